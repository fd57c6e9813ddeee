/**
 * A small pool of chunk workers (chunk-worker.ts). Jobs are dispatched round-robin to the least
 * busy worker; each returns a promise. Buffers are transferred, not copied: the caller gives up
 * the ArrayBuffer it sends and gets it back in the reply.
 *
 * Protocol (structured-clone messages):
 *   hash   { buffer, lengths[] }                         -> { buffer, ids }   ids = n × 32 bytes,
 *                                                          all-zero chunks get the zero id
 *   encode { buffer, items[[offset, length, idStart]], ids, codec, level }
 *                                                       -> { buffer, out, codecs[], sizes[] }
 *   share  { id, sab }                                   (no reply) registers a shared buffer
 *   decode { input, items[[offset, length, codec, rawLength, idStart]], ids, output }
 *                                                       -> {}               plaintexts back to back,
 *                                                          each verified against its id, written
 *                                                          to file descriptor `fd` at `position` by
 *                                                          the worker itself, or into shared buffer
 *                                                          `slot`; `input` is a shared buffer id
 *   error  { message, name, code? }                      any job that threw; `code` is the errno
 *                                                          code of a failed write (ENOSPC, EIO)
 */
import { Worker } from 'node:worker_threads';
import { availableParallelism } from 'node:os';
import { IntegrityError } from './errors.js';

export interface WorkerInit {
  aeadKey: Uint8Array | null;
  idKey: Uint8Array | null;
}

/** Where a decode job puts the plaintexts. */
export type DecodeOutput = { fd: number; position: number } | { slot: number };

export type WorkerRequest =
  | { type: 'share'; seq: number; id: number; sab: SharedArrayBuffer }
  | { type: 'hash'; seq: number; buffer: ArrayBuffer; lengths: number[] }
  | { type: 'encode'; seq: number; buffer: ArrayBuffer; items: [number, number, number][]; ids: ArrayBuffer; codec: number; level: number }
  | { type: 'decode'; seq: number; input: number; items: [number, number, number, number, number][]; ids: Uint8Array; output: DecodeOutput };

export type WorkerReply =
  | { type: 'hash'; seq: number; buffer: ArrayBuffer; ids: ArrayBuffer }
  | { type: 'encode'; seq: number; buffer: ArrayBuffer; out: ArrayBuffer; codecs: number[]; sizes: number[] }
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

interface Slot {
  worker: Worker;
  busy: number;
}

export class WorkerPool {
  private slots: Slot[] = [];
  private pending = new Map<number, { resolve: (r: WorkerReply) => void; reject: (e: Error) => void }>();
  private seq = 0;
  private closed = false;
  private sharedFree = new Map<number, SharedSlot[]>();
  private sharedCount = 0;

  constructor(init: WorkerInit, size = Math.max(1, Math.min(4, availableParallelism()))) {
    const self = new URL(import.meta.url);
    const ts = self.pathname.endsWith('.ts');
    const file = new URL(`./chunk-worker.${ts ? 'ts' : 'js'}`, self);
    for (let i = 0; i < size; i++) {
      // Under the test runner the sources are TypeScript: the worker registers tsx before loading them.
      const worker = ts
        ? new Worker(
            `import('tsx/esm/api').then((m) => { m.register(); return import(${JSON.stringify(file.href)}); })`,
            { eval: true, workerData: init },
          )
        : new Worker(file, { workerData: init });
      worker.unref();
      const slot: Slot = { worker, busy: 0 };
      worker.on('message', (r: WorkerReply) => {
        slot.busy--;
        const p = this.pending.get(r.seq);
        if (!p) return;
        this.pending.delete(r.seq);
        if (r.type === 'error') {
          p.reject(r.name === 'IntegrityError' ? new IntegrityError(r.message) : Object.assign(new Error(r.message), r.code ? { code: r.code } : {}));
        } else p.resolve(r);
      });
      worker.on('error', (err) => this.failAll(err));
      this.slots.push(slot);
    }
  }

  /**
   * A shared buffer of exactly `size` bytes, from the free list or new (and announced to every
   * worker; messages on one port arrive in order, so any job sent after this sees it).
   */
  acquireShared(size: number): SharedSlot {
    const free = this.sharedFree.get(size)?.pop();
    if (free) return free;
    const sab = new SharedArrayBuffer(size);
    const slot: SharedSlot = { id: ++this.sharedCount, bytes: Buffer.from(sab) };
    for (const s of this.slots) s.worker.postMessage({ type: 'share', seq: 0, id: slot.id, sab } satisfies WorkerRequest);
    return slot;
  }

  /** Gives a shared buffer back for reuse. Shared buffers live as long as the pool. */
  releaseShared(slot: SharedSlot): void {
    const list = this.sharedFree.get(slot.bytes.length) ?? [];
    if (!list.includes(slot)) list.push(slot);
    this.sharedFree.set(slot.bytes.length, list);
  }

  run<T extends 'hash' | 'encode' | 'decode'>(job: Job & { type: T }): Promise<Extract<WorkerReply, { type: T }>> {
    if (this.closed) return Promise.reject(new Error('worker pool is closed'));
    const seq = ++this.seq;
    const slot = this.slots.reduce((a, b) => (b.busy < a.busy ? b : a));
    slot.busy++;
    return new Promise((resolve, reject) => {
      this.pending.set(seq, { resolve: resolve as (r: WorkerReply) => void, reject });
      // Shared buffers (decode) cross without a transfer; hash and encode hand their buffers over.
      const j: Job = job;
      const transfer: ArrayBuffer[] = [];
      if (j.type === 'hash' || j.type === 'encode') transfer.push(j.buffer);
      if (j.type === 'encode' && j.ids !== j.buffer) transfer.push(j.ids);
      slot.worker.postMessage({ ...job, seq }, transfer);
    });
  }

  private failAll(err: Error): void {
    for (const p of this.pending.values()) p.reject(err);
    this.pending.clear();
  }

  async close(): Promise<void> {
    this.closed = true;
    await Promise.all(this.slots.map((s) => s.worker.terminate()));
  }
}
