/**
 * Snapshots and clones of copy-on-write volumes.
 *
 * A snapshot writes only the closed generations' dirty blocks into the repository; every other
 * block keeps the parent stream's chunk id, so unchanged data is never read. When tracking was
 * lost the frozen set covers the whole volume and each block's hash is compared with the parent's
 * id instead (slower, still correct, and still deduplicated because the store deduplicates).
 *
 * Reusing the parent's ids is only sound while the store still has those chunks. A volume's parent
 * (its last snapshot) is not pinned, so `forget` + `prune` may remove it; the next snapshot then
 * finds some parent chunks gone (ensureParentChunks) and reads the whole volume once instead, storing
 * again what is missing. Pinning the parent instead would make every VM's latest snapshot impossible
 * to forget for as long as the VM exists, and cost a pin write per take; this costs one index lookup
 * per block per snapshot, and a full read only after such a prune.
 *
 * A clone is a new volume whose base is a snapshot's disk stream: constant work, no data copied.
 */
import { blockCount, isZeroBuffer, isZeroId, validateDiskStream, ZERO_CHUNK_ID, CHUNK_ID_BYTES, type ChunkStore, type DiskStream } from './chunk-store.js';
import { Volume, BASE, ZERO, type FrozenSet, type VolumeOpenOptions } from './volume.js';
import { UserFacingError } from '../util/errors.js';
import { withBasePin, type SnapshotPinner } from './base-pin.js';

export class SnapshotError extends UserFacingError {
  override readonly name = 'SnapshotError';
}
export class CloneError extends UserFacingError {
  override readonly name = 'CloneError';
}

export interface SnapshotStats {
  /** Generations captured (oldest first). */
  generations: number[];
  mode: 'tracked' | 'hash';
  /** Blocks examined: the dirty blocks, or every block in hash mode. */
  dirtyBlocks: number;
  zeroBlocks: number;
  /** Blocks whose chunk id equals the parent's (hash mode) or that the store already had. */
  reusedBlocks: number;
  newChunks: number;
  newBytes: number;
  readBytes: number;
  durationMs: number;
}

export interface SnapshotResult {
  stream: DiskStream;
  stats: SnapshotStats;
}

export interface SnapshotOptions {
  /** Stream to diff against when the volume lost its own record of it (hash mode). */
  parent?: DiskStream;
  /** Parallel reads of the overlay (default 4). */
  concurrency?: number;
}

const RUN_BLOCKS = 16;
const running = new WeakMap<Volume, Promise<unknown>>();

/**
 * Freezes the volume (unless freeze() was already called in this process for a generation not yet
 * captured, e.g. by the QEMU driver while the guest was paused), writes the frozen blocks into `store` and returns the new disk
 * stream. The caller commits the stream into a snapshot manifest.
 */
export function snapshotVolume(volume: Volume, store: ChunkStore, opts: SnapshotOptions = {}): Promise<SnapshotResult> {
  const prev = running.get(volume) ?? Promise.resolve();
  const p = prev.catch(() => undefined).then(() => snapshotLocked(volume, store, opts));
  running.set(volume, p);
  return p;
}

/**
 * Counts the chunks of the stream the next snapshot diffs against (`parent`, else the volume's own
 * record) that `store` no longer has — their snapshot was forgotten and pruned — and, if any, drops
 * the volume's dirty tracking: the next freeze then covers every block and the snapshot reads and
 * stores them again (hash mode) instead of reusing ids of chunks that are gone. Call it before the
 * freeze a snapshot captures (snapshotVolume does when it freezes itself; a caller that freezes
 * earlier, e.g. while the guest is paused, calls it before that).
 */
