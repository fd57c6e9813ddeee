/**
 * A copy-on-write volume: a fixed-size virtual disk made of an optional read-only base (a disk
 * stream in the repository, read lazily) and a writable overlay on local disk, with dirty
 * tracking by generation.
 *
 * Directory layout (`dir`, given by the caller):
 *
 *   state.bin            checkpoint, replaced atomically (see encodeState)
 *   journal-<epoch>.log  map changes committed since the checkpoint of that epoch
 *   overlay.data         slots of blockSize bytes; slot s at offset s·blockSize. Slots 0..n-1 are
 *                        "home" slots (block i prefers slot i, so sequential I/O stays sequential
 *                        in the file); slots >= n are overflow slots.
 *   base.chunks          n × 32-byte chunk ids of the base stream (absent: no base)
 *   parent-<gen>.chunks  the stream the next snapshot diffs against (absent: the base, or zeros)
 *   lock                 pid of the process that has the volume open
 *
 * state.bin:
 *   "VSNAPVOL" | u32le version=1 | u32le headerLen | header JSON | zero pad to 8
 *   | map i32le[n] | blockGen u32le[n] | per frozen set: blocks u32le[count], slots i32le[count]
 *   | u32le crc32 of everything before
 *
 * journal record (one per commit):
 *   u32le 0x4c4e524a | u32le payloadLen | u32le crc32(payload) | payload
 *   payload entries:  0x01 u32 block i32 slot u32 gen     block's mapping changed
 *                     0x02 u32 newGeneration u8 full      freeze (full: every block, tracking was lost)
 *
 * Block map values: slot >= 0, BASE (-1) read from the base, ZERO (-2) reads as zeros.
 *
 * Crash safety works like a log-structured store. A guest write to a block whose slot belongs to an
 * older generation (or to the base) never overwrites that slot: it gets a fresh slot, and the
 * journal entry pointing at the fresh slot is committed only after the data file is fsynced
 * (FLUSH/FUA). A slot stays reserved while the committed map, an uncommitted journal entry or a
 * frozen generation refers to it. So after kill -9 the committed map shows exactly the content at
 * the last FLUSH (plus possibly later writes into slots of the current generation, which are
 * dirty anyway), and the committed dirty sets can only be too large, never too small. Frozen
 * generations keep their slots pinned until their snapshot is written, so the guest keeps writing
 * while a snapshot reads the frozen content.
 */
import { promises as fsp } from 'node:fs';
import { crc32 } from 'node:zlib';
import { atomicWriteFile, containedPath, createTempFile, fsyncDir, mkdirPrivate } from '../util/fs.js';
import { BaseReader, type BaseReaderOptions } from './base-reader.js';
import {
  blockCount,
  isZeroBuffer,
  validateDiskStream,
  zeroDiskStream,
  CHUNK_ID_BYTES,
  type ChunkStore,
  type DiskStream,
} from './chunk-store.js';
import { closeFd, fdatasync, ftruncate, openFd, pread, pwritev } from './fileio.js';
import { ownerAlive, ownerToken, processAlive } from '../util/process.js';
import { randomBytes } from 'node:crypto';
import { UserFacingError } from '../util/errors.js';
import { DirtyBitmap } from './dirty-bitmap.js';

export const BASE = -1;
export const ZERO = -2;

const STATE_MAGIC = 'VSNAPVOL';
const STATE_VERSION = 1;
const JOURNAL_MAGIC = 0x4c4e524a;
const CHECKPOINT_JOURNAL_BYTES = 32 * 1024 * 1024;
const MAP_ENTRY = 1;
const FREEZE_ENTRY = 2;

export class VolumeCreateError extends UserFacingError {
  override readonly name = 'VolumeCreateError';
}
export class VolumeOpenError extends UserFacingError {
  override readonly name = 'VolumeOpenError';
}
export class VolumeIoError extends Error {
  override readonly name = 'VolumeIoError';
}
export class VolumeRangeError extends UserFacingError {
  override readonly name = 'VolumeRangeError';
}
export class VolumeFlushError extends Error {
  override readonly name = 'VolumeFlushError';
}
export class VolumeRestoreError extends UserFacingError {
  override readonly name = 'VolumeRestoreError';
}

export interface VolumeCreateOptions {
  size: number;
  blockSize: number;
  base?: DiskStream;
  store?: ChunkStore;
  baseReader?: BaseReaderOptions;
}

export interface VolumeOpenOptions {
  store?: ChunkStore;
  baseReader?: BaseReaderOptions;
}

/** A closed generation whose blocks are pinned until a snapshot has been written from them. */
export interface FrozenSet {
  generation: number;
  /** Blocks written during the generation (every block when `full`). */
  blocks: Uint32Array;
  /** Mapping of each block at freeze time: slot, ZERO or BASE. */
  slots: Int32Array;
  /** Tracking was lost before this freeze: the set covers the whole volume. */
  full: boolean;
  /** Settles once every write issued before the freeze has completed. */
  drained: Promise<unknown>;
  /**
   * Restored from disk when the volume was opened (a snapshot of it was interrupted, e.g. by a
   * crash) rather than frozen by freeze() in this process.
   */
  recovered?: boolean;
}

export interface FreezeResult {
  /** The generation that was closed. */
  generation: number;
  dirtyBlocks: number;
  /** True when tracking had been lost and the snapshot will compare hashes of every block. */
  full: boolean;
}

export interface Extent {
  length: number;
  /** NBD base:allocation flags: 1 hole, 2 zero. */
  flags: number;
}

export interface VolumeInfo {
  size: number;
  blockSize: number;
  generation: number;
  dirtyBlocks: number;
  overlayBlocks: number;
  zeroBlocks: number;
  baseBlocks: number;
  frozenGenerations: number[];
  tracking: boolean;
  hasBase: boolean;
}

interface PersistedHeader {
  size: number;
  blockSize: number;
  generation: number;
  epoch: number;
  tracking: boolean;
  hasBase: boolean;
  parentFile: string | null;
  frozen: { generation: number; count: number; full: boolean }[];
}

function isAllZero(bufs: readonly Buffer[]): boolean {
  for (const b of bufs) if (!isZeroBuffer(b)) return false;
  return true;
}

/** Walks a list of buffers handing out consecutive sub-slices without copying. */
class SliceCursor {
  private idx = 0;
  private off = 0;
  constructor(private readonly bufs: readonly Buffer[]) {}
  take(n: number): Buffer[] {
    const out: Buffer[] = [];
    while (n > 0) {
      const b = this.bufs[this.idx]!;
      const k = Math.min(n, b.length - this.off);
      out.push(this.off === 0 && k === b.length ? b : b.subarray(this.off, this.off + k));
      this.off += k;
      n -= k;
      if (this.off === b.length) {
        this.idx++;
        this.off = 0;
      }
    }
    return out;
  }
}

/** null: detect all-zero blocks; 'zero': map to ZERO; 'keep': write zeros as data (NBD NO_HOLE). */
type ZeroMode = 'zero' | 'keep' | null;

interface WriteOp {
  pos: number;
  bufs: Buffer[];
  /** The block whose slot this writes (merged ops cover several). */
  block: number;
}

