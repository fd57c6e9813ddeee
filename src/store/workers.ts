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
 *   decode { buffer, items[[offset, length, codec, rawLength, idStart]], ids }
 *                                                       -> { buffer, out }   plaintexts back to back,
 *                                                          each verified against its id
 */
import { Worker } from 'node:worker_threads';
import { availableParallelism } from 'node:os';
import { IntegrityError } from './errors.js';

export interface WorkerInit {
  aeadKey: Uint8Array | null;
  idKey: Uint8Array | null;
}

export type WorkerRequest =
  | { type: 'hash'; seq: number; buffer: ArrayBuffer; lengths: number[] }
  | { type: 'encode'; seq: number; buffer: ArrayBuffer; items: [number, number, number][]; ids: ArrayBuffer; codec: number; level: number }
  | { type: 'decode'; seq: number; buffer: ArrayBuffer; items: [number, number, number, number, number][]; ids: ArrayBuffer };

export type WorkerReply =
  | { type: 'hash'; seq: number; buffer: ArrayBuffer; ids: ArrayBuffer }
  | { type: 'encode'; seq: number; buffer: ArrayBuffer; out: ArrayBuffer; codecs: number[]; sizes: number[] }
  | { type: 'decode'; seq: number; buffer: ArrayBuffer; out: ArrayBuffer }
  | { type: 'error'; seq: number; message: string; name: string };

type DistributiveOmit<T, K extends PropertyKey> = T extends unknown ? Omit<T, K> : never;
export type Job = DistributiveOmit<WorkerRequest, 'seq'>;

interface Slot {
  worker: Worker;
  busy: number;
}

export class WorkerPool {
  private slots: Slot[] = [];
  private pending = new Map<number, { resolve: (r: WorkerReply) => void; reject: (e: Error) => void }>();
  private seq = 0;
  private closed = false;

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
          p.reject(r.name === 'IntegrityError' ? new IntegrityError(r.message) : new Error(r.message));
        } else p.resolve(r);
      });
      worker.on('error', (err) => this.failAll(err));
      this.slots.push(slot);
    }
  }

  run<T extends WorkerReply['type']>(job: Job & { type: T }): Promise<Extract<WorkerReply, { type: T }>> {
    if (this.closed) return Promise.reject(new Error('worker pool is closed'));
    const seq = ++this.seq;
    const slot = this.slots.reduce((a, b) => (b.busy < a.busy ? b : a));
    slot.busy++;
    return new Promise((resolve, reject) => {
      this.pending.set(seq, { resolve: resolve as (r: WorkerReply) => void, reject });
      const transfer: ArrayBuffer[] = [job.buffer];
      if ('ids' in job && job.ids !== job.buffer) transfer.push(job.ids);
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
