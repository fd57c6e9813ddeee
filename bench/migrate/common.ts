/**
 * bench/migrate, shared part: one scenario, any migration method, the same measurements.
 *
 * A scenario is the Linux fixture guest (self-checking memory workload + raw disk workload on
 * /dev/vda, disk pre-filled with random data) running on host A of a NetnsPair, moved to host B
 * over a veth shaped to --link-mbit (both directions: a symmetric home link). The method is a
 * `MigrationMethod`:
 *
 *   startSource(ctx)         starts the guest on A (ctx.guest says what to run), returns its console
 *   migrate(ctx, src, leg)   moves it leg.from → leg.to (A→B; with --return-trip 1 then B→A);
 *                            resolves once the guest RUNS there, with its console there
 *   (cleanup)                nothing: the harness kills every process left in either namespace
 *                            and removes the run's directory, whatever happened
 *
 * and `runScenario` measures each leg identically for every method:
 *   total_s      wall time of migrate() (the method's first step to the guest running on B)
 *   pause_ms     the guest's own view of its freeze. Its CLOCK_MONOTONIC stops while QEMU is
 *                stopped, so (arrival wall time − printed uptime) of its status lines jumps by
 *                exactly the pause. A line prints after the loop iteration that read the uptime,
 *                so each line carries a print latency (long when the vCPU is saturated); the
 *                estimate takes the least-delayed line on each side: min over B's lines minus
 *                min over A's last 10 s of lines. pause_adjacent_ms is the simpler estimate from
 *                the reference relay (last A line, first B line), which counts both lines' latency.
 *   freeze_ms    host-side, when the method reports it: source STOP → destination RESUME (QMP stamps)
 *   link bytes   veth tx counters of the leg's two ends before and after migrate() (all traffic)
 *   verdict      after --watch-s on B: errors=0, disk_errors=0, no VMSNAP-ERROR line, gen went on,
 *                and (when the method exposes B's raw image) every pre-written data extent equal
 *
 * Status lines come every 200 ms of guest time (`fixtures/guest/README.md`); the consoles are read
 * with their arrival time stamped (a unix-socket console as bytes arrive; a file console by polling
 * every 10 ms, for methods whose QEMU writes its serial to a log file).
 */
import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, promises as fsp } from 'node:fs';
import * as net from 'node:net';
import { loadavg } from 'node:os';
import * as path from 'node:path';
import { guestArtifacts, parseErrorLines, parseStatusLines, type GuestStatus } from '../../fixtures/guest/index.js';
import { NetnsPair, type Side } from '../../test/helpers/netns.js';
import { benchRoot, fmt, table } from '../common/measure.js';

export const GiB = 1 << 30;
export const MiB = 1 << 20;
/** Where the pre-written random data starts on the disk: past the guest's 16 MiB workload area. */
const DATA_START = 32 * MiB;
const DATA_CHUNK = 1 * MiB;

export interface ScenarioParams {
  /** Guest RAM. */
  memMiB: number;
  /** Guest memory workload area (`vmsnap.mem`). */
  workloadMiB: number;
  /** Pages (4 KiB) the guest rewrites per second (`vmsnap.rate`). */
  rate: number;
  /**
   * One full verify sweep of the workload area per this period (`vmsnap.sweep_ms`). Longer than
   * the guest's 1 s default: under TCG a 256 MiB sweep per second saturates the vCPU, and a
   * saturated guest prints its status lines late (see the pause estimator).
   */
  sweepMs: number;
  /** Disk records (4 KiB, O_DIRECT) the guest writes per second (`vmsnap.disk_rate`). */
  diskRate: number;
  diskGiB: number;
  /** Random data pre-written on the disk (spread over it in 1 MiB extents). */
  dataGiB: number;
  /** Link rate, both directions (tc tbf on each sender side); 0 = unshaped veth. */
  linkMbit: number;
  /** Seconds the guest runs on A (after its first status lines) before the move. */
  warmS: number;
  /** Seconds the guest is watched on B after the move. */
  watchS: number;
  /** A method gives up (and must leave the guest running on its source) after this many seconds. */
  timeoutS: number;
  /** 1: after the watch on B, move the guest back to A (the evening trip home) and measure that too. */
  returnTrip: number;
}