export class Volume {
  readonly nBlocks: number;
  private map: Int32Array;
  private blockGen: Uint32Array;
  private pMap: Int32Array;
  private pGen: Uint32Array;
  private refs: Uint32Array;
  private overflowFree: number[] = [];
  private slotCount: number;
  private dirty: number[] = [];
  private frozen: FrozenSet[] = [];
  private pFrozen: FrozenSet[] = [];
  private pGeneration: number;
  private pTracking: boolean;
  private pending: number[] = [];
  private pendingFreezes: FrozenSet[] = [];
  private readonly locks = new Map<number, Promise<void>>();
  /** Named dirty-block trackers of other consumers than the snapshot chain (dirty-bitmap.ts). */
  private readonly bitmaps = new Map<string, DirtyBitmap>();
  /**
   * Writes into a block's current slot still in flight without a block lock (the slot was already
   * this generation's, or a whole-block write took a fresh one). A copy-on-write of the block —
   * a partial write after a freeze — waits for them before it reads the slot, or it would copy
   * the block without bytes the guest has been (or is about to be) told are written.
   */
  private readonly landing = new Map<number, Set<Promise<void>>>();
  private readonly inflight = new Set<Promise<unknown>>();
  /**
   * A data write completed since the last fdatasync of the data file began. Set on completion,
   * not on issue: a write issued while a commit waits and finishing during that commit's
   * fdatasync is not covered by it, so the next FLUSH must sync again (issue 12 item 11).
   */
  private dataDirty = false;
  private commitChain: Promise<unknown> = Promise.resolve();
  private queuedCommit: Promise<void> | null = null;
  private journalFd: number;
  private journalPos: number;
  private failed: Error | null = null;
  /** Counts resets (restoreBase); a write begun before one must never land after it. */
  private resets = 0;
  /** A reset is waiting for writes in flight: new writes are refused meanwhile. */
  private resetting = false;
  private closed = false;
  private baseReader: BaseReader | null;
  private parentStream: DiskStream | null;
  /**
   * Home slots known to hold zeros in the overlay file: never written since this process created
   * the file or truncated it (restoreBase). Null when unknown (after open). A partial write into a
   * zero block whose home slot is known zero writes only its own bytes: no copy-on-write.
   */
  private homeZero: Uint8Array | null = null;
  /** Set by allocSlot: the slot it returned is known to hold zeros. */
  private allocZero = false;
  /** Read-only zeros, one block long (padding for writes into zero blocks). */
  private zeroBlock: Buffer | null = null;

  private constructor(
    readonly dir: string,
    readonly size: number,
    readonly blockSize: number,
    private generationNo: number,
    private epoch: number,
    private trackingValid: boolean,
    private parentFile: string | null,
    private readonly dataFd: number,
    journalFd: number,
    journalPos: number,
    map: Int32Array,
    blockGen: Uint32Array,
    frozen: FrozenSet[],
    base: DiskStream | null,
    private store: ChunkStore | undefined,
    private readonly baseReaderOpts: BaseReaderOptions | undefined,
    parent: DiskStream | null,
  ) {
    this.nBlocks = blockCount(size, blockSize);
    this.map = map;
    this.blockGen = blockGen;
    this.pMap = map.slice();
    this.pGen = blockGen.slice();
    this.pGeneration = generationNo;
    this.pTracking = trackingValid;
    this.journalFd = journalFd;
    this.journalPos = journalPos;
    this.frozen = frozen;
    this.pFrozen = frozen.slice();
    this.baseReader = base ? new BaseReader(base, store, baseReaderOpts) : null;
    this.parentStream = parent;
    let maxSlot = this.nBlocks - 1;
    for (let i = 0; i < this.nBlocks; i++) if (map[i]! > maxSlot) maxSlot = map[i]!;
    for (const f of frozen) for (const s of f.slots) if (s > maxSlot) maxSlot = s;
    this.slotCount = maxSlot + 1;
    this.refs = new Uint32Array(Math.max(this.slotCount, this.nBlocks) + 64);
    for (let i = 0; i < this.nBlocks; i++) {
      const s = map[i]!;
      if (s >= 0) this.refs[s]! += 2; // current map and committed map
      if (blockGen[i] === generationNo) this.dirty.push(i);
    }
    for (const f of frozen) for (const s of f.slots) if (s >= 0) this.refs[s]!++;
    for (let s = this.slotCount - 1; s >= this.nBlocks; s--) if (this.refs[s] === 0) this.overflowFree.push(s);
  }

  // ---------------------------------------------------------------- lifecycle

  static async create(dir: string, opts: VolumeCreateOptions): Promise<Volume> {
    const { size, blockSize, base } = opts;
    if (!Number.isSafeInteger(size) || size <= 0) throw new VolumeCreateError(`volume size ${size} must be a positive integer`);
    if (!Number.isInteger(blockSize) || blockSize < 512 || (blockSize & (blockSize - 1)) !== 0 || blockSize > 16 << 20) {
      throw new VolumeCreateError(`block size ${blockSize} must be a power of two between 512 and 16 MiB`);
    }
    if (base) {
      try {
        validateDiskStream(base);
      } catch (err) {
        throw new VolumeCreateError(`invalid base: ${(err as Error).message}`);
      }
      if (base.size !== size) throw new VolumeCreateError(`base is ${base.size} bytes but the volume is ${size} bytes`);
      if (base.chunkSize !== blockSize) {
        throw new VolumeCreateError(`base chunk size ${base.chunkSize} differs from the volume block size ${blockSize}`);
      }
    }
    await mkdirPrivate(dir);
    const statePath = containedPath(dir, 'state.bin');
    try {
      await fsp.access(statePath);
      throw new VolumeCreateError(`a volume already exists in ${dir}`);
    } catch (err) {
      if (err instanceof VolumeCreateError) throw err;
    }
    const n = blockCount(size, blockSize);
    const dataPath = containedPath(dir, 'overlay.data');
    // Not fsynced: a slot past a shorter file reads as zeros, and slot writes are fdatasynced
    // (size included) before any journal entry refers to them.
    // Asynchronous throughout: a supervisor creating a volume may be serving others' guest I/O.
    const fd = await openFd(dataPath, 'w');
    try {
      await ftruncate(fd, n * blockSize);
    } finally {
      await closeFd(fd);
    }
    if (base) {
      // Durable content, renamed into place; the directory fsync of the state file below makes
      // both names durable together, so a clone costs two fsyncs of the directory less.
      const final = containedPath(dir, 'base.chunks');
      const tmp = await createTempFile(final);
      try {
        await tmp.fh.write(base.chunks, 0, base.chunks.length, 0);
        await tmp.fh.datasync();
      } finally {
        await tmp.fh.close();
      }
      await fsp.rename(tmp.path, final);
    }
    await closeFd(await openFd(containedPath(dir, 'journal-1.log'), 'w'));
    const map = new Int32Array(n).fill(BASE);
    const gen = new Uint32Array(n);
    const header: PersistedHeader = {
      size,
      blockSize,
      generation: 1,
      epoch: 1,
      tracking: true,
      hasBase: !!base,
      parentFile: null,
      frozen: [],
    };
    // The state file is written last: its presence is what makes the directory a volume.
    await atomicWriteFile(statePath, encodeState(header, map, gen, []), { exclusive: true });
    const vol = await Volume.open(dir, { store: opts.store, baseReader: opts.baseReader });
    vol.homeZero = new Uint8Array(n).fill(1); // the overlay file was just created empty
    return vol;
  }

  static async open(dir: string, opts: VolumeOpenOptions = {}): Promise<Volume> {
    const st = await readState(dir);
    await acquireLock(dir);
    try {
      return await Volume.openLocked(dir, st, opts);
    } catch (err) {
      // Nothing of this open may outlive it: a lock left with our own pid would refuse every later
      // open in this (long-lived) process.
      await fsp.rm(containedPath(dir, 'lock'), { force: true });
      if (err instanceof VolumeOpenError) throw err;
      throw new VolumeOpenError(`cannot open volume ${dir}: ${(err as Error).message}`, { cause: err });
    }
  }