export function ensureParentChunks(volume: Volume, store: ChunkStore, parent: DiskStream | null = volume.parent): number {
  if (!parent || parent.size !== volume.size || parent.chunkSize !== volume.blockSize) return 0;
  let missing = 0;
  const n = blockCount(parent.size, parent.chunkSize);
  for (let i = 0; i < n; i++) {
    if (!isZeroId(parent.chunks, i) && !store.hasChunk(parent.chunks.subarray(i * CHUNK_ID_BYTES, (i + 1) * CHUNK_ID_BYTES))) missing++;
  }
  if (missing) volume.invalidateTracking();
  return missing;
}

async function snapshotLocked(volume: Volume, store: ChunkStore, opts: SnapshotOptions): Promise<SnapshotResult> {
  const t0 = performance.now();
  const bs = volume.blockSize;
  if (store.chunkSize !== bs) {
    throw new SnapshotError(`repository chunk size ${store.chunkSize} differs from volume block size ${bs}`);
  }
  // Frozen sets restored at open (a snapshot interrupted by a crash) do not stand for a freeze
  // point the caller chose: without a fresh freeze the snapshot would miss every later write.
  if (!volume.frozenSets().some((s) => !s.recovered)) {
    ensureParentChunks(volume, store, opts.parent ?? volume.parent);
    volume.freeze();
  }
  const sets: FrozenSet[] = [...volume.frozenSets()];
  await Promise.all(sets.map((s) => s.drained));
  try {
    await volume.flush();
  } catch (err) {
    throw new SnapshotError(`flushing the volume before the snapshot failed: ${(err as Error).message}`);
  }
  const hash = sets.some((s) => s.full);
  const parent = opts.parent ?? volume.parent;
  if (parent) {
    try {
      validateDiskStream(parent);
    } catch (err) {
      throw new SnapshotError(`parent stream is invalid: ${(err as Error).message}`);
    }
    if (parent.size !== volume.size || parent.chunkSize !== bs) {
      throw new SnapshotError(`parent stream geometry ${parent.size}/${parent.chunkSize} does not match the volume`);
    }
  } else if (!hash) {
    throw new SnapshotError('the volume has no parent stream to diff against');
  }
  const n = blockCount(volume.size, bs);
  const chunks = parent ? Buffer.from(parent.chunks) : Buffer.alloc(n * CHUNK_ID_BYTES);

  // Latest frozen mapping per block; later generations override earlier ones.
  let merged: Int32Array | null = null;
  let touched: Uint8Array | null = null;
  if (sets.length > 1) {
    merged = new Int32Array(n);
    touched = new Uint8Array(n);
    for (const s of sets) {
      for (let k = 0; k < s.blocks.length; k++) {
        merged[s.blocks[k]!] = s.slots[k]!;
        touched[s.blocks[k]!] = 1;
      }
    }
  }
  const blocks: number[] = [];
  const slots: number[] = [];
  if (merged && touched) {
    for (let i = 0; i < n; i++) {
      if (touched[i]) {
        blocks.push(i);
        slots.push(merged[i]!);
      }
    }
  } else if (sets[0]) {
    for (let k = 0; k < sets[0].blocks.length; k++) {
      blocks.push(sets[0].blocks[k]!);
      slots.push(sets[0].slots[k]!);
    }
  }

  const stats: SnapshotStats = {
    generations: sets.map((s) => s.generation),
    mode: hash ? 'hash' : 'tracked',
    dirtyBlocks: blocks.length,
    zeroBlocks: 0,
    reusedBlocks: 0,
    newChunks: 0,
    newBytes: 0,
    readBytes: 0,
    durationMs: 0,
  };

  // Runs of blocks whose slots are consecutive in the overlay file are read with one call.
  interface Run {
    first: number; // index into blocks/slots
    count: number;
  }
  const runs: Run[] = [];
  const base = volume.base;
  for (let k = 0; k < blocks.length; k++) {
    const b = blocks[k]!;
    const s = slots[k]!;
    if (s === ZERO) {
      ZERO_CHUNK_ID.copy(chunks, b * CHUNK_ID_BYTES);
      stats.zeroBlocks++;
      continue;
    }
    if (s === BASE) {
      // Only in hash mode: the block still reads from the base, whose id is known without a read.
      if (base) base.chunks.copy(chunks, b * CHUNK_ID_BYTES, b * CHUNK_ID_BYTES, (b + 1) * CHUNK_ID_BYTES);
      else ZERO_CHUNK_ID.copy(chunks, b * CHUNK_ID_BYTES);
      stats.reusedBlocks++;
      continue;
    }
    const last = runs[runs.length - 1];
    if (last && last.count < RUN_BLOCKS && slots[last.first + last.count - 1]! + 1 === s && last.first + last.count === k) last.count++;
    else runs.push({ first: k, count: 1 });
  }

  let next = 0;
  const worker = async (): Promise<void> => {
    while (next < runs.length) {
      const run = runs[next++]!;
      const buf = Buffer.allocUnsafe(run.count * bs);
      await volume.readSlots(slots[run.first]!, run.count, buf);
      stats.readBytes += run.count * bs;
      for (let j = 0; j < run.count; j++) {
        const b = blocks[run.first + j]!;
        const data = buf.subarray(j * bs, j * bs + volume.blockLen(b));
        const at = b * CHUNK_ID_BYTES;
        if (isZeroBuffer(data)) {
          ZERO_CHUNK_ID.copy(chunks, at);
          stats.zeroBlocks++;
          continue;
        }
        if (hash && parent) {
          const id = store.chunkId(data);
          // The parent's chunk may be gone (ensureParentChunks): then it is stored again below.
          if (id.equals(parent.chunks.subarray(at, at + CHUNK_ID_BYTES)) && store.hasChunk(id)) {
            id.copy(chunks, at);
            stats.reusedBlocks++;
            continue;
          }
        }
        const { id, isNew } = await store.putChunk(data);
        id.copy(chunks, at);
        if (isNew) {
          stats.newChunks++;
          stats.newBytes += data.length;
        } else stats.reusedBlocks++;
      }
    }
  };
  try {
    await Promise.all(Array.from({ length: Math.max(1, opts.concurrency ?? 4) }, worker));
    await store.flush();
  } catch (err) {
    throw new SnapshotError(`writing the snapshot of generation ${stats.generations.join(',')} failed: ${(err as Error).message}`);
  }
  const stream: DiskStream = { size: volume.size, chunkSize: bs, chunks };
  await volume.completeSnapshot(sets, stream);
  stats.durationMs = performance.now() - t0;
  return { stream, stats };
}

