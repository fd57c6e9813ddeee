/**
 * The source side of a live migration (protocol.ts has the sequence diagram). It runs inside the
 * VM's supervisor, which owns the QEMU and the volumes being moved.
 *
 * Three streams share one channel, each with its own pace:
 *   - RAM: QEMU migrates into a unix socket we listen on; one loop reads it, cuts it
 *     (MigStreamRelay) and sends each piece before reading on. No queue between QEMU and the
 *     link: when the link is slow, `send` waits, we stop reading, QEMU's writes block, and QEMU's
 *     own bandwidth estimate sees the link as it is (../shared/README.md "Relayed live
 *     migration": an unbounded queue let QEMU "complete" and then kept the guest paused 10.9 s).
 *   - disks: a named dirty bitmap per volume ('migration', cow/dirty-bitmap.ts) starts with every
 *     block marked; rounds drain it while the guest runs; the last round runs after QEMU has
 *     stopped the guest (migration completed), when no write can come any more.
 *   - control: a reader loop takes the destination's messages (ABORT, READY, RUNNING).
 *
 * What QEMU cannot know: referenced and compressed pages cost the link less than QEMU counts, so
 * its estimate of the final copy is too optimistic and it switches over with too much left (2.6×
 * the downtime limit, measured). We measure the link ourselves (bytes the channel wrote per
 * second) and set `avail-switchover-bandwidth` to it while we dedup or compress and the link is the limit.
 *
 * Failure before COMMIT → QEMU's migration is cancelled (or, if it had completed, the guest is
 * resumed with `cont`), an ABORT goes to the destination, and the guest runs on here. After COMMIT
 * without RUNNING, the guest stays paused here: the destination may be running it.
 */
import * as net from 'node:net';
import * as path from 'node:path';
import { promises as fsp, createReadStream } from 'node:fs';
import { createHash, randomBytes } from 'node:crypto';
import { blake3 } from '@napi-rs/blake-hash';
import { MigStreamRelay, PAGE_SIZE, type PageRecord, type RelayPiece } from '../migstream/index.js';
import type { DepartureRecorder } from './departure.js';
import { eventTimeMs, type QmpClient, type QmpEvent } from '../hypervisor/qmp.js';
import type { Volume, VolumeInfo } from '../cow/volume.js';
import type { DirtyBitmap } from '../cow/dirty-bitmap.js';
import { CODECS, encode, type CodecId } from '../store/codec.js';
import { isZeroBuffer } from '../cow/chunk-store.js';
import { openClientChannel, type SecureChannel, type Message } from './channel.js';
import type { HostIdentity } from './identity.js';
import {
  BLOCK_HASH_BYTES,
  readHaveDisk,
  ramMixHead,
  diskHeader,
  jsonBody,
  MigrationError,
  MigrationRefusedError,
  MSG,
  PAGE_HASH_BYTES,
  parseJsonBody,
  type AbortMessage,
  type FileOffer,
  type MigrationPhase,
  type MigrationRequest,
  type PreflightReply,
} from './protocol.js';
import { pageHash } from './holdings.js';
import { COLD_VERSION, MIX_VERSION } from './version.js';
import type { VmDefinition } from '../vm/config.js';

export interface SourceVm {
  definition: VmDefinition;
  qmp: QmpClient;
  qemu: { version: string; machine: string; accel: string };
  volumes: ReadonlyMap<string, Volume>;
  runDir: string;
  /** A UEFI VM's variables file (its content also travels in the RAM stream; the file must exist there). */
  nvramPath?: string;
}

export interface MigrateTarget {
  host: string;
  port: number;
  /** The destination's pinned key fingerprint (`vmsnap peer add`). */
  fingerprint: string;
}

export interface MigrateOptions {
  identity: HostIdentity;
  /** The guest pause allowed at most, ms; the downtime limit starts lower and rises to it. */
  maxDowntimeMs?: number;
  /** Abort (guest keeps running here) when not converged by then, ms. */
  timeoutMs?: number;
  compress?: 'auto' | 'zstd' | 'lz4' | 'none';
  signal?: AbortSignal;
  onEvent?: (e: MigrationEvent) => void;
  /** Fail when nothing crosses the link for this long while sending (a cut cable never errors), ms. */
  stallTimeoutMs?: number;
  /** Keeps the final RAM as it is relayed (departure.ts), for a snapshot of the state at departure. */
  recorder?: DepartureRecorder;
  /** Called (synchronously, inside the guest's pause) right before COMMIT: the guest may run elsewhere from then on. */
  beforeCommit?: () => void;
}

export interface MigrationEvent {
  phase: MigrationPhase | 'done';
  /** QEMU's dirty-sync count: the RAM round. */
  round: number;
  diskRound: number;
  ramTransferred: number;
  ramRemaining: number;
  /** Bytes per second the guest dirties (QEMU's estimate). */
  dirtyRate: number;
  /** Bytes per second the link carries (measured here). */
  linkRate: number;
  /** Bytes written to the link so far. */
  bytesSent: number;
  /** Bytes not sent thanks to references, zero blocks and compression. */
  bytesSaved: number;
  /** Rough time to completion at the current rates, ms (null when unknown / not converging). */
  etaMs: number | null;
  downtimeLimitMs: number;
}