  private static async openLocked(dir: string, st: ReturnType<typeof decodeState>, opts: VolumeOpenOptions): Promise<Volume> {
    const h = st.header;
    let base: DiskStream | null = null;
    if (h.hasBase) {
      const chunks = await fsp.readFile(containedPath(dir, 'base.chunks')).catch((err: Error) => {
        throw new VolumeOpenError(`volume ${dir} has a base but base.chunks is unreadable: ${err.message}`);
      });
      base = { size: h.size, chunkSize: h.blockSize, chunks };
      validateDiskStream(base);
    }
    let parent = await readParent(dir, h);
    // Without the stream the dirty sets were computed against, tracked snapshots would be wrong.
    let tracking = h.tracking && parent !== 'lost';
    if (parent === 'lost') parent = null;
    // Replay the journal of this epoch; a torn tail (crash mid-append) ends it.
    const journalPath = containedPath(dir, `journal-${h.epoch}.log`);
    let jbuf: Buffer;
    try {
      jbuf = await fsp.readFile(journalPath);
    } catch {
      jbuf = Buffer.alloc(0);
    }
    const replay = replayJournal(st, jbuf);
    const { generation, frozen, pos } = replay;
    if (replay.tracking !== null) tracking = replay.tracking;
    for (const f of await fsp.readdir(dir)) {
      if (/^journal-\d+\.log$/.test(f) && f !== `journal-${h.epoch}.log`) await fsp.rm(containedPath(dir, f), { force: true });
    }
    const dataFd = await openFd(containedPath(dir, 'overlay.data'), 'r+');
    let journalFd: number;
    try {
      // 'a+' would make every write append; the journal is written at explicit positions.
      journalFd = await openFd(journalPath, 'r+').catch((err: NodeJS.ErrnoException) => {
        if (err.code === 'ENOENT') return openFd(journalPath, 'w+');
        throw err;
      });
      if (pos < jbuf.length) await ftruncate(journalFd, pos); // drop the torn tail before appending
    } catch (err) {
      await closeFd(dataFd).catch(() => undefined);
      throw err;
    }
    if (!parent && tracking) parent = base ?? null;
    const vol = new Volume(
      dir,
      h.size,
      h.blockSize,
      generation,
      h.epoch,
      tracking,
      h.parentFile,
      dataFd,
      journalFd,
      pos,
      st.map,
      st.gen,
      frozen,
      base,
      opts.store,
      opts.baseReader,
      parent,
    );
    return vol;
  }

  /** Commits, checkpoints and releases the volume. */
  async close(): Promise<void> {
    if (this.closed) return;
    await this.runLocked(async () => {
      await this.commitLocked();
      await this.checkpointLocked();
    }).finally(async () => {
      this.closed = true;
      await closeFd(this.dataFd).catch(() => undefined);
      await closeFd(this.journalFd).catch(() => undefined);
      await fsp.rm(containedPath(this.dir, 'lock'), { force: true });
    });
  }

  setStore(store: ChunkStore): void {
    this.store = store;
    if (this.baseReader) this.baseReader = new BaseReader(this.baseReader.stream, store, this.baseReaderOpts);
  }

  get generation(): number {
    return this.generationNo;
  }

  get tracking(): boolean {
    return this.trackingValid;
  }

  get base(): DiskStream | null {
    return this.baseReader?.stream ?? null;
  }

  /**
   * The volume still needs its base snapshot's chunks: some block (live or frozen) reads from the
   * base, or the next snapshot diffs against the base (reusing its chunk ids). While true, the base
   * snapshot must stay pinned (base-pin.ts).
   */
  get dependsOnBase(): boolean {
    const r = this.baseReader;
    if (!r) return false;
    if (this.parentFile === null) return true;
    for (let i = 0; i < this.nBlocks; i++) if (this.map[i] === BASE && !r.isZero(i)) return true;
    for (const f of this.frozen) for (let k = 0; k < f.slots.length; k++) if (f.slots[k] === BASE && !r.isZero(f.blocks[k]!)) return true;
    return false;
  }

  /** The stream the next snapshot diffs against: the last snapshot, else the base, else zeros. */
  get parent(): DiskStream | null {
    return this.trackingValid ? (this.parentStream ?? zeroDiskStream(this.size, this.blockSize)) : this.parentStream;
  }

  info(): VolumeInfo {
    return {
      ...countBlocks(this.map),
      size: this.size,
      blockSize: this.blockSize,
      generation: this.generationNo,
      dirtyBlocks: this.dirty.length,
      frozenGenerations: this.frozen.map((f) => f.generation),
      tracking: this.trackingValid,
      hasBase: this.baseReader !== null,
    };
  }

  /**
   * What `info()` would say, read without opening: no lock taken, nothing replayed onto disk, no
   * torn journal tail trimmed, so it works on a volume another process has open (its committed
   * state; writes not yet committed are not seen). `openBy` is the live owner's pid.
   */
  static async inspect(dir: string): Promise<VolumeInfo & { openBy: number | null }> {
    const st = await readState(dir);
    const h = st.header;
    const jbuf = await fsp.readFile(containedPath(dir, `journal-${h.epoch}.log`)).catch(() => Buffer.alloc(0));
    const replay = replayJournal(st, jbuf);
    // As open does: a parent stream that is unreadable or malformed means the dirty sets are lost.
    let tracking = h.tracking && (await readParent(dir, h)) !== 'lost';
    if (replay.tracking !== null) tracking = replay.tracking;
    let dirtyBlocks = 0;
    for (let i = 0; i < st.gen.length; i++) if (st.gen[i] === replay.generation) dirtyBlocks++;
    const owner = await readOwner(containedPath(dir, 'lock'));
    return {
      ...countBlocks(st.map),
      size: h.size,
      blockSize: h.blockSize,
      generation: replay.generation,
      dirtyBlocks,
      frozenGenerations: replay.frozen.map((f) => f.generation),
      tracking,
      hasBase: h.hasBase,
      openBy: owner?.alive && owner.pid !== null ? owner.pid : null,
    };
  }

  /** Blocks written in the current (open) generation, ascending. */
  dirtyBlocks(): Uint32Array {
    return Uint32Array.from(this.dirty).sort();
  }

  /** Declares the dirty sets untrustworthy (e.g. the overlay was modified by another tool). */
  invalidateTracking(): void {
    this.trackingValid = false;
  }

  // ---------------------------------------------------------------- slots and journal

  private ref(s: number): void {
    if (s >= this.refs.length) {
      const grown = new Uint32Array(Math.max(s + 1, this.refs.length * 2));
      grown.set(this.refs);
      this.refs = grown;
    }
    this.refs[s]!++;
  }

  private unref(s: number): void {
    if (--this.refs[s]! === 0 && s >= this.nBlocks) this.overflowFree.push(s);
  }

  /** A free slot for `block` (its home slot when free); sets allocZero. The caller writes it. */
  private allocSlot(block: number): number {
    this.allocZero = false;
    if (this.refs[block] === 0) {
      if (this.homeZero && this.homeZero[block] === 1) {
        this.homeZero[block] = 0;
        this.allocZero = true;
      }
      return block;
    }
    const s = this.overflowFree.pop();
    if (s !== undefined) return s;
    return this.slotCount++;
  }

  private zeros(): Buffer {
    return (this.zeroBlock ??= Buffer.alloc(this.blockSize));
  }

  /** Changes a block's mapping and queues the journal entry (which holds a ref until committed). */
  private setMap(block: number, value: number, gen: number): void {
    const old = this.map[block]!;
    this.map[block] = value;
    if (value >= 0) {
      this.ref(value); // current map
      this.ref(value); // queued journal entry
    }
    if (old >= 0) this.unref(old);
    if (gen === this.generationNo && this.blockGen[block] !== gen) this.dirty.push(block);
    this.blockGen[block] = gen;
    this.pending.push(MAP_ENTRY, block, value, gen);
  }

  /** Tracks a data-file write: commits wait for it, and its completion marks the data file dirty. */
  private track<T>(p: Promise<T>): Promise<T> {
    this.inflight.add(p);
    const done = (): void => {
      this.inflight.delete(p);
    };
    p.then(() => {
      this.dataDirty = true;
      done();
    }, (err: unknown) => {
      done();
      // A lost data write may leave a committed-to-be entry pointing at garbage: stop accepting I/O.
      this.failed ??= err instanceof Error ? err : new Error(String(err));
    });
    return p;
  }