export const DEFAULT_PARAMS: ScenarioParams = {
  memMiB: 1024,
  workloadMiB: 256,
  rate: 12800,
  sweepMs: 4000,
  diskRate: 100,
  diskGiB: 4,
  dataGiB: 1,
  linkMbit: 1000,
  warmS: 5,
  watchS: 6,
  timeoutS: 300,
  returnTrip: 0,
};

export class BenchUsageError extends Error {
  override readonly name = 'BenchUsageError';
}

/** The ScenarioParams flags (`--mem-mib 1024 --rate 12800 …`) plus `--runs`; unknown flags are errors. */
export function parseScenarioArgs(argv: readonly string[], extra: Record<string, string> = {}): { params: ScenarioParams; runs: number; extra: Record<string, string> } {
  const flags: Record<string, keyof ScenarioParams> = {
    '--mem-mib': 'memMiB', '--workload-mib': 'workloadMiB', '--rate': 'rate', '--sweep-ms': 'sweepMs', '--disk-rate': 'diskRate',
    '--disk-gib': 'diskGiB', '--data-gib': 'dataGiB', '--link-mbit': 'linkMbit', '--warm-s': 'warmS',
    '--watch-s': 'watchS', '--timeout-s': 'timeoutS', '--return-trip': 'returnTrip',
  };
  const params = { ...DEFAULT_PARAMS };
  const ex = { ...extra };
  let runs = 1;
  for (let i = 0; i < argv.length; i += 2) {
    const k = argv[i]!;
    const v = argv[i + 1];
    if (v === undefined) throw new BenchUsageError(`${k} needs a value`);
    if (k in ex) {
      ex[k] = v;
      continue;
    }
    const n = Number(v);
    if (!Number.isFinite(n) || n < 0) throw new BenchUsageError(`${k} wants a number >= 0, got ${JSON.stringify(v)}`);
    if (k === '--runs') runs = Math.max(1, Math.floor(n));
    else if (flags[k]) params[flags[k]] = n;
    else throw new BenchUsageError(`unknown option ${k} (known: --runs ${[...Object.keys(flags), ...Object.keys(ex)].join(' ')})`);
  }
  if (params.dataGiB * GiB + DATA_START > params.diskGiB * GiB) throw new BenchUsageError(`--data-gib ${params.dataGiB} does not fit a ${params.diskGiB} GiB disk`);
  if (params.watchS * 1000 < params.sweepMs + 1000) throw new BenchUsageError(`--watch-s ${params.watchS} is too short for one verify sweep on B (--sweep-ms ${params.sweepMs}): use at least ${Math.ceil(params.sweepMs / 1000) + 1}`);
  if (params.workloadMiB + 64 > params.memMiB) throw new BenchUsageError(`--workload-mib ${params.workloadMiB} needs --mem-mib of at least ${params.workloadMiB + 64}`);
  return { params, runs, extra: ex };
}

// ---------------------------------------------------------------------------------------- console

export interface TimedStatus extends GuestStatus {
  /** performance.now() when the line arrived. */
  at: number;
}

/** A guest serial console read as timestamped lines (a unix socket QEMU serves, or a log file). */
export class Console {
  private text = '';
  private readonly stamps: Array<{ at: number; end: number }> = [];
  private closer: () => void = () => undefined;

