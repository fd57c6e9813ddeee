/**
 * The embedded runner: the job queue of a single host without Redis (the local `vmsnap agent`,
 * and `schedule run-now` there). Jobs run in this process with the same handlers as under BullMQ
 * and the same policy:
 *
 * - at most `concurrency` jobs at once; jobs of one guest one at a time (handlers.ts);
 * - a failure whose error is retryable (isRetryable: a held lock past the wait, a backend timeout)
 *   is tried again after an exponential backoff, up to `attempts` tries; any other fails the job at
 *   once (retrying bad input or a bug only repeats it);
 * - a job submitted with the idempotency key of a job this runner knows (queued, running or
 *   completed) is that job: nothing runs twice. A take also checks its snapshot tag (handlers.ts),
 *   which covers a key re-submitted after this process restarted.
 *
 * Records go to a JobFileStore (optional) for `vmsnap jobs`.
 */
import { randomBytes } from 'node:crypto';
import { errorRecord, isRetryable } from '../util/errors.js';
import type { ProgressEvent } from '../ops/progress.js';
import { guestOf, parseJobSpec, type AnyJobSpec, type JobRecord } from './model.js';
import { runJob, type JobContext } from './handlers.js';
import type { JobFileStore } from './store.js';

export interface Clock {
  now(): number;
  sleep(ms: number): Promise<void>;
}

export const systemClock: Clock = { now: () => Date.now(), sleep: (ms) => new Promise((r) => setTimeout(r, ms)) };

export interface RetryPolicy {
  /** Tries in all (default 3). */
  attempts: number;
  /** First backoff; doubled per retry (default 2000 ms). */
  backoffMs: number;
}

export const DEFAULT_RETRY: RetryPolicy = { attempts: 3, backoffMs: 2000 };

/**
 * Replaces runJob in a runner (tests of the queue policy, bench/jobs): the job's payload as parsed,
 * its id in that runner, the idempotency key in force and its progress sink.
 */
export type JobHandler = (spec: AnyJobSpec, run: { id: string; key: string; sink: { emit(e: ProgressEvent): void } }) => Promise<unknown>;

export interface EmbeddedRunnerOptions {
  ctx: JobContext;
  concurrency?: number;
  retry?: Partial<RetryPolicy>;
  store?: JobFileStore;
  clock?: Clock;
  /** Replaces runJob (tests of the queue policy itself). */
  handler?: JobHandler;
}

interface Entry {
  rec: JobRecord;
  spec: AnyJobSpec;
  done: Promise<JobRecord>;
  settle: (r: JobRecord) => void;
}

export class EmbeddedRunner {
  private readonly entries = new Map<string, Entry>();
  private readonly byKey = new Map<string, string>();
  private readonly queue: Entry[] = [];
  private active = 0;
  private closed = false;
  private readonly retry: RetryPolicy;
  private readonly clock: Clock;
  private readonly concurrency: number;
  private readonly running = new Set<Promise<void>>();

  constructor(private readonly opts: EmbeddedRunnerOptions) {
    this.retry = { ...DEFAULT_RETRY, ...opts.retry };
    this.clock = opts.clock ?? systemClock;
    this.concurrency = Math.max(1, opts.concurrency ?? 2);
  }

  /**
   * Queues a job (its payload checked: JobPayloadError for a malformed one). Returns its record, or
   * that of the job already known under the same idempotency key.
   */
  submit(data: unknown): JobRecord {
    if (this.closed) throw new Error('the runner is closed');
    const spec = parseJobSpec(data);
    if (spec.key !== undefined) {
      const known = this.byKey.get(spec.key);
      const e = known !== undefined ? this.entries.get(known) : undefined;
      if (e && e.rec.state !== 'failed') return e.rec;
    }
    const id = `${new Date(this.clock.now()).toISOString().replace(/[-:.TZ]/g, '').slice(0, 14)}-${randomBytes(4).toString('hex')}`;
    const rec: JobRecord = {
      id,
      host: this.opts.ctx.hostId,
      kind: spec.kind,
      key: spec.key ?? id,
      vm: guestOf(spec),
      state: 'queued',
      attempts: 0,
      progress: null,
      phase: null,
      created: new Date(this.clock.now()).toISOString(),
      started: null,
      finished: null,
      result: null,
      error: null,
    };
    let settle!: (r: JobRecord) => void;
    const done = new Promise<JobRecord>((r) => (settle = r));
    const entry: Entry = { rec, spec, done, settle };
    this.entries.set(id, entry);
    this.byKey.set(rec.key!, id);
    this.queue.push(entry);
    this.opts.store?.save(rec, true);
    this.pump();
    return rec;
  }

  /** The job's final record (completed or failed). */
  wait(id: string): Promise<JobRecord> {
    const e = this.entries.get(id);
    if (!e) return Promise.reject(new Error(`no job ${id}`));
    return e.done;
  }

  list(): JobRecord[] {
    return [...this.entries.values()].map((e) => e.rec);
  }

  /** Stops taking jobs and waits for the running ones (queued ones stay queued in their records). */
  async close(): Promise<void> {
    this.closed = true;
    await Promise.all([...this.running]);
    await this.opts.store?.close();
  }

  private pump(): void {
    while (!this.closed && this.active < this.concurrency && this.queue.length) {
      const e = this.queue.shift()!;
      this.active++;
      const p = this.execute(e).finally(() => {
        this.active--;
        this.running.delete(p);
        this.pump();
      });
      this.running.add(p);
    }
  }

  private async execute(e: Entry): Promise<void> {
    const { rec } = e;
    const store = this.opts.store;
    const sink = {
      emit: (ev: ProgressEvent) => {
        if (ev.type === 'phase') rec.phase = ev.phase;
        else if (ev.type === 'progress') rec.progress = ev;
        store?.save(rec, false);
      },
    };
    for (;;) {
      rec.state = 'active';
      rec.attempts++;
      rec.started ??= new Date(this.clock.now()).toISOString();
      store?.save(rec, true);
      try {
        const run = { key: rec.key!, sink };
        rec.result = this.opts.handler ? await this.opts.handler(e.spec, { ...run, id: rec.id }) : await runJob(this.opts.ctx, e.spec, run);
        rec.state = 'completed';
        rec.error = null;
        break;
      } catch (err) {
        rec.error = errorRecord(err);
        if (!isRetryable(err) || rec.attempts >= this.retry.attempts || this.closed) {
          rec.state = 'failed';
          break;
        }
        rec.state = 'delayed';
        store?.save(rec, true);
        await this.clock.sleep(this.retry.backoffMs * 2 ** (rec.attempts - 1));
      }
    }
    rec.finished = new Date(this.clock.now()).toISOString();
    store?.save(rec, true);
    e.settle(rec);
  }
}