  private runLocked<T>(fn: () => Promise<T>): Promise<T> {
    const p = this.commitChain.then(fn);
    this.commitChain = p.catch(() => undefined);
    return p;
  }

  /** Makes every write completed so far durable (NBD FLUSH). Concurrent callers share commits. */
  flush(): Promise<void> {
    if (this.queuedCommit) return this.queuedCommit;
    const p = this.runLocked(async () => {
      this.queuedCommit = null;
      await this.commitLocked();
    });
    this.queuedCommit = p;
    return p;
  }

  private async commitLocked(): Promise<void> {
    this.checkUsable();
    const entries = this.pending;
    const freezes = this.pendingFreezes;
    this.pending = [];
    this.pendingFreezes = [];
    if (this.inflight.size) await Promise.allSettled([...this.inflight]);
    if (this.failed) throw new VolumeFlushError(`volume ${this.dir} had a failed write: ${this.failed.message}`);
    try {
      if (this.dataDirty) {
        this.dataDirty = false;
        await fdatasync(this.dataFd);
      }
      if (entries.length === 0) return;
      let bytes = 0;
      for (let k = 0; k < entries.length; k += 4) bytes += entries[k] === MAP_ENTRY ? 13 : 6;
      const rec = Buffer.allocUnsafe(12 + bytes);
      let p = 12;
      for (let k = 0; k < entries.length; k += 4) {
        if (entries[k] === MAP_ENTRY) {
          rec[p] = MAP_ENTRY;
          rec.writeUInt32LE(entries[k + 1]!, p + 1);
          rec.writeInt32LE(entries[k + 2]!, p + 5);
          rec.writeUInt32LE(entries[k + 3]!, p + 9);
          p += 13;
        } else {
          rec[p] = FREEZE_ENTRY;
          rec.writeUInt32LE(entries[k + 1]!, p + 1);
          rec[p + 5] = entries[k + 2]!;
          p += 6;
        }
      }
      rec.writeUInt32LE(JOURNAL_MAGIC, 0);
      rec.writeUInt32LE(bytes, 4);
      rec.writeUInt32LE(crc32(rec.subarray(12)), 8);
      await pwritev(this.journalFd, [rec], this.journalPos);
      await fdatasync(this.journalFd);
      this.journalPos += rec.length;
    } catch (err) {
      this.failed ??= err as Error;
      throw new VolumeFlushError(`committing volume ${this.dir} failed: ${(err as Error).message}`);
    }
    let fi = 0;
    for (let k = 0; k < entries.length; k += 4) {
      if (entries[k] === MAP_ENTRY) {
        const b = entries[k + 1]!;
        const v = entries[k + 2]!;
        const old = this.pMap[b]!;
        this.pMap[b] = v;
        this.pGen[b] = entries[k + 3]!;
        if (v >= 0) this.ref(v); // committed map
        if (old >= 0) this.unref(old);
        if (v >= 0) this.unref(v); // the queued entry's ref
      } else {
        const f = freezes[fi++]!;
        this.pFrozen.push(f);
        this.pGeneration = entries[k + 1]!;
        if (f.full) this.pTracking = true;
      }
    }
    if (this.journalPos > CHECKPOINT_JOURNAL_BYTES) await this.checkpointLocked();
  }

  /** Writes the committed state as a new checkpoint and starts an empty journal. */
  private async checkpointLocked(): Promise<void> {
    const epoch = this.epoch + 1;
    const header: PersistedHeader = {
      size: this.size,
      blockSize: this.blockSize,
      generation: this.pGeneration,
      epoch,
      tracking: this.pTracking,
      hasBase: this.baseReader !== null,
      parentFile: this.parentFile,
      frozen: this.pFrozen.map((f) => ({ generation: f.generation, count: f.blocks.length, full: f.full })),
    };
    const newJournal = containedPath(this.dir, `journal-${epoch}.log`);
    const journalFd = await openFd(newJournal, 'w+');
    try {
      await atomicWriteFile(containedPath(this.dir, 'state.bin'), encodeState(header, this.pMap, this.pGen, this.pFrozen));
    } catch (err) {
      await closeFd(journalFd).catch(() => undefined);
      throw err;
    }
    const oldFd = this.journalFd;
    const oldPath = containedPath(this.dir, `journal-${this.epoch}.log`);
    this.journalFd = journalFd;
    this.journalPos = 0;
    this.epoch = epoch;
    await closeFd(oldFd).catch(() => undefined);
    await fsp.rm(oldPath, { force: true });
    await fsyncDir(this.dir);
  }

  private checkUsable(): void {
    if (this.closed) throw new VolumeIoError(`volume ${this.dir} is closed`);
    if (this.failed) throw new VolumeIoError(`volume ${this.dir} stopped after a failed write: ${this.failed.message}`);
  }

  /**
   * checkUsable for writes, which are also refused while the disk is being reset (restoreBase): a
   * write of the guest that is being replaced must not land on the restored disk. Returns the
   * reset count the write belongs to.
   */
  private checkWritable(): number {
    this.checkUsable();
    if (this.resetting) throw new VolumeIoError(`volume ${this.dir} is being reset to a snapshot: write refused`);
    return this.resets;
  }

