/**
 * Repository locks.
 *
 *   locks/<random 32 hex>  JSON { "version": 1, "exclusive": bool, "host": "...", "pid": 1234,
 *                                 "created": ISO, "refreshed": ISO, "operation": "prune" }
 *
 * Writers (import, take, copy) hold a shared lock; prune holds an exclusive one. To acquire, a
 * process writes its own lock object, then lists all locks: if a conflicting live lock exists, it
 * deletes its own and fails with LockedError naming the holder. Two exclusive lockers racing both
 * see each other and both back off (the caller may retry) — never both proceed.
 *
 * A lock is stale (ignored, and removed by `unlock --stale`/prune) when it was not refreshed for
 * STALE_AFTER_MS, or when it was written on this host by a process that no longer exists. Holders
 * refresh every REFRESH_MS. Clock skew between hosts sharing an S3 repository must stay well under
 * STALE_AFTER_MS - REFRESH_MS (25 minutes); a host whose clock runs ahead makes its locks look
 * fresher, never staler, than they are, so skew delays prune rather than breaking a writer.
 *
 * Holders that cannot refresh (network down) must stop before others may call them stale:
 * `HeldLock.assertHeld()` throws once the last successful refresh is older than STALE_AFTER_MS -
 * REFRESH_MS; writers call it before writing a manifest. `release()` waits for a refresh in flight so
 * the lock object is not re-created after its delete. For S3-compatible servers whose listings lag
 * behind writes, VMSNAP_LOCK_SETTLE_MS adds a second listing after a pause. See docs/locks.md.
 *
 * A process stopped by SIGINT or SIGTERM (Ctrl-C of an import) releases the locks it holds before it
 * dies: a left-behind lock would block prune for 30 minutes. See `releaseOnSignal`.
 */
import { randomBytes } from 'node:crypto';
import { hostname } from 'node:os';
import type { Backend } from './backend/contract.js';
import { ObjectNotFoundError } from './backend/contract.js';
import { LockedError } from './errors.js';
import { processAlive } from '../util/process.js';

export const STALE_AFTER_MS = 30 * 60_000;
export const REFRESH_MS = 5 * 60_000;

export interface LockInfo {
  version: 1;
  exclusive: boolean;
  host: string;
  pid: number;
  created: string;
  refreshed: string;
  operation: string;
}

export interface HeldLock {
  name: string;
  info: LockInfo;
  /**
   * Throws LockedError when the lock may no longer protect us: it was released, or it has not been
   * refreshed successfully for so long that other hosts may treat it as stale (and a prune may
   * delete our unindexed packs). Call it before a commit point (writing a manifest).
   */
  assertHeld(): void;
  release(): Promise<void>;
}

export function isStale(info: LockInfo, now = Date.now()): boolean {
  const refreshed = Date.parse(info.refreshed);
  if (Number.isNaN(refreshed) || now - refreshed > STALE_AFTER_MS) return true;
  return info.host === hostname() && !processAlive(info.pid);
}

export async function listLocks(backend: Backend): Promise<{ name: string; info: LockInfo | null }[]> {
  const out: { name: string; info: LockInfo | null }[] = [];
  for await (const o of backend.list('locks')) {
    try {
      out.push({ name: o.name, info: JSON.parse((await backend.get('locks', o.name)).toString('utf8')) as LockInfo });
    } catch (err) {
      if (err instanceof ObjectNotFoundError) continue; // released while we listed
      out.push({ name: o.name, info: null });
    }
  }
  return out;
}

export async function removeStaleLocks(backend: Backend): Promise<string[]> {
  const removed: string[] = [];
  for (const l of await listLocks(backend)) {
    if (!l.info || isStale(l.info)) {
      await backend.delete('locks', l.name);
      removed.push(l.name);
    }
  }
  return removed;
}

export interface AcquireOptions {
  /**
   * After the first conflict check, wait this long and list again (default: env
   * VMSNAP_LOCK_SETTLE_MS, else 0). For S3-compatible servers whose listings lag behind writes:
   * two lockers that raced then see each other on the second listing. AWS S3 lists consistently.
   */
  settleMs?: number;
}

function settleDefault(): number {
  const v = Number(process.env.VMSNAP_LOCK_SETTLE_MS ?? 0);
  return Number.isFinite(v) && v > 0 ? Math.min(v, 60_000) : 0;
}

async function findConflict(backend: Backend, name: string, exclusive: boolean): Promise<LockInfo | null> {
  for (const l of await listLocks(backend)) {
    if (l.name === name || !l.info || isStale(l.info)) continue;
    if (exclusive || l.info.exclusive) return l.info;
  }
  return null;
}

