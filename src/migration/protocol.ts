/**
 * The live-migration protocol between two vmsnap hosts, spoken over a SecureChannel (channel.ts:
 * pinned-key handshake, then sealed ordered records of `u8 type | body`, at most 1 MiB each).
 * Version 1 (version.ts holds the rule: both ends name a range, the highest common one is spoken).
 *
 *   source (`vmsnap migrate`, in the VM's supervisor)            destination (`vmsnap receive` worker)
 *   ── handshake (channel.ts) ───────────────────────────────────▶  both keys checked against pins
 *   ── REQUEST {vm, definition, qemu, cpu, disks, files} ────────▶  pre-flight: name free, QEMU, CPU,
 *   ◀───────────────────────── PREFLIGHT {base, needFiles} | REFUSE  memory, disk space, devices
 *   ── FILE_DATA* / FILE_END (kernel, initrd it lacks) ──────────▶
 *   ◀────────────────────────── HAVE_RAM* HAVE_DISK* HAVE_END        what it holds of this guest:
 *                                                                   page hashes, base block ids
 *   ── DISK_DATA | DISK_ZERO | DISK_REF  (round 1: all blocks) ──▶  written into the new volumes
 *   ── RAM_RAW | RAM_REF | RAM_MIX (QEMU's stream, verbatim but for refs) ─▶  fed to QEMU -incoming (paused)
 *   ── DISK_* (later rounds: blocks dirtied since), interleaved ──▶
 *   ── RAM_END (the stream is whole: source guest stopped) ──────▶
 *   ── DISK_* (final round) , SENT_ALL {stats} ──────────────────▶  wait for QEMU to load the
 *   ◀─────────────────────────────────────────────── READY          stream (paused)
 *   ── COMMIT (after the source QEMU reported completion) ───────▶  `cont`; the VM is now this host's;
 *   ◀─────────────────────────────────────────────── RUNNING        volumes flushed, then RUNNING:
 *                                                                   the source lets go only now
 *
 *   ABORT {phase, message} may be sent by either side at any point before COMMIT; then both close.
 *
 * Cold migration (version 2, REQUEST `mode: "cold"`; the source VM is stopped, so its disks no
 * longer change): the same opening (pre-flight, files, haves), then ONE disk round and SENT_ALL —
 * no RAM, no later rounds. The destination flushes the volumes and, with `start`, boots QEMU paused
 * before READY (a guest that cannot start there fails the migration, not the commit); COMMIT then
 * `cont`s it, or, without `start`, just makes the stopped VM the destination's.
 *
 *   ── DISK_DATA | DISK_ZERO | DISK_REF (every block once) ──▶  written into the new volumes
 *   ── SENT_ALL ────────────────────────────────────────────▶  flush; [start: boot paused]
 *   ◀──────────────────────────────────────────── READY ; COMMIT ▶ ; ◀ RUNNING {state}
 *
 * A running VM is asked about first: REQUEST {probe: true} → PREFLIGHT | REFUSE, then the
 * destination closes having created nothing; only an accepted probe stops the VM at the source.
 *
 * Receiver state machine (`receiverNext`; anything else is a protocol violation → FrameError, the
 * destination discards everything and the source guest keeps running):
 *
 *   AwaitRequest ──REQUEST──▶ [pre-flight] ──▶ AwaitFiles ──FILE_END──▶ [send haves] ──▶ Receiving
 *   AwaitFiles   ──FILE_DATA──▶ AwaitFiles
 *   Receiving    ──DISK_*, RAM_RAW, RAM_REF, RAM_MIX──▶ Receiving   ──RAM_END──▶ RamDone
 *   Receiving    ──SENT_ALL──▶ [flush, boot paused] ──▶ AwaitCommit        (cold only; no RAM_* there)
 *   RamDone      ──DISK_*──▶ RamDone   ──SENT_ALL──▶ [load] ──▶ AwaitCommit
 *   AwaitCommit  ──COMMIT──▶ [cont, flush] ──▶ Running (terminal: the guest is ours)
 *   any state but Running ──ABORT / channel closed / error──▶ Discarded (terminal)
 *
 * Why commit is a separate step: a destination that resumed the guest on its own when the stream
 * ended could run it while the source, not having heard back, resumes its copy too. With COMMIT the
 * only unsafe window is "COMMIT sent, RUNNING lost": the source then keeps its guest *paused* and
 * says so — two paused copies are recoverable, two running ones are not.
 *
 * Bodies: control messages are JSON (small, versioned by the protocol version); data messages are
 * binary, laid out below. Integers big-endian. Hashes: RAM pages are named by the first 16 bytes of
 * BLAKE3-256 of the 4096 page bytes; disk blocks by the full 32-byte BLAKE3-256 of the block (equal
 * to the chunk id of an unencrypted repository, so a destination names its holdings without
 * reading them).
 *
 *   FILE_DATA   u8 fileIndex | bytes
 *   HAVE_RAM    n × 16-byte page hashes
 *   HAVE_DISK   u16 disk | u32 firstBlock | n × 32-byte block hashes (the base's blocks, in order)
 *   DISK_DATA   u16 disk | u32 block | u8 codec | block bytes, encoded (codec ids: store/codec.ts,
 *               0 none, 1 zstd, 2 lz4; the decoded length must be the block's)
 *   DISK_ZERO   u16 disk | u32 block | u32 count
 *   DISK_REF    u16 disk | u32 block | 32-byte hash of a block the destination holds
 *   RAM_RAW     u8 codec | u32 length | stream bytes, encoded (decoded length must be `length`)
 *   RAM_REF     n × 16-byte page hashes (pages the destination holds, in stream order)
 *   RAM_MIX     u32 n | n × u32 at | n × 16-byte page hash | u8 codec | u32 length | stream bytes,
 *               encoded (version 3): the stream is the decoded bytes with the held page of hash i
 *               inserted before decoded byte at[i] (at non-decreasing, ≤ length)
 *   RUNNING     JSON {state, resumeMs}: resumeMs = COMMIT to `cont` done (the guest's pause ends
 *               there; RUNNING follows the flush of the arrived disks)
 */
