/**
 * bench/take: guest pause of `vmsnap take` against QEMU's own `savevm` (internal snapshot into a
 * qcow2), on the same fixture guest in the same run, and the stored bytes of each incremental
 * snapshot against the bytes the guest's workload changed between the two snapshot points.
 *
 *   npx tsx bench/take/run.ts [--memory-mib 1024] [--area-mib 768] [--rate 12800] [--takes 7]
 *                             [--savevms 3] [--gap-s 4] [--out FILE]
 *
 * The guest is the Linux fixture (fixtures/guest) under TCG with a disk workload on /dev/vda; its
 * memory workload rewrites `rate` pages/s (12800 pages/s × 4 KiB ≈ 50 MiB/s) in an area of
 * `area-mib` MiB. Both tools get the same kernel, initrd, command line, memory, machine type and
 * vCPU count; vmsnap's disk is its own NBD-served volume, savevm's a qcow2 (savevm needs one).
 *
 * Take 1 is the first take after `vm start` (reported apart from the steady state, takes 2..N).
 * The pause is measured three ways, the same way for both tools:
 *   qmp    QEMU's STOP → RESUME event timestamps (QEMU stamps events when it emits them). For the
 *          vmsnap VM the bench adds a second, listen-only QMP monitor (--qemu-arg), because the
 *          supervisor owns the first one.
 *   tool   vmsnap's own `pauseMs` (QEMU's STOP→RESUME timestamps as the supervisor saw them, or stop
 *          sent → cont replied when vmsnap paused the guest itself) / the wall time of the HMP `savevm`.
 *   guest  the time the guest's own clock lost: under TCG the guest's clocks (TSC, HPET, PIT) run
 *          on QEMU's virtual clock, which stands still while the VM is stopped. Each status line
 *          carries the guest's CLOCK_MONOTONIC; host arrival time minus guest uptime is constant
 *          while the guest runs and grows by exactly the pause. The minimum of that offset over
 *          the lines of a window before and of a window after the operation removes the
 *          (positive) delivery delay; their difference is the pause the guest experienced.
 *          Checked in the same run against a known pause (QMP stop, 300 ms, cont) and against an
 *          idle pair of windows (no operation: ≈ 0).
 */
import type { TakeResult } from '../../src/vm/runtime.js';
import { closeSync, existsSync, openSync, readSync, fstatSync, promises as fsp } from 'node:fs';
import { loadavg } from 'node:os';
import * as path from 'node:path';
import { benchRoot, check, freshDir, fmt, median, table, MiB } from '../common/measure.js';
import { REPO_ROOT, vmCli } from '../common/vmsnap-cli.js';
import { guestArtifacts, parseErrorLines, parseStatusLines } from '../../fixtures/guest/index.js';
import { launchQemu, type QemuProcess } from '../../src/hypervisor/qemu.js';
import { QmpClient } from '../../src/hypervisor/qmp.js';
import { EventLog, eventMonitorArgs } from './qmp-events.js';

// ------------------------------------------------------------------ options

interface Options {
  memoryMiB: number;
  areaMiB: number;
  rate: number;
  takes: number;
  savevms: number;
  gapS: number;
  out: string | undefined;
}

function parseArgs(argv: readonly string[]): Options {
  const o: Options = { memoryMiB: 1024, areaMiB: NaN, rate: 12800, takes: 7, savevms: 3, gapS: 4, out: undefined };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    const v = argv[i + 1];
    const num = (): number => {
      const n = Number(v);
      if (v === undefined || !Number.isFinite(n) || n < 0) throw new Error(`${a} needs a number`);
      i++;
      return n;
    };
    if (a === '--memory-mib') o.memoryMiB = num();
    else if (a === '--area-mib') o.areaMiB = num();
    else if (a === '--rate') o.rate = num();
    else if (a === '--takes') o.takes = num();
    else if (a === '--savevms') o.savevms = num();
    else if (a === '--gap-s') o.gapS = num();
    else if (a === '--out') {
      if (v === undefined) throw new Error('--out needs a file');
      o.out = v;
      i++;
    } else throw new Error(`unknown argument ${a}`);
  }
  // The fixture forks its disk writer after stamping the area, so every page the memory workload
  // rewrites is copied (COW): the area needs 2× its size. 3/8 of RAM leaves room for the kernel.
  if (!Number.isFinite(o.areaMiB)) o.areaMiB = Math.floor((o.memoryMiB * 3) / 8);
  return o;
}

