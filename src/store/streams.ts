/**
 * Moving whole streams in and out of the repository: ingest (a file, a disk image, stdin) and export.
 *
 * Ingest cuts the input at fixed offsets (the repository's chunk size, 64 KiB by default): VM disk
 * images change in place at block granularity, so block-aligned fixed chunks deduplicate every
 * unchanged block between two versions of an image, where content-defined chunking would buy
 * nothing and cost a rolling hash (see docs/format.md for the measurement behind 64 KiB).
 *
 * Pipeline (both cores busy, memory bounded by MAX_IN_FLIGHT batches plus two packs in upload):
 *   read 4 MiB batch ──> worker: BLAKE3 each chunk ──> main: dedup against index + in-flight claims
 *        ──> worker: compress + seal the new ones ──> main: append to pack (uploads in background)
 * Export reads runs of chunks that sit next to each other in one pack with one ranged read,
 * decodes and verifies them in workers, and writes them in order; zero chunks become holes in a
 * file target.
 */
import { once } from 'node:events';
import { write as writeCb } from 'node:fs';
import { promisify } from 'node:util';
import type { Readable, Writable } from 'node:stream';
import type { FileHandle } from 'node:fs/promises';
import { ID_SIZE, isZeroId } from './hash.js';
import { chunkCount, type StreamKind, type StreamRecord } from './manifest.js';
import type { Repository } from './repository.js';
import type { SharedSlot } from './workers.js';
import { IngestError, IntegrityError } from './errors.js';
import { encodeBound } from './codec.js';
import { SEAL_OVERHEAD } from './crypto.js';
import type { Extent } from '../util/sparse.js';

const BATCH_BYTES = 4 << 20;
const MAX_IN_FLIGHT = 4;

export interface IngestOptions {
  name: string;
  kind: StreamKind;
  /** Called with the bytes read so far (for progress bars). */
  onProgress?: (bytesRead: number) => void;
}

export interface IngestResult {
  stream: StreamRecord;
  newChunks: number;
  newBytes: number;
  storedBytes: number;
  dedupChunks: number;
  zeroChunks: number;
}

export type { Extent } from '../util/sparse.js';

/**
 * A regular file read with positional reads straight into the pipeline's buffers. With `extents`
 * (the file's data ranges, from SEEK_DATA/SEEK_HOLE), chunks that lie wholly in a hole are never
 * read: they are zero chunks by definition. Reading a hole is not free: the kernel zero-fills page
 * cache for it, which measured as the largest single cost of importing a sparse image. As with any
 * backup of a file that changes while it is read, data written into a hole after the extents were
 * taken may be missed: import a stopped VM's disk, or a snapshot of it (vmsnap take does).
 */
export interface FileSource {
  file: FileHandle;
  size: number;
  extents?: Extent[];
}

export type IngestInput = AsyncIterable<Uint8Array> | Readable | FileSource;

function isFileSource(input: IngestInput): input is FileSource {
  return typeof (input as FileSource).size === 'number' && typeof (input as FileSource).file === 'object';
}

