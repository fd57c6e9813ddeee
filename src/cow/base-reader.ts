/**
 * Lazy reads of a volume's base (a disk stream in the repository). A block that is not in the
 * overlay is fetched from the chunk store on first use. A small LRU cache absorbs re-reads, and
 * a run of consecutive block reads triggers read-ahead of the following blocks so a guest booting
 * straight from a snapshot streams instead of paying one store round trip per block.
 */
import { blockCount, isZeroId, type ChunkStore, type DiskStream, CHUNK_ID_BYTES } from './chunk-store.js';

export class BaseReadError extends Error {
  override readonly name = 'BaseReadError';
}

export interface BaseReaderOptions {
  /** Blocks kept in memory (default 64: 4 MiB with 64 KiB blocks). */
  cacheBlocks?: number;
  /** Blocks fetched ahead once reads look sequential (default 8). */
  readAhead?: number;
}

export class BaseReader {
  private readonly cache = new Map<number, Buffer>();
  private readonly pending = new Map<number, Promise<Buffer>>();
  private readonly cacheBlocks: number;
  private readonly readAhead: number;
  private lastBlock = -2;
  private readonly nBlocks: number;
  fetches = 0;

  constructor(
    readonly stream: DiskStream,
    private readonly store: ChunkStore | undefined,
    opts: BaseReaderOptions = {},
  ) {
    this.cacheBlocks = opts.cacheBlocks ?? 64;
    this.readAhead = opts.readAhead ?? 8;
    this.nBlocks = blockCount(stream.size, stream.chunkSize);
  }

  isZero(block: number): boolean {
    return isZeroId(this.stream.chunks, block);
  }

  chunkId(block: number): Buffer {
    return this.stream.chunks.subarray(block * CHUNK_ID_BYTES, (block + 1) * CHUNK_ID_BYTES);
  }

  /**
   * Content of `block`, exactly chunkSize bytes (a short last chunk is zero-padded). The returned
   * buffer is shared with the cache: callers copy out of it and never modify it.
   */
  async read(block: number): Promise<Buffer> {
    const sequential = block === this.lastBlock + 1;
    this.lastBlock = block;
    const p = this.fetch(block);
    if (sequential) {
      for (let k = 1; k <= this.readAhead && block + k < this.nBlocks; k++) {
        const b = block + k;
        if (!this.cache.has(b) && !this.pending.has(b) && !this.isZero(b)) {
          this.fetch(b).catch(() => undefined);
        }
      }
    }
    return p;
  }

  private fetch(block: number): Promise<Buffer> {
    const hit = this.cache.get(block);
    if (hit) {
      this.cache.delete(block);
      this.cache.set(block, hit);
      return Promise.resolve(hit);
    }
    const inflight = this.pending.get(block);
    if (inflight) return inflight;
    const bs = this.stream.chunkSize;
    if (this.isZero(block)) return Promise.resolve(Buffer.alloc(bs));
    const store = this.store;
    if (!store) {
      return Promise.reject(new BaseReadError(`block ${block} lives in the base snapshot but the volume was opened without a repository`));
    }
    const p = (async () => {
      this.fetches++;
      let data: Buffer;
      try {
        data = await store.getChunk(this.chunkId(block));
      } catch (err) {
        throw new BaseReadError(`reading base block ${block} from the repository failed: ${(err as Error).message}`);
      }
      const want = Math.min(bs, this.stream.size - block * bs);
      if (data.length !== want) {
        throw new BaseReadError(`base block ${block} has ${data.length} bytes, expected ${want}`);
      }
      if (data.length < bs) {
        const padded = Buffer.alloc(bs);
        data.copy(padded);
        data = padded;
      }
      this.cache.set(block, data);
      while (this.cache.size > this.cacheBlocks) {
        const oldest = this.cache.keys().next().value as number;
        this.cache.delete(oldest);
      }
      return data;
    })();
    this.pending.set(block, p);
    p.then(
      () => this.pending.delete(block),
      () => this.pending.delete(block),
    );
    return p;
  }
}