/** Creates a volume in `dir` whose base is `stream`: no data copied, constant time. */
/**
 * A new volume whose base is `stream`. With `pin`, the stream's snapshot is pinned in the repository
 * before the volume exists and for as long as it depends on it (base-pin.ts).
 */
export async function cloneVolume(
  dir: string,
  stream: DiskStream,
  opts: VolumeOpenOptions & { pin?: { pinner: SnapshotPinner; snapshot: string; holder: string } } = {},
): Promise<Volume> {
  const { pin } = opts;
  if (pin) return withBasePin(dir, pin.pinner, pin.snapshot, pin.holder, () => cloneVolume(dir, stream, { ...opts, pin: undefined }));
  try {
    validateDiskStream(stream);
  } catch (err) {
    throw new CloneError(`cannot clone: ${(err as Error).message}`);
  }
  if (opts.store && opts.store.chunkSize !== stream.chunkSize) {
    throw new CloneError(`snapshot chunk size ${stream.chunkSize} differs from the repository's ${opts.store.chunkSize}`);
  }
  try {
    return await Volume.create(dir, { size: stream.size, blockSize: stream.chunkSize, base: stream, store: opts.store, baseReader: opts.baseReader });
  } catch (err) {
    throw new CloneError(`cloning into ${dir} failed: ${(err as Error).message}`);
  }
}