  private checkRange(offset: number, length: number, what: string): void {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.size) {
      throw new VolumeRangeError(`${what} of ${length} bytes at ${offset} is outside the ${this.size}-byte volume`);
    }
  }

  blockLen(block: number): number {
    return Math.min(this.blockSize, this.size - block * this.blockSize);
  }

  // ---------------------------------------------------------------- data path

  async read(offset: number, length: number, dst: Buffer, dstOffset = 0): Promise<void> {
    this.checkUsable();
    this.checkRange(offset, length, 'read');
    const bs = this.blockSize;
    const tasks: Promise<void>[] = [];
    let runPos = -1;
    let runDst = 0;
    let runLen = 0;
    const flushRun = (): void => {
      if (runLen > 0) tasks.push(pread(this.dataFd, dst, runDst, runLen, runPos));
      runLen = 0;
    };
    let pos = offset;
    const end = offset + length;
    while (pos < end) {
      const i = Math.floor(pos / bs);
      const inOff = pos - i * bs;
      const n = Math.min(end, (i + 1) * bs) - pos;
      const d = dstOffset + (pos - offset);
      const lock = this.locks.get(i);
      if (lock) {
        flushRun();
        tasks.push(this.readAfterLock(i, lock, inOff, n, dst, d));
      } else {
        const s = this.map[i]!;
        if (s >= 0) {
          const fpos = s * bs + inOff;
          if (runLen > 0 && runPos + runLen === fpos) runLen += n;
          else {
            flushRun();
            runPos = fpos;
            runDst = d;
            runLen = n;
          }
        } else {
          flushRun();
          if (s === ZERO || !this.baseReader || this.baseReader.isZero(i)) dst.fill(0, d, d + n);
          else tasks.push(this.readBase(i, inOff, n, dst, d));
        }
      }
      pos += n;
    }
    flushRun();
    if (tasks.length === 1) await tasks[0];
    else if (tasks.length) await Promise.all(tasks);
  }

  private async readBase(i: number, inOff: number, n: number, dst: Buffer, d: number): Promise<void> {
    const data = await this.baseReader!.read(i);
    data.copy(dst, d, inOff, inOff + n);
  }

  private async readAfterLock(i: number, lock: Promise<void>, inOff: number, n: number, dst: Buffer, d: number): Promise<void> {
    let l: Promise<void> | undefined = lock;
    while (l) {
      await l.catch(() => undefined);
      l = this.locks.get(i);
    }
    await this.read(i * this.blockSize + inOff, n, dst, d);
  }

  /**
   * Writes `data` (a list of buffers, used in place) at `offset`. With `fua`, returns after the
   * write is durable.
   */
  async write(offset: number, data: readonly Buffer[] | Buffer, fua = false): Promise<void> {
    const epoch = this.checkWritable();
    const bufs = Buffer.isBuffer(data) ? [data] : data;
    let length = 0;
    for (const b of bufs) length += b.length;
    this.checkRange(offset, length, 'write');
    const bs = this.blockSize;
    const cursor = new SliceCursor(bufs);
    const ops: WriteOp[] = [];
    const waits: Promise<void>[] = [];
    let pos = offset;
    const end = offset + length;
    while (pos < end) {
      const i = Math.floor(pos / bs);
      const inOff = pos - i * bs;
      const n = Math.min(end, (i + 1) * bs) - pos;
      const slices = cursor.take(n);
      const lock = this.locks.get(i);
      if (lock) waits.push(this.writeAfterLock(i, lock, inOff, slices, null, epoch));
      else this.planBlockWrite(i, inOff, n, slices, ops, waits, null);
      pos += n;
    }
    this.issue(ops, waits);
    if (waits.length === 1) await waits[0];
    else if (waits.length) await Promise.all(waits);
    this.markWritten(offset, length);
    if (fua) await this.flush();
  }

  /**
   * Adds a named dirty-block tracker: from now on every completed write marks its blocks in it
   * (`all`: start with every block marked, as a consumer that has seen nothing yet). Names are
   * unique per volume: a second consumer of the same name is refused.
   */
  addDirtyBitmap(name: string, opts: { all?: boolean } = {}): DirtyBitmap {
    if (this.bitmaps.has(name)) throw new VolumeIoError(`volume ${this.dir} already has a dirty bitmap named ${JSON.stringify(name)}`);
    const b = new DirtyBitmap(name, this.nBlocks, opts.all ?? false);
    this.bitmaps.set(name, b);
    return b;
  }

  dirtyBitmap(name: string): DirtyBitmap | undefined {
    return this.bitmaps.get(name);
  }

  removeDirtyBitmap(name: string): boolean {
    return this.bitmaps.delete(name);
  }

  /** Marks the blocks of a completed write (or zeroing) in every named bitmap. */
  private markWritten(offset: number, length: number): void {
    if (this.bitmaps.size === 0 || length === 0) return;
    const first = Math.floor(offset / this.blockSize);
    const end = Math.ceil((offset + length) / this.blockSize);
    for (const b of this.bitmaps.values()) b.markRange(first, end);
  }

  /** Zeroes a range. Whole blocks become ZERO in the map (no data written) unless `noHole`. */
  async writeZeroes(offset: number, length: number, opts: { fua?: boolean; noHole?: boolean } = {}): Promise<void> {
    const epoch = this.checkWritable();
    this.checkRange(offset, length, 'write-zeroes');
    const bs = this.blockSize;
    const ops: WriteOp[] = [];
    const waits: Promise<void>[] = [];
    let zeroBuf: Buffer | null = null;
    let pos = offset;
    const end = offset + length;
    while (pos < end) {
      const i = Math.floor(pos / bs);
      const inOff = pos - i * bs;
      const n = Math.min(end, (i + 1) * bs) - pos;
      zeroBuf ??= this.zeros();
      const slices = [zeroBuf.subarray(0, n)];
      const lock = this.locks.get(i);
      if (lock) waits.push(this.writeAfterLock(i, lock, inOff, slices, opts.noHole ? 'keep' : 'zero', epoch));
      else this.planBlockWrite(i, inOff, n, slices, ops, waits, opts.noHole ? 'keep' : 'zero');
      pos += n;
    }
    this.issue(ops, waits);
    await Promise.all(waits);
    this.markWritten(offset, length);
    if (opts.fua) await this.flush();
  }

  /** Discards whole blocks in the range (they read as zeros afterwards); partial blocks are left alone. */
  async trim(offset: number, length: number, fua = false): Promise<void> {
    this.checkWritable();
    this.checkRange(offset, length, 'trim');
    const bs = this.blockSize;
    const first = Math.ceil(offset / bs);
    const endBlock = offset + length === this.size ? this.nBlocks : Math.floor((offset + length) / bs);
    if (first < endBlock) {
      await this.writeZeroes(first * bs, Math.min(this.size, endBlock * bs) - first * bs, { fua });
    } else if (fua) await this.flush();
  }

  private issue(ops: WriteOp[], waits: Promise<void>[]): void {
    if (ops.length === 0) return;
    ops.sort((a, b) => a.pos - b.pos);
    let cur = ops[0]!;
    let curLen = 0;
    for (const b of cur.bufs) curLen += b.length;
    let blocks = [cur.block];
    const emit = (op: WriteOp, covered: number[]): void => {
      const p = this.track(pwritev(this.dataFd, op.bufs, op.pos));
      for (const b of covered) this.land(b, p);
      waits.push(p);
    };
    for (let k = 1; k < ops.length; k++) {
      const op = ops[k]!;
      let len = 0;
      for (const b of op.bufs) len += b.length;
      if (cur.pos + curLen === op.pos && cur.bufs.length + op.bufs.length <= 512) {
        for (const b of op.bufs) cur.bufs.push(b);
        curLen += len;
        if (blocks[blocks.length - 1] !== op.block) blocks.push(op.block);
      } else {
        emit(cur, blocks);
        cur = op;
        curLen = len;
        blocks = [op.block];
      }
    }
    emit(cur, blocks);
  }

  /** Registers a lock-free write into `block`'s slot until it settles (see `landing`). */
  private land(block: number, p: Promise<void>): void {
    let set = this.landing.get(block);
    if (!set) this.landing.set(block, (set = new Set()));
    set.add(p);
    const done = (): void => {
      set.delete(p);
      if (set.size === 0 && this.landing.get(block) === set) this.landing.delete(block);
    };
    p.then(done, done);
  }

  /**
   * Decides synchronously where a block write goes, so the map, dirty set and journal order
   * follow request arrival order. Partial writes to a block without a current-generation slot copy
   * the old content into a fresh slot first (copy-on-write) under a per-block lock.
   */
  private planBlockWrite(
    i: number,
    inOff: number,
    n: number,
    slices: Buffer[],
    ops: WriteOp[],
    waits: Promise<void>[],
    zeroMode: ZeroMode,
  ): void {
    const bs = this.blockSize;
    const gen = this.generationNo;
    const cur = this.map[i]!;
    const full = inOff === 0 && n === this.blockLen(i);
    if (full && zeroMode !== 'keep' && (zeroMode === 'zero' || isAllZero(slices))) {
      if (!(cur === ZERO && this.blockGen[i] === gen)) this.setMap(i, ZERO, gen);
      return;
    }
    if (cur >= 0 && this.blockGen[i] === gen) {
      ops.push({ pos: cur * bs + inOff, bufs: slices, block: i });
      return;
    }
    const s = this.allocSlot(i);
    if (full) {
      this.setMap(i, s, gen);
      ops.push({ pos: s * bs, bufs: slices, block: i });
      return;
    }
    const wasZero = cur === ZERO || (cur === BASE && (!this.baseReader || this.baseReader.isZero(i)));
    if (wasZero && this.allocZero) {
      // The block reads as zeros and its fresh slot already holds zeros: write only the new bytes.
      this.setMap(i, s, gen);
      ops.push({ pos: s * bs + inOff, bufs: slices, block: i });
      return;
    }
    if (cur >= 0) this.ref(cur); // keep the old slot from being reused while we copy it
    this.setMap(i, s, gen);
    if (wasZero) {
      // Nothing to read or copy: pad the new bytes with zeros to the whole block (still under the
      // block lock, so a later write to the block cannot be overtaken by this one).
      const zeros = this.zeros();
      const bufs = inOff > 0 ? [zeros.subarray(0, inOff), ...slices] : [...slices];
      const tail = this.blockLen(i) - inOff - n;
      if (tail > 0) bufs.push(zeros.subarray(0, tail));
      const lock = this.track(pwritev(this.dataFd, bufs, s * bs)).finally(() => {
        if (this.locks.get(i) === lock) this.locks.delete(i);
      });
      this.locks.set(i, lock);
      waits.push(lock);
      return;
    }
    // Taken now, at plan time: the writes planned before this one that still land in the old slot.
    const landing = cur >= 0 ? this.landing.get(i) : undefined;
    const before = landing ? [...landing] : null;
    const fill = (async (): Promise<void> => {
      const buf = Buffer.allocUnsafe(bs);
      try {
        if (before) await Promise.allSettled(before);
        if (cur >= 0) await pread(this.dataFd, buf, 0, bs, cur * bs);
        else if (cur === ZERO || !this.baseReader || this.baseReader.isZero(i)) buf.fill(0);
        else (await this.baseReader.read(i)).copy(buf);
      } finally {
        if (cur >= 0) this.unref(cur);
      }
      let o = inOff;
      for (const sl of slices) {
        sl.copy(buf, o);
        o += sl.length;
      }
      await pwritev(this.dataFd, [buf], s * bs);
    })();
    const lock = this.track(fill).finally(() => {
      if (this.locks.get(i) === lock) this.locks.delete(i);
    });
    this.locks.set(i, lock);
    waits.push(lock);
  }

  private async writeAfterLock(i: number, lock: Promise<void>, inOff: number, slices: Buffer[], zeroMode: ZeroMode, epoch: number): Promise<void> {
    let l: Promise<void> | undefined = lock;
    while (l) {
      await l.catch(() => undefined);
      l = this.locks.get(i);
    }
    // Planned only now, against the current map: if the disk was reset while this write waited,
    // it belongs to the replaced disk and must not touch the restored one.
    if (this.checkWritable() !== epoch) throw new VolumeIoError(`volume ${this.dir} was reset to a snapshot while a write waited: write dropped`);
    const ops: WriteOp[] = [];
    const waits: Promise<void>[] = [];
    let n = 0;
    for (const s of slices) n += s.length;
    this.planBlockWrite(i, inOff, n, slices, ops, waits, zeroMode);
    this.issue(ops, waits);
    await Promise.all(waits);
  }

  /** NBD base:allocation extents for a range, merged, at most `maxExtents` of them. */
  extents(offset: number, length: number, maxExtents = 1024): Extent[] {
    this.checkRange(offset, length, 'block status');
    const bs = this.blockSize;
    const out: Extent[] = [];
    let pos = offset;
    const end = offset + length;
    while (pos < end) {
      const i = Math.floor(pos / bs);
      const n = Math.min(end, (i + 1) * bs) - pos;
      const s = this.map[i]!;
      const flags = s >= 0 ? 0 : s === ZERO || !this.baseReader || this.baseReader.isZero(i) ? 3 : 0;
      const last = out[out.length - 1];
      if (last && last.flags === flags) last.length += n;
      else {
        if (out.length === maxExtents) break;
        out.push({ length: n, flags });
      }
      pos += n;
    }
    return out;
  }

  // ---------------------------------------------------------------- generations and snapshots

  /**
   * Closes the current generation and opens the next. Synchronous and O(dirty): call it while the
   * guest is paused. Writes acknowledged before the call belong to the closed generation. The
   * freeze becomes durable with the next flush (snapshotVolume flushes first).
   */
  freeze(): FreezeResult {
    this.checkUsable();
    const generation = this.generationNo;
    const full = !this.trackingValid;
    let set: FrozenSet;
    if (full) {
      set = frozenFromMap(this.map, this.blockGen, generation, true);
    } else {
      const blocks = Uint32Array.from(this.dirty).sort();
      const slots = new Int32Array(blocks.length);
      for (let k = 0; k < blocks.length; k++) slots[k] = this.map[blocks[k]!]!;
      set = { generation, blocks, slots, full: false, drained: Promise.resolve() };
    }
    set.drained = Promise.allSettled([...this.inflight]);
    for (const s of set.slots) if (s >= 0) this.ref(s);
    this.frozen.push(set);
    this.pendingFreezes.push(set);
    this.pending.push(FREEZE_ENTRY, generation + 1, full ? 1 : 0, 0);
    this.generationNo = generation + 1;
    this.dirty = [];
    if (full) this.trackingValid = true;
    return { generation, dirtyBlocks: set.blocks.length, full };
  }

  /** Frozen generations not yet captured by a snapshot, oldest first. */
  frozenSets(): readonly FrozenSet[] {
    return this.frozen;
  }

  /** Reads the content a frozen set recorded for one block (blockLen bytes) into `dst`. */
  async readFrozenBlock(block: number, slot: number, dst: Buffer): Promise<void> {
    const len = this.blockLen(block);
    if (slot >= 0) await pread(this.dataFd, dst, 0, len, slot * this.blockSize);
    else if (slot === ZERO || !this.baseReader || this.baseReader.isZero(block)) dst.fill(0, 0, len);
    else (await this.baseReader.read(block)).copy(dst, 0, 0, len);
  }

  /** Reads `count` consecutive slots starting at `slot` into `dst` in one system call. */
  async readSlots(slot: number, count: number, dst: Buffer): Promise<void> {
    await pread(this.dataFd, dst, 0, count * this.blockSize, slot * this.blockSize);
  }

  /**
   * Records that a snapshot captured `sets` and produced `stream`: the stream becomes the parent
   * of the next snapshot and the sets' slots are released. Durable when it returns.
   */
  async completeSnapshot(sets: readonly FrozenSet[], stream: DiskStream): Promise<void> {
    validateDiskStream(stream);
    if (stream.size !== this.size || stream.chunkSize !== this.blockSize) {
      throw new VolumeFlushError(`snapshot stream geometry ${stream.size}/${stream.chunkSize} does not match the volume`);
    }
    await this.runLocked(async () => {
      await this.commitLocked();
      const last = sets[sets.length - 1];
      const name = `parent-${last ? last.generation : this.generationNo}.chunks`;
      await atomicWriteFile(containedPath(this.dir, name), stream.chunks);
      const oldParent = this.parentFile;
      this.parentFile = name;
      this.parentStream = { size: stream.size, chunkSize: stream.chunkSize, chunks: stream.chunks };
      for (const f of sets) {
        const k = this.frozen.indexOf(f);
        if (k >= 0) this.frozen.splice(k, 1);
        const pk = this.pFrozen.indexOf(f);
        if (pk >= 0) this.pFrozen.splice(pk, 1);
      }
      if (this.trackingValid) this.pTracking = true;
      await this.checkpointLocked();
      for (const f of sets) for (const s of f.slots) if (s >= 0) this.unref(s);
      if (oldParent && oldParent !== name) await fsp.rm(containedPath(this.dir, oldParent), { force: true });
    });
  }

  /**
   * Makes `base` the volume's new base and drops the overlay (restore in place). Disconnect the
   * volume's NBD clients first (NbdServer.disconnectClients): writes already started are waited for
   * and then discarded, writes arriving meanwhile are refused, writes waiting for a block are dropped.
   */
  async restoreBase(base: DiskStream): Promise<void> {
    try {
      validateDiskStream(base);
    } catch (err) {
      throw new VolumeRestoreError(`invalid base: ${(err as Error).message}`);
    }
    if (base.size !== this.size || base.chunkSize !== this.blockSize) {
      throw new VolumeRestoreError(
        `base geometry ${base.size} bytes / ${base.chunkSize}-byte chunks does not match the volume (${this.size} / ${this.blockSize})`,
      );
    }
    await this.runLocked(async () => {
      // The fence: from here no write starts, and every write already started (including the
      // read-modify-writes of a fresh slot) completes before the map is reset; a write still
      // waiting for a block lock sees the new reset count and is dropped (writeAfterLock).
      this.resetting = true;
      try {
        await this.commitLocked();
        while (this.inflight.size) await Promise.allSettled([...this.inflight]);
        await this.resetToBaseLocked(base);
        // Every block may read differently now: every named consumer must look at all of them.
        for (const b of this.bitmaps.values()) b.markAll();
      } finally {
        this.resets++;
        this.resetting = false;
      }
    });
  }

  private async resetToBaseLocked(base: DiskStream): Promise<void> {
    await atomicWriteFile(containedPath(this.dir, 'base.chunks'), base.chunks);
    this.map.fill(BASE);
    this.pMap.fill(BASE);
    this.blockGen.fill(0);
    this.pGen.fill(0);
    this.frozen = [];
    this.pFrozen = [];
    this.pending = [];
    this.pendingFreezes = [];
    this.dirty = [];
    this.generationNo += 1;
    this.pGeneration = this.generationNo;
    this.trackingValid = true;
    this.pTracking = true;
    const oldParent = this.parentFile;
    this.parentFile = null;
    this.parentStream = base;
    this.baseReader = new BaseReader(base, this.store, this.baseReaderOpts);
    this.refs.fill(0);
    this.overflowFree = [];
    this.slotCount = this.nBlocks;
    this.homeZero = null;
    await this.checkpointLocked();
    // Punch the old overlay out of the host file system.
    await ftruncate(this.dataFd, 0);
    await ftruncate(this.dataFd, this.nBlocks * this.blockSize);
    await fdatasync(this.dataFd);
    this.homeZero = new Uint8Array(this.nBlocks).fill(1);
    if (oldParent) await fsp.rm(containedPath(this.dir, oldParent), { force: true });
  }

  /**
   * Copies every base block not yet in the overlay into it, so the volume stops depending on the
   * repository. Hydrated blocks are not dirty. Safe while the volume is being served.
   */
  async hydrate(
    opts: { signal?: AbortSignal; onProgress?: (done: number, total: number) => void; bytesPerSecond?: number } = {},
  ): Promise<number> {
    const t0 = performance.now();
    const reader = this.baseReader;
    if (!reader) return 0;
    const todo: number[] = [];
    for (let i = 0; i < this.nBlocks; i++) if (this.map[i] === BASE && !reader.isZero(i)) todo.push(i);
    let done = 0;
    opts.onProgress?.(0, todo.length);
    for (const i of todo) {
      if (opts.signal?.aborted) break;
      this.checkUsable();
      if (this.map[i] !== BASE || this.locks.has(i)) continue;
      const data = await reader.read(i);
      if (this.map[i] !== BASE || this.locks.has(i) || this.baseReader !== reader) continue;
      const s = this.allocSlot(i);
      this.setMap(i, s, this.blockGen[i]!);
      // Under the block lock, as every write to a fresh slot: until the bytes land, a reader (or a
      // partial write filling the rest of the block from this slot) must wait, not see the empty slot.
      const lock = this.track(pwritev(this.dataFd, [data], s * this.blockSize)).finally(() => {
        if (this.locks.get(i) === lock) this.locks.delete(i);
      });
      this.locks.set(i, lock);
      await lock;
      done++;
      if (opts.bytesPerSecond) {
        // Background hydration must not starve the guest's own reads of the same link.
        const ahead = (done * this.blockSize * 1000) / opts.bytesPerSecond - (performance.now() - t0);
        if (ahead > 0) await new Promise((r) => setTimeout(r, ahead));
      }
      if (done % 256 === 0) {
        await this.flush();
        opts.onProgress?.(done, todo.length);
      }
    }
    await this.flush();
    opts.onProgress?.(done, todo.length);
    return done;
  }
}