import { UserFacingError } from '../util/errors.js';
import { FrameError, MAX_RECORD_PLAINTEXT } from './channel.js';

export const MSG = {
  REQUEST: 0x01,
  PREFLIGHT: 0x02,
  REFUSE: 0x03,
  ABORT: 0x04,
  FILE_DATA: 0x08,
  FILE_END: 0x09,
  HAVE_RAM: 0x10,
  HAVE_DISK: 0x11,
  HAVE_END: 0x12,
  DISK_DATA: 0x20,
  DISK_ZERO: 0x21,
  DISK_REF: 0x22,
  RAM_RAW: 0x30,
  RAM_REF: 0x31,
  RAM_END: 0x32,
  RAM_MIX: 0x33,
  SENT_ALL: 0x40,
  READY: 0x41,
  COMMIT: 0x42,
  RUNNING: 0x43,
} as const;
export type MsgType = (typeof MSG)[keyof typeof MSG];

export const PAGE_HASH_BYTES = 16;
export const BLOCK_HASH_BYTES = 32;

/** The phases a migration goes through; a failure names the one it happened in. */
export type MigrationPhase = 'connect' | 'preflight' | 'files' | 'haves' | 'disk' | 'ram' | 'switchover' | 'commit' | 'cleanup';

/**
 * A migration that failed, naming its phase. `guestRunsOn` says where the guest is now — the one
 * thing a person needs to know after a failure.
 */