  /** Connects to QEMU's `-chardev socket,server=on,wait=off` (retrying until it exists). */
  static async socket(file: string, timeoutMs = 30_000): Promise<Console> {
    const c = new Console();
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      try {
        const sock = await new Promise<net.Socket>((resolve, reject) => {
          const s = net.connect(file, () => resolve(s));
          s.once('error', reject);
        });
        sock.on('data', (b: Buffer) => c.push(b.toString('latin1')));
        sock.on('error', () => undefined);
        c.closer = () => sock.destroy();
        return c;
      } catch (e) {
        if (Date.now() > deadline) throw new Error(`console ${file}: ${(e as Error).message}`);
        await sleep(20);
      }
    }
  }

  /** Follows a serial log file from `fromByte` on, polling every 10 ms (the stamps' resolution). */
  static file(file: string, fromByte = 0): Console {
    const c = new Console();
    let pos = fromByte;
    let busy = false;
    const timer = setInterval(() => {
      if (busy) return;
      busy = true;
      void (async () => {
        try {
          const fh = await fsp.open(file, 'r');
          try {
            const buf = Buffer.alloc(1 << 16);
            for (;;) {
              const { bytesRead } = await fh.read(buf, 0, buf.length, pos);
              if (!bytesRead) break;
              pos += bytesRead;
              c.push(buf.subarray(0, bytesRead).toString('latin1'));
            }
          } finally {
            await fh.close();
          }
        } catch {
          /* not there yet */
        } finally {
          busy = false;
        }
      })();
    }, 10);
    c.closer = () => clearInterval(timer);
    return c;
  }

  private push(s: string): void {
    this.text += s;
    this.stamps.push({ at: performance.now(), end: this.text.length });
  }

  /** Arrival time of the byte at `offset`. */
  private arrival(offset: number): number {
    for (const s of this.stamps) if (s.end > offset) return s.at;
    return performance.now();
  }

  statuses(): TimedStatus[] {
    const out: TimedStatus[] = [];
    const re = /VMSNAP-STATUS [^\r\n]*\r?\n/g;
    for (const m of this.text.matchAll(re)) {
      const st = parseStatusLines(m[0])[0];
      if (st) out.push({ ...st, at: this.arrival((m.index ?? 0) + m[0].length - 1) });
    }
    return out;
  }

  errorLines(): string[] {
    return parseErrorLines(this.text).map((e) => e.detail);
  }

  /** Everything read so far. */
  get content(): string {
    return this.text;
  }

  tail(n = 5): string {
    return this.text.split('\n').slice(-n).join('\n');
  }

  async waitStatuses(n: number, timeoutMs: number, what: string): Promise<TimedStatus[]> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const st = this.statuses();
      if (st.length >= n) return st;
      if (Date.now() > deadline) throw new Error(`${what}: ${st.length} of ${n} status lines after ${timeoutMs} ms; console tail:\n${this.tail()}`);
      await sleep(50);
    }
  }

  close(): void {
    this.closer();
  }
}

export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

// ------------------------------------------------------------------------------------------- disk

/**
 * A raw disk of `diskGiB` with `dataGiB` of random data in 1 MiB extents spread evenly from 32 MiB
 * on (the guest's disk workload uses the first 16 MiB). Built once per size under the bench root
 * and copied (sparse) for each run: generating a GiB of random data costs more than copying it.
 */
/** Offsets of the 1 MiB random-data extents on a scenario's source disk. */
function dataExtents(p: ScenarioParams): number[] {
  const chunks = Math.round((p.dataGiB * GiB) / DATA_CHUNK);
  const stride = chunks ? Math.floor((p.diskGiB * GiB - DATA_START) / chunks / DATA_CHUNK) * DATA_CHUNK : 0;
  return Array.from({ length: chunks }, (_, i) => DATA_START + i * stride);
}

/**
 * Compares the pre-written data extents (which the guest never writes) of two raw images; returns
 * how many differ. The guest checks only its own workload records, so this is what shows that the
 * rest of the disk arrived.
 */
export async function compareDataExtents(p: ScenarioParams, a: string, b: string): Promise<number> {
  const [fa, fb] = [await fsp.open(a, 'r'), await fsp.open(b, 'r')];
  try {
    const [x, y] = [Buffer.alloc(DATA_CHUNK), Buffer.alloc(DATA_CHUNK)];
    let bad = 0;
    for (const off of dataExtents(p)) {
      await fa.read(x, 0, DATA_CHUNK, off);
      await fb.read(y, 0, DATA_CHUNK, off);
      if (!x.equals(y)) bad++;
    }
    return bad;
  } finally {
    await fa.close();
    await fb.close();
  }
}

export async function sourceDisk(p: ScenarioParams, dest: string): Promise<void> {
  const dir = path.join(benchRoot(), 'migrate-templates');
  await fsp.mkdir(dir, { recursive: true });
  const tpl = path.join(dir, `disk-${p.diskGiB}g-data-${p.dataGiB}g.raw`);
  if (!existsSync(tpl)) {
    const tmp = `${tpl}.${process.pid}.tmp`;
    const fh = await fsp.open(tmp, 'w');
    try {
      await fh.truncate(p.diskGiB * GiB);
      for (const off of dataExtents(p)) await fh.write(randomBytes(DATA_CHUNK), 0, DATA_CHUNK, off);
      await fh.sync();
    } finally {
      await fh.close();
    }
    await fsp.rename(tmp, tpl);
  }
  const r = spawnSync('cp', ['--sparse=always', '--reflink=auto', tpl, dest]);
  if (r.status !== 0) throw new Error(`cp ${tpl}: ${r.stderr.toString()}`);
}

