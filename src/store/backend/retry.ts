/**
 * Retries retryable BackendErrors with capped exponential backoff and full jitter (AWS's
 * "exponential backoff and jitter" scheme: sleep = random(0, min(cap, base * 2^attempt))). Permanent
 * errors, ObjectNotFoundError and invalid arguments pass through at once.
 *
 * Two operations need care because a failed attempt may still have taken effect (the reply was
 * lost):
 *  - create: a retry may find the object that the failed attempt created. When an earlier attempt
 *    failed ambiguously and the retry reports "already exists", the stored bytes are compared with
 *    ours; identical bytes mean we created it (locks carry a unique id, so this cannot be confused
 *    with another writer's lock).
 *  - list: a listing that fails midway restarts and skips names already yielded, so every object is
 *    still yielded exactly once.
 */
import {
  BackendError,
  ObjectNotFoundError,
  type Backend,
  type BackendCapabilities,
  type ByteRange,
  type ObjectInfo,
  type ObjectKind,
  type Leftover,
} from './contract.js';

export interface RetryOptions {
  /** Total attempts including the first (default 6). */
  maxAttempts?: number;
  /** Backoff base in ms (default 200). */
  baseDelayMs?: number;
  /** Upper bound of a single sleep in ms (default 15 000). */
  maxDelayMs?: number;
  /** Called before each retry sleep (for logs and progress; never receives credentials). */
  onRetry?: (info: { method: string; what: string; attempt: number; delayMs: number; error: BackendError }) => void;
  /** Injectable for tests. */
  sleep?: (ms: number) => Promise<void>;
  random?: () => number;
}

export class RetryExhaustedError extends BackendError {
  override readonly name = 'RetryExhaustedError';
  constructor(
    readonly method: string,
    readonly what: string,
    readonly attempts: number,
    readonly lastError: BackendError,
  ) {
    // Still retryable: a caller one level up (e.g. a job queue) may try again much later.
    super(`${method} ${what} failed after ${attempts} attempts: ${lastError.message}`, true, { cause: lastError });
  }
}

const defaultSleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

export class RetryBackend implements Backend {
  private readonly maxAttempts: number;
  private readonly baseDelayMs: number;
  private readonly maxDelayMs: number;
  private readonly sleep: (ms: number) => Promise<void>;
  private readonly random: () => number;
  /** Retries performed so far (for --stats). */
  retries = 0;

  constructor(
    readonly inner: Backend,
    private readonly opts: RetryOptions = {},
  ) {
    this.maxAttempts = Math.max(1, opts.maxAttempts ?? 6);
    this.baseDelayMs = opts.baseDelayMs ?? 200;
    this.maxDelayMs = opts.maxDelayMs ?? 15_000;
    this.sleep = opts.sleep ?? defaultSleep;
    this.random = opts.random ?? Math.random;
  }

  get location(): string {
    return this.inner.location;
  }

  get capabilities(): BackendCapabilities {
    return this.inner.capabilities;
  }

  private delayFor(attempt: number): number {
    const ceiling = Math.min(this.maxDelayMs, this.baseDelayMs * 2 ** (attempt - 1));
    return Math.floor(this.random() * ceiling);
  }

  /** Runs `op` until it succeeds, fails permanently or attempts run out. */
  private async run<T>(method: string, what: string, op: (attempt: number) => Promise<T>): Promise<T> {
    for (let attempt = 1; ; attempt++) {
      try {
        return await op(attempt);
      } catch (err) {
        await this.backOff(method, what, attempt, err);
      }
    }
  }

  /** After failed attempt `attempt`: rethrows what may not be retried, else waits before the next. */
  private async backOff(method: string, what: string, attempt: number, err: unknown): Promise<void> {
    if (!(err instanceof BackendError) || !err.retryable) throw err;
    if (attempt >= this.maxAttempts) throw new RetryExhaustedError(method, what, attempt, err);
    const delayMs = this.delayFor(attempt);
    this.retries++;
    this.opts.onRetry?.({ method, what, attempt, delayMs, error: err });
    await this.sleep(delayMs);
  }

  put(kind: ObjectKind, name: string, data: Uint8Array): Promise<void> {
    return this.run('put', `${kind}/${name}`, () => this.inner.put(kind, name, data));
  }

  create(kind: ObjectKind, name: string, data: Uint8Array): Promise<boolean> {
    let ambiguous = false;
    return this.run('create', `${kind}/${name}`, async () => {
      let created: boolean;
      try {
        created = await this.inner.create(kind, name, data);
      } catch (err) {
        ambiguous = true;
        throw err;
      }
      if (created || !ambiguous) return created;
      // Verification errors propagate: swallowing a failed read here would report "not created"
      // for an object this call did create, leaving nobody owning it.
      let stored: Buffer;
      try {
        stored = await this.inner.get(kind, name);
      } catch (err) {
        if (err instanceof ObjectNotFoundError) {
          // Deleted between our create and this read: the name is free again, so try again.
          throw new BackendError(`${kind}/${name} vanished while verifying create`, true, { cause: err });
        }
        throw err;
      }
      return Buffer.compare(stored, data) === 0;
    });
  }

  get(kind: ObjectKind, name: string, range?: ByteRange, into?: Uint8Array): Promise<Buffer> {
    return this.run('get', `${kind}/${name}`, () => this.inner.get(kind, name, range, into));
  }

  stat(kind: ObjectKind, name: string): Promise<ObjectInfo> {
    return this.run('stat', `${kind}/${name}`, () => this.inner.stat(kind, name));
  }

  async *list(kind: ObjectKind): AsyncIterable<ObjectInfo> {
    const yielded = new Set<string>();
    for (let attempt = 1; ; attempt++) {
      const batch: ObjectInfo[] = [];
      try {
        for await (const info of this.inner.list(kind)) {
          if (yielded.has(info.name)) continue;
          yielded.add(info.name);
          batch.push(info);
          // Hand items out in chunks so huge listings stream instead of piling up.
          if (batch.length >= 1000) yield* batch.splice(0);
        }
        yield* batch;
        return;
      } catch (err) {
        yield* batch.splice(0);
        await this.backOff('list', `${kind}/`, attempt, err);
      }
    }
  }

  delete(kind: ObjectKind, name: string): Promise<void> {
    return this.run('delete', `${kind}/${name}`, () => this.inner.delete(kind, name));
  }

  removeLeftovers(olderThanMs: number): Promise<number> {
    return this.run('removeLeftovers', this.inner.location, () => this.inner.removeLeftovers(olderThanMs));
  }

  leftovers(): Promise<Leftover[]> {
    return this.run('leftovers', this.inner.location, () => this.inner.leftovers());
  }

  close(): Promise<void> {
    return this.inner.close();
  }
}
