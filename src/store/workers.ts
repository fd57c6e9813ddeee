/**
 * A small pool of chunk workers (chunk-worker.ts). Jobs are dispatched to the least busy worker;
 * each returns a promise. Bulk data never crosses threads in messages: it lives in shared buffers
 * (SharedArrayBuffer) that the pool hands out, announces to every worker once, and reuses, so a
 * job names its buffers by id. (Transferring ArrayBuffers instead created a new one in the
 * receiving isolate per message, each counted as fresh external memory: at ingest and export
 * rates that triggered a major GC every ~60 MB in every thread.)
 *
 * Protocol (structured-clone messages; `input`, `output`, `slot` are shared buffer ids):
 *   share  { id, sab }                                   (no reply) registers a shared buffer
 *   unshare { id }                                       (no reply) forgets it
 *   hash   { input, lengths[], holes? }                  -> { ids }   ids = n × 32 bytes; all-zero
 *                                                          chunks and `holes` (indexes of chunks
 *                                                          never read: zeros) get the zero id
 *   encode { input, items[[offset, length, idStart]], ids, codec, level, output }
 *                                                       -> { codecs[], sizes[] } stored chunks back
 *                                                          to back in `output`
 *   decode { input, items[[offset, length, codec, rawLength, idStart]], ids, output }
 *                                                       -> {}        plaintexts back to back, each
 *                                                          verified against its id, written to
 *                                                          file descriptor `fd` at `position` by
 *                                                          the worker itself, or into `slot`
 *   error  { message, name, code? }                      any job that threw; `code` is the errno
 *                                                          code of a failed write (ENOSPC, EIO)
 */
import { Worker } from 'node:worker_threads';
import { availableParallelism } from 'node:os';
import { FormatError, IntegrityError } from './errors.js';

export interface WorkerInit {
  aeadKey: Uint8Array | null;
  idKey: Uint8Array | null;
}

/** Where a decode job puts the plaintexts. */
export type DecodeOutput = { fd: number; position: number } | { slot: number };

export type WorkerRequest =
  | { type: 'share'; seq: number; id: number; sab: SharedArrayBuffer }
  | { type: 'unshare'; seq: number; id: number }
  | { type: 'hash'; seq: number; input: number; lengths: number[]; holes?: number[] }
  | { type: 'encode'; seq: number; input: number; items: [number, number, number][]; ids: Uint8Array; codec: number; level: number; output: number }
  | { type: 'decode'; seq: number; input: number; items: [number, number, number, number, number][]; ids: Uint8Array; output: DecodeOutput };

export type WorkerReply =
  | { type: 'hash'; seq: number; ids: ArrayBuffer }
  | { type: 'encode'; seq: number; codecs: number[]; sizes: number[] }
  | { type: 'decode'; seq: number }
  | { type: 'error'; seq: number; message: string; name: string; code?: string };

type DistributiveOmit<T, K extends PropertyKey> = T extends unknown ? Omit<T, K> : never;
export type Job = DistributiveOmit<WorkerRequest, 'seq'>;

/**
 * A buffer every worker can see, reused by id. Hot paths (export) keep their buffers here instead
 * of transferring ArrayBuffers back and forth: each transfer creates a new ArrayBuffer in the
 * receiving isolate, counted as fresh external memory, and at export rates that alone triggered a
 * major GC every ~60 MB in each thread (measured: a fifth of the export's CPU time).
 */
export interface SharedSlot {
  readonly id: number;
  readonly bytes: Buffer;
}

/** How many free shared buffers of one size the pool keeps; beyond that they are dropped. */
const KEEP_FREE = 8;

interface Slot {
  worker: Worker;
  busy: number;
  /** Sequence numbers of this worker's unanswered jobs: a crash fails these, and only these. */
  jobs: Set<number>;
  dead: boolean;
  /** The worker has answered a job: it loaded, so losing it later is not a startup failure. */
  answered: boolean;
}

