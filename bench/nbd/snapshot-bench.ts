/**
 * Snapshot cost versus dirty fraction on a 4 GiB volume, and clone time of a 4 GiB snapshot.
 * The store hashes (BLAKE3) and counts but keeps nothing, so the figures are the volume's side:
 * reading dirty blocks, zero detection, hashing.
 *
 *   npx tsx bench/nbd/snapshot-bench.ts [--size-gib 4]
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { randomBytes } from 'node:crypto';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { blake3 } from '@napi-rs/blake-hash';
import type { ChunkStore } from '../../src/cow/chunk-store.js';
import { Volume } from '../../src/cow/volume.js';
import { cloneVolume, snapshotVolume } from '../../src/cow/snapshot.js';

class HashOnlyStore implements ChunkStore {
  readonly chunkSize = 65536;
  puts = 0;
  chunkId(d: Uint8Array): Buffer {
    return blake3(Buffer.from(d.buffer, d.byteOffset, d.byteLength));
  }
  async putChunk(d: Uint8Array): Promise<{ id: Buffer; isNew: boolean }> {
    this.puts++;
    return { id: this.chunkId(d), isNew: true };
  }
  async getChunk(): Promise<Buffer> {
    throw new Error('hash-only store keeps no data');
  }
  async flush(): Promise<void> {}
}

const i = process.argv.indexOf('--size-gib');
const SIZE = (i >= 0 ? Number(process.argv[i + 1]) : 4) * 2 ** 30;
const BS = 65536;
const N = SIZE / BS;
const dir = await mkdtemp(path.join(tmpdir(), 'snapbench-'));
const store = new HashOnlyStore();
try {
  const v = await Volume.create(path.join(dir, 'vol'), { size: SIZE, blockSize: BS });
  const chunk = randomBytes(2 ** 20);
  let t = performance.now();
  for (let o = 0; o < SIZE; o += chunk.length) {
    chunk.writeUInt32LE(o / chunk.length, 0);
    for (let b = 0; b < 16; b++) chunk.writeUInt32LE(o + b, b * BS + 8);
    await v.write(o, chunk);
  }
  await v.flush();
  console.log(`filled ${SIZE / 2 ** 30} GiB in ${((performance.now() - t) / 1000).toFixed(1)} s`);
  t = performance.now();
  const first = await snapshotVolume(v, store);
  console.log(`initial full snapshot: ${(first.stats.durationMs / 1000).toFixed(2)} s`);
  const block = randomBytes(BS);
  for (const pct of [1, 10, 100]) {
    const count = Math.round((N * pct) / 100);
    const picks = pct === 100 ? Array.from({ length: N }, (_, k) => k) : [...new Set(Array.from({ length: count * 2 }, () => Math.floor(Math.random() * N)))].slice(0, count);
    for (const b of picks) {
      block.writeUInt32LE(b, 0);
      block.writeUInt32LE(pct, 4);
      await v.write(b * BS, block);
    }
    await v.flush();
    const t0 = performance.now();
    const f = v.freeze();
    const freezeMs = performance.now() - t0;
    const s = await snapshotVolume(v, store);
    console.log(
      `${String(pct).padStart(3)}% dirty (${s.stats.dirtyBlocks} blocks): freeze ${freezeMs.toFixed(2)} ms, snapshot ${s.stats.durationMs.toFixed(0)} ms, read ${(s.stats.readBytes / 2 ** 20).toFixed(0)} MiB (frozen ${f.dirtyBlocks})`,
    );
  }
  const last = await snapshotVolume(v, store);
  await v.close();
  const t1 = performance.now();
  const c = await cloneVolume(path.join(dir, 'clone'), last.stream, { store });
  console.log(`clone of a ${SIZE / 2 ** 30} GiB snapshot: ${(performance.now() - t1).toFixed(1)} ms`);
  await c.close();
} finally {
  await rm(dir, { recursive: true, force: true });
}