export async function ingestStream(repo: Repository, input: IngestInput, opts: IngestOptions): Promise<IngestResult> {
  const chunkSize = repo.chunkSize;
  const perBatch = Math.max(1, Math.floor(BATCH_BYTES / chunkSize));
  const batchBytes = perBatch * chunkSize;
  const outBytes = perBatch * (encodeBound(chunkSize) + SEAL_OVERHEAD);
  const pool = repo.workers();
  const idParts: Buffer[] = [];
  const claimed = new Set<string>();
  const inFlight: Promise<void>[] = [];
  const held = new Set<SharedSlot>();
  const result = { newChunks: 0, newBytes: 0, storedBytes: 0, dedupChunks: 0, zeroChunks: 0 };
  let total = 0;
  const acquire = (size: number): SharedSlot => {
    const slot = pool.acquireShared(size);
    held.add(slot);
    return slot;
  };
  const release = (slot: SharedSlot): void => {
    held.delete(slot);
    pool.releaseShared(slot);
  };

  const dispatch = (batch: SharedSlot, used: number, seq: number, holes?: number[]) => {
    const lengths: number[] = [];
    for (let off = 0; off < used; off += chunkSize) lengths.push(Math.min(chunkSize, used - off));
    const job = (async () => {
      // A lease is released exactly once (the pool throws on a second release): the input goes
      // back as soon as encoding is done, so the read loop can refill it while chunks are packed.
      let input: SharedSlot | undefined = batch;
      let output: SharedSlot | undefined;
      try {
        const hashed = await pool.run({ type: 'hash', input: batch.id, lengths, ...(holes?.length ? { holes } : {}) });
        const ids = Buffer.from(hashed.ids);
        idParts[seq] = ids;
        // Claiming is synchronous, so two batches in flight never both store the same new chunk.
        const items: [number, number, number][] = [];
        for (let i = 0; i < lengths.length; i++) {
          const id = ids.subarray(i * ID_SIZE, (i + 1) * ID_SIZE);
          if (isZeroId(id)) {
            result.zeroChunks++;
            continue;
          }
          const hex = id.toString('hex');
          if (claimed.has(hex) || repo.hasChunk(id)) {
            result.dedupChunks++;
            continue;
          }
          claimed.add(hex);
          items.push([i * chunkSize, lengths[i]!, i * ID_SIZE]);
        }
        if (items.length === 0) return;
        output = acquire(outBytes);
        const enc = await pool.run({ type: 'encode', input: batch.id, items, ids, codec: repo.codec, level: 3, output: output.id });
        release(batch);
        input = undefined;
        let p = 0;
        for (let k = 0; k < items.length; k++) {
          const [, length, idStart] = items[k]!;
          const size = enc.sizes[k]!;
          const id = Buffer.from(ids.subarray(idStart, idStart + ID_SIZE));
          // addEncoded copies the bytes into the pack, so the output buffer can be reused after.
          await repo.addEncoded(id, enc.codecs[k]!, output.bytes.subarray(p, p + size), length);
          claimed.delete(id.toString('hex'));
          p += size;
          result.newChunks++;
          result.newBytes += length;
          result.storedBytes += size;
        }
      } finally {
        if (input) release(input);
        if (output) release(output);
      }
    })();
    job.catch(() => undefined); // surfaced by drain(); a job failing while input is awaited must not be unhandled
    inFlight.push(job);
  };

  let seq = 0;
  const drain = async (limit: number) => {
    while (inFlight.length > limit) await inFlight.shift();
  };
  try {
    if (isFileSource(input)) {
      const { file, size } = input;
      const extents = input.extents ?? [{ offset: 0, length: size }];
      let e = 0;
      for (let start = 0; start < size; start += batchBytes) {
        const used = Math.min(batchBytes, size - start);
        const batch = acquire(batchBytes);
        const holes: number[] = [];
        // Read runs of chunks that touch data; chunks wholly inside a hole are not read at all.
        let runStart = -1;
        const readRun = async (from: number, to: number) => {
          let done = 0;
          while (done < to - from) {
            const { bytesRead } = await file.read(batch.bytes, from + done, to - from - done, start + from + done);
            if (bytesRead === 0) throw new IngestError(`input ended at ${start + from + done} bytes, expected ${size} (did the file shrink while it was read?)`);
            done += bytesRead;
          }
        };
        for (let off = 0, i = 0; off < used; off += chunkSize, i++) {
          const cs = start + off;
          const ce = Math.min(start + used, cs + chunkSize);
          while (e < extents.length && extents[e]!.offset + extents[e]!.length <= cs) e++;
          const hasData = e < extents.length && extents[e]!.offset < ce;
          if (hasData && runStart < 0) runStart = off;
          if (!hasData) {
            holes.push(i);
            if (runStart >= 0) await readRun(runStart, off);
            runStart = -1;
          }
        }
        if (runStart >= 0) await readRun(runStart, used);
        total += used;
        dispatch(batch, used, seq++, holes);
        await drain(MAX_IN_FLIGHT);
        opts.onProgress?.(total);
      }
    } else {
      let batch = acquire(batchBytes);
      let fill = 0;
      for await (const piece of input as AsyncIterable<Uint8Array>) {
        let off = 0;
        while (off < piece.length) {
          const n = Math.min(piece.length - off, batchBytes - fill);
          batch.bytes.set(piece.subarray(off, off + n), fill);
          fill += n;
          off += n;
          total += n;
          if (fill === batchBytes) {
            dispatch(batch, fill, seq++);
            batch = acquire(batchBytes);
            fill = 0;
            await drain(MAX_IN_FLIGHT);
            opts.onProgress?.(total);
          }
        }
      }
      if (fill > 0) dispatch(batch, fill, seq++);
      else release(batch);
    }
    await drain(0);
  } catch (err) {
    // Let the other batches settle before reporting, so no worker reply lands after we return.
    await Promise.allSettled(inFlight);
    for (const slot of held) pool.releaseShared(slot);
    throw err;
  } finally {
    pool.trimShared();
  }
  opts.onProgress?.(total);
  repo.noteDedup(result.dedupChunks, result.zeroChunks);
  const chunks = Buffer.concat(idParts.slice(0, seq));
  if (chunks.length !== chunkCount(total, chunkSize) * ID_SIZE) throw new Error('internal: chunk list length mismatch');
  return { stream: { name: opts.name, kind: opts.kind, size: total, chunkSize, chunks }, ...result };
}

