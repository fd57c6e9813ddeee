/**
 * The "second backup" input: a copy of the base image with 1% of its blocks changed in place.
 *
 * Blocks are picked among those that hold data (not all zeros), with a seeded PRNG, so the same
 * base image always gives the same mutated image. Each picked block is edited, not replaced: one
 * 16-byte random stamp per 4 KiB page at a random offset, like a file system rewriting a few
 * fields, so the changed blocks compress about as well as the original ones (replacing them
 * with random bytes would make "growth / compressed size" look better than it is).
 *
 * Two variants:
 *   block 65536: 1% of the image's 64 KiB blocks change (aligned with vmsnap's chunks);
 *   block 4096:  1% of the image's 4 KiB blocks change: each dirties a whole 64 KiB chunk.
 *
 * The compressed size of the changed blocks is measured on the new contents, zstd level 3 (the
 * store's level) and lz4, each block compressed on its own and the sizes summed. For the 4 KiB
 * variant the same figure is also given for the 64 KiB chunks they dirty.
 */
import { promises as fsp, existsSync } from 'node:fs';
import { compress as zstdCompress } from 'zstd-napi';
import * as lz4 from 'lz4';
import { check } from '../common/measure.js';

export interface Mutation {
  base: string;
  out: string;
  seed: number;
  blockSize: number;
  /** Block numbers (in units of blockSize) that changed, ascending. */
  blocks: number[];
  changedBytes: number;
  /** 64 KiB chunks touched (equals blocks.length when blockSize is 64 KiB). */
  dirtiedChunks: number;
  /** Sum over changed blocks of their zstd -3 size (each block compressed alone). */
  zstdBytes: number;
  lz4Bytes: number;
  /** Sum over the dirtied 64 KiB chunks of their zstd -3 / lz4 size. */
  chunkZstdBytes: number;
  chunkLz4Bytes: number;
}

const CHUNK = 64 << 10;
const PAGE = 4096;

/** splitmix32-style generator: small, fast, and identical on every platform. */
export function prng(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x9e3779b9) >>> 0;
    let z = s;
    z = Math.imul(z ^ (z >>> 16), 0x85ebca6b) >>> 0;
    z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35) >>> 0;
    return (z ^ (z >>> 16)) >>> 0;
  };
}

function allZero(b: Uint8Array): boolean {
  for (let i = 0; i < b.length; i++) if (b[i] !== 0) return false;
  return true;
}

function zstdSize(b: Uint8Array): number {
  return zstdCompress(b, { compressionLevel: 3 }).length;
}
function lz4Size(b: Uint8Array): number {
  const out = Buffer.allocUnsafe(lz4.encodeBound(b.length));
  const n = lz4.encodeBlock(b, out);
  return n > 0 ? n : b.length;
}

/** Creates `out` from `base` (cached with a JSON description next to it). */
export async function mutateImage(base: string, out: string, blockSize: number, fraction = 0.01, seed = 20240601): Promise<Mutation> {
  const metaFile = `${out}.json`;
  if (existsSync(out) && existsSync(metaFile)) {
    const m = JSON.parse(await fsp.readFile(metaFile, 'utf8')) as Mutation;
    if (m.seed === seed && m.blockSize === blockSize && m.base === base) return m;
  }
  const size = (await fsp.stat(base)).size;
  const total = Math.floor(size / blockSize);
  const want = Math.round(total * fraction);

  // Data blocks of the base image.
  const fh = await fsp.open(base, 'r');
  const data: number[] = [];
  const buf = Buffer.allocUnsafe(8 << 20);
  for (let pos = 0; pos < size; pos += buf.length) {
    const { bytesRead } = await fh.read(buf, 0, buf.length, pos);
    for (let o = 0; o + blockSize <= bytesRead; o += blockSize) {
      if (!allZero(buf.subarray(o, o + blockSize))) data.push((pos + o) / blockSize);
    }
  }
  await fh.close();
  if (data.length < want) throw new Error(`${base}: only ${data.length} data blocks, need ${want}`);

  // Partial Fisher–Yates: the first `want` entries are a uniform sample.
  const rnd = prng(seed);
  for (let i = 0; i < want; i++) {
    const j = i + (rnd() % (data.length - i));
    [data[i], data[j]] = [data[j]!, data[i]!];
  }
  const blocks = data.slice(0, want).sort((a, b) => a - b);

  await fsp.rm(out, { force: true });
  await check('cp', ['--sparse=always', base, `${out}.tmp`]);
  const w = await fsp.open(`${out}.tmp`, 'r+');
  const block = Buffer.allocUnsafe(blockSize);
  let zstdBytes = 0;
  let lz4Bytes = 0;
  for (const b of blocks) {
    await w.read(block, 0, blockSize, b * blockSize);
    for (let p = 0; p < blockSize; p += PAGE) {
      const at = p + (rnd() % (PAGE - 16));
      for (let k = 0; k < 16; k += 4) block.writeUInt32LE(rnd(), at + k);
    }
    await w.write(block, 0, blockSize, b * blockSize);
    zstdBytes += zstdSize(block);
    lz4Bytes += lz4Size(block);
  }
  // The 64 KiB chunks that now differ, measured on the mutated contents.
  const chunks = [...new Set(blocks.map((b) => Math.floor((b * blockSize) / CHUNK)))];
  let chunkZstdBytes = 0;
  let chunkLz4Bytes = 0;
  const chunk = Buffer.allocUnsafe(CHUNK);
  for (const c of chunks) {
    const { bytesRead } = await w.read(chunk, 0, CHUNK, c * CHUNK);
    chunkZstdBytes += zstdSize(chunk.subarray(0, bytesRead));
    chunkLz4Bytes += lz4Size(chunk.subarray(0, bytesRead));
  }
  await w.sync();
  await w.close();
  await fsp.rename(`${out}.tmp`, out);
  const m: Mutation = {
    base,
    out,
    seed,
    blockSize,
    blocks,
    changedBytes: blocks.length * blockSize,
    dirtiedChunks: chunks.length,
    zstdBytes,
    lz4Bytes,
    chunkZstdBytes,
    chunkLz4Bytes,
  };
  await fsp.writeFile(metaFile, JSON.stringify(m));
  return m;
}