/** A blank (sparse) raw disk of the scenario's size: a destination's mirror target. */
export async function blankDisk(p: ScenarioParams, dest: string): Promise<void> {
  const fh = await fsp.open(dest, 'w');
  await fh.truncate(p.diskGiB * GiB);
  await fh.close();
}

// ------------------------------------------------------------------------------------------- qemu

/** What the source guest is: the same for every method. */
export interface GuestSpec {
  kernel: string;
  initrd: string;
  /** Kernel command line (console, workload parameters). */
  append: string;
  memMiB: number;
  /** The source disk image (raw), already filled. */
  disk: string;
}

export function guestSpec(p: ScenarioParams, disk: string): GuestSpec {
  const a = guestArtifacts();
  const append = ['console=ttyS0', 'quiet', `vmsnap.mem=${p.workloadMiB}`, `vmsnap.rate=${p.rate}`, `vmsnap.sweep_ms=${p.sweepMs}`, 'vmsnap.disk=/dev/vda', `vmsnap.disk_rate=${p.diskRate}`].join(' ');
  return { kernel: a.kernel, initrd: a.initrd, append, memMiB: p.memMiB, disk };
}

export interface QemuSockets {
  qmp: string;
  serial: string;
}

/**
 * The QEMU command line of the fixture guest with its disk as node `disk0` (file → raw), serial on
 * a unix socket and QMP on another; `extra` is appended (e.g. `-incoming defer -S`).
 */
export function qemuArgv(g: GuestSpec, disk: string, s: QemuSockets, extra: readonly string[] = []): string[] {
  return [
    '-accel', 'tcg', '-machine', 'pc', '-m', String(g.memMiB), '-nodefaults', '-no-user-config', '-display', 'none',
    '-kernel', g.kernel, '-initrd', g.initrd, '-append', g.append,
    '-chardev', `socket,id=s0,path=${s.serial},server=on,wait=off`, '-serial', 'chardev:s0',
    '-qmp', `unix:${s.qmp},server=on,wait=off`,
    '-blockdev', JSON.stringify({ driver: 'raw', 'node-name': 'disk0', file: { driver: 'file', filename: disk } }),
    '-device', 'virtio-blk-pci,drive=disk0,id=vda',
    ...extra,
  ];
}

// ------------------------------------------------------------------------------------- scenario

export interface ScenarioContext {
  pair: NetnsPair;
  params: ScenarioParams;
  /** This run's scratch directory (removed after the run). */
  dir: string;
  guest: GuestSpec;
}

export interface SourceGuest {
  console: Console;
}

/** One move: leg 0 is A→B; with --return-trip 1, leg 1 brings the guest back B→A. */
export interface Leg {
  index: number;
  from: Side;
  to: Side;
}

export interface MigrationOutcome {
  /** The guest as it now runs on `leg.to`: its console, and the handle a next leg starts from. */
  guest: SourceGuest;
  /**
   * Host-side freeze, where the method can see it: from the source QEMU's last STOP event to the
   * destination's RESUME (QMP event timestamps, host wall clock). Independent of the guest's load,
   * unlike the pause read from its console.
   */
  freezeMs?: number;
  /** QEMU's own figures, where the method has them. */
  qemu?: { downtimeMs?: number; totalMs?: number; setupMs?: number; ramTransferred?: number; dirtySyncs?: number; mbps?: number };
  /** Anything else the method wants in its RESULT line. */
  details?: Record<string, unknown>;
  /**
   * The destination's disk as a raw image readable once its QEMU is gone (when the method has one):
   * the harness then compares the pre-written data with the source's (`diskDataMismatches`).
   */
  destinationDisk?: string;
}