export interface MigrateResult {
  totalMs: number;
  /** QEMU's downtime figure (source side: ends when the source wrote its last byte). */
  qemuDowntimeMs: number | null;
  /** Source stop (QMP STOP event) to the destination's `cont` (as it reports it): the guest's pause, host-side. */
  pauseMs: number | null;
  bytesSent: number;
  bytesSaved: number;
  qemuBytes: number;
  ramRefs: number;
  diskBlocksSent: number;
  diskBlocksSkipped: number;
  rounds: number;
  base: string | null;
  /**
   * Where the pause went, in ms after the source's STOP (null: the step was not reached or STOP
   * was not seen): QEMU's last byte relayed, QEMU reporting completion (and its MIGRATION event's
   * own time of it), the final disk round sent,
   * the destination READY (state loaded), the guest resumed there (`cont`, as the destination
   * reports it), and RUNNING (the arrived disks flushed there: the source may let go).
   */
  /** When each phase began, ms after the start of the migration ('done': the end). */
  phases: Partial<Record<MigrationPhase | 'done', number>>;
  switchover: { ramSentMs: number | null; completedMs: number | null; qemuCompletedMs: number | null; diskDoneMs: number | null; readyMs: number | null; resumedMs: number | null; runningMs: number | null };
}

/** A switchover report with no step reached (a cold move has none: its VM was stopped first). */
export function noSwitchover(): MigrateResult['switchover'] {
  return { ramSentMs: null, completedMs: null, qemuCompletedMs: null, diskDoneMs: null, readyMs: null, resumedMs: null, runningMs: null };
}

interface MigrationInfo {
  status?: string;
  'error-desc'?: string;
  'total-time'?: number;
  downtime?: number;
  ram?: { transferred?: number; remaining?: number; 'dirty-pages-rate'?: number; 'dirty-sync-count'?: number; mbps?: number };
}

const RECORD_PAYLOAD = 1 << 20;
const READ_AHEAD = 8;
const RAW_BATCH = 256 << 10;

/** Reads the destination's messages; waiters take the ones they expect, ABORT fails them all. */
export class Inbox {
  private queue: Message[] = [];
  private waiter: (() => void) | null = null;
  private failure: Error | null = null;
  private done = false;

  constructor(private readonly ch: SecureChannel) {}

  run(onAbort: (e: Error) => void): void {
    void (async () => {
      try {
        for (;;) {
          const m = await this.ch.receive();
          if (m === null) throw new Error('the destination closed the connection');
          if (m.type === MSG.ABORT) {
            const a = parseJsonBody<AbortMessage>(m.body, 'ABORT');
            throw new MigrationError(a.phase ?? 'ram', `the destination aborted: ${String(a.message)}`, false);
          }
          this.queue.push(m);
          this.wake();
        }
      } catch (err) {
        if (this.done) return;
        this.failure = err as Error;
        onAbort(this.failure);
        this.wake();
      }
    })();
  }

  private wake(): void {
    const w = this.waiter;
    this.waiter = null;
    w?.();
  }

  stop(): void {
    this.done = true;
  }

  /** The destination's own reason (its ABORT), if it arrives within `ms`; null otherwise. */
  async abortReason(ms: number): Promise<MigrationError | null> {
    const deadline = Date.now() + ms;
    while (!this.failure && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
    return this.failure instanceof MigrationError ? this.failure : null;
  }

  async expect(type: number, what: string, timeoutMs: number): Promise<Message> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const m = this.queue.shift();
      if (m) {
        if (m.type !== type) throw new Error(`the destination sent message 0x${m.type.toString(16)} while ${what} was expected`);
        return m;
      }
      if (this.failure) throw this.failure;
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`no ${what} from the destination within ${timeoutMs} ms`);
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, left);
        this.waiter = () => {
          clearTimeout(t);
          resolve();
        };
      });
    }
  }
}

/** Connects, authenticates the destination by its pinned key, and returns the channel. */
export async function connectToPeer(target: MigrateTarget, identity: HostIdentity, timeoutMs = 15_000): Promise<SecureChannel> {
  const sock = await new Promise<net.Socket>((resolve, reject) => {
    const s = net.connect({ host: target.host, port: target.port });
    const t = setTimeout(() => {
      s.destroy();
      reject(new MigrationError('connect', `no connection to ${target.host}:${target.port} within ${timeoutMs} ms`, true));
    }, timeoutMs);
    s.once('connect', () => {
      clearTimeout(t);
      s.setNoDelay(true);
      resolve(s);
    });
    s.once('error', (err) => {
      clearTimeout(t);
      reject(new MigrationError('connect', `cannot connect to ${target.host}:${target.port}: ${err.message}`, true, 'source', { cause: err }));
    });
  });
  return openClientChannel(sock, {
    identity,
    authorize: (fp) => (fp === target.fingerprint ? true : `the host at ${target.host}:${target.port} presented key ${fp}, not the paired ${target.fingerprint}`),
  });
}

export async function fileOffers(def: VmDefinition, nvramPath: string | undefined): Promise<FileOffer[]> {
  const out: FileOffer[] = [];
  for (const role of ['kernel', 'initrd', 'nvram'] as const) {
    const p = role === 'nvram' ? (def.firmware === 'uefi' ? nvramPath : undefined) : def[role];
    if (!p) continue;
    const st = await fsp.stat(p);
    const h = createHash('sha256');
    for await (const c of createReadStream(p)) h.update(c as Buffer);
    out.push({ role, path: p, size: st.size, sha256: h.digest('hex') });
  }
  return out;
}

/** What the destination holds of this guest (HAVE_*): page hashes, each disk's base block ids, and all of those ids. */
export interface Negotiated {
  pre: PreflightReply;
  heldPages: Set<string>;
  heldBlocks: Map<number, Buffer>;
  heldBlockSet: Set<string>;
}

/** What a REQUEST says of a disk: an open Volume, or `Volume.inspect` of one another process holds. */
export type DiskShape = Pick<VolumeInfo, 'size' | 'blockSize' | 'overlayBlocks'>;