export interface ExportTarget {
  /** Sequential writes to a stream (a socket, a PassThrough): each gets its own copy of the bytes. */
  writable?: Writable;
  /**
   * Sequential writes to a file descriptor the caller owns (stdout as fd 1, a pipe): write(2) in
   * order, straight from the shared buffers, no copies. A non-blocking descriptor is retried.
   */
  fd?: number;
  /** Positional writes to a file: zero chunks are left as holes. */
  file?: FileHandle;
}

const MAX_GROUP_BYTES = 8 << 20;
const MAX_GAP = 256 << 10;
const READ_AHEAD = 6;

interface Group {
  pack: string;
  start: number;
  end: number;
  /** [chunk index, offset in group, stored length, codec, raw length] */
  items: [number, number, number, number, number][];
}

/** Plans ranged reads: consecutive chunks of the stream that lie close together in one pack. */
function planGroups(repo: Repository, stream: StreamRecord): (Group | { zero: number; count: number })[] {
  const n = chunkCount(stream.size, stream.chunkSize);
  const out: (Group | { zero: number; count: number })[] = [];
  let g: Group | null = null;
  for (let i = 0; i < n; i++) {
    const id = stream.chunks.subarray(i * ID_SIZE, (i + 1) * ID_SIZE);
    const raw = i === n - 1 ? stream.size - i * stream.chunkSize : stream.chunkSize;
    if (isZeroId(id)) {
      const last = out[out.length - 1];
      if (!g && last && 'zero' in last && last.zero + last.count === i) last.count++;
      else {
        g = null;
        out.push({ zero: i, count: 1 });
      }
      continue;
    }
    const loc = repo.locate(id);
    if (loc.rawLength !== raw) {
      throw new IntegrityError(`stream ${stream.name}: chunk ${i} is ${loc.rawLength} bytes in the index, expected ${raw}`);
    }
    // Bounded by stored and by decoded size: well-compressed chunks must not make one huge group
    // (memory, and one worker doing all the work).
    if (
      g &&
      g.pack === loc.pack &&
      loc.offset >= g.end &&
      loc.offset - g.end <= MAX_GAP &&
      loc.offset + loc.storedLength - g.start <= MAX_GROUP_BYTES &&
      (g.items.length + 1) * stream.chunkSize <= MAX_GROUP_BYTES
    ) {
      g.items.push([i, loc.offset - g.start, loc.storedLength, loc.codec, raw]);
      g.end = loc.offset + loc.storedLength;
    } else {
      g = { pack: loc.pack, start: loc.offset, end: loc.offset + loc.storedLength, items: [[i, 0, loc.storedLength, loc.codec, raw]] };
      out.push(g);
    }
  }
  return out;
}

/**
 * Writes a stream's bytes to `target`, verifying every chunk. Nothing unverified is ever written:
 * a damaged chunk stops the export with an IntegrityError naming the chunk and its offset.
 */