export interface MigrationMethod {
  name: string;
  /** Starts the guest on A. */
  startSource(ctx: ScenarioContext): Promise<SourceGuest>;
  /** Resolves once the guest runs on `leg.to`; throws (guest still on `leg.from`) when it cannot. */
  migrate(ctx: ScenarioContext, src: SourceGuest, leg: Leg): Promise<MigrationOutcome>;
  /**
   * Untimed, after the leg was checked: waits for work the method still does on the source once
   * the guest runs on the destination (vmsnap: the departure snapshot, the VM's removal), so the
   * next leg starts from a settled source; returns figures to add to the leg's details.
   */
  settle?(ctx: ScenarioContext, leg: Leg, migrateReturnedAt: number): Promise<Record<string, unknown>>;
}

export interface ScenarioResult {
  method: string;
  run: number;
  /** "A→B", or "B→A" for the return trip. */
  leg: string;
  ok: boolean;
  error?: string;
  params: ScenarioParams;
  totalS: number;
  pauseMs: number;
  pauseAdjacentMs: number;
  freezeMs: number | null;
  qemuDowntimeMs: number | null;
  /** Bytes the leg's source end sent (its veth tx), and what came back. */
  linkBytesSent: number;
  linkBytesBack: number;
  genSrcLast: number | null;
  genDstFirst: number | null;
  dstErrors: number | null;
  dstDiskErrors: number | null;
  /** Pre-written 1 MiB data extents that differ on the destination (null: no raw image exposed). */
  diskDataMismatches: number | null;
  errorLines: string[];
  /** Page rewrites per guest second on the source over the 5 s before the move (TCG may fall short of --rate). */
  guestPagesPerS: number | null;
  loadavg1: number;
  timeline?: { srcLast: number[][]; dstFirst: number[][]; migrateReturnedMs: number };
  details?: Record<string, unknown>;
  qemu?: MigrationOutcome['qemu'];
  /** Where the consoles were saved. */
  consoleLogs?: string;
}

const HOST: Record<Side, string> = { a: 'A', b: 'B' };

/** Runs in progress, torn down by a SIGINT/SIGTERM (Ctrl-C during a long bench). */
const active = new Map<string, { pair?: NetnsPair }>();
let signalsHooked = false;
function hookSignals(): void {
  if (signalsHooked) return;
  signalsHooked = true;
  for (const sig of ['SIGINT', 'SIGTERM'] as const) {
    process.once(sig, () => {
      console.error(`${sig}: removing ${active.size} run(s) in progress`);
      void Promise.allSettled([...active].map(async ([dir, r]) => {
        await r.pair?.destroy();
        await fsp.rm(dir, { recursive: true, force: true });
      })).then(() => process.exit(130));
    });
  }
}