export class MigrationError extends UserFacingError {
  override readonly name = 'MigrationError';
  constructor(
    readonly phase: MigrationPhase,
    message: string,
    readonly retryable: boolean,
    readonly guestRunsOn: 'source' | 'destination' | 'unknown' = 'source',
    options?: { cause?: unknown },
  ) {
    super(`migration failed in phase ${phase}: ${message}`, options);
  }

  get step(): string {
    return this.phase;
  }
}

/** The destination's refusal, before anything moved. */
export class MigrationRefusedError extends UserFacingError {
  override readonly name = 'MigrationRefusedError';
  constructor(readonly reason: string) {
    super(`the destination refused the migration: ${reason}`);
  }
}

export interface FileOffer {
  /** kernel/initrd: reused when the destination has the same file at the same path; nvram (a UEFI VM's variables) always sent. */
  role: 'kernel' | 'initrd' | 'nvram';
  path: string;
  size: number;
  sha256: string;
}

export interface DiskOffer {
  name: string;
  size: number;
  blockSize: number;
}

export interface MigrationRequest {
  vm: string;
  /** The VM definition (config.ts) as the source has it. */
  definition: Record<string, unknown>;
  qemu: { version: string; machine: string; accel: string };
  /** `host` for host-passthrough (KVM), with the source CPU's model and flags digest. */
  cpu: { model: string; hostModel: string; flagsDigest: string };
  memoryMiB: number;
  disks: DiskOffer[];
  /** Bytes the disks hold beyond holes (what the destination must have room for at most). */
  allocatedBytes: number;
  files: FileOffer[];
  /** Whether the destination should send page hashes (the source dedups against them). */
  wantHaves: boolean;
  /** Absent: live. `cold` (version 2): the VM is stopped; disks only, and it boots there when `start`. */
  mode?: 'live' | 'cold';
  /** Cold: boot the VM on the destination at COMMIT (it ran on the source); otherwise it arrives stopped. */
  start?: boolean;
  /**
   * Version 2: pre-flight only. The destination answers PREFLIGHT or REFUSE, creates nothing and
   * closes: a source asks before it stops a running VM for a cold migration.
   */
  probe?: boolean;
}

export interface PreflightReply {
  /** The local snapshot whose disks the new volumes start from (null: blank volumes). */
  base: string | null;
  /** Indexes into the request's `files` the destination lacks and needs sent. */
  needFiles: number[];
  qemuVersion: string;
  accel: string;
}

export interface SentAll {
  qemuBytes: number;
  ramRefs: number;
  diskBlocks: number;
}

export interface AbortMessage {
  phase: MigrationPhase;
  message: string;
}

export function jsonBody(v: unknown): Buffer {
  return Buffer.from(JSON.stringify(v), 'utf8');
}

/** A JSON control body, checked to be an object; anything else is a FrameError naming the message. */
export function parseJsonBody<T>(body: Buffer, what: string): T {
  let v: unknown;
  try {
    v = JSON.parse(body.toString('utf8'));
  } catch {
    throw new FrameError('record', `malformed ${what} message (not JSON)`);
  }
  if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new FrameError('record', `malformed ${what} message (not an object)`);
  return v as T;
}

export function diskHeader(type: 'data' | 'zero' | 'ref', disk: number, block: number, extra: number): Buffer {
  const h = Buffer.allocUnsafe(type === 'data' ? 7 : type === 'zero' ? 10 : 6);
  h.writeUInt16BE(disk, 0);
  h.writeUInt32BE(block, 2);
  if (type === 'data') h[6] = extra;
  else if (type === 'zero') h.writeUInt32BE(extra, 6);
  return h;
}

export interface DiskMessage {
  disk: number;
  block: number;
}

