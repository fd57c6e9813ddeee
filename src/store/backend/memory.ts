/**
 * An in-process backend for tests and `memory:` URLs. It honours the whole contract (copies on put
 * and get so callers cannot mutate stored objects through a shared buffer).
 */
import {
  BackendError,
  destination,
  ObjectNotFoundError,
  checkObjectName,
  checkRange,
  type Backend,
  type BackendCapabilities,
  type ByteRange,
  type ObjectInfo,
  type ObjectKind,
  type Leftover,
} from './contract.js';

export class MemoryBackend implements Backend {
  readonly capabilities: BackendCapabilities = { local: true, requestCost: false, atomicCreate: true };
  private readonly objects = new Map<ObjectKind, Map<string, Buffer>>();
  private closed = false;

  constructor(readonly location: string = 'memory:') {}

  private bucket(kind: ObjectKind): Map<string, Buffer> {
    let m = this.objects.get(kind);
    if (!m) {
      m = new Map();
      this.objects.set(kind, m);
    }
    return m;
  }

  private check(kind: ObjectKind, name: string): void {
    if (this.closed) throw new BackendError(`${this.location} is closed`, false);
    checkObjectName(kind, name);
  }

  async put(kind: ObjectKind, name: string, data: Uint8Array): Promise<void> {
    this.check(kind, name);
    this.bucket(kind).set(name, Buffer.from(data));
  }

  async create(kind: ObjectKind, name: string, data: Uint8Array): Promise<boolean> {
    this.check(kind, name);
    const m = this.bucket(kind);
    if (m.has(name)) return false;
    m.set(name, Buffer.from(data));
    return true;
  }

  async get(kind: ObjectKind, name: string, range?: ByteRange, into?: Uint8Array): Promise<Buffer> {
    this.check(kind, name);
    const data = this.bucket(kind).get(name);
    if (!data) throw new ObjectNotFoundError(kind, name);
    const r = range ?? { offset: 0, length: data.length };
    checkRange(kind, name, r, data.length);
    const out = destination(kind, name, r.length, into);
    out.set(data.subarray(r.offset, r.offset + r.length));
    return out;
  }

  async stat(kind: ObjectKind, name: string): Promise<ObjectInfo> {
    this.check(kind, name);
    const data = this.bucket(kind).get(name);
    if (!data) throw new ObjectNotFoundError(kind, name);
    return { name, size: data.length };
  }

  async *list(kind: ObjectKind): AsyncIterable<ObjectInfo> {
    this.check(kind, 'x');
    // Snapshot the entries so deletes during iteration neither skip nor repeat objects.
    const entries = [...this.bucket(kind)].map(([name, data]) => ({ name, size: data.length }));
    for (const e of entries) yield e;
  }

  async delete(kind: ObjectKind, name: string): Promise<void> {
    this.check(kind, name);
    this.bucket(kind).delete(name);
  }

  /** A put here is one Map.set: nothing is ever left half written. */
  async removeLeftovers(_olderThanMs: number): Promise<number> {
    return 0;
  }

  async leftovers(): Promise<Leftover[]> {
    return [];
  }

  async close(): Promise<void> {
    this.closed = true;
  }
}