/** Moves the guest once and measures the move; throws (after filling what it could) when the move or the guest's check fails. */
async function runLeg(method: MigrationMethod, ctx: ScenarioContext, src: SourceGuest, leg: Leg, res: ScenarioResult): Promise<MigrationOutcome> {
  const { pair, params } = ctx;
  const pre = src.console.statuses();
  const lastPre = pre[pre.length - 1];
  const win = pre.filter((x) => lastPre && x.uptimeMs >= lastPre.uptimeMs - 5000);
  const [w0, w1] = [win[0], win[win.length - 1]];
  if (w0 && w1 && w1.uptimeMs > w0.uptimeMs) res.guestPagesPerS = Math.round(((w1.gen - w0.gen) * 1000) / (w1.uptimeMs - w0.uptimeMs));
  const before = { from: await pair.counters(leg.from), to: await pair.counters(leg.to) };
  const t0 = performance.now();
  const out = await method.migrate(ctx, src, leg);
  res.totalS = (performance.now() - t0) / 1000;
  const after = { from: await pair.counters(leg.from), to: await pair.counters(leg.to) };
  res.linkBytesSent = after.from.txBytes - before.from.txBytes;
  res.linkBytesBack = after.to.txBytes - before.to.txBytes;
  res.qemu = out.qemu;
  res.qemuDowntimeMs = out.qemu?.downtimeMs ?? null;
  res.freezeMs = out.freezeMs ?? null;
  res.details = out.details;
  const dst = out.guest.console;
  await dst.waitStatuses(1, 60_000, `guest on ${HOST[leg.to]}`);
  await sleep(params.watchS * 1000);
  const s = src.console.statuses();
  const d = dst.statuses();
  const lastSrc = s[s.length - 1];
  const firstDst = d[0];
  const lastDst = d[d.length - 1];
  if (!lastSrc || !firstDst || !lastDst) throw new Error('no status lines to compare');
  res.pauseAdjacentMs = Math.round(firstDst.at - lastSrc.at - (firstDst.uptimeMs - lastSrc.uptimeMs));
  const offset = (xs: TimedStatus[]) => Math.min(...xs.map((x) => x.at - x.uptimeMs));
  res.pauseMs = Math.round(offset(d) - offset(s.filter((x) => x.uptimeMs >= lastSrc.uptimeMs - 10_000)));
  // [ms since migrate() began, guest uptime ms, gen] around the switch: where a pause came from.
  const line = (x: TimedStatus) => [Math.round(x.at - t0), x.uptimeMs, x.gen];
  res.timeline = { srcLast: s.slice(-3).map(line), dstFirst: d.slice(0, 5).map(line), migrateReturnedMs: Math.round(res.totalS * 1000) };
  res.genSrcLast = lastSrc.gen;
  res.genDstFirst = firstDst.gen;
  res.dstErrors = lastDst.errors;
  res.dstDiskErrors = lastDst.diskErrors;
  res.errorLines = [...src.console.errorLines(), ...dst.errorLines()].slice(0, 10);
  const problems: string[] = [];
  const to = HOST[leg.to];
  if (lastDst.errors !== 0) problems.push(`errors=${lastDst.errors} on ${to}`);
  if (lastDst.diskErrors !== 0) problems.push(`disk_errors=${lastDst.diskErrors} on ${to}`);
  if (res.errorLines.length) problems.push(`VMSNAP-ERROR lines: ${res.errorLines.join(' | ')}`);
  if (firstDst.gen < lastSrc.gen) problems.push(`generation went back: ${lastSrc.gen} last on ${HOST[leg.from]}, ${firstDst.gen} first on ${to}`);
  if (lastDst.gen <= firstDst.gen && params.rate > 0) problems.push(`the workload did not go on on ${to}`);
  // A saturated guest prints late, so only ask that the destination said something more than once.
  if (d.length < 3) problems.push(`only ${d.length} status lines on ${to} in ${params.watchS} s`);
  if (problems.length) throw new Error(problems.join('; '));
  if (method.settle) res.details = { ...(res.details ?? {}), ...(await method.settle(ctx, leg, t0 + res.totalS * 1000)) };
  res.ok = true;
  return out;
}

/**
 * One run of `method` on a fresh pair of hosts: start the guest on A, let it warm up, move it to B
 * and watch it there (and with --return-trip 1, move it back and watch it on A), measuring each
 * move. Whatever happens, every process in either namespace is killed and the run's directory
 * removed before this returns. A failed move is a result with ok=false and the error; a return
 * trip is only tried after a good first move.
 */
