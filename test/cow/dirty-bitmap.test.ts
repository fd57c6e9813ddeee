/**
 * Named dirty-block trackers (issue 9, make room: a migration's disk rounds must not disturb the
 * snapshot chain's generations, and the chain must not disturb them).
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { DirtyBitmap } from '../../src/cow/dirty-bitmap.js';
import { Volume } from '../../src/cow/volume.js';
import { snapshotVolume } from '../../src/cow/snapshot.js';
import { MemoryChunkStore } from '../../src/cow/chunk-store.js';

const BS = 64 * 1024;
const dirs: string[] = [];
afterEach(() => {
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});
async function volume(blocks: number): Promise<Volume> {
  const d = mkdtempSync(path.join(tmpdir(), 'vmsnap-bitmap-'));
  dirs.push(d);
  return Volume.create(path.join(d, 'v'), { size: blocks * BS, blockSize: BS });
}

describe('DirtyBitmap', () => {
  it('marks ranges once, drains in order and clears; all covers exactly the blocks', () => {
    const b = new DirtyBitmap('m', 21);
    b.markRange(3, 5);
    b.markRange(4, 6);
    b.markRange(20, 21);
    expect(b.count).toBe(4);
    expect([...b.drain()]).toEqual([3, 4, 5, 20]);
    expect(b.count).toBe(0);
    expect([...b.drain()]).toEqual([]);
    b.markAll();
    expect(b.count).toBe(21);
    expect([...b.drain()]).toEqual(Array.from({ length: 21 }, (_, i) => i));
  });
});

describe('named dirty bitmaps on a volume', () => {
  it('each consumer sees every completed write since its own last drain, whatever snapshots do', async () => {
    const v = await volume(32);
    const mig = v.addDirtyBitmap('migration', { all: true });
    expect(() => v.addDirtyBitmap('migration')).toThrow(/already has a dirty bitmap named "migration"/);
    expect(mig.count).toBe(32); // a new consumer has seen nothing
    expect(mig.drain().length).toBe(32);

    await v.write(0, Buffer.alloc(BS, 1)); // block 0
    await v.write(5 * BS + 100, Buffer.alloc(2 * BS, 2)); // blocks 5, 6, 7 (partial ends)
    await v.writeZeroes(10 * BS, BS); // block 10
    await v.trim(12 * BS, 2 * BS); // blocks 12, 13
    // The snapshot chain closes a generation and writes it out: the migration's bitmap is untouched.
    const store = new MemoryChunkStore(BS);
    const snap = await snapshotVolume(v, store);
    expect(snap.stats.dirtyBlocks).toBe(7);
    expect([...mig.drain()]).toEqual([0, 5, 6, 7, 10, 12, 13]);

    // A second consumer added later sees only what happens after it was added.
    const other = v.addDirtyBitmap('backup');
    await v.write(3 * BS, Buffer.alloc(BS, 3));
    expect([...other.drain()]).toEqual([3]);
    expect([...mig.drain()]).toEqual([3]);
    // Draining one does not drain the other, and the chain's next snapshot still sees block 3.
    expect((await snapshotVolume(v, store)).stats.dirtyBlocks).toBe(1);
    expect(v.removeDirtyBitmap('backup')).toBe(true);
    await v.write(4 * BS, Buffer.alloc(BS, 4));
    expect(other.count).toBe(0);
    expect([...mig.drain()]).toEqual([4]);

    // A reset to a snapshot changes what every block reads: every consumer must look at all.
    await v.restoreBase(snap.stream);
    expect(mig.count).toBe(32);
    await v.close();
  });

  it('a write that completes after a drain is marked again, so the next round carries it', async () => {
    const v = await volume(4);
    const mig = v.addDirtyBitmap('migration');
    const writing = v.write(BS, Buffer.alloc(BS, 9));
    expect(mig.drain().length).toBe(0); // drained while the write is in flight
    await writing;
    expect([...mig.drain()]).toEqual([1]);
    await v.close();
  });
});