const PAGE = 4096;
/** Fixture default disk workload: 100 records/s of 4 KiB in a 16 MiB wrapping area. */
const DISK_AREA_SLOTS = (16 * MiB) / PAGE - 1;
const STATUS_MS = 50;
/** Status lines a window needs for the guest-clock measure (a 4 s window holds ~75). */
const MIN_WINDOW_LINES = 20;

// ------------------------------------------------------------------ guest console, timestamped on arrival

interface StampedStatus {
  /** Host monotonic ms (performance.now()) at which the line was seen in the serial log. */
  host: number;
  gen: number;
  uptimeMs: number;
  diskSeq: number;
  errors: number;
  diskErrors: number;
}

/** Polls a serial log file every ms and timestamps each complete status line when it appears. */
class SerialTail {
  readonly lines: StampedStatus[] = [];
  private fd: number | null = null;
  private pos = 0;
  private partial = '';
  private timer: NodeJS.Timeout;
  text = '';

  constructor(private readonly file: string) {
    this.timer = setInterval(() => this.poll(), 1);
  }

  private poll(): void {
    if (this.fd === null) {
      if (!existsSync(this.file)) return;
      this.fd = openSync(this.file, 'r');
    }
    const size = fstatSync(this.fd).size;
    if (size <= this.pos) return;
    const buf = Buffer.alloc(size - this.pos);
    const n = readSync(this.fd, buf, 0, buf.length, this.pos);
    this.pos += n;
    const now = performance.now();
    const s = this.partial + buf.subarray(0, n).toString('latin1');
    const nl = s.lastIndexOf('\n');
    if (nl < 0) {
      this.partial = s;
      return;
    }
    const complete = s.slice(0, nl + 1);
    this.partial = s.slice(nl + 1);
    if (this.text.length < 1 << 20) this.text += complete.replace(/VMSNAP-STATUS[^\n]*\n/g, '');
    for (const st of parseStatusLines(complete)) this.lines.push({ host: now, ...st });
  }

  async waitFor(pred: (l: StampedStatus) => boolean, timeoutMs: number, what: string): Promise<StampedStatus> {
    const deadline = performance.now() + timeoutMs;
    let seen = 0;
    for (;;) {
      for (; seen < this.lines.length; seen++) if (pred(this.lines[seen]!)) return this.lines[seen]!;
      if (performance.now() > deadline) throw new Error(`guest: no ${what} within ${timeoutMs} ms; console:\n${this.text.slice(-2000)}`);
      await sleep(20);
    }
  }

  last(): StampedStatus | undefined {
    return this.lines[this.lines.length - 1];
  }