export async function exportStream(repo: Repository, stream: StreamRecord, target: ExportTarget, onProgress?: (bytes: number) => void): Promise<void> {
  const plan = planGroups(repo, stream);
  const pool = repo.workers();
  // Buffers are shared with the workers and reused: READ_AHEAD groups in flight, each holding one
  // input buffer (and one output buffer unless the worker writes the file itself).
  // A file alone is written by the workers themselves; any sequential target needs the bytes back.
  const workerFd = target.file && !target.writable && target.fd === undefined ? target.file.fd : undefined;
  let written = 0;
  const fetch = (g: Group): Promise<Decoded> =>
    (async () => {
      // A group starts with one chunk whatever its size: chunks may exceed the usual group size.
      const length = g.end - g.start;
      const input = pool.acquireShared(Math.max(MAX_GROUP_BYTES, length));
      let output: SharedSlot | undefined;
      try {
        const data = await repo.backend.get('packs', g.pack, { offset: g.start, length }, input.bytes);
        // A backend may ignore `into` (the contract allows it): then its bytes are copied in.
        if (data.buffer !== input.bytes.buffer || data.byteOffset !== 0) data.copy(input.bytes);
        const ids = new Uint8Array(g.items.length * ID_SIZE);
        g.items.forEach(([i], k) => ids.set(stream.chunks.subarray(i * ID_SIZE, (i + 1) * ID_SIZE), k * ID_SIZE));
        const items = g.items.map(([, off, len, codec, raw], k): [number, number, number, number, number] => [off, len, codec, raw, k * ID_SIZE]);
        const rawBytes = g.items.reduce((n, it) => n + it[4], 0);
        if (workerFd !== undefined) {
          // The worker writes what it decoded: the bytes are still in its cache (see chunk-worker.ts).
          await pool.run({ type: 'decode', input: input.id, items, ids, output: { fd: workerFd, position: g.items[0]![0] * stream.chunkSize } });
          return { written: rawBytes };
        }
        const out = pool.acquireShared(Math.max(MAX_GROUP_BYTES, rawBytes));
        output = out;
        await pool.run({ type: 'decode', input: input.id, items, ids, output: { slot: out.id } });
        output = undefined;
        return { written: 0, data: out.bytes.subarray(0, rawBytes), release: () => pool.releaseShared(out) };
      } catch (err) {
        if (err instanceof IntegrityError) {
          throw new IntegrityError(`stream ${stream.name}: chunks ${g.items[0]![0]}-${g.items[g.items.length - 1]![0]} (pack ${g.pack.slice(0, 12)}): ${err.message}`);
        }
        throw err;
      } finally {
        pool.releaseShared(input);
        if (output) pool.releaseShared(output);
      }
    })();
  const queue: { entry: (typeof plan)[number]; data: Promise<Decoded> | null }[] = [];
  let next = 0;
  const refill = () => {
    while (queue.length < READ_AHEAD && next < plan.length) {
      const entry = plan[next++]!;
      const data = 'zero' in entry ? null : fetch(entry);
      data?.catch(() => undefined); // surfaced when awaited in order
      queue.push({ entry, data });
    }
  };
  const zeros = Buffer.alloc(Math.min(stream.chunkSize * 16, 1 << 20));
  try {
    await writeInOrder();
  } catch (err) {
    // Let the groups still in flight finish and give their buffers back before reporting.
    for (const { data } of queue.splice(0)) {
      const decoded = await data?.catch(() => null);
      decoded?.release?.();
    }
    throw err;
  } finally {
    pool.trimShared();
  }

  async function writeInOrder(): Promise<void> {
    refill();
    while (queue.length) {
      const { entry, data } = queue.shift()!;
      refill();
      if ('zero' in entry) {
        const start = entry.zero * stream.chunkSize;
        const end = Math.min(stream.size, (entry.zero + entry.count) * stream.chunkSize);
        for (let p = start; p < end; p += zeros.length) {
          const z = zeros.subarray(0, Math.min(zeros.length, end - p));
          if (target.writable) await write(target.writable, z);
          if (target.fd !== undefined) await writeAll(target.fd, z);
        }
        written += end - start;
      } else {
        const decoded = await data!;
        if (decoded.data) {
          const buf = decoded.data;
          let copy: Buffer | undefined;
          try {
            if (target.file) await target.file.write(buf, 0, buf.length, entry.items[0]![0] * stream.chunkSize);
            if (target.fd !== undefined) await writeAll(target.fd, buf);
            // A Writable may hand what it was given on (a PassThrough's reader keeps it): give it its
            // own copy, never a view of a buffer that is about to be reused.
            if (target.writable) copy = Buffer.from(buf);
          } finally {
            decoded.release();
          }
          if (copy) await write(target.writable!, copy);
          written += buf.length;
        } else written += decoded.written;
      }
      onProgress?.(written);
    }
    if (target.file) await target.file.truncate(stream.size);
  }
}

type Decoded =
  /** Already written to the file target by the worker. */
  | { written: number; data?: undefined; release?: undefined }
  | {
      written: 0;
      data: Buffer;
      /** Gives the buffer behind `data` back to the pool once it has been written. */
      release: () => void;
    };

const fsWrite = promisify(writeCb);

/** All of `buf` to `fd` at its current offset; EAGAIN (a non-blocking pipe that is full) waits and retries. */
async function writeAll(fd: number, buf: Buffer): Promise<void> {
  let done = 0;
  while (done < buf.length) {
    try {
      done += (await fsWrite(fd, buf, done, buf.length - done, null)).bytesWritten;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EAGAIN') throw err;
      await new Promise((resolve) => setTimeout(resolve, 1));
    }
  }
}

async function write(w: Writable, buf: Buffer): Promise<void> {
  if (!w.write(buf)) await once(w, 'drain');
}