function frozenFromMap(map: Int32Array, gen: Uint32Array, generation: number, full: boolean): FrozenSet {
  if (full) {
    const blocks = new Uint32Array(map.length);
    for (let i = 0; i < blocks.length; i++) blocks[i] = i;
    return { generation, blocks, slots: map.slice(), full, drained: Promise.resolve() };
  }
  const list: number[] = [];
  for (let i = 0; i < gen.length; i++) if (gen[i] === generation) list.push(i);
  const blocks = Uint32Array.from(list);
  const slots = new Int32Array(blocks.length);
  for (let k = 0; k < blocks.length; k++) slots[k] = map[blocks[k]!]!;
  return { generation, blocks, slots, full, drained: Promise.resolve() };
}

function encodeState(h: PersistedHeader, map: Int32Array, gen: Uint32Array, frozen: readonly FrozenSet[]): Buffer {
  const json = Buffer.from(JSON.stringify(h));
  const headLen = 16 + json.length;
  const pad = (8 - (headLen % 8)) % 8;
  let frozenBytes = 0;
  for (const f of frozen) frozenBytes += f.blocks.length * 8;
  const total = headLen + pad + map.length * 8 + frozenBytes + 4;
  const out = Buffer.alloc(total);
  out.write(STATE_MAGIC, 0, 'latin1');
  out.writeUInt32LE(STATE_VERSION, 8);
  out.writeUInt32LE(json.length, 12);
  json.copy(out, 16);
  let p = headLen + pad;
  const put = (a: Int32Array | Uint32Array): void => {
    Buffer.from(a.buffer, a.byteOffset, a.byteLength).copy(out, p);
    p += a.byteLength;
  };
  put(map);
  put(gen);
  for (const f of frozen) {
    put(f.blocks);
    put(f.slots);
  }
  out.writeUInt32LE(crc32(out.subarray(0, p)), p);
  return out;
}