/** The REQUEST a migration opens with (the disks' order is the disk numbering of the DISK_* messages). */
export async function migrationRequest(
  def: VmDefinition,
  qemu: MigrationRequest['qemu'],
  volumes: ReadonlyMap<string, Volume | DiskShape>,
  files: FileOffer[],
  mode: 'live' | 'cold',
  start = true,
): Promise<MigrationRequest> {
  const vols = [...volumes.entries()].map(([name, v]): [string, DiskShape] => [name, 'info' in v ? v.info() : v]);
  return {
    vm: def.name,
    definition: def as unknown as Record<string, unknown>,
    qemu,
    cpu: await cpuIdentity(qemu.accel),
    memoryMiB: def.memoryMiB,
    disks: vols.map(([name, v]) => ({ name, size: v.size, blockSize: v.blockSize })),
    allocatedBytes: vols.reduce((a, [, v]) => a + v.overlayBlocks * v.blockSize, 0),
    files,
    wantHaves: true,
    // Version 1 has no `mode`: a live request stays readable by a version-1 destination.
    ...(mode === 'cold' ? { mode, start } : {}),
  };
}

/** REQUEST → PREFLIGHT (returned) or REFUSE (MigrationRefusedError). */
export async function requestPreflight(chan: SecureChannel, req: MigrationRequest): Promise<PreflightReply> {
  if ((req.mode === 'cold' || req.probe) && chan.version < COLD_VERSION) {
    throw new MigrationRefusedError(`the destination speaks migration protocol version ${chan.version}, which has no cold migration (version ${COLD_VERSION}); update vmsnap there`);
  }
  await chan.send(MSG.REQUEST, jsonBody(req));
  const first = await chan.receive();
  if (first === null) throw new Error('the destination closed the connection during pre-flight');
  if (first.type === MSG.REFUSE) throw new MigrationRefusedError(String(parseJsonBody<{ message: string }>(first.body, 'REFUSE').message));
  if (first.type !== MSG.PREFLIGHT) throw new Error(`unexpected message 0x${first.type.toString(16)} during pre-flight`);
  return parseJsonBody<PreflightReply>(first.body, 'PREFLIGHT');
}

/**
 * The opening every migration shares (protocol.ts): REQUEST → PREFLIGHT or REFUSE, the files the
 * destination lacks, then what it holds (HAVE_* up to HAVE_END). `onPhase` follows the phases.
 */
export async function negotiate(chan: SecureChannel, req: MigrationRequest, files: FileOffer[], aborted: () => void, onPhase: (p: MigrationPhase) => void): Promise<Negotiated> {
  onPhase('preflight');
  const pre = await requestPreflight(chan, req);

  onPhase('files');
  for (const idx of pre.needFiles ?? []) {
    const f = files[idx];
    if (!f) throw new Error(`the destination asked for file #${idx}, which was not offered`);
    for await (const c of createReadStream(f.path, { highWaterMark: RECORD_PAYLOAD })) {
      aborted();
      await chan.send(MSG.FILE_DATA, Buffer.from([idx]), c as Buffer);
    }
  }
  await chan.send(MSG.FILE_END);

  onPhase('haves');
  const heldPages = new Set<string>();
  const heldBlocks = new Map<number, Buffer>();
  const heldBlockSet = new Set<string>();
  for (;;) {
    const m = await chan.receive();
    if (m === null) throw new Error('the destination closed the connection while sending what it holds');
    if (m.type === MSG.HAVE_END) break;
    if (m.type === MSG.ABORT) throw new MigrationError('haves', `the destination aborted: ${parseJsonBody<AbortMessage>(m.body, 'ABORT').message}`, false);
    if (m.type === MSG.HAVE_RAM) {
      if (m.body.length % PAGE_HASH_BYTES) throw new Error('malformed HAVE_RAM');
      for (let i = 0; i < m.body.length; i += PAGE_HASH_BYTES) heldPages.add(m.body.toString('latin1', i, i + PAGE_HASH_BYTES));
    } else if (m.type === MSG.HAVE_DISK) {
      const blocksOf = (i: number): number | undefined => {
        const d = req.disks[i];
        return d ? Math.ceil(d.size / d.blockSize) : undefined;
      };
      const { disk, firstBlock, count: n, hashes } = readHaveDisk(m.body, blocksOf);
      let ids = heldBlocks.get(disk);
      if (!ids) heldBlocks.set(disk, (ids = Buffer.alloc(blocksOf(disk)! * BLOCK_HASH_BYTES)));
      hashes.copy(ids, firstBlock * BLOCK_HASH_BYTES);
      for (let i = 0; i < n; i++) heldBlockSet.add(hashes.toString('latin1', i * BLOCK_HASH_BYTES, (i + 1) * BLOCK_HASH_BYTES));
    } else throw new Error(`unexpected message 0x${m.type.toString(16)} while receiving what the destination holds`);
  }
  return { pre, heldPages, heldBlocks, heldBlockSet };
}

