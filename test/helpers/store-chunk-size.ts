/**
 * The measurement behind vmsnap's 64 KiB default chunk size (docs/format.md, "Why 64 KiB chunks").
 *
 *   npx tsx test/helpers/store-chunk-size.ts [imageMiB=64]
 *
 * Builds an ext4-like image in memory (4 KiB blocks: superblock/group-descriptor/bitmap/inode-table
 * regions every 128 MiB-equivalent group, a journal, files of text, of already-compressed data and
 * of binaries laid out in extents, ~35 % free space as zeros), then a second version with 1 % of the
 * 4 KiB blocks that hold data edited in place (a 16-byte stamp at a random offset, as a file system
 * rewriting a few fields, so edited blocks compress like the originals). Imports both versions into
 * a fresh in-memory repository at chunk sizes 16, 64, 256 and 1024 KiB and prints, per size:
 * stored bytes after the first import, growth of the second, index bytes per chunk at that scale
 * (Repository.index.memoryBytes / size) and first-import speed. Finally it fills a ChunkIndex with
 * 1 Mi and 1.5 Mi random ids and prints its memory per chunk, the figure that matters at scale.
 * Deterministic apart from timings.
 */
import { Readable } from 'node:stream';
import { randomBytes } from 'node:crypto';
import { MemoryBackend } from '../../src/store/backend/memory.js';
import { Repository } from '../../src/store/repository.js';
import { ingestStream } from '../../src/store/streams.js';
import { ChunkIndex } from '../../src/store/chunk-index.js';
import { mixedImage, randomData, rng } from './cli.js';

const BLOCK = 4096;
const MiB = 1 << 20;

function ext4Like(size: number, seed: number): Buffer {
  const img = Buffer.alloc(size);
  const r = rng(seed);
  const blocks = size / BLOCK;
  const text = Buffer.from('Lorem ipsum dolor sit amet, /usr/share/doc/package/changelog 2026-11-25 version 1.2.3\n'.repeat(64));
  // Metadata every 32768 blocks (a block group): superblock copy, descriptors, bitmaps, inode table.
  for (let g = 0; g < blocks; g += 32768) {
    for (let b = g; b < Math.min(blocks, g + 2 + 512); b++) {
      const off = b * BLOCK;
      for (let i = 0; i < BLOCK; i += 256) img.writeUInt32LE(Math.floor(r() * 0xffffffff), off + i); // sparse inode fields
    }
  }
  // Journal: 2048 blocks of mixed records near the start.
  mixedImage(Math.min(2048 * BLOCK, size / 8), seed + 1).copy(img, 520 * BLOCK);
  // Files: extents of 1-256 blocks, each text, compressed data or binary-like; ~65 % of the disk.
  let b = 520 + 2048;
  while (b < blocks * 0.95) {
    const len = 1 + Math.floor(r() ** 3 * 256);
    const kind = r();
    for (let i = 0; i < len && b + i < blocks; i++) {
      const off = (b + i) * BLOCK;
      if (kind < 0.35) text.copy(img, off, (i * 97) % 1024, ((i * 97) % 1024) + BLOCK);
      else if (kind < 0.65) randomData(BLOCK, Math.floor(r() * 0xffffffff)).copy(img, off);
      else mixedImage(BLOCK, Math.floor(r() * 0xffffffff), 512).copy(img, off);
    }
    b += len + (r() < 0.5 ? Math.floor(r() * 64) : 0); // free gaps
  }
  return img;
}

function mutate(base: Buffer, fraction: number, seed: number): { out: Buffer; changed: number } {
  const out = Buffer.from(base);
  const r = rng(seed);
  const used: number[] = [];
  const zero = Buffer.alloc(BLOCK);
  for (let b = 0; b < base.length / BLOCK; b++) if (!base.subarray(b * BLOCK, (b + 1) * BLOCK).equals(zero)) used.push(b);
  const n = Math.round((base.length / BLOCK) * fraction);
  for (let k = 0; k < n; k++) {
    const b = used[Math.floor(r() * used.length)]!;
    randomBytes(16).copy(out, b * BLOCK + Math.floor(r() * (BLOCK - 16)));
  }
  return { out, changed: n };
}

const sizeMiB = Number(process.argv[2] ?? 64);
const base = ext4Like(sizeMiB * MiB, 7);
const { out: second, changed } = mutate(base, 0.01, 8);
const fmt = (n: number) => `${(n / MiB).toFixed(2)} MiB`;
console.log(`image ${sizeMiB} MiB, ${changed} of ${(sizeMiB * MiB) / BLOCK} 4 KiB blocks changed (1 %)`);
console.log('| chunk | chunks | stored after 1st | growth of 2nd | growth / changed data | index bytes/chunk (this repo) | 1st import |');
console.log('|---|---|---|---|---|---|---|');
for (const kib of [16, 64, 256, 1024]) {
  const repo = await Repository.init(new MemoryBackend(), { chunkSize: kib << 10 });
  const piece = (buf: Buffer) => Readable.from((function* () {
    for (let o = 0; o < buf.length; o += MiB) yield buf.subarray(o, o + MiB);
  })());
  const t0 = performance.now();
  const session = await repo.beginWrite('import');
  const a = await ingestStream(repo, piece(base), { name: 'disk0', kind: 'disk' });
  await repo.saveSnapshot({ vm: 'bench', tags: [], parent: null, meta: {}, streams: [a.stream] });
  const secs = (performance.now() - t0) / 1000;
  const stored1 = repo.stats.storedBytes;
  const b = await ingestStream(repo, piece(second), { name: 'disk0', kind: 'disk' });
  await repo.saveSnapshot({ vm: 'bench', tags: [], parent: null, meta: {}, streams: [b.stream] });
  await session.end();
  const growth = repo.stats.storedBytes - stored1;
  console.log(
    `| ${kib} KiB | ${repo.index.size} | ${fmt(stored1)} | ${fmt(growth)} | ${(growth / (changed * BLOCK)).toFixed(1)}x | ${(repo.index.memoryBytes / repo.index.size).toFixed(0)} | ${(base.length / MiB / secs).toFixed(0)} MiB/s |`,
  );
  await repo.close();
}
for (const n of [1 << 20, 1.5 * (1 << 20)]) {
  const idx = new ChunkIndex(1 << 14);
  const e = { offset: 8, storedLength: 1000, rawLength: 65536, codec: 1 };
  const ids = randomBytes(32 * n);
  for (let i = 0; i < n; i++) idx.add(ids.subarray(i * 32, (i + 1) * 32), 'p'.repeat(64), e);
  console.log(`ChunkIndex with ${n} chunks: ${idx.memoryBytes} bytes = ${(idx.memoryBytes / n).toFixed(1)} bytes/chunk`);
}