function decodeState(
  raw: Buffer,
  file: string,
): { header: PersistedHeader; map: Int32Array; gen: Uint32Array; frozen: FrozenSet[] } {
  const bad = (why: string): VolumeOpenError => new VolumeOpenError(`volume state ${file} is unusable: ${why}`);
  if (raw.length < 20 || raw.toString('latin1', 0, 8) !== STATE_MAGIC) throw bad('bad magic');
  if (raw.readUInt32LE(8) !== STATE_VERSION) throw bad(`unsupported version ${raw.readUInt32LE(8)}`);
  if (crc32(raw.subarray(0, raw.length - 4)) !== raw.readUInt32LE(raw.length - 4)) throw bad('checksum mismatch');
  const jlen = raw.readUInt32LE(12);
  let header: PersistedHeader;
  try {
    header = JSON.parse(raw.toString('utf8', 16, 16 + jlen)) as PersistedHeader;
  } catch {
    throw bad('header is not JSON');
  }
  const n = blockCount(header.size, header.blockSize);
  const headLen = 16 + jlen;
  let p = headLen + ((8 - (headLen % 8)) % 8);
  const take = (count: number): ArrayBuffer => {
    if (p + count * 4 > raw.length - 4) throw bad('truncated');
    const ab = raw.buffer.slice(raw.byteOffset + p, raw.byteOffset + p + count * 4) as ArrayBuffer;
    p += count * 4;
    return ab;
  };
  const map = new Int32Array(take(n));
  const gen = new Uint32Array(take(n));
  const frozen: FrozenSet[] = [];
  for (const f of header.frozen) {
    const blocks = new Uint32Array(take(f.count));
    const slots = new Int32Array(take(f.count));
    frozen.push({ generation: f.generation, blocks, slots, full: f.full, drained: Promise.resolve(), recovered: true });
  }
  return { header, map, gen, frozen };
}

async function readState(dir: string): Promise<ReturnType<typeof decodeState>> {
  const statePath = containedPath(dir, 'state.bin');
  const raw = await fsp.readFile(statePath).catch((err: Error) => {
    throw new VolumeOpenError(`no volume in ${dir}: ${err.message}`);
  });
  return decodeState(raw, statePath);
}

/** The stream the next snapshot diffs against, if the state names one: null if none, 'lost' if unreadable or malformed. */
async function readParent(dir: string, h: PersistedHeader): Promise<DiskStream | null | 'lost'> {
  if (!h.parentFile) return null;
  try {
    const parent = { size: h.size, chunkSize: h.blockSize, chunks: await fsp.readFile(containedPath(dir, h.parentFile)) };
    validateDiskStream(parent);
    return parent;
  } catch {
    return 'lost';
  }
}