  close(): void {
    clearInterval(this.timer);
    if (this.fd !== null) closeSync(this.fd);
  }
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** min over the window of (host arrival − guest uptime): the guest-clock offset plus the smallest delivery delay. */
function minOffset(lines: readonly StampedStatus[], from: number, to: number): { offset: number; n: number } {
  let offset = Infinity;
  let n = 0;
  for (const l of lines) {
    if (l.host < from || l.host > to) continue;
    n++;
    offset = Math.min(offset, l.host - l.uptimeMs);
  }
  return { offset, n };
}

/** The status line seen last at or before host time `t` (the guest's state then). */
function statusAt(lines: readonly StampedStatus[], t: number): StampedStatus {
  let best: StampedStatus | undefined;
  for (const l of lines) if (l.host <= t) best = l;
  if (!best) throw new Error(`no guest status line before t=${t.toFixed(0)}`);
  return best;
}

/**
 * Waits until the console runs steadily (a full window of status lines: right after boot the
 * lines come in bursts, which would make the first guest-clock figure meaningless), then `gapS`.
 */
async function warmUp(tail: SerialTail, gapS: number, log: (s: string) => void, who: string): Promise<number> {
  const t0 = performance.now();
  for (;;) {
    const now = performance.now();
    if (minOffset(tail.lines, now - 4000, now).n >= (4000 / STATUS_MS) * 0.8 || now - t0 > 120_000) break;
    await sleep(250);
  }
  log(`${who} guest: console steady after ${fmt((performance.now() - t0) / 1000, 1)} s`);
  const warm0 = performance.now();
  await sleep(gapS * 1000);
  return warm0;
}

/** Guest-measured pause of an operation between host times `opStart` and `opEnd`. */
function guestPause(tail: SerialTail, opStart: number, opEnd: number, windowMs: number): { pauseMs: number; before: number; after: number } {
  const b = minOffset(tail.lines, opStart - windowMs, opStart);
  const a = minOffset(tail.lines, opEnd, opEnd + windowMs);
  // Too few lines (console output held up) make the minimum meaningless: no figure.
  const enough = b.n >= MIN_WINDOW_LINES && a.n >= MIN_WINDOW_LINES;
  return { pauseMs: enough ? a.offset - b.offset : NaN, before: b.n, after: a.n };
}

/** Errors the guest reported: its counters, or its VMSNAP-ERROR lines (e.g. the workload died). */
function guestErrors(tail: SerialTail): string {
  const last = tail.last();
  const lines = parseErrorLines(tail.text);
  const counted = (last?.errors ?? 0) + (last?.diskErrors ?? 0);
  return lines.length ? `${Math.max(counted, lines.length)} (${lines.map((l) => l.detail).slice(0, 3).join('; ')})` : String(counted);
}

function assertWorkloadAlive(tail: SerialTail): void {
  const dead = parseErrorLines(tail.text).find((l) => l.area === 'workload');
  if (dead) throw new Error(`the guest workload stopped (${dead.detail}); console:\n${tail.text.slice(-1500)}`);
}

// ------------------------------------------------------------------ statistics

const min = (xs: readonly number[]): number => Math.min(...xs.filter((x) => Number.isFinite(x)));
const max = (xs: readonly number[]): number => Math.max(...xs.filter((x) => Number.isFinite(x)));

/** Rewrite rate the guest achieved over [from, to] host ms, in pages per second of host and of guest time. */
function achievedRate(lines: readonly StampedStatus[], from: number, to: number): { hostRate: number; guestRate: number } {
  const w = lines.filter((l) => l.host >= from && l.host <= to);
  if (w.length < 2) return { hostRate: NaN, guestRate: NaN };
  const a = w[0]!;
  const b = w[w.length - 1]!;
  return { hostRate: ((b.gen - a.gen) * 1000) / (b.host - a.host), guestRate: ((b.gen - a.gen) * 1000) / (b.uptimeMs - a.uptimeMs) };
}

// ------------------------------------------------------------------ vmsnap side

/** `take --json` prints the TakeResult of src/vm/runtime.ts. */
type TakeJson = TakeResult;

interface TakeRow {
  i: number;
  toolMs: number;
  qmpMs: number;
  guestMs: number;
  qemuDowntimeMs: number | null;
  durationS: number;
  newBytes: number;
  storedBytes: number;
  /** Guest state when the call started (≈ the snapshot point: the pause comes first). */
  at: StampedStatus;
  /** QEMU's migration setup (ms) and whether the guest was paused through it (TakeResult). */
  setupMs: number | null;
  setupInPause: boolean | null;
  /** Guest running again → RAM and device state stored (ms). */
  saveMs: number | null;
  timeline: string;
}

interface Workload {
  args: string;
  append: string;
}

function workload(o: Options): Workload {
  const params = `vmsnap.mem=${o.areaMiB} vmsnap.rate=${o.rate} vmsnap.disk=/dev/vda vmsnap.sweep_ms=60000 vmsnap.status_ms=${STATUS_MS}`;
  return { args: params, append: `console=ttyS0 quiet ${params}` };
}

async function runVmsnap(o: Options, root: string, log: (s: string) => void): Promise<{ rows: TakeRow[]; tail: SerialTail; rate: { hostRate: number; guestRate: number }; overall: { hostRate: number; guestRate: number }; errors: string }> {
  const g = guestArtifacts();
  const { cli, dataDir } = await vmCli(root, 'take');
  const runDir = path.join(dataDir, 'vms', 'bench', 'run');
  const eventSock = path.join(runDir, 'bench-qmp.sock');
  await cli([
    'vm', 'create', 'bench', '--memory', `${o.memoryMiB}M`, '--disk', '256M', '--accel', 'tcg',
    '--kernel', g.kernel, '--initrd', g.initrd, '--append', workload(o).append,
    // A second QMP monitor, listen-only: STOP/RESUME events with QEMU's timestamps.
    ...eventMonitorArgs(eventSock),
  ]);
  await cli(['vm', 'start', 'bench']);
  const tail = new SerialTail(path.join(runDir, 'serial.log'));
  const qmp = await QmpClient.connect(eventSock, { timeoutMs: 30_000 });
  const events = new EventLog(qmp);
  const rows: TakeRow[] = [];
  let rate = { hostRate: NaN, guestRate: NaN };
  let overall = { hostRate: NaN, guestRate: NaN };
  let warmStart = 0;
  try {
    const first = await tail.waitFor(() => true, 300_000, 'first status line');
    log(`vmsnap guest: first status at uptime ${first.uptimeMs} ms`);
    const warm0 = await warmUp(tail, o.gapS, log, 'vmsnap');
    warmStart = warm0;
    rate = achievedRate(tail.lines, warm0, performance.now());
    log(`vmsnap guest: rewrite rate ${fmt(rate.guestRate, 0)} pages/s guest time, ${fmt(rate.hostRate, 0)} pages/s host time`);
    for (let i = 1; i <= o.takes; i++) {
      assertWorkloadAlive(tail);
      const mark = events.mark();
      const t0 = performance.now();
      const at = statusAt(tail.lines, t0);
      const r = JSON.parse(await cli(['--json', 'take', 'bench'])) as TakeJson;
      const t1 = performance.now();
      await sleep(o.gapS * 1000);
      const gp = guestPause(tail, t0, t1, o.gapS * 1000 - 200);
      const ev = events.pauseSince(mark);
      const tl0 = r.timeline[0]?.at ?? 0;
      const timeline = r.timeline.map((e) => `${e.what} +${(e.at - tl0).toFixed(1)}`).join(', ');
      const row: TakeRow = {
        i, toolMs: r.pauseMs, qmpMs: ev?.pauseMs ?? NaN, guestMs: gp.pauseMs, qemuDowntimeMs: r.qemuDowntimeMs,
        durationS: r.durationMs / 1000, newBytes: r.newBytes, storedBytes: r.storedBytes, at,
        setupMs: r.setupMs, setupInPause: r.setupInPause, saveMs: r.saveMs, timeline,
      };
      rows.push(row);
      log(`take ${i}: vmsnap ${fmt(r.pauseMs, 2)} ms (${r.pauseSource}), setup ${fmt(r.setupMs ?? NaN, 1)} ms ${r.setupInPause ? 'in the pause' : 'guest running'}, save ${fmt((r.saveMs ?? NaN) / 1000, 1)} s, QMP events ${fmt(row.qmpMs, 2)} ms (${ev?.stops ?? 0} STOP/${ev?.resumes ?? 0} RESUME), guest ${fmt(gp.pauseMs, 1)} ms (${gp.before}+${gp.after} lines), QEMU downtime ${r.qemuDowntimeMs ?? '?'} ms, ${fmt(r.durationMs / 1000, 1)} s, new ${fmt(r.newBytes / MiB)} MiB, stored ${fmt(r.storedBytes / MiB)} MiB | ${timeline}`);
    }
    overall = achievedRate(tail.lines, warmStart, performance.now());
  } finally {
    qmp.close();
    await cli(['vm', 'stop', 'bench']).catch((e: unknown) => log(`vm stop failed: ${(e as Error).message}`));
    tail.close();
  }
  return { rows, tail, rate, overall, errors: guestErrors(tail) };
}

// ------------------------------------------------------------------ savevm side

interface SavevmRow {
  i: number;
  toolMs: number;
  qmpMs: number;
  guestMs: number;
  qcow2GrowthBytes: number;
}

async function runSavevm(o: Options, root: string, log: (s: string) => void): Promise<{ rows: SavevmRow[]; calib: { knownMs: number; qmpMs: number; guestMs: number; toolMs: number }; idleGuestMs: number; rate: { hostRate: number; guestRate: number }; errors: string }> {
  const g = guestArtifacts();
  const dir = await freshDir(root, 'take-savevm');
  const qcow = path.join(dir, 'disk.qcow2');
  await check('qemu-img', ['create', '-q', '-f', 'qcow2', qcow, '256M']);
  const q: QemuProcess = await launchQemu({
    runDir: path.join(dir, 'run'), accel: 'tcg', memoryMiB: o.memoryMiB, cpus: 1,
    kernel: g.kernel, initrd: g.initrd, append: workload(o).append,
    extraArgs: ['-drive', `file=${qcow},format=qcow2,if=virtio,cache=none`],
  });
  const tail = new SerialTail(q.paths.serialLog);
  const events = new EventLog(q.qmp);
  const rows: SavevmRow[] = [];
  const W = o.gapS * 1000 - 200;
  try {
    await tail.waitFor(() => true, 300_000, 'first status line');
    const warm0 = await warmUp(tail, o.gapS, log, 'savevm');
    const rate = achievedRate(tail.lines, warm0, performance.now());
    log(`savevm guest: rewrite rate ${fmt(rate.guestRate, 0)} pages/s guest time, ${fmt(rate.hostRate, 0)} pages/s host time`);

    // Method check 1: no operation between two windows → the guest measure reads ≈ 0.
    const tIdle = performance.now();
    await sleep(o.gapS * 1000);
    const idle = guestPause(tail, tIdle, tIdle, W);
    log(`method check: idle (no pause) guest measure ${fmt(idle.pauseMs, 1)} ms`);

    // Method check 2: a known pause.
    const knownMs = 300;
    let mark = events.mark();
    const c0 = performance.now();
    await q.qmp.execute('stop');
    await sleep(knownMs);
    await q.qmp.execute('cont');
    const c1 = performance.now();
    await sleep(o.gapS * 1000);
    const calib = { knownMs, toolMs: c1 - c0, qmpMs: events.pauseSince(mark)?.pauseMs ?? NaN, guestMs: guestPause(tail, c0, c1, W).pauseMs };
    log(`method check: stop/${knownMs} ms/cont: host ${fmt(calib.toolMs, 1)} ms, QMP events ${fmt(calib.qmpMs, 1)} ms, guest ${fmt(calib.guestMs, 1)} ms`);

    for (let i = 1; i <= o.savevms; i++) {
      assertWorkloadAlive(tail);
      const size0 = (await fsp.stat(qcow)).size;
      mark = events.mark();
      const t0 = performance.now();
      const out = await q.qmp.execute<string>('human-monitor-command', { 'command-line': `savevm bench${i}` }, { timeoutMs: 900_000 });
      const t1 = performance.now();
      if (out.trim()) throw new Error(`savevm: ${out.trim()}`);
      await sleep(o.gapS * 1000);
      const ev = events.pauseSince(mark);
      const row: SavevmRow = { i, toolMs: t1 - t0, qmpMs: ev?.pauseMs ?? NaN, guestMs: guestPause(tail, t0, t1, W).pauseMs, qcow2GrowthBytes: (await fsp.stat(qcow)).size - size0 };
      rows.push(row);
      log(`savevm ${i}: command ${fmt(row.toolMs, 0)} ms, QMP events ${fmt(row.qmpMs, 0)} ms, guest ${fmt(row.guestMs, 0)} ms, qcow2 +${fmt(row.qcow2GrowthBytes / MiB)} MiB`);
    }
    return { rows, calib, idleGuestMs: idle.pauseMs, rate, errors: guestErrors(tail) };
  } finally {
    tail.close();
    await q.quit(10_000);
  }
}

// ------------------------------------------------------------------ main

async function main(): Promise<void> {
  const o = parseArgs(process.argv.slice(2));
  const root = benchRoot();
  await fsp.mkdir(root, { recursive: true });
  const log = (s: string): void => console.error(`[${new Date().toISOString().slice(11, 19)}] ${s}`);
  const qemuVersion = (await check('qemu-system-x86_64', ['--version'])).split('\n')[0] ?? '';
  log(`${qemuVersion}; guest ${o.memoryMiB} MiB, workload area ${o.areaMiB} MiB at ${o.rate} pages/s`);

  const load0 = loadavg()[0]!;
  const vm = await runVmsnap(o, root, log);
  const load1 = loadavg()[0]!;
  const sv = await runSavevm(o, root, log);
  const load2 = loadavg()[0]!;

  const areaPages = (o.areaMiB * MiB) / PAGE;
  const pick = (rows: readonly { toolMs: number; qmpMs: number; guestMs: number }[], k: 'toolMs' | 'qmpMs' | 'guestMs'): number[] => rows.map((r) => r[k]);
  const out: string[] = [];
  out.push(`QEMU: ${qemuVersion}; TCG; machine pc-i440fx-10.0; 1 vCPU; guest ${o.memoryMiB} MiB; workload area ${o.areaMiB} MiB, target ${o.rate} pages/s (${fmt((o.rate * PAGE) / 1e6)} MB/s) + disk 100 × 4 KiB records/s`);
  out.push(`Achieved rewrite rate before the first operation: vmsnap guest ${fmt(vm.rate.guestRate, 0)} pages/s of guest time (${fmt((vm.rate.guestRate * PAGE) / 1e6)} MB/s), ${fmt(vm.rate.hostRate, 0)} pages/s of host time; savevm guest ${fmt(sv.rate.guestRate, 0)} / ${fmt(sv.rate.hostRate, 0)} pages/s`);
  out.push(`Achieved over the whole vmsnap phase (takes included): ${fmt(vm.overall.hostRate, 0)} pages/s of host time (${fmt((vm.overall.hostRate * PAGE) / 1e6)} MB/s), ${fmt(vm.overall.guestRate, 0)} pages/s of guest time`);
  out.push(`Host load average (1 min, 2 cores): ${fmt(load0)} at start, ${fmt(load1)} after the takes, ${fmt(load2)} after the savevms`);
  out.push(`Guest self-check errors at the end: vmsnap guest ${vm.errors}, savevm guest ${sv.errors}`);
  out.push('');
  out.push(`Method check (savevm guest): no operation → guest measure ${fmt(sv.idleGuestMs, 1)} ms; QMP stop, ${sv.calib.knownMs} ms sleep, cont → host ${fmt(sv.calib.toolMs, 1)} ms, QMP events ${fmt(sv.calib.qmpMs, 1)} ms, guest ${fmt(sv.calib.guestMs, 1)} ms`);
  out.push('');
  out.push('Guest pause per operation (ms):');
  out.push('');
  out.push(table(
    ['op', 'tool', 'QMP STOP→RESUME', 'guest clock lost', 'QEMU downtime', 'setup ms (guest)', 'save s', 'total s'],
    [
      ...vm.rows.map((r) => [`take ${r.i}${r.i === 1 ? ' (first after start)' : ''}`, fmt(r.toolMs, 2), fmt(r.qmpMs, 2), fmt(r.guestMs, 1), r.qemuDowntimeMs === null ? '–' : String(r.qemuDowntimeMs), `${fmt(r.setupMs ?? NaN, 1)} (${r.setupInPause ? 'paused' : 'running'})`, fmt((r.saveMs ?? NaN) / 1000, 1), fmt(r.durationS, 1)]),
      ...sv.rows.map((r) => [`savevm ${r.i}`, fmt(r.toolMs, 0), fmt(r.qmpMs, 0), fmt(r.guestMs, 0), '–', '–', '–', fmt(r.toolMs / 1000, 1)]),
    ],
  ));
  out.push('');
  // The first take after `vm start` is reported on its own: it is the one a fresh QEMU makes
  // expensive (issue 13); the steady state is every later take.
  const summary = (k: 'toolMs' | 'qmpMs' | 'guestMs'): string[] => {
    const firstTake = vm.rows[0]?.[k] ?? NaN;
    const a = pick(vm.rows.slice(1), k);
    const b = pick(sv.rows, k);
    return [k === 'toolMs' ? 'tool' : k === 'qmpMs' ? 'QMP STOP→RESUME' : 'guest clock lost', fmt(firstTake, 2), fmt(median(a), 2), fmt(min(a), 2), fmt(max(a), 2), fmt(median(b), 0), `${fmt(median(b) / firstTake, 0)}x / ${fmt(median(b) / median(a), 0)}x`];
  };
  out.push(table(['measure', 'first take', 'steady median', 'steady min', 'steady max', 'savevm median', 'savevm / take (first / steady)'], [summary('qmpMs'), summary('toolMs'), summary('guestMs')]));
  out.push('');
  out.push('Incremental snapshots: stored bytes against what the workload changed since the previous snapshot point');
  out.push('(pages rewritten = gen delta between the status lines current when each take started, capped at the area; disk = records written × 4 KiB, capped at the 16 MiB area):');
  out.push('');
  const incr = vm.rows.slice(1).map((r, k) => {
    const prev = vm.rows[k]!;
    const memChanged = Math.min(r.at.gen - prev.at.gen, areaPages) * PAGE;
    const diskChanged = Math.min(r.at.diskSeq - prev.at.diskSeq, DISK_AREA_SLOTS) * PAGE;
    return { r, memChanged, diskChanged };
  });
  out.push(table(
    ['take', 'interval s', 'pages rewritten MiB (uncapped)', 'RAM pages changed MiB', 'disk changed MiB', 'new MiB', 'stored MiB', 'stored / changed'],
    incr.map(({ r, memChanged, diskChanged }, k) => [
      `${r.i}`, fmt((r.at.host - vm.rows[k]!.at.host) / 1000, 1), fmt(((r.at.gen - vm.rows[k]!.at.gen) * PAGE) / MiB, 0), fmt(memChanged / MiB), fmt(diskChanged / MiB), fmt(r.newBytes / MiB), fmt(r.storedBytes / MiB), fmt(r.storedBytes / (memChanged + diskChanged), 2),
    ]),
  ));
  out.push('');
  out.push(`First snapshot: new ${fmt((vm.rows[0]?.newBytes ?? NaN) / MiB)} MiB, stored ${fmt((vm.rows[0]?.storedBytes ?? NaN) / MiB)} MiB; savevm grows the qcow2 by ${sv.rows.map((r) => fmt(r.qcow2GrowthBytes / MiB, 0)).join(', ')} MiB per snapshot`);
  out.push('');
  out.push('vmsnap take timelines (`take --json` timeline, ms from its first step):');
  for (const r of vm.rows) out.push(`- take ${r.i}: ${r.timeline}`);
  const text = out.join('\n');
  console.log(text);
  if (o.out) await fsp.writeFile(path.resolve(REPO_ROOT, o.out), text + '\n');
}

main().catch((e: unknown) => {
  console.error(e);
  process.exit(1);
});
