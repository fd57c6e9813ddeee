/**
 * The narrow slice of the repository that copy-on-write volumes need. The real Repository
 * (src/store) is plugged in through a small adapter implementing `ChunkStore`; tests use
 * `MemoryChunkStore`.
 *
 * A disk stream (one disk of one snapshot):
 *
 *   { size, chunkSize, chunks }
 *   chunks = n × 32-byte chunk ids, n = ceil(size / chunkSize)
 *   block i covers bytes [i·chunkSize, min(size, (i+1)·chunkSize)); the last chunk may be short
 *   id == ZERO_CHUNK_ID (32 zero bytes)  →  block reads as zeros and nothing is stored
 */
import { blake3 } from '@napi-rs/blake-hash';
import { UserFacingError } from '../util/errors.js';

export const CHUNK_ID_BYTES = 32;
export const ZERO_CHUNK_ID: Buffer = Buffer.alloc(CHUNK_ID_BYTES);

export interface ChunkStore {
  /** Block size of volumes backed by this store (the repository's disk chunk size). */
  readonly chunkSize: number;
  /** Content id (32 bytes) of `data`; keyed when the repository is encrypted. */
  chunkId(data: Uint8Array): Buffer;
  /**
   * True when a chunk with this id is stored (or waiting to be): a snapshot may reference it. Must
   * not report chunks maintenance removed (the Repository's write session reloads an index a prune
   * replaced): snapshots reuse their parent's ids only while this holds for them.
   */
  hasChunk(id: Uint8Array): boolean;
  /** Stores `data` unless a chunk with the same id exists. */
  putChunk(data: Uint8Array): Promise<{ id: Buffer; isNew: boolean }>;
  /** Verified plaintext of a stored chunk. */
  getChunk(id: Buffer): Promise<Buffer>;
  /** Makes every chunk put so far durable. */
  flush(): Promise<void>;
}

export interface DiskStream {
  size: number;
  chunkSize: number;
  /** n × 32 bytes of chunk ids. */
  chunks: Buffer;
}

export class DiskStreamError extends UserFacingError {
  override readonly name = 'DiskStreamError';
}

export function blockCount(size: number, blockSize: number): number {
  return Math.ceil(size / blockSize);
}

/** Throws a DiskStreamError naming what is wrong with `stream`. */
export function validateDiskStream(stream: DiskStream): void {
  if (!Number.isSafeInteger(stream.size) || stream.size < 0) {
    throw new DiskStreamError(`disk stream size ${stream.size} is not a non-negative integer`);
  }
  if (!Number.isInteger(stream.chunkSize) || stream.chunkSize < 512 || (stream.chunkSize & (stream.chunkSize - 1)) !== 0) {
    throw new DiskStreamError(`disk stream chunk size ${stream.chunkSize} is not a power of two >= 512`);
  }
  const want = blockCount(stream.size, stream.chunkSize) * CHUNK_ID_BYTES;
  if (stream.chunks.length !== want) {
    throw new DiskStreamError(
      `disk stream of ${stream.size} bytes in ${stream.chunkSize}-byte chunks needs ${want} bytes of chunk ids, has ${stream.chunks.length}`,
    );
  }
}

export function chunkIdAt(stream: DiskStream, block: number): Buffer {
  return stream.chunks.subarray(block * CHUNK_ID_BYTES, (block + 1) * CHUNK_ID_BYTES);
}

export function isZeroId(chunks: Buffer, block: number): boolean {
  const o = block * CHUNK_ID_BYTES;
  // Four 8-byte reads instead of a 32-byte compare: this runs once per block on read paths.
  return (
    chunks.readBigUInt64LE(o) === 0n &&
    chunks.readBigUInt64LE(o + 8) === 0n &&
    chunks.readBigUInt64LE(o + 16) === 0n &&
    chunks.readBigUInt64LE(o + 24) === 0n
  );
}

/** A stream of `size` bytes that is all zeros. */
export function zeroDiskStream(size: number, chunkSize: number): DiskStream {
  return { size, chunkSize, chunks: Buffer.alloc(blockCount(size, chunkSize) * CHUNK_ID_BYTES) };
}

export class ChunkNotFoundError extends Error {
  override readonly name = 'ChunkNotFoundError';
}

/** In-memory store for tests and tools: BLAKE3 ids, no packing, no encryption. */
export class MemoryChunkStore implements ChunkStore {
  readonly chunks = new Map<string, Buffer>();
  puts = 0;
  gets = 0;
  newBytes = 0;

  constructor(readonly chunkSize = 65536) {}

  chunkId(data: Uint8Array): Buffer {
    return blake3(Buffer.from(data.buffer, data.byteOffset, data.byteLength));
  }

  async putChunk(data: Uint8Array): Promise<{ id: Buffer; isNew: boolean }> {
    const id = this.chunkId(data);
    const key = id.toString('hex');
    this.puts++;
    if (this.chunks.has(key)) return { id, isNew: false };
    this.chunks.set(key, Buffer.from(data));
    this.newBytes += data.byteLength;
    return { id, isNew: true };
  }

  hasChunk(id: Uint8Array): boolean {
    return this.chunks.has(Buffer.from(id.buffer, id.byteOffset, id.byteLength).toString('hex'));
  }

  async getChunk(id: Buffer): Promise<Buffer> {
    this.gets++;
    const data = this.chunks.get(id.toString('hex'));
    if (!data) throw new ChunkNotFoundError(`chunk ${id.toString('hex')} is not in the store`);
    return data;
  }

  async flush(): Promise<void> {}
}

/**
 * Checks that every non-zero chunk a stream references is present and hashes to its id.
 * Returns the list of problems (empty when the stream is sound).
 */
export async function checkDiskStream(stream: DiskStream, store: ChunkStore): Promise<string[]> {
  const problems: string[] = [];
  try {
    validateDiskStream(stream);
  } catch (err) {
    return [(err as Error).message];
  }
  const n = blockCount(stream.size, stream.chunkSize);
  for (let i = 0; i < n; i++) {
    if (isZeroId(stream.chunks, i)) continue;
    const id = chunkIdAt(stream, i);
    try {
      const data = await store.getChunk(id);
      const want = Math.min(stream.chunkSize, stream.size - i * stream.chunkSize);
      if (data.length !== want) problems.push(`block ${i}: chunk is ${data.length} bytes, expected ${want}`);
      else if (!store.chunkId(data).equals(id)) problems.push(`block ${i}: chunk content does not match its id`);
    } catch (err) {
      problems.push(`block ${i}: ${(err as Error).message}`);
    }
  }
  return problems;
}

let zeroBuf = Buffer.alloc(65536);

/** True when every byte of `b` is zero (native memcmp against a shared zero buffer). */
export function isZeroBuffer(b: Uint8Array): boolean {
  if (b.length === 0) return true;
  if (b[0] !== 0 || b[b.length - 1] !== 0) return false;
  if (b.length > zeroBuf.length) zeroBuf = Buffer.alloc(b.length);
  return Buffer.compare(b, zeroBuf.subarray(0, b.length)) === 0;
}