/** Moves a running guest to the destination. Resolves once the destination runs it. */
export async function migrateOut(vm: SourceVm, target: MigrateTarget, o: MigrateOptions): Promise<MigrateResult> {
  const t0 = performance.now();
  const maxDowntime = o.maxDowntimeMs ?? 300;
  const timeoutMs = o.timeoutMs ?? 600_000;
  let phase: MigrationPhase = 'connect';
  let ch: SecureChannel | null = null;
  let inbox: Inbox | null = null;
  let committed = false;
  let qemuStarted = false;
  const bitmaps = new Map<string, DirtyBitmap>();
  let watchdog: NodeJS.Timeout | undefined;
  let codecTimer: NodeJS.Timeout | undefined;
  const abort = new AbortController();
  const fail = (e: Error) => abort.abort(e);
  o.signal?.addEventListener('abort', () => fail(new MigrationError(phase, 'cancelled', false)), { once: true });
  const aborted = (): void => {
    if (abort.signal.aborted) throw abort.signal.reason as Error;
  };
  const stats = { bytesSaved: 0, qemuBytes: 0, ramRefs: 0, diskSent: 0, diskSkipped: 0, diskRound: 0, round: 0 };
  let linkRate = 0;
  let downtimeLimit = Math.min(maxDowntime, 300);
  let stopAt: number | null = null;
  let lastInfo: MigrationInfo = {};
  /** When each phase began, ms after the start (the result's `phases`). */
  const phaseAt: Partial<Record<MigrationPhase | 'done', number>> = {};
  const emit = (p: MigrationPhase | 'done'): void => {
    phaseAt[p] ??= Math.round(performance.now() - t0);
    const ram = lastInfo.ram ?? {};
    const remaining = ram.remaining ?? 0;
    o.onEvent?.({
      phase: p,
      round: ram['dirty-sync-count'] ?? 0,
      diskRound: stats.diskRound,
      ramTransferred: ram.transferred ?? 0,
      ramRemaining: remaining,
      dirtyRate: (ram['dirty-pages-rate'] ?? 0) * PAGE_SIZE,
      linkRate,
      bytesSent: ch?.bytesSent ?? 0,
      bytesSaved: stats.bytesSaved,
      etaMs: linkRate > 0 && remaining > 0 ? Math.round((remaining / linkRate) * 1000) : null,
      downtimeLimitMs: downtimeLimit,
    });
  };
  let stopped!: () => void;
  const stoppedNow = new Promise<void>((res) => (stopped = res));
  let stopQemuAt: number | null = null;
  let completedQemuAt: number | null = null;
  let completedSeen!: () => void;
  const completedEvent = new Promise<void>((res) => (completedSeen = res));
  const onStop = (e: QmpEvent): void => {
    stopAt ??= performance.now();
    stopQemuAt ??= eventTimeMs(e);
    stopped();
  };
  // The MIGRATION event carries QEMU's own time of completion: the switchover report tells QEMU's
  // delay from the delay of its monitor's answer.
  const onMigration = (e: QmpEvent): void => {
    if (e.data.status !== 'completed') return;
    completedQemuAt ??= eventTimeMs(e);
    completedSeen();
  };
  const sinceStop = (): number | null => (stopAt === null ? null : Math.round(performance.now() - stopAt));
  const switchover = noSwitchover();
  vm.qmp.events.on('STOP', onStop);
  vm.qmp.events.on('MIGRATION', onMigration);
  try {
    const files = await fileOffers(vm.definition, vm.nvramPath);
    ch = await connectToPeer(target, o.identity);
    const chan = ch;
    // A send blocked on a dead link waits forever: an abort closes the channel under it.
    abort.signal.addEventListener('abort', () => {
      if (!committed) chan.destroy();
    }, { once: true });
    // TCP over a cut link neither fails nor progresses for many minutes: watch progress instead.
    const stallMs = o.stallTimeoutMs ?? (Number(process.env.VMSNAP_MIGRATION_STALL_MS) || 20_000);
    let lastMoved = -1;
    let lastMoveAt = Date.now();
    watchdog = setInterval(() => {
      const moved = chan.bytesSent + chan.bytesReceived;
      if (moved !== lastMoved) {
        lastMoved = moved;
        lastMoveAt = Date.now();
      } else if (!committed && (phase === 'files' || phase === 'disk' || phase === 'ram') && Date.now() - lastMoveAt > stallMs) {
        fail(new MigrationError(phase, `the link stalled: nothing crossed it for ${Math.round(stallMs / 1000)} s`, true));
      }
    }, 1000);
    phase = 'preflight';
    emit(phase);
    const volumes = [...vm.volumes.entries()];
    const { pre, heldPages, heldBlocks, heldBlockSet } = await negotiate(chan, await migrationRequest(vm.definition, vm.qemu, vm.volumes, files, 'live'), files, aborted, (p) => {
      phase = p;
      if (p === 'haves') emit(p);
    });
    inbox = new Inbox(chan);
    inbox.run(fail);

    let codec: CodecId = pickCodec(o.compress ?? 'auto', 0, false);
    // Compression pays only while the link is what limits us: its send buffer stayed full for
    // much of the interval. Otherwise the CPU is (on two cores here: both QEMUs, this relay and
    // the destination's), and compressing would slow the move down.
    let linkBound = false;
    let lastBlocked = 0;
    let lastSent = 0;
    let lastTick = performance.now();
    codecTimer = setInterval(() => {
      const now = performance.now();
      const dt = Math.max(1, now - lastTick);
      const blocked = (chan.sendBlockedMs - lastBlocked) / dt;
      const rate = ((chan.bytesSent - lastSent) * 1000) / dt;
      lastTick = now;
      lastBlocked = chan.sendBlockedMs;
      lastSent = chan.bytesSent;
      linkBound = blocked > 0.5 || (linkBound && blocked > 0.2);
      codec = pickCodec(o.compress ?? 'auto', rate, linkBound);
    }, 250);

    // ------------------------------------------------------------------ disks, round 1 and on
    phase = 'disk';
    emit(phase);
    const sentOnce = new Map<number, Uint8Array>();
    volumes.forEach(([name, v], i) => {
      v.removeDirtyBitmap('migration');
      bitmaps.set(name, v.addDirtyBitmap('migration', { all: true }));
      sentOnce.set(i, new Uint8Array(Math.ceil(v.size / v.blockSize)));
    });
    const diskRound = async (): Promise<number> => {
      let n = 0;
      stats.diskRound++;
      for (let di = 0; di < volumes.length; di++) {
        const [name, v] = volumes[di]!;
        const blocks = bitmaps.get(name)!.drain();
        n += blocks.length;
        await sendBlocks(chan, di, v, blocks, heldBlocks.get(di) ?? null, heldBlockSet, sentOnce.get(di)!, () => codec, stats, aborted);
      }
      return n;
    };
    await diskRound();

    // ------------------------------------------------------------------ RAM (and disk rounds beside it)
    phase = 'ram';
    emit(phase);
    const sockPath = path.join(vm.runDir, `mig-out-${randomBytes(6).toString('hex')}.sock`);
    const server = net.createServer();
    await new Promise<void>((res, rej) => server.once('error', rej).listen(sockPath, () => res()));
    let conn: net.Socket | null = null;
    let ramDone = false;
    // The loops beside the relay sleep between steps; the end of the stream must not wait out a
    // sleep (a 250 ms one was most of the guest's pause).
    let ramOver!: () => void;
    const ramFinished = new Promise<void>((res) => (ramOver = res));
    try {
      const accepted = new Promise<net.Socket>((res) => server.once('connection', res));
      const compressing = (): boolean => codec !== CODECS.none || heldPages.size > 0;
      await vm.qmp.execute('migrate-set-capabilities', {
        capabilities: [
          { capability: 'background-snapshot', state: false },
          { capability: 'events', state: true },
          { capability: 'auto-converge', state: true },
        ],
      });
      await vm.qmp.execute('migrate-set-parameters', {
        'max-bandwidth': 64 * 1024 * 1024 * 1024,
        'downtime-limit': downtimeLimit,
        'avail-switchover-bandwidth': 0,
      });
      await vm.qmp.execute('migrate', { uri: `unix:${sockPath}` });
      qemuStarted = true;
      conn = await Promise.race([accepted, new Promise<never>((_, rej) => abort.signal.addEventListener('abort', () => rej(abort.signal.reason as Error), { once: true }))]);

      // Progress, link rate and the convergence autopilot.
      const deadline = Date.now() + timeoutMs;
      let lastBytes = chan.bytesSent;
      let lastT = performance.now();
      const remainingAtSync: number[] = [];
      let lastSync = 0;
      let switchoverBw = 0;
      const poll = (async () => {
        while (!ramDone && !abort.signal.aborted) {
          await Promise.race([new Promise((r) => setTimeout(r, 250)), ramFinished]);
          if (ramDone) return;
          let st: MigrationInfo;
          try {
            st = await vm.qmp.execute<MigrationInfo>('query-migrate');
          } catch (err) {
            fail(new MigrationError('ram', `QEMU stopped answering: ${(err as Error).message}`, false));
            return;
          }
          lastInfo = st;
          if (st.status === 'failed' || st.status === 'cancelled') {
            fail(new MigrationError('ram', `QEMU reports the migration ${st.status}: ${st['error-desc'] ?? 'no reason given'}`, true));
            return;
          }
          const now = performance.now();
          const rate = ((chan.bytesSent - lastBytes) * 1000) / Math.max(1, now - lastT);
          lastBytes = chan.bytesSent;
          lastT = now;
          if (rate > 0) linkRate = linkRate === 0 ? rate : linkRate * 0.6 + rate * 0.4;
          // QEMU counts the bytes it writes; the link carries fewer when we dedup or compress, so
          // while the link (or the destination behind it) is what limits the move, QEMU's own
          // rate overstates how fast the last pages — dirty ones, sent whole — will cross: tell it
          // the link's. When the link is not the limit, QEMU's own rate is the real one (the relay
          // keeps up with it), and the link's, lowered by references, would understate it: QEMU
          // would then wait for a final set it never reaches and throttle the guest instead
          // (measured: a warm return trip's RAM phase took 24 s instead of 11).
          const want = compressing() && linkBound && linkRate > 0 ? Math.round(linkRate) : 0;
          if ((want === 0) !== (switchoverBw === 0) || Math.abs(want - switchoverBw) > switchoverBw * 0.1) {
            switchoverBw = want;
            await vm.qmp.execute('migrate-set-parameters', { 'avail-switchover-bandwidth': switchoverBw }).catch(() => undefined);
          }
          const sync = st.ram?.['dirty-sync-count'] ?? 0;
          if (sync > lastSync) {
            lastSync = sync;
            remainingAtSync.push(st.ram?.remaining ?? 0);
            const k = remainingAtSync.length;
            // Rounds no longer shrink: allow a longer pause, in bounded steps, up to --max-downtime.
            if (k >= 3 && remainingAtSync[k - 1]! > remainingAtSync[k - 3]! * 0.9 && downtimeLimit < maxDowntime) {
              downtimeLimit = Math.min(maxDowntime, Math.round(downtimeLimit * 1.5));
              await vm.qmp.execute('migrate-set-parameters', { 'downtime-limit': downtimeLimit }).catch(() => undefined);
            }
          }
          if (Date.now() > deadline) {
            fail(new MigrationError('ram', `did not converge within ${Math.round(timeoutMs / 1000)} s (the guest dirties memory faster than the link carries it); the guest keeps running here`, true));
            return;
          }
          emit('ram');
        }
      })();

      let stopRoundTaken = false;
      const diskLoop = (async () => {
        while (!ramDone && !abort.signal.aborted) {
          // QEMU's STOP ends the guest's writes (those in flight land in the round after RAM_END):
          // their round starts at once, beside the RAM tail, instead of inside the pause after it.
          const tick = new Promise((r) => setTimeout(r, 200));
          await Promise.race(stopRoundTaken ? [tick, ramFinished] : [tick, ramFinished, stoppedNow]);
          if (stopAt !== null) stopRoundTaken = true;
          if (ramDone || abort.signal.aborted) return;
          let dirty = 0;
          for (const b of bitmaps.values()) dirty += b.count;
          if (dirty > 0) await diskRound();
        }
      })();
      diskLoop.catch(fail);

      const relay = new MigStreamRelay();
      await relayRam(conn, chan, relay, heldPages, () => codec, stats, abort.signal, o.recorder);
      switchover.ramSentMs = sinceStop();
      const tail = relay.finish();
      o.recorder?.finish(tail);
      stats.qemuBytes = relay.bytes;
      ramDone = true;
      ramOver();
      await poll;
      await diskLoop;
      aborted();
      // The stream is whole (relay.finish checked its device state and EOF): the destination can
      // load it now, while QEMU here still finishes up (COMMIT waits for its completion).
      await chan.send(MSG.RAM_END);
    } finally {
      ramDone = true;
      ramOver();
      conn?.destroy();
      server.close();
      await fsp.rm(sockPath, { force: true });
    }

    // ------------------------------------------------------------------ switchover
    phase = 'switchover';
    emit(phase);
    // QEMU stopped the guest and drained its disk requests before it wrote the device state, so
    // every guest write is in the volumes now: this round is the last. QEMU must still report
    // completion before COMMIT: a failure in its last steps resumes the guest here.
    const completed = (async () => {
      for (;;) {
        const st = await vm.qmp.execute<MigrationInfo>('query-migrate');
        lastInfo = st;
        if (st.status === 'completed') return;
        if (st.status === 'failed' || st.status === 'cancelled') throw new Error(`QEMU reports the migration ${st.status}: ${st['error-desc'] ?? ''}`);
        // The event, when it comes first, ends the wait: one more query then confirms it.
        await Promise.race([new Promise((r) => setTimeout(r, 5)), completedEvent]);
      }
    })();
    completed.catch(() => undefined);
    await diskRound();
    switchover.diskDoneMs = sinceStop();
    await chan.send(MSG.SENT_ALL, jsonBody({ qemuBytes: stats.qemuBytes, ramRefs: stats.ramRefs, diskBlocks: stats.diskSent }));
    await completed;
    switchover.completedMs = sinceStop();
    switchover.qemuCompletedMs = stopQemuAt !== null && completedQemuAt !== null ? Math.round(completedQemuAt - stopQemuAt) : null;
    await inbox.expect(MSG.READY, 'READY', 120_000);
    switchover.readyMs = sinceStop();
    aborted();
    phase = 'commit';
    o.beforeCommit?.();
    committed = true;
    const tCommit = performance.now();
    await chan.send(MSG.COMMIT);
    const running = await inbox.expect(MSG.RUNNING, 'RUNNING', 60_000);
    switchover.runningMs = sinceStop();
    // The guest's pause ended at the destination's `cont`, before it flushed the arrived disks and
    // answered: it reports how long after COMMIT that was (older destinations do not: RUNNING then).
    let resumed: unknown;
    try {
      resumed = parseJsonBody<{ resumeMs?: unknown }>(running.body, 'RUNNING').resumeMs;
    } catch {
      // RUNNING itself is the confirmation; its figures are only for the report.
    }
    const tResumed = typeof resumed === 'number' && resumed >= 0 ? Math.min(performance.now(), tCommit + resumed) : performance.now();
    switchover.resumedMs = stopAt !== null ? Math.round(tResumed - stopAt) : null;
    inbox.stop();
    await chan.close();
    emit('done');
    return {
      totalMs: performance.now() - t0,
      qemuDowntimeMs: lastInfo.downtime ?? null,
      pauseMs: stopAt !== null ? tResumed - stopAt : null,
      bytesSent: chan.bytesSent,
      bytesSaved: stats.bytesSaved,
      qemuBytes: stats.qemuBytes,
      ramRefs: stats.ramRefs,
      diskBlocksSent: stats.diskSent,
      diskBlocksSkipped: stats.diskSkipped,
      rounds: lastInfo.ram?.['dirty-sync-count'] ?? 0,
      base: pre.base,
      switchover,
      phases: phaseAt,
    };
  } catch (err) {
    throw await migrationFailed(err, {
      abort: abort.signal,
      inbox,
      ch,
      committed,
      phase,
      afterCommit:
        `the destination was told to run the guest but did not confirm ($ERR); the guest stays paused here. ` +
        `Check the destination: if the VM runs there, remove it here; if not, \`vmsnap vm resume ${vm.definition.name}\` here.`,
      takeBack: qemuStarted ? () => cancelAndResume(vm.qmp) : undefined,
    });
  } finally {
    clearInterval(watchdog);
    clearInterval(codecTimer);
    vm.qmp.events.off('STOP', onStop);
    vm.qmp.events.off('MIGRATION', onMigration);
    // auto-converge stays set in QEMU otherwise, and a later take's background snapshot refuses it.
    if (qemuStarted) await vm.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'auto-converge', state: false }] }).catch(() => undefined);
    for (const [name, v] of vm.volumes) if (bitmaps.has(name)) v.removeDirtyBitmap('migration');
  }
}

