/**
 * How jobs inside one agent keep out of each other's way, before the repository's own locks
 * (docs/locks.md) have to say no:
 *
 * - GuestLocks: one job at a time per guest (never two snapshots of one VM at once; a restore
 *   waits for a take of the same VM to finish).
 * - RepoGate: a readers-writer gate over the agent's repository. Takes, imports, copies and checks
 *   pass shared; a prune waits until they are done and keeps new ones waiting (writer preference,
 *   so a steady stream of takes cannot starve it).
 * - waitWhileLocked: another process (a CLI `vmsnap prune`, another host's agent on a shared
 *   repository) may still hold the repository's lock: LockedError is then waited out with backoff
 *   instead of failing the job, up to a limit.
 */
import { LockedError } from '../store/errors.js';

/** A FIFO mutex per key. */
export class GuestLocks {
  private readonly tails = new Map<string, Promise<void>>();

  async with<T>(key: string | null, fn: () => Promise<T>): Promise<T> {
    if (key === null) return fn();
    const prev = this.tails.get(key) ?? Promise.resolve();
    let release!: () => void;
    const mine = new Promise<void>((r) => (release = r));
    const tail = prev.then(() => mine);
    this.tails.set(key, tail);
    await prev;
    try {
      return await fn();
    } finally {
      release();
      if (this.tails.get(key) === tail) this.tails.delete(key);
    }
  }
}

export class RepoGate {
  private readers = 0;
  private writer = false;
  private writersWaiting = 0;
  private readonly waiters: (() => void)[] = [];

  private wake(): void {
    for (const w of this.waiters.splice(0)) w();
  }

  private async until(cond: () => boolean): Promise<void> {
    while (!cond()) await new Promise<void>((r) => this.waiters.push(r));
  }

  async shared<T>(fn: () => Promise<T>): Promise<T> {
    await this.until(() => !this.writer && this.writersWaiting === 0);
    this.readers++;
    try {
      return await fn();
    } finally {
      this.readers--;
      this.wake();
    }
  }

  async exclusive<T>(fn: () => Promise<T>): Promise<T> {
    this.writersWaiting++;
    try {
      await this.until(() => !this.writer && this.readers === 0);
    } finally {
      this.writersWaiting--;
    }
    this.writer = true;
    try {
      return await fn();
    } finally {
      this.writer = false;
      this.wake();
    }
  }
}

export function isLockedError(err: unknown): boolean {
  return err instanceof LockedError || (err as { name?: unknown } | null)?.name === 'LockedError';
}

export interface LockWaitOptions {
  /** Give up (and let the LockedError fail the attempt, retried by the queue) after this long. */
  maxWaitMs?: number;
  /** Called before each wait with the holder's message. */
  onWait?: (message: string, delayMs: number) => void;
  sleep?: (ms: number) => Promise<void>;
  now?: () => number;
}

/** Runs `fn`, and again after a backoff (0.5 s doubling to 10 s) while it fails with LockedError. */
export async function waitWhileLocked<T>(fn: () => Promise<T>, o: LockWaitOptions = {}): Promise<T> {
  const now = o.now ?? Date.now;
  const sleep = o.sleep ?? ((ms: number) => new Promise<void>((r) => setTimeout(r, ms)));
  const deadline = now() + (o.maxWaitMs ?? 10 * 60_000);
  for (let delay = 500; ; delay = Math.min(delay * 2, 10_000)) {
    try {
      return await fn();
    } catch (err) {
      if (!isLockedError(err) || now() + delay > deadline) throw err;
      o.onWait?.((err as Error).message, delay);
      await sleep(delay);
    }
  }
}
