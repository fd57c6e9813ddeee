/**
 * Counts requests, errors and bytes per method, for `--stats` and for checking the S3 cost targets
 * (at most 64 PUTs per GiB ingested). Wrap it outside RetryBackend to count logical operations,
 * inside to count billed requests (each retry is a request S3 charges for).
 */
import type { Backend, BackendCapabilities, ByteRange, Leftover, ObjectInfo, ObjectKind } from './contract.js';

export type StatsMethod = 'put' | 'create' | 'get' | 'stat' | 'list' | 'delete';

export interface MethodStats {
  requests: number;
  errors: number;
  /** Bytes sent to the backend (put/create) or received from it (get). */
  bytes: number;
}

export type BackendStats = Record<StatsMethod, MethodStats> & {
  /** Objects yielded by list calls. */
  listed: number;
};

function emptyStats(): BackendStats {
  const m = (): MethodStats => ({ requests: 0, errors: 0, bytes: 0 });
  return { put: m(), create: m(), get: m(), stat: m(), list: m(), delete: m(), listed: 0 };
}

export class StatsBackend implements Backend {
  private counters = emptyStats();

  constructor(readonly inner: Backend) {}

  get location(): string {
    return this.inner.location;
  }

  get capabilities(): BackendCapabilities {
    return this.inner.capabilities;
  }

  /** A copy of the counters. */
  snapshot(): BackendStats {
    return structuredClone(this.counters);
  }

  reset(): void {
    this.counters = emptyStats();
  }

  /** Write requests (put + create) per GiB written; 0 when nothing was written. */
  writesPerGiB(): number {
    const c = this.counters;
    const bytes = c.put.bytes + c.create.bytes;
    return bytes === 0 ? 0 : ((c.put.requests + c.create.requests) * 2 ** 30) / bytes;
  }

  private async count<T>(method: StatsMethod, op: () => Promise<T>, bytes: (r: T) => number): Promise<T> {
    const m = this.counters[method];
    m.requests++;
    try {
      const r = await op();
      m.bytes += bytes(r);
      return r;
    } catch (err) {
      m.errors++;
      throw err;
    }
  }

  put(kind: ObjectKind, name: string, data: Uint8Array): Promise<void> {
    return this.count('put', () => this.inner.put(kind, name, data), () => data.length);
  }

  create(kind: ObjectKind, name: string, data: Uint8Array): Promise<boolean> {
    return this.count('create', () => this.inner.create(kind, name, data), (c) => (c ? data.length : 0));
  }

  get(kind: ObjectKind, name: string, range?: ByteRange, into?: Uint8Array): Promise<Buffer> {
    return this.count('get', () => this.inner.get(kind, name, range, into), (b) => b.length);
  }

  stat(kind: ObjectKind, name: string): Promise<ObjectInfo> {
    return this.count('stat', () => this.inner.stat(kind, name), () => 0);
  }

  async *list(kind: ObjectKind): AsyncIterable<ObjectInfo> {
    const m = this.counters.list;
    m.requests++;
    try {
      for await (const info of this.inner.list(kind)) {
        this.counters.listed++;
        yield info;
      }
    } catch (err) {
      m.errors++;
      throw err;
    }
  }

  delete(kind: ObjectKind, name: string): Promise<void> {
    return this.count('delete', () => this.inner.delete(kind, name), () => 0);
  }

  removeLeftovers(olderThanMs: number): Promise<number> {
    return this.inner.removeLeftovers(olderThanMs);
  }

  leftovers(): Promise<Leftover[]> {
    return this.inner.leftovers();
  }

  close(): Promise<void> {
    return this.inner.close();
  }
}