/**
 * The error a failed migration ends with, after the source side's cleanup: the inbox stopped; after
 * COMMIT the channel dropped and `afterCommit` (where $ERR is the cause) said — the destination may
 * hold the VM, so nothing is taken back; before it, ABORT sent, `takeBack` run (the guest is the
 * source's again) and the error named by its phase.
 */
export async function migrationFailed(
  err: unknown,
  s: { abort: AbortSignal; inbox: Inbox | null; ch: SecureChannel | null; committed: boolean; phase: MigrationPhase; afterCommit: string; takeBack?: (() => Promise<void>) | undefined },
): Promise<Error> {
  // An abort (a cancel, the destination's ABORT, a stall) surfaces below as whatever it broke: name the abort.
  let e = s.abort.aborted && !(err instanceof MigrationError) && !(err instanceof MigrationRefusedError) ? (s.abort.reason as Error) : (err as Error);
  // A destination that gives up sends ABORT with its reason and closes; our next write can fail
  // ("EPIPE") before the reader has handed that ABORT over. The reason is what the user needs.
  if (!(e instanceof MigrationError) && !(e instanceof MigrationRefusedError) && !s.committed) e = (await s.inbox?.abortReason(1000)) ?? e;
  s.inbox?.stop();
  if (s.committed) {
    s.ch?.destroy();
    return new MigrationError('commit', s.afterCommit.replace('$ERR', e.message), false, 'unknown', { cause: e });
  }
  if (s.ch) {
    await s.ch.send(MSG.ABORT, jsonBody({ phase: s.phase, message: e.message })).catch(() => undefined);
    s.ch.destroy();
  }
  await s.takeBack?.();
  if (e instanceof MigrationError || e instanceof MigrationRefusedError) return e;
  return new MigrationError(s.phase, e.message, (e as { retryable?: boolean }).retryable ?? true, 'source', { cause: e });
}