/** Workers that die before answering anything, in a row, before the pool gives up respawning. */
const MAX_STARTUP_FAILURES = 3;

export class WorkerPool {
  private slots: Slot[] = [];
  private pending = new Map<number, { resolve: (r: WorkerReply) => void; reject: (e: Error) => void }>();
  private seq = 0;
  private closed = false;
  private sharedFree = new Map<number, { id: number; bytes: Buffer }[]>();
  /** Each acquisition is a new lease object, so a lease released twice is caught, never mistaken for a newer one. */
  private leases = new Map<SharedSlot, { id: number; bytes: Buffer }>();
  /** Every buffer the workers currently know (leased or free), so a replacement worker learns them too. */
  private shared = new Map<number, SharedArrayBuffer>();
  private sharedCount = 0;
  private readonly init: WorkerInit;
  private startupFailures = 0;
  /** Set when workers keep dying before they answer (a broken install, a bad key): run() fails with it. */
  private broken: Error | null = null;

  constructor(init: WorkerInit, size = Math.max(1, Math.min(4, availableParallelism()))) {
    this.init = init;
    for (let i = 0; i < size; i++) this.slots.push(this.spawn());
  }

  private spawn(): Slot {
    const self = new URL(import.meta.url);
    const ts = self.pathname.endsWith('.ts');
    const file = new URL(`./chunk-worker.${ts ? 'ts' : 'js'}`, self);
    // Under the test runner the sources are TypeScript: the worker registers tsx before loading them.
    const worker = ts
      ? new Worker(
          `import('tsx/esm/api').then((m) => { m.register(); return import(${JSON.stringify(file.href)}); })`,
          { eval: true, workerData: this.init },
        )
      : new Worker(file, { workerData: this.init });
    worker.unref();
    const slot: Slot = { worker, busy: 0, jobs: new Set(), dead: false, answered: false };
    worker.on('message', (r: WorkerReply) => {
      slot.answered = true;
      this.startupFailures = 0;
      slot.busy--;
      slot.jobs.delete(r.seq);
      const p = this.pending.get(r.seq);
      if (!p) return;
      this.pending.delete(r.seq);
      if (r.type === 'error') {
        p.reject(workerError(r));
      } else p.resolve(r);
    });
    worker.on('error', (err) => this.lose(slot, err));
    worker.on('exit', (code) => this.lose(slot, new Error(`chunk worker exited (code ${code})`)));
    // Messages on one port arrive in order: the shares reach the worker before any job.
    for (const [id, sab] of this.shared) worker.postMessage({ type: 'share', seq: 0, id, sab } satisfies WorkerRequest);
    return slot;
  }

  /**
   * A worker died (out of memory, an uncaught error, terminated): its unanswered jobs fail, the
   * other workers' jobs go on, and a fresh worker takes its place, so a long-lived process (a VM
   * supervisor) keeps its full pool. An 'error' is followed by 'exit': the second call is a no-op.
   * Workers that die before answering anything are not respawned for ever: after a few in a row the
   * pool is broken and every job fails with the cause.
   */
  private lose(slot: Slot, err: Error): void {
    // Terminating at close() is not a loss (and close()'s callers have no job left to fail).
    if (slot.dead || this.closed) return;
    slot.dead = true;
    for (const seq of slot.jobs) {
      const p = this.pending.get(seq);
      this.pending.delete(seq);
      p?.reject(new Error(`internal: chunk worker failed: ${err.message}`));
    }
    slot.jobs.clear();
    if (this.broken) return; // the others, terminated when the pool broke
    if (!slot.answered && ++this.startupFailures >= MAX_STARTUP_FAILURES) {
      this.broken ??= new Error(`internal: chunk workers keep failing before their first job: ${err.message}`);
      for (const other of this.slots) if (other !== slot) void other.worker.terminate();
      for (const p of this.pending.values()) p.reject(this.broken);
      this.pending.clear();
      return;
    }
    const i = this.slots.indexOf(slot);
    if (i >= 0) this.slots[i] = this.spawn();
  }