export function readDiskMessage(type: number, body: Buffer): DiskMessage & ({ kind: 'data'; codec: number; payload: Buffer } | { kind: 'zero'; count: number } | { kind: 'ref'; hash: Buffer }) {
  const need = type === MSG.DISK_DATA ? 7 : type === MSG.DISK_ZERO ? 10 : 6 + BLOCK_HASH_BYTES;
  if (body.length < need || (type === MSG.DISK_REF && body.length !== need) || (type === MSG.DISK_ZERO && body.length !== need)) {
    throw new FrameError('record', `malformed disk message (type ${type}, ${body.length} bytes)`);
  }
  const disk = body.readUInt16BE(0);
  const block = body.readUInt32BE(2);
  if (type === MSG.DISK_DATA) return { disk, block, kind: 'data', codec: body[6]!, payload: body.subarray(7) };
  if (type === MSG.DISK_ZERO) return { disk, block, kind: 'zero', count: body.readUInt32BE(6) };
  return { disk, block, kind: 'ref', hash: body.subarray(6) };
}

/** The head of a RAM_MIX record (everything before its encoded stream bytes). */
export function ramMixHead(at: readonly number[], hashes: readonly Buffer[], codec: number, length: number): Buffer {
  const n = at.length;
  const head = Buffer.allocUnsafe(4 + n * (4 + PAGE_HASH_BYTES) + 5);
  head.writeUInt32BE(n, 0);
  for (let i = 0; i < n; i++) head.writeUInt32BE(at[i]!, 4 + i * 4);
  for (let i = 0; i < n; i++) hashes[i]!.copy(head, 4 + n * 4 + i * PAGE_HASH_BYTES, 0, PAGE_HASH_BYTES);
  head[4 + n * (4 + PAGE_HASH_BYTES)] = codec;
  head.writeUInt32BE(length, 4 + n * (4 + PAGE_HASH_BYTES) + 1);
  return head;
}

/** A RAM_MIX body, checked: offsets in order and within the decoded length. */
export function readRamMix(body: Buffer): { at: Uint32Array; hashes: Buffer; codec: number; length: number; payload: Buffer } {
  if (body.length < 9) throw new FrameError('record', `malformed RAM_MIX (${body.length} bytes)`);
  const n = body.readUInt32BE(0);
  const headLen = 4 + n * (4 + PAGE_HASH_BYTES) + 5;
  if (n > body.length || headLen > body.length) throw new FrameError('record', `malformed RAM_MIX (${n} references in ${body.length} bytes)`);
  const at = new Uint32Array(n);
  for (let i = 0; i < n; i++) at[i] = body.readUInt32BE(4 + i * 4);
  const codec = body[headLen - 5]!;
  const length = body.readUInt32BE(headLen - 4);
  for (let i = 0; i < n; i++) {
    if (at[i]! > length || (i > 0 && at[i]! < at[i - 1]!)) throw new FrameError('record', 'malformed RAM_MIX (reference offsets out of order or beyond the stream bytes)');
  }
  return { at, hashes: body.subarray(4 + n * 4, 4 + n * (4 + PAGE_HASH_BYTES)), codec, length, payload: body.subarray(headLen) };
}

/** The QEMU stream a RAM_MIX stands for: its decoded bytes with the held pages put in place. */
export function assembleRamMix(at: Uint32Array, decoded: Buffer, pages: Buffer, pageSize: number): Buffer {
  const out = Buffer.allocUnsafe(decoded.length + at.length * pageSize);
  let from = 0;
  let o = 0;
  for (let i = 0; i < at.length; i++) {
    o += decoded.copy(out, o, from, at[i]!);
    from = at[i]!;
    o += pages.copy(out, o, i * pageSize, (i + 1) * pageSize);
  }
  decoded.copy(out, o, from);
  return out;
}

// ------------------------------------------------------------------------------ receiver state

export type ReceiverState = 'AwaitRequest' | 'AwaitFiles' | 'Receiving' | 'RamDone' | 'AwaitCommit' | 'Running' | 'Discarded';

const DISK_TYPES: ReadonlySet<number> = new Set([MSG.DISK_DATA, MSG.DISK_ZERO, MSG.DISK_REF]);

