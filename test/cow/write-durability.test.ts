/**
 * Issue 12 item 11 (durability of acknowledged writes), two races in the volume's write path, each
 * made certain by holding data-file writes at gates (a mock of src/cow/fileio.ts):
 *
 * Copy-on-write after a freeze: a partial write copying a block must wait for writes still landing
 * in the block's old slot (below).
 *
 * FLUSH/FUA ordering: a FLUSH must make durable every write that completed before
 * it — including a write that was issued while an earlier commit waited for its own writes and
 * that completed only after that commit's fdatasync of the data file had begun. Before the fix the
 * volume cleared its "data written" flag when that earlier fdatasync began, so the next FLUSH
 * committed the late write's journal entry (pointing at its slot) without syncing its bytes: after
 * a host crash the guest's synced block would read as whatever the slot held before.
 *
 * The data file's writes are held at gates (a mock of src/cow/fileio.ts) to make that interleaving
 * certain; the fdatasyncs are recorded in order with the writes' completions.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';

const hooks = vi.hoisted(() => ({
  gates: new Map<number, Promise<void>>(), // data-file position → the next write there waits for it
  dataFd: -1,
  log: [] as string[],
}));

vi.mock('../../src/cow/fileio.js', async (importOriginal) => {
  const real = await importOriginal<typeof import('../../src/cow/fileio.js')>();
  return {
    ...real,
    pwritev: async (fd: number, bufs: readonly Buffer[], pos: number): Promise<void> => {
      const gate = hooks.gates.get(pos);
      if (gate) {
        // Each gate holds one data write (the journal's writes go to the same small positions).
        hooks.gates.delete(pos);
        hooks.dataFd = fd;
        await gate;
      }
      await real.pwritev(fd, bufs, pos);
    },
    fdatasync: async (fd: number): Promise<void> => {
      hooks.log.push(fd === hooks.dataFd ? 'fdatasync data' : 'fdatasync other');
      await real.fdatasync(fd);
    },
  };
});

const { Volume } = await import('../../src/cow/volume.js');

const BS = 65536;
let dir: string;

beforeEach(async () => {
  dir = await mkdtemp(path.join(tmpdir(), 'vmsnap-flush-'));
  hooks.gates.clear();
  hooks.dataFd = -1;
  hooks.log = [];
});
afterEach(async () => {
  await rm(dir, { recursive: true, force: true });
});

function gate(pos: number): () => void {
  let release!: () => void;
  hooks.gates.set(pos, new Promise<void>((r) => (release = r)));
  return release;
}

const tick = (): Promise<void> => new Promise((r) => setImmediate(r));

describe('copy-on-write after a freeze', () => {
  // Two guest writes to different sectors of one 64 KiB block may be in flight together. When a
  // freeze (a take) falls between them, the second copies the block into a fresh slot: that copy
  // must include the first write's bytes, which land in the old slot. Before the fix the copy read
  // the old slot at once, and the first write — acknowledged to the guest — was lost from the disk.
  it('a partial write after a freeze keeps a write in flight to the same block from before it', async () => {
    const v = await Volume.create(path.join(dir, 'v'), { size: 16 * BS, blockSize: BS });
    try {
      await v.write(0, Buffer.alloc(BS, 0xaa)); // block 0 in home slot 0, this generation
      await v.flush();
      const release = gate(0); // the next data write at slot 0's start: w1's
      const w1 = v.write(0, Buffer.alloc(4096, 1));
      await tick();
      v.freeze();
      const w2 = v.write(8192, Buffer.alloc(4096, 2)); // copies block 0 into a fresh slot
      await tick();
      release();
      await Promise.all([w1, w2]);
      const got = Buffer.alloc(BS);
      await v.read(0, BS, got, 0);
      const want = Buffer.alloc(BS, 0xaa);
      want.fill(1, 0, 4096);
      want.fill(2, 8192, 12288);
      expect(got.subarray(0, 4096).equals(want.subarray(0, 4096)), 'the first write is on the disk').toBe(true);
      expect(got.equals(want), 'the block holds both writes and the rest unchanged').toBe(true);
    } finally {
      await v.close();
    }
  });
});

describe('volume FLUSH', () => {
  /**
   * Commit 1 (block 0's entry) waits for w1; w2 (block 1, FUA or not) is issued meanwhile; then w1
   * lands and commit 1 syncs the data file while w2's bytes are still held. Returns w2's write
   * and the release of its bytes.
   */
  async function w2DuringCommit(v: Awaited<ReturnType<typeof Volume.create>>, fua: boolean): Promise<{ w2: Promise<void>; release2: () => void }> {
    const release1 = gate(0);
    const release2 = gate(BS);
    const w1 = v.write(0, Buffer.alloc(BS, 1));
    const f1 = v.flush();
    await tick();
    const w2 = v.write(BS, Buffer.alloc(BS, 2), fua);
    await tick();
    release1();
    await Promise.all([w1, f1]);
    expect(hooks.log).toContain('fdatasync data');
    return { w2, release2 };
  }

  it('syncs a write that completed after an earlier commit began its fdatasync', async () => {
    const v = await Volume.create(path.join(dir, 'v'), { size: 16 * BS, blockSize: BS });
    try {
      const { w2, release2 } = await w2DuringCommit(v, false);
      release2();
      await w2; // the guest now has w2's reply
      hooks.log.push('w2 completed');
      await v.flush(); // ... and flushes: w2 must be durable when this returns
      const after = hooks.log.slice(hooks.log.indexOf('w2 completed'));
      expect(after, `fdatasyncs after w2 completed: ${after.join(', ')}`).toContain('fdatasync data');
    } finally {
      await v.close();
    }
  });

  it('syncs a FUA write that completed while another commit was syncing', async () => {
    const v = await Volume.create(path.join(dir, 'v'), { size: 16 * BS, blockSize: BS });
    try {
      const { w2, release2 } = await w2DuringCommit(v, true);
      let w2done = false;
      void w2.then(() => (w2done = true));
      await tick();
      expect(w2done).toBe(false);
      hooks.log.push('w2 bytes written');
      release2();
      await w2;
      const after = hooks.log.slice(hooks.log.indexOf('w2 bytes written'));
      expect(after, `fdatasyncs after w2's bytes were written: ${after.join(', ')}`).toContain('fdatasync data');
    } finally {
      await v.close();
    }
  });
});