export async function runScenario(method: MigrationMethod, params: ScenarioParams, run: number): Promise<ScenarioResult[]> {
  const root = path.join(benchRoot(), 'migrate');
  await fsp.mkdir(root, { recursive: true });
  const dir = await fsp.mkdtemp(path.join(root, `${method.name}-`));
  const legs: Leg[] = [{ index: 0, from: 'a', to: 'b' }, ...(params.returnTrip ? [{ index: 1, from: 'b' as const, to: 'a' as const }] : [])];
  const results: ScenarioResult[] = legs.map((l) => ({
    method: method.name, run, leg: `${HOST[l.from]}→${HOST[l.to]}`, ok: false, params, totalS: NaN, pauseMs: NaN, pauseAdjacentMs: NaN,
    freezeMs: null, qemuDowntimeMs: null, linkBytesSent: NaN, linkBytesBack: NaN, genSrcLast: null, genDstFirst: null, dstErrors: null,
    dstDiskErrors: null, diskDataMismatches: null, errorLines: [], guestPagesPerS: null, loadavg1: NaN,
  }));
  let pair: NetnsPair | undefined;
  const disks: Array<string | undefined> = [];
  const srcDisk = path.join(dir, 'source.raw');
  const consoles: Console[] = [];
  let leg = 0;
  const live: { pair?: NetnsPair } = {};
  hookSignals();
  active.set(dir, live);
  try {
    const shape = params.linkMbit > 0 ? { a: { rateMbit: params.linkMbit }, b: { rateMbit: params.linkMbit } } : {};
    pair = live.pair = await NetnsPair.create({ shape });
    await sourceDisk(params, srcDisk);
    const ctx: ScenarioContext = { pair, params, dir, guest: guestSpec(params, srcDisk) };
    let guest = await method.startSource(ctx);
    consoles.push(guest.console);
    // Stamping a large workload area takes a while under TCG before the first status line.
    await guest.console.waitStatuses(3, 180_000, 'guest boot on A');
    await sleep(params.warmS * 1000);
    for (; leg < legs.length; leg++) {
      results[leg]!.loadavg1 = loadavg()[0] ?? NaN;
      const out = await runLeg(method, ctx, guest, legs[leg]!, results[leg]!);
      disks[leg] = out.destinationDisk;
      guest = out.guest;
      consoles.push(guest.console);
    }
  } catch (e) {
    const r = results[leg];
    if (r) r.error = (e as Error).message;
  } finally {
    // The consoles outlive the run directory, for looking into a surprising figure afterwards.
    const logs = path.join(root, 'consoles');
    await fsp.mkdir(logs, { recursive: true });
    for (const [i, c] of consoles.entries()) {
      c.close();
      await fsp.writeFile(path.join(logs, `${path.basename(dir)}-${i}-${i % 2 ? 'B' : 'A'}.txt`), c.content);
    }
    for (const r of results) r.consoleLogs = path.join(logs, `${path.basename(dir)}-*.txt`);
    // Kills every QEMU (and anything else) still inside either namespace, by pid.
    if (pair) await pair.destroy().catch((e: Error) => (results[0]!.error = `${results[0]!.error ?? ''}; cleanup: ${e.message}`));
    for (const [i, d] of disks.entries()) {
      const r = results[i]!;
      if (!d) continue;
      r.diskDataMismatches = await compareDataExtents(params, srcDisk, d).catch(() => null);
      if (r.diskDataMismatches !== 0) {
        r.ok = false;
        r.error = `${r.error ? `${r.error}; ` : ''}${r.diskDataMismatches ?? 'unreadable'} data extents differ after the move`;
      }
    }
    await fsp.rm(dir, { recursive: true, force: true });
    active.delete(dir);
  }
  return results;
}

/**
 * Runs each method `runs` times, interleaved (run 0 of every method, then run 1, …) so that all of
 * them see the same machine state; prints one `RESULT {json}` line per run and a table at the end.
 * To compare a new method with QEMU's: `runBench([nativeMethod('proxmox'), myMethod], params, 3)`.
 */
export async function runBench(methods: readonly MigrationMethod[], params: ScenarioParams, runs: number): Promise<ScenarioResult[]> {
  console.log(`# ${methods.map((m) => m.name).join(', ')}: ${JSON.stringify(params)}`);
  console.log(`# guest dirties ${fmt((params.rate * 4096) / 1e6)} MB/s of RAM; link ${params.linkMbit ? `${params.linkMbit} Mbit/s = ${fmt((params.linkMbit * 1e6) / 8 / 1e6)} MB/s` : 'unshaped'}`);
  const results: ScenarioResult[] = [];
  for (let i = 0; i < runs; i++) {
    for (const m of methods) {
      for (const r of await runScenario(m, params, i)) {
        results.push(r);
        console.log(`RESULT ${JSON.stringify(r)}`);
      }
    }
  }
  console.log(resultTable(results));
  return results;
}

export function resultTable(rs: readonly ScenarioResult[]): string {
  return table(
    ['method', 'run', 'leg', 'link Mbit', 'guest pages/s', 'ok', 'total s', 'pause ms (guest)', 'pause ms (adjacent)', 'freeze ms (QMP)', 'downtime ms (QEMU)', 'MB sent', 'MB back', 'error'],
    rs.map((r) => [
      r.method, String(r.run), r.leg, String(r.params.linkMbit), r.guestPagesPerS === null ? '–' : String(r.guestPagesPerS), r.ok ? 'yes' : 'NO', fmt(r.totalS, 2), fmt(r.pauseMs, 0), fmt(r.pauseAdjacentMs, 0), r.freezeMs === null ? '–' : String(r.freezeMs),
      r.qemuDowntimeMs === null ? '–' : String(r.qemuDowntimeMs), fmt(r.linkBytesSent / 1e6, 1), fmt(r.linkBytesBack / 1e6, 1),
      (r.error ?? '').slice(0, 80),
    ]),
  );
}