export async function acquireLock(backend: Backend, exclusive: boolean, operation: string, opts: AcquireOptions = {}): Promise<HeldLock> {
  const name = randomBytes(16).toString('hex');
  const now = new Date().toISOString();
  const info: LockInfo = { version: 1, exclusive, host: hostname(), pid: process.pid, created: now, refreshed: now, operation };
  // Hooked before the PUT, and the object counted as ours from then on: a signal that arrives while
  // the lock is being written or checked must still delete it (a test saw one left behind).
  releaseOnSignal();
  const put = backend.put('locks', name, Buffer.from(JSON.stringify(info)));
  // Releasing waits for the PUT: a delete that overtook it would leave the object behind.
  const acquiring = { release: () => put.then(() => backend.delete('locks', name)).catch(() => undefined) };
  heldLocks.add(acquiring);
  try {
    await put;
  } catch (err) {
    heldLocks.delete(acquiring);
    throw err;
  }
  let conflict: LockInfo | null;
  try {
    conflict = await findConflict(backend, name, exclusive);
    const settle = opts.settleMs ?? settleDefault();
    if (!conflict && settle > 0) {
      await new Promise((r) => setTimeout(r, settle));
      conflict = await findConflict(backend, name, exclusive);
    }
  } catch (err) {
    // Could not look for other locks: ours must not stay behind, blocking others for 30 minutes.
    heldLocks.delete(acquiring);
    await backend.delete('locks', name).catch(() => undefined);
    throw err;
  }
  if (conflict) {
    heldLocks.delete(acquiring);
    await backend.delete('locks', name);
    throw new LockedError(
      `repository is locked by ${conflict.operation} (pid ${conflict.pid} on ${conflict.host}, since ${conflict.created}${conflict.exclusive ? ', exclusive' : ''}); ` +
        'if that process is gone the lock expires after 30 minutes, or run `vmsnap unlock`',
    );
  }
  // Time of the last write of the lock object that is known to have succeeded.
  let confirmed = Date.now();
  let refreshing: Promise<void> = Promise.resolve();
  let released = false;
  let inFlight = false;
  const timer = setInterval(() => {
    // One refresh at a time: a slow one (retries over S3) must not be overtaken by the next and
    // then land after release() deleted the object, re-creating it.
    if (inFlight) return;
    inFlight = true;
    const started = Date.now();
    info.refreshed = new Date(started).toISOString();
    refreshing = backend.put('locks', name, Buffer.from(JSON.stringify(info))).then(
      () => {
        confirmed = started;
      },
      () => undefined, // retried at the next interval; assertHeld() reports a lock that went stale
    ).finally(() => {
      inFlight = false;
    });
  }, REFRESH_MS);
  timer.unref();
  const held: HeldLock = {
    name,
    info,
    assertHeld() {
      // Others judge staleness by `refreshed` with their own clocks; leave them REFRESH_MS of margin.
      if (released || Date.now() - confirmed > STALE_AFTER_MS - REFRESH_MS) {
        throw new LockedError(
          `lost the ${exclusive ? 'exclusive' : 'shared'} lock for ${operation}: it could not be refreshed for ${Math.round((Date.now() - confirmed) / 60_000)} minutes, so another host may consider it stale; nothing more is written`,
        );
      }
    },
    async release() {
      if (released) return;
      released = true;
      heldLocks.delete(held);
      clearInterval(timer);
      // A refresh still in flight would otherwise re-create the object after the delete.
      await refreshing;
      await backend.delete('locks', name);
    },
  };
  heldLocks.add(held);
  heldLocks.delete(acquiring);
  return held;
}

/** Locks this process holds or is acquiring now (released ones leave the set). */
const heldLocks = new Set<{ release(): Promise<unknown> }>();
let signalsHooked = false;
const SIGNAL_RELEASE_MS = 10_000;

/**
 * On SIGINT/SIGTERM, deletes every lock this process holds, then lets the signal take its course:
 * when nothing else listens for it, the process dies of it as it would have without us (exit status
 * 128+n); when something else does (a VM supervisor shutting down), that listener decides. A writer
 * whose lock was released this way writes no manifest (assertHeld throws), so nothing half-done is
 * committed; its packs are unindexed garbage for the next prune.
 */
function releaseOnSignal(): void {
  if (signalsHooked) return;
  signalsHooked = true;
  for (const sig of ['SIGINT', 'SIGTERM'] as const) {
    const onSignal = (): void => {
      const others = process.listeners(sig).filter((l) => l !== onSignal).length;
      // Bounded: a hung store must not keep a process alive that was told to stop.
      const deadline = new Promise<void>((r) => setTimeout(r, SIGNAL_RELEASE_MS).unref());
      void Promise.race([releaseAllLocks(), deadline]).finally(() => {
        if (others > 0) return;
        process.removeListener(sig, onSignal);
        process.kill(process.pid, sig);
      });
    };
    process.on(sig, onSignal);
  }
}

/** Releases every lock this process holds (best effort: a failed delete leaves a lock to go stale). */
export async function releaseAllLocks(): Promise<void> {
  await Promise.all([...heldLocks].map((l) => l.release().catch(() => undefined)));
}

/**
 * Runs `fn` under a lock. `fn` gets the lock so that it can call assertHeld() before each step
 * that others must not see done without the lock (prune: before writing the index, before deleting).
 */
export async function withLock<T>(backend: Backend, exclusive: boolean, operation: string, fn: (lock: HeldLock) => Promise<T>): Promise<T> {
  const lock = await acquireLock(backend, exclusive, operation);
  try {
    const r = await fn(lock);
    lock.assertHeld();
    return r;
  } finally {
    await lock.release();
  }
}
