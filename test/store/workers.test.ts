/** The chunk worker pool's shared buffers: leases, reuse, and what workers see. */
import { afterEach, describe, expect, it } from 'vitest';
import { WorkerPool } from '../../src/store/workers.js';
import { chunkHasher } from '../../src/store/hash.js';

let pool: WorkerPool | null = null;
afterEach(async () => {
  await pool?.close();
  pool = null;
});

describe('WorkerPool shared buffers', () => {
  it('reuses a released buffer under a new lease and refuses a second release of the old one', () => {
    pool = new WorkerPool({ aeadKey: null, idKey: null }, 1);
    const a = pool.acquireShared(4096);
    pool.releaseShared(a);
    const b = pool.acquireShared(4096);
    expect(b.id).toBe(a.id); // the same memory…
    expect(b).not.toBe(a); // …under a new lease
    expect(() => pool!.releaseShared(a)).toThrow(/shared buffer \d+ released twice/);
    pool.releaseShared(b);
    expect(() => pool!.releaseShared(b)).toThrow(/released twice/);
    const c = pool.acquireShared(8192);
    expect(c.id).not.toBe(a.id); // sizes never mix
  });

  it('workers see what the main thread wrote into a shared buffer, with no transfer', async () => {
    pool = new WorkerPool({ aeadKey: null, idKey: null }, 2);
    const hash = chunkHasher(null);
    for (let round = 0; round < 4; round++) {
      const slot = pool.acquireShared(3 * 1024);
      slot.bytes.fill(round + 1, 0, 1024);
      slot.bytes.fill(0, 1024, 2048);
      slot.bytes.fill(7, 2048, 3072);
      const { ids } = await pool.run({ type: 'hash', input: slot.id, lengths: [1024, 1024, 1024], holes: [2] });
      const got = Buffer.from(ids);
      expect(got.subarray(0, 32).equals(hash(Buffer.alloc(1024, round + 1)))).toBe(true);
      expect(got.subarray(32, 64).equals(Buffer.alloc(32))).toBe(true); // all zeros: the zero id
      expect(got.subarray(64, 96).equals(Buffer.alloc(32))).toBe(true); // a hole: never looked at
      pool.releaseShared(slot);
    }
  });

  it('keeps a bounded number of free buffers', () => {
    pool = new WorkerPool({ aeadKey: null, idKey: null }, 1);
    const leases = Array.from({ length: 20 }, () => pool!.acquireShared(1024));
    for (const l of leases) pool.releaseShared(l);
    const again = new Set(Array.from({ length: 20 }, () => pool!.acquireShared(1024).id));
    // Only the kept ones come back; the rest are new buffers.
    expect([...again].filter((id) => leases.some((l) => l.id === id)).length).toBe(8);
  });
});

describe('WorkerPool when a worker dies', () => {
  it("fails only the dead worker's jobs, and a replacement that knows the shared buffers serves the next", async () => {
    pool = new WorkerPool({ aeadKey: null, idKey: null }, 2);
    const hash = chunkHasher(null);
    const slot = pool.acquireShared(1 << 20);
    slot.bytes.fill(9);
    // Warm up: both workers have loaded and answered a job.
    await Promise.all([0, 1].map(() => pool!.run({ type: 'hash', input: slot.id, lengths: [1 << 20] })));
    const victim = pool.workerForTest(0);
    const jobs = Array.from({ length: 8 }, () =>
      pool!.run({ type: 'hash', input: slot.id, lengths: Array<number>(256).fill(4096) }).then(
        () => 'ok',
        (e: Error) => e.message,
      ),
    );
    await victim.terminate();
    const outcomes = await Promise.all(jobs);
    // Jobs go to the least busy worker: half were the victim's.
    expect(outcomes.filter((o) => o === 'ok').length).toBeGreaterThanOrEqual(1);
    for (const o of outcomes) if (o !== 'ok') expect(o).toMatch(/chunk worker failed: chunk worker exited/);
    expect(outcomes.filter((o) => o !== 'ok').length).toBeGreaterThanOrEqual(1);
    // The pool is whole again, and the new worker knows the buffer leased before it started.
    expect(pool.workerForTest(0)).not.toBe(victim);
    const again = await Promise.all(
      Array.from({ length: 4 }, () => pool!.run({ type: 'hash', input: slot.id, lengths: [4096] })),
    );
    for (const r of again) expect(Buffer.from(r.ids).equals(hash(Buffer.alloc(4096, 9)))).toBe(true);
    pool.releaseShared(slot);
  });

  it('stops respawning workers that die before their first answer, and every job then fails with the cause', async () => {
    // A 5-byte id key: each worker throws while loading, before it can answer anything.
    pool = new WorkerPool({ aeadKey: null, idKey: new Uint8Array(5) }, 2);
    const slot = pool.acquireShared(4096);
    const job = () => pool!.run({ type: 'hash', input: slot.id, lengths: [4096] }).then(() => 'ok', (e: Error) => e.message);
    expect(await job()).toMatch(/chunk worker/);
    const deadline = Date.now() + 20_000;
    let last = '';
    while (!/keep failing/.test(last) && Date.now() < deadline) {
      last = await job();
      await new Promise((r) => setTimeout(r, 50));
    }
    expect(last).toMatch(/chunk workers keep failing before their first job/);
    const w = pool.workerForTest(0);
    await new Promise((r) => setTimeout(r, 500));
    expect(pool.workerForTest(0)).toBe(w); // no more respawns
    expect(await job()).toMatch(/keep failing/);
    pool.releaseShared(slot);
  });
});
