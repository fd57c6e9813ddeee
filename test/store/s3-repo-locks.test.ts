/**
 * Repository locks on S3 (s3rver) and their failure modes: shared/exclusive conflicts between two
 * clients, the settle re-listing, release racing a refresh in flight, and a holder that cannot refresh
 * noticing it lost its lock (docs/locks.md).
 */
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { openBackend } from '../../src/store/backend/open.js';
import { MemoryBackend } from '../../src/store/backend/memory.js';
import type { Backend, ObjectInfo, ObjectKind } from '../../src/store/backend/contract.js';
import { acquireLock, listLocks, REFRESH_MS, STALE_AFTER_MS } from '../../src/store/lock.js';
import { LockedError } from '../../src/store/errors.js';
import { startS3rver, type S3rverHandle } from '../helpers/s3rver.js';

let s3: S3rverHandle;
beforeAll(async () => {
  s3 = await startS3rver();
}, 60_000);
afterAll(async () => {
  await s3?.stop();
});

const client = (prefix: string): Backend => openBackend(`${s3.url}/${prefix}`, { s3: { credentials: { accessKeyId: s3.accessKeyId, secretAccessKey: s3.secretAccessKey } } });

describe('locks on S3', () => {
  it('two clients: shared locks coexist, exclusive excludes both ways, release frees', async () => {
    const a = client('locks1');
    const b = client('locks1');
    const w1 = await acquireLock(a, false, 'import');
    const w2 = await acquireLock(b, false, 'copy');
    await expect(acquireLock(b, true, 'prune')).rejects.toThrow(LockedError);
    await w1.release();
    await w2.release();
    const p = await acquireLock(b, true, 'prune', { settleMs: 50 });
    await expect(acquireLock(a, false, 'import')).rejects.toThrow(/locked by prune/);
    p.assertHeld();
    await p.release();
    expect(() => p.assertHeld()).toThrow(LockedError);
    expect(await listLocks(a)).toEqual([]);
    await a.close();
    await b.close();
  });
});

/** Memory backend whose lock puts can be delayed or made to fail. */
class Flaky extends MemoryBackend {
  failPuts = false;
  failLists = false;
  lockPuts = 0;
  delay: Promise<void> | null = null;
  override async put(kind: ObjectKind, name: string, data: Uint8Array): Promise<void> {
    if (kind === 'locks') this.lockPuts++;
    if (kind === 'locks' && this.failPuts) throw new Error('network down');
    if (kind === 'locks' && this.delay) await this.delay;
    return super.put(kind, name, data);
  }
  override list(kind: ObjectKind): AsyncIterable<ObjectInfo> {
    if (kind === 'locks' && this.failLists) throw new Error('list failed');
    return super.list(kind);
  }
}

describe('lock refresh', () => {
  /**
   * A shared lock whose refresh PUTs hang until let go; `during` advances the fake clock. Then the
   * lock is released while a refresh is in flight, and no lock object may remain.
   */
  async function releaseDuringHungRefresh(during: (b: Flaky) => void): Promise<void> {
    vi.useFakeTimers({ toFake: ['setInterval', 'clearInterval', 'Date'] });
    try {
      const b = new Flaky();
      const l = await acquireLock(b, false, 'import');
      let letGo = (): void => undefined;
      b.delay = new Promise<void>((r) => (letGo = r));
      during(b);
      const released = l.release();
      letGo();
      await released;
      expect(await listLocks(b)).toEqual([]);
    } finally {
      vi.useRealTimers();
    }
  }

  it('release waits for a refresh in flight, so the lock object is not re-created', async () => {
    await releaseDuringHungRefresh(() => vi.advanceTimersByTime(REFRESH_MS + 1)); // refresh PUT starts and hangs
  });

  it('never has two refreshes in flight: a slow one is not overtaken (it could land after release)', async () => {
    await releaseDuringHungRefresh((b) => {
      const before = b.lockPuts;
      vi.advanceTimersByTime(3 * REFRESH_MS + 1); // three intervals pass while the first refresh hangs
      expect(b.lockPuts - before).toBe(1);
    });
  });

  it('a lock whose conflict check fails is removed, not left to block others for 30 minutes', async () => {
    const b = new Flaky();
    b.failLists = true;
    await expect(acquireLock(b, true, 'prune')).rejects.toThrow(/list failed/);
    b.failLists = false;
    expect(await listLocks(b)).toEqual([]);
  });

  it('a holder that cannot refresh learns it lost the lock before others may call it stale', async () => {
    vi.useFakeTimers({ toFake: ['setInterval', 'clearInterval', 'Date'] });
    try {
      const b = new Flaky();
      const l = await acquireLock(b, false, 'copy');
      b.failPuts = true;
      for (let t = 0; t < STALE_AFTER_MS - 2 * REFRESH_MS; t += REFRESH_MS) {
        vi.advanceTimersByTime(REFRESH_MS);
        await Promise.resolve();
      }
      l.assertHeld(); // still within the margin
      vi.advanceTimersByTime(2 * REFRESH_MS);
      await Promise.resolve();
      expect(() => l.assertHeld()).toThrow(/lost the shared lock/);
      b.failPuts = false;
      await l.release();
    } finally {
      vi.useRealTimers();
    }
  });
});