/**
 * The codec for the next records. `auto`: none while the CPU is the limit (the link takes all we
 * send), else zstd on a slow link (more bytes saved per CPU second) and lz4 on a fast one.
 */
export function pickCodec(choice: 'auto' | 'zstd' | 'lz4' | 'none', linkRate: number, linkBound: boolean): CodecId {
  if (choice === 'none') return CODECS.none;
  if (choice === 'zstd') return CODECS.zstd;
  if (choice === 'lz4') return CODECS.lz4;
  if (!linkBound) return CODECS.none;
  return linkRate > 0 && linkRate < 40e6 ? CODECS.zstd : CODECS.lz4;
}

/** Cancels QEMU's migration and makes sure the guest runs again here. */
async function cancelAndResume(qmp: QmpClient): Promise<void> {
  await qmp.execute('migrate_cancel').catch(() => undefined);
  const deadline = Date.now() + 30_000;
  while (Date.now() < deadline) {
    const st = await qmp.execute<MigrationInfo>('query-migrate').catch(() => ({ status: 'unknown' }) as MigrationInfo);
    if (st.status !== 'active' && st.status !== 'device' && st.status !== 'cancelling' && st.status !== 'pre-switchover' && st.status !== 'setup') break;
    await new Promise((r) => setTimeout(r, 20));
  }
  const run = await qmp.execute<{ status: string }>('query-status').catch(() => ({ status: 'unknown' }));
  if (run.status !== 'running') await qmp.execute('cont').catch(() => undefined);
}

