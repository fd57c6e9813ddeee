/**
 * Snapshot cost versus dirty fraction on a 4 GiB volume, and clone time of a 4 GiB snapshot, with
 * the real Repository on a LocalBackend on local disk (zstd, 64 KiB chunks). Each snapshot is
 * written into the repository and committed with saveSnapshot; its time covers freeze, reading
 * the dirty blocks, hashing, compressing, writing packs and index, and the manifest commit.
 * Block contents are half random, half zeros (compress about 2:1), every block distinct.
 *
 *   npx tsx bench/nbd/snapshot-bench.ts [--size-gib 4] [--repo-dir /var/tmp] [--rounds 1]
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { randomBytes } from 'node:crypto';
import * as path from 'node:path';
import { Volume } from '../../src/cow/volume.js';
import { cloneVolume, snapshotVolume } from '../../src/cow/snapshot.js';
import { Repository } from '../../src/store/repository.js';
import { LocalBackend } from '../../src/store/backend/local.js';

const arg = (k: string): string | undefined => {
  const i = process.argv.indexOf(k);
  return i >= 0 ? process.argv[i + 1] : undefined;
};
const SIZE = Number(arg('--size-gib') ?? 4) * 2 ** 30;
const ROUNDS = Number(arg('--rounds') ?? 1);
const BS = 65536;
const N = SIZE / BS;
const dir = await mkdtemp(path.join(arg('--repo-dir') ?? '/var/tmp', 'snapbench-'));
const median = (l: number[]): number => [...l].sort((a, b) => a - b)[Math.floor(l.length / 2)]!;

/** Half random, half zeros, stamped with (block, tag) so no two blocks are equal. */
function fillBlock(buf: Buffer, block: number, tag: number): void {
  randomBytes(BS / 2).copy(buf, 0);
  buf.fill(0, BS / 2);
  buf.writeUInt32LE(block, 0);
  buf.writeUInt32LE(tag, 4);
}

try {
  const repo = await Repository.init(new LocalBackend(path.join(dir, 'repo')), { chunkSize: BS });
  const v = await Volume.create(path.join(dir, 'vol'), { size: SIZE, blockSize: BS, store: repo });
  const chunk = Buffer.allocUnsafe(2 ** 20);
  let t = performance.now();
  for (let o = 0; o < SIZE; o += chunk.length) {
    for (let b = 0; b < 16; b++) fillBlock(chunk.subarray(b * BS, (b + 1) * BS), o / BS + b, 0);
    await v.write(o, chunk);
  }
  await v.flush();
  console.log(`filled ${SIZE / 2 ** 30} GiB in ${((performance.now() - t) / 1000).toFixed(1)} s`);
  let parent: string | null = null;
  const take = async (): Promise<{ ms: number; dirty: number; read: number; newChunks: number; freezeMs: number }> => {
    const t0 = performance.now();
    const f = v.freeze();
    const freezeMs = performance.now() - t0;
    const session = await repo.beginWrite('take');
    const { stream, stats } = await snapshotVolume(v, repo);
    const snap = await repo.saveSnapshot({
      vm: 'bench',
      tags: [],
      parent,
      meta: {},
      streams: [{ name: 'disk0', kind: 'disk', size: stream.size, chunkSize: stream.chunkSize, chunks: stream.chunks }],
    });
    await session.end();
    parent = snap.id;
    return { ms: performance.now() - t0, dirty: f.dirtyBlocks, read: stats.readBytes, newChunks: stats.newChunks, freezeMs };
  };
  t = performance.now();
  const first = await take();
  console.log(`initial full snapshot: ${(first.ms / 1000).toFixed(1)} s, ${first.newChunks} new chunks`);
  const block = Buffer.allocUnsafe(BS);
  const times: Record<number, number[]> = { 1: [], 10: [], 100: [] };
  let tag = 1;
  for (let r = 0; r < ROUNDS; r++) {
    for (const pct of [1, 10, 100]) {
      const count = Math.round((N * pct) / 100);
      const picks = pct === 100 ? Array.from({ length: N }, (_, k) => k) : [...new Set(Array.from({ length: count * 2 }, () => Math.floor(Math.random() * N)))].slice(0, count);
      tag++;
      for (const b of picks) {
        fillBlock(block, b, tag);
        await v.write(b * BS, block);
      }
      await v.flush();
      const s = await take();
      times[pct]!.push(s.ms);
      console.log(
        `round ${r + 1}: ${String(pct).padStart(3)}% dirty (${s.dirty} blocks): freeze ${s.freezeMs.toFixed(2)} ms, snapshot+commit ${s.ms.toFixed(0)} ms, read ${(s.read / 2 ** 20).toFixed(0)} MiB, ${s.newChunks} new chunks`,
      );
    }
  }
  const m1 = median(times[1]!);
  const m10 = median(times[10]!);
  const m100 = median(times[100]!);
  console.log(`median snapshot+commit: 1% ${m1.toFixed(0)} ms, 10% ${m10.toFixed(0)} ms, 100% ${m100.toFixed(0)} ms`);
  console.log(`ratios: 10%/1% = ${(m10 / m1).toFixed(1)} (proportional: 10), 100%/1% = ${(m100 / m1).toFixed(1)} (proportional: 100)`);
  await v.close();
  const last = (await repo.readSnapshot(parent!)).streams[0]!;
  await repo.close();
  const reopened = await Repository.open(new LocalBackend(path.join(dir, 'repo')));
  const t1 = performance.now();
  const c = await cloneVolume(path.join(dir, 'clone'), { size: last.size, chunkSize: last.chunkSize, chunks: last.chunks }, { store: reopened });
  console.log(`clone of a ${SIZE / 2 ** 30} GiB snapshot: ${(performance.now() - t1).toFixed(1)} ms`);
  await c.close();
  await reopened.close();
} finally {
  await rm(dir, { recursive: true, force: true });
}