function countBlocks(map: Int32Array): { overlayBlocks: number; zeroBlocks: number; baseBlocks: number } {
  let overlayBlocks = 0;
  let zeroBlocks = 0;
  let baseBlocks = 0;
  for (let i = 0; i < map.length; i++) {
    const s = map[i]!;
    if (s >= 0) overlayBlocks++;
    else if (s === ZERO) zeroBlocks++;
    else baseBlocks++;
  }
  return { overlayBlocks, zeroBlocks, baseBlocks };
}

/**
 * Applies the journal of the state's epoch to its map (in place) and says where the valid records
 * end: a torn tail (crash mid-append) ends the journal; damage before the end, or an unknown
 * entry, makes the dirty sets untrustworthy. A freeze with `full` (every block counted dirty)
 * makes them trustworthy again. `tracking` is the last such verdict, null if the journal has none.
 */
function replayJournal(
  st: ReturnType<typeof decodeState>,
  jbuf: Buffer,
): { generation: number; frozen: FrozenSet[]; pos: number; tracking: boolean | null } {
  let generation = st.header.generation;
  const frozen = st.frozen;
  let pos = 0;
  let tracking: boolean | null = null;
  while (pos + 12 <= jbuf.length) {
    if (jbuf.readUInt32LE(pos) !== JOURNAL_MAGIC) break;
    const len = jbuf.readUInt32LE(pos + 4);
    if (pos + 12 + len > jbuf.length) break;
    const payload = jbuf.subarray(pos + 12, pos + 12 + len);
    if (crc32(payload) !== jbuf.readUInt32LE(pos + 8)) {
      if (pos + 12 + len < jbuf.length) tracking = false; // damage inside the journal, not a torn tail
      break;
    }
    let p = 0;
    while (p < payload.length) {
      const t = payload[p];
      if (t === MAP_ENTRY) {
        const b = payload.readUInt32LE(p + 1);
        if (b < st.map.length) {
          st.map[b] = payload.readInt32LE(p + 5);
          st.gen[b] = payload.readUInt32LE(p + 9);
        }
        p += 13;
      } else if (t === FREEZE_ENTRY) {
        const newGen = payload.readUInt32LE(p + 1);
        const full = payload[p + 5] === 1;
        frozen.push({ ...frozenFromMap(st.map, st.gen, newGen - 1, full), recovered: true });
        generation = newGen;
        if (full) tracking = true;
        p += 6;
      } else {
        tracking = false;
        break;
      }
    }
    pos += 12 + len;
  }
  return { generation, frozen, pos, tracking };
}

/**
 * One process per volume: a lock file naming its owner (ownerToken: pid, start time, boot id, so a
 * reused pid is not taken for the owner); a dead owner's lock is taken over.
 *
 * The lock appears with its owner already in it (written to a private file, then hard-linked into
 * place: link fails atomically if the lock exists), so nobody ever reads a half-made lock and
 * mistakes it for a dead one. A stale lock is never removed, only replaced (rename over it), so a
 * newcomer always finds some lock; replacing happens under `lock.takeover`, a short-lived mutex
 * made the same way, after re-reading that the lock is still the one judged dead. (Removing a
 * stale lock and creating a new one let several processes take over at once: 2-4 owners of 5.)
 * The mutex is held for a few system calls: one whose holder is dead, or that is older than
 * MUTEX_STALE_MS (a holder that died across a reboot may have left it empty), is removed; only a
 * second takeover racing that removal could then go wrong, which takes a crash inside the window.
 * On a filesystem without hard links (vfat, some FUSE mounts) the lock is created with O_EXCL and
 * written after; a lock without a readable owner counts as alive until it is MUTEX_STALE_MS old.
 */
async function acquireLock(dir: string): Promise<void> {
  const lock = containedPath(dir, 'lock');
  const token = ownerToken();
  const mine = containedPath(dir, `lock.${process.pid}.${randomBytes(6).toString('hex')}`);
  await fsp.writeFile(mine, token).catch((err: Error) => {
    throw new VolumeOpenError(`cannot lock volume ${dir}: ${err.message}`);
  });
  try {
    for (let attempt = 0; attempt < 100; attempt++) {
      if (await createExclusive(mine, lock, token, dir)) {
        await removeDeadPrivateFiles(dir);
        return;
      }
      const seen = await readOwner(lock);
      if (seen === null) continue; // released meanwhile
      if (seen.alive) throw new VolumeOpenError(`volume ${dir} is already open by process ${seen.pid ?? '(unknown: the lock file is being written)'}`);
      const took = await underTakeoverMutex(dir, mine, token, async () => {
        if ((await fsp.readFile(lock, 'utf8').catch(() => null)) !== seen.text) return false;
        await fsp.rename(mine, lock);
        return true;
      });
      if (took) {
        await removeDeadPrivateFiles(dir);
        return;
      }
    }
    throw new VolumeOpenError(`cannot lock volume ${dir}: the lock keeps changing hands`);
  } finally {
    await fsp.rm(mine, { force: true });
  }
}

const MUTEX_STALE_MS = 30_000;

/** Who holds a lock file, null if there is none. A file with no readable owner is young or stale. */
async function readOwner(file: string): Promise<{ text: string; pid: number | null; alive: boolean } | null> {
  const [text, st] = await Promise.all([fsp.readFile(file, 'utf8').catch(() => null), fsp.stat(file).catch(() => null)]);
  if (text === null || st === null) return null;
  const owner = ownerAlive(text);
  if (owner) return { text, pid: owner.pid, alive: owner.alive };
  return { text, pid: null, alive: Date.now() - st.mtimeMs < MUTEX_STALE_MS };
}

/** link(2) as an exclusive create: true if `to` is now ours, false if it existed. */
async function createExclusive(from: string, to: string, token: string, dir: string): Promise<boolean> {
  try {
    await fsp.link(from, to);
    return true;
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'EEXIST') return false;
    if (code !== 'EPERM' && code !== 'ENOTSUP' && code !== 'EOPNOTSUPP' && code !== 'ENOSYS') {
      throw new VolumeOpenError(`cannot lock volume ${dir}: ${(err as Error).message}`);
    }
  }
  try {
    await fsp.writeFile(to, token, { flag: 'wx' });
    return true;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'EEXIST') return false;
    throw new VolumeOpenError(`cannot lock volume ${dir}: ${(err as Error).message}`);
  }
}

async function underTakeoverMutex(dir: string, mine: string, token: string, fn: () => Promise<boolean>): Promise<boolean> {
  const mutex = containedPath(dir, 'lock.takeover');
  const deadline = Date.now() + 2 * MUTEX_STALE_MS;
  while (!(await createExclusive(mine, mutex, token, dir))) {
    const holder = await readOwner(mutex);
    if (holder && (!holder.alive || Date.now() - (await fsp.stat(mutex).then((st) => st.mtimeMs, () => Date.now())) > MUTEX_STALE_MS)) {
      await fsp.rm(mutex, { force: true });
      continue;
    }
    if (Date.now() > deadline) throw new VolumeOpenError(`cannot lock volume ${dir}: process ${holder?.pid ?? '?'} holds ${mutex}`);
    await new Promise((r) => setTimeout(r, 5));
  }
  try {
    return await fn();
  } finally {
    await fsp.rm(mutex, { force: true });
  }
}

/** Private lock files (`lock.PID.RANDOM`) of processes killed while locking: nothing else removes them. */
async function removeDeadPrivateFiles(dir: string): Promise<void> {
  for (const f of await fsp.readdir(dir).catch(() => [] as string[])) {
    const m = /^lock\.(\d+)\.[0-9a-f]{12}$/.exec(f);
    if (m && Number(m[1]) !== process.pid && !processAlive(Number(m[1]))) await fsp.rm(containedPath(dir, f), { force: true });
  }
}

export { CHUNK_ID_BYTES };