async function cpuIdentity(accel: string): Promise<MigrationRequest['cpu']> {
  const info = await fsp.readFile('/proc/cpuinfo', 'utf8').catch(() => '');
  const model = /^model name\s*:\s*(.*)$/m.exec(info)?.[1] ?? 'unknown';
  const flags = /^flags\s*:\s*(.*)$/m.exec(info)?.[1] ?? '';
  return { model: accel === 'kvm' ? 'host' : 'default', hostModel: model, flagsDigest: createHash('sha256').update(flags).digest('hex').slice(0, 16) };
}

/** The relay loop: one read, its pieces sent, then the next read (backpressure end to end). */
async function relayRam(
  conn: net.Socket,
  ch: SecureChannel,
  relay: MigStreamRelay,
  held: ReadonlySet<string>,
  codec: () => CodecId,
  stats: { bytesSaved: number; ramRefs: number },
  signal: AbortSignal,
  recorder?: DepartureRecorder,
): Promise<void> {
  const onRecord = recorder ? (rec: PageRecord) => recorder.record(relay.prefix, rec) : undefined;
  let raw: Buffer[] = [];
  let rawLen = 0;
  let refs: Buffer[] = [];
  let lastHash: Buffer | null = null;
  const flushRaw = async (): Promise<void> => {
    if (rawLen === 0) return;
    const bytes = raw.length === 1 ? raw[0]! : Buffer.concat(raw, rawLen);
    raw = [];
    rawLen = 0;
    const enc = encode(codec(), bytes, 1);
    const head = Buffer.allocUnsafe(5);
    head[0] = enc.codec;
    head.writeUInt32BE(bytes.length, 1);
    stats.bytesSaved += bytes.length - enc.data.length;
    await ch.send(MSG.RAM_RAW, head, enc.data);
  };
  const flushRefs = async (): Promise<void> => {
    if (refs.length === 0) return;
    const body = refs;
    refs = [];
    await ch.send(MSG.RAM_REF, ...body);
  };
  // A push's pieces are views valid only until the next push: raw bytes are copied, pages become
  // their hash (computed once, in `cut`).
  const pending: ({ raw: Buffer } | { ref: Buffer })[] = [];
  const cut = held.size
    ? (rec: { data?: Buffer }) => {
        lastHash = pageHash(rec.data!);
        return held.has(lastHash.toString('latin1'));
      }
    : () => false;
  // Version 3: raw bytes and references travel together, one record per batch (RAM_MIX).
  const mixed = ch.version >= MIX_VERSION;
  let at: number[] = [];
  const flushMix = async (): Promise<void> => {
    if (rawLen === 0 && refs.length === 0) return;
    const bytes = raw.length === 1 ? raw[0]! : Buffer.concat(raw, rawLen);
    const hashes = refs;
    const offsets = at;
    raw = [];
    rawLen = 0;
    refs = [];
    at = [];
    const enc = encode(codec(), bytes, 1);
    stats.bytesSaved += bytes.length - enc.data.length;
    await ch.send(MSG.RAM_MIX, ramMixHead(offsets, hashes, enc.codec, bytes.length), enc.data);
  };
  for await (const chunk of conn) {
    if (signal.aborted) throw signal.reason as Error;
    relay.push(
      chunk as Buffer,
      cut,
      (p: RelayPiece) => {
        if (p.kind === 'raw') pending.push({ raw: p.bytes });
        else pending.push({ ref: lastHash! });
      },
      onRecord,
    );
    if (mixed) {
      // Raw pieces are views into the socket's chunks, which Node never reuses: they may wait here
      // across pushes until the batch is sent.
      for (const p of pending) {
        if ('raw' in p) {
          raw.push(p.raw);
          rawLen += p.raw.length;
        } else {
          at.push(rawLen);
          refs.push(p.ref);
          stats.ramRefs++;
          stats.bytesSaved += PAGE_SIZE - PAGE_HASH_BYTES - 4;
        }
      }
      pending.length = 0;
      if (conn.readableLength > 0 && rawLen < RAW_BATCH && refs.length < 4096) continue;
      await flushMix();
      continue;
    }
    for (const p of pending) {
      if ('raw' in p) {
        if (refs.length) await flushRefs();
        raw.push(p.raw);
        rawLen += p.raw.length;
        if (rawLen >= RAW_BATCH) await flushRaw();
      } else {
        if (rawLen) await flushRaw();
        refs.push(p.ref);
        stats.ramRefs++;
        stats.bytesSaved += PAGE_SIZE - PAGE_HASH_BYTES;
        if (refs.length >= 4096) await flushRefs();
      }
    }
    pending.length = 0;
    // More of the stream already waiting: batch it into the same record (fewer seals and writes);
    // otherwise send now, so nothing lingers while QEMU waits on us.
    if (conn.readableLength > 0 && rawLen < RAW_BATCH && refs.length < 4096) continue;
    await flushRefs();
    await flushRaw();
  }
  await flushMix();
  await flushRefs();
  await flushRaw();
}