  /**
   * A shared buffer of exactly `size` bytes, from the free list or new (and announced to every
   * worker; messages on one port arrive in order, so any job sent after this sees it).
   */
  acquireShared(size: number): SharedSlot {
    let buf = this.sharedFree.get(size)?.pop();
    if (!buf) {
      const sab = new SharedArrayBuffer(size);
      buf = { id: ++this.sharedCount, bytes: Buffer.from(sab) };
      this.shared.set(buf.id, sab);
      for (const s of this.slots) s.worker.postMessage({ type: 'share', seq: 0, id: buf.id, sab } satisfies WorkerRequest);
    }
    const lease: SharedSlot = { id: buf.id, bytes: buf.bytes };
    this.leases.set(lease, buf);
    return lease;
  }

  /**
   * Gives a leased buffer back for reuse. Releasing a lease twice is a bug (the buffer may already
   * belong to someone else) and throws. A few free buffers per size are kept for reuse; the rest
   * are dropped, here and in the workers.
   */
  releaseShared(lease: SharedSlot): void {
    const buf = this.leases.get(lease);
    if (!buf) throw new Error(`internal: shared buffer ${lease.id} released twice`);
    this.leases.delete(lease);
    const list = this.sharedFree.get(buf.bytes.length) ?? [];
    this.sharedFree.set(buf.bytes.length, list);
    if (list.length < KEEP_FREE) {
      list.push(buf);
      return;
    }
    this.shared.delete(buf.id);
    for (const s of this.slots) s.worker.postMessage({ type: 'unshare', seq: 0, id: buf.id } satisfies WorkerRequest);
  }

  /**
   * Drops every free shared buffer, here and in the workers, so a long-lived process (a VM's
   * supervisor) does not keep an operation's buffers resident between operations. Leased buffers
   * are untouched. Ingest and export call this when they finish.
   */
  trimShared(): void {
    for (const list of this.sharedFree.values()) {
      for (const buf of list) {
        this.shared.delete(buf.id);
        for (const s of this.slots) s.worker.postMessage({ type: 'unshare', seq: 0, id: buf.id } satisfies WorkerRequest);
      }
    }
    this.sharedFree.clear();
  }

  /** Shared buffers currently leased and kept free (tests check nothing leaks). */
  sharedStats(): { leased: number; free: number } {
    let free = 0;
    for (const list of this.sharedFree.values()) free += list.length;
    return { leased: this.leases.size, free };
  }

  run<T extends 'hash' | 'encode' | 'decode'>(job: Job & { type: T }): Promise<Extract<WorkerReply, { type: T }>> {
    if (this.closed) return Promise.reject(new Error('worker pool is closed'));
    if (this.broken) return Promise.reject(this.broken);
    const seq = ++this.seq;
    const slot = this.slots.reduce((a, b) => (b.busy < a.busy ? b : a));
    slot.busy++;
    slot.jobs.add(seq);
    return new Promise((resolve, reject) => {
      this.pending.set(seq, { resolve: resolve as (r: WorkerReply) => void, reject });
      // Bulk data stays in shared buffers; what crosses is ids and small lists.
      slot.worker.postMessage({ ...job, seq });
    });
  }

  /** For tests: the worker behind slot `i`, to make it fail. */
  workerForTest(i: number): Worker {
    const slot = this.slots[i];
    if (!slot) throw new Error(`no worker ${i}`);
    return slot.worker;
  }

  async close(): Promise<void> {
    this.closed = true;
    await Promise.all(this.slots.map((s) => s.worker.terminate()));
  }
}

/** A worker's error as the class it was thrown as: user-facing repository errors stay user-facing. */
function workerError(r: Extract<WorkerReply, { type: 'error' }>): Error {
  if (r.name === 'IntegrityError') return new IntegrityError(r.message);
  if (r.name === 'FormatError') return new FormatError(r.message);
  return Object.assign(new Error(r.message), r.code ? { code: r.code } : {});
}