/**
 * The receiver's transition on a message from the source (the diagram above). Returns the next
 * state, or throws FrameError for a message this state does not accept. States entered by the
 * receiver's own work (pre-flight, loading) are set by it, not here.
 */
/**
 * The HAVE_DISK messages naming one disk's held blocks: as many whole hashes as fit a record, so a
 * large disk (4 GiB at 64 KiB blocks: 65,536 hashes, 2 MiB) takes several messages.
 */
export const HAVE_DISK_HASHES_PER_MESSAGE = Math.floor((MAX_RECORD_PLAINTEXT - 1 - 6) / BLOCK_HASH_BYTES);

export function* haveDiskMessages(disk: number, hashes: Buffer): Generator<[head: Buffer, hashes: Buffer]> {
  const n = hashes.length / BLOCK_HASH_BYTES;
  if (!Number.isInteger(n)) throw new Error('haveDiskMessages: not a whole number of block hashes');
  for (let first = 0; first < n; first += HAVE_DISK_HASHES_PER_MESSAGE) {
    const k = Math.min(HAVE_DISK_HASHES_PER_MESSAGE, n - first);
    const head = Buffer.alloc(6);
    head.writeUInt16BE(disk, 0);
    head.writeUInt32BE(first, 2);
    yield [head, hashes.subarray(first * BLOCK_HASH_BYTES, (first + k) * BLOCK_HASH_BYTES)];
  }
}

/** A HAVE_DISK body, checked against the disk's block count. */
export function readHaveDisk(body: Buffer, blocksOf: (disk: number) => number | undefined): { disk: number; firstBlock: number; count: number; hashes: Buffer } {
  if (body.length < 6 || (body.length - 6) % BLOCK_HASH_BYTES) throw new FrameError('record', `malformed HAVE_DISK (${body.length} bytes)`);
  const disk = body.readUInt16BE(0);
  const firstBlock = body.readUInt32BE(2);
  const blocks = blocksOf(disk);
  if (blocks === undefined) throw new FrameError('record', `HAVE_DISK for unknown disk #${disk}`);
  const count = (body.length - 6) / BLOCK_HASH_BYTES;
  if (firstBlock + count > blocks) throw new FrameError('record', `HAVE_DISK beyond the disk (blocks ${firstBlock}+${count} of ${blocks})`);
  return { disk, firstBlock, count, hashes: body.subarray(6) };
}

export function receiverNext(state: ReceiverState, type: number, mode: 'live' | 'cold' = 'live'): ReceiverState {
  if (type === MSG.ABORT && state !== 'Running' && state !== 'Discarded') return 'Discarded';
  if (mode === 'cold' && state === 'Receiving') {
    if (DISK_TYPES.has(type)) return 'Receiving';
    if (type === MSG.SENT_ALL) return 'AwaitCommit';
    throw new FrameError('record', `protocol violation: message type 0x${type.toString(16)} in state ${state} of a cold migration`);
  }
  switch (state) {
    case 'AwaitRequest':
      if (type === MSG.REQUEST) return 'AwaitFiles';
      break;
    case 'AwaitFiles':
      if (type === MSG.FILE_DATA) return 'AwaitFiles';
      if (type === MSG.FILE_END) return 'Receiving';
      break;
    case 'Receiving':
      if (DISK_TYPES.has(type) || type === MSG.RAM_RAW || type === MSG.RAM_REF || type === MSG.RAM_MIX) return 'Receiving';
      if (type === MSG.RAM_END) return 'RamDone';
      break;
    case 'RamDone':
      if (DISK_TYPES.has(type)) return 'RamDone';
      if (type === MSG.SENT_ALL) return 'AwaitCommit';
      break;
    case 'AwaitCommit':
      if (type === MSG.COMMIT) return 'Running';
      break;
    default:
      break;
  }
  throw new FrameError('record', `protocol violation: message type 0x${type.toString(16)} in state ${state}`);
}