/** Sends one round of a disk's blocks: zero runs, same-as-base skipped (first time only), refs, data. */
export async function sendBlocks(
  ch: SecureChannel,
  disk: number,
  v: Volume,
  blocks: Uint32Array,
  heldIds: Buffer | null,
  heldSet: ReadonlySet<string>,
  sentOnce: Uint8Array,
  codec: () => CodecId,
  stats: { bytesSaved: number; diskSent: number; diskSkipped: number },
  aborted: () => void,
): Promise<void> {
  const bs = v.blockSize;
  // Reads run a few blocks ahead of the sends (each read waits on the disk, each send on the link).
  const read = (b: number): Promise<Buffer | null> => {
    const len = v.blockLen(b);
    const ext = v.extents(b * bs, len, 1)[0];
    if (ext !== undefined && ext.flags === 3) return Promise.resolve(null);
    const buf = Buffer.allocUnsafe(len);
    return v.read(b * bs, len, buf).then(() => buf);
  };
  const ahead: Promise<Buffer | null>[] = [];
  let next = 0;
  let zeroStart = -1;
  let zeroCount = 0;
  const flushZeros = async (): Promise<void> => {
    if (zeroCount === 0) return;
    await ch.send(MSG.DISK_ZERO, diskHeader('zero', disk, zeroStart, zeroCount));
    zeroCount = 0;
  };
  for (const b of blocks) {
    aborted();
    while (ahead.length < READ_AHEAD && next < blocks.length) {
      const p = read(blocks[next++]!);
      p.catch(() => undefined);
      ahead.push(p);
    }
    const data = await ahead.shift()!;
    const len = v.blockLen(b);
    if (data === null || isZeroBuffer(data)) {
      if (zeroCount > 0 && zeroStart + zeroCount === b) zeroCount++;
      else {
        await flushZeros();
        zeroStart = b;
        zeroCount = 1;
      }
      stats.bytesSaved += len;
      sentOnce[b] = 1;
      continue;
    }
    await flushZeros();
    // A destination that holds nothing of this guest needs no names, and hashing every block of
    // the first round costs the CPU the relay needs.
    const hash = heldIds || heldSet.size > 0 ? blake3(data) : null;
    if (hash && heldIds && !sentOnce[b] && hash.equals(heldIds.subarray(b * BLOCK_HASH_BYTES, (b + 1) * BLOCK_HASH_BYTES))) {
      stats.diskSkipped++;
      stats.bytesSaved += len;
      sentOnce[b] = 1;
      continue;
    }
    sentOnce[b] = 1;
    if (hash && heldSet.has(hash.toString('latin1'))) {
      await ch.send(MSG.DISK_REF, diskHeader('ref', disk, b, 0), hash);
      stats.bytesSaved += len - BLOCK_HASH_BYTES;
      continue;
    }
    const enc = encode(codec(), data, 1);
    stats.bytesSaved += len - enc.data.length;
    stats.diskSent++;
    await ch.send(MSG.DISK_DATA, diskHeader('data', disk, b, enc.codec), enc.data);
  }
  await flushZeros();
}
