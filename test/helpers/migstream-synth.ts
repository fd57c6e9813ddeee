/**
 * Synthetic QEMU 10 migration streams, shared by test/migstream/migstream.test.ts and
 * bench/migstream/run.ts: a prefix and a device-state suffix laid out exactly as QEMU writes them
 * (see src/migstream/parser.ts), page contents that differ per page, and a large
 * guest-like stream built with the project's own builder.
 */
import { buildStream, type RebuildPage } from '../../src/migstream/index.js';

export const PS = 4096;

export function be32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n >>> 0);
  return b;
}
export function be64(n: number | bigint): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(BigInt(n));
  return b;
}
export function str8(s: string): Buffer {
  return Buffer.concat([Buffer.from([s.length]), Buffer.from(s, 'latin1')]);
}

/** A prefix laid out exactly like QEMU 10 writes it (see parser.ts). */
export function makePrefix(blocks: Array<[string, number | bigint]>, machine = 'pc-i440fx-10.0', sid = 1): Buffer {
  const total = blocks.reduce((a, [, l]) => a + BigInt(l), 0n);
  return Buffer.concat([
    Buffer.from('QEVM'),
    be32(3),
    Buffer.from([7]),
    be32(machine.length),
    Buffer.from(machine),
    Buffer.from([1]),
    be32(sid),
    str8('ram'),
    be32(0),
    be32(4),
    be64(total + 0x04n),
    ...blocks.flatMap(([n, l]) => [str8(n), be64(l)]),
    be64(0x10),
    Buffer.from([0x7e]),
    be32(sid),
  ]);
}

/** One device section, EOF and a vmdesc trailer. */
export function makeSuffix(): Buffer {
  const dev = Buffer.concat([Buffer.from([4]), be32(2), str8('timer'), be32(0), be32(2), Buffer.from('devstate'), Buffer.from([0x7e]), be32(2)]);
  const json = Buffer.from(JSON.stringify({ 'page_size': 4096, devices: [{ name: 'timer' }] }));
  return Buffer.concat([dev, Buffer.from([0]), Buffer.from([6]), be32(json.length), json]);
}

/** 4096 bytes that differ for every seed (no two pages of a test alike). */
export function pageData(seed: number): Buffer {
  const words = new Uint32Array(PS / 4);
  for (let i = 0; i < words.length; i++) words[i] = (seed * 2654435761 + 4 * i) >>> 0;
  return Buffer.from(words.buffer);
}

/** `buf` cut into pieces of the given sizes, cycling through them. */
export function* chunked(buf: Buffer, sizes: number[]): Generator<Buffer> {
  let o = 0;
  let k = 0;
  while (o < buf.length) {
    const n = sizes[k++ % sizes.length] as number;
    yield buf.subarray(o, o + n);
    o += n;
  }
}

/** The page at index `i` of `guestStream`: one page in four is zero, like a lightly used guest. */
export function guestPage(i: number): RebuildPage {
  return i % 4 === 0 ? { block: 0, offset: i * PS, kind: 'zero' } : { block: 0, offset: i * PS, kind: 'page', data: pageData(i) };
}

/**
 * The stream of a `pages`-page guest (one block, pc.ram) as a background snapshot sends it: every
 * page once, in order, `guestPage(i)` at index i, then `makeSuffix()`.
 */
export async function guestStream(pages: number): Promise<Buffer> {
  function* all(): Generator<RebuildPage> {
    for (let i = 0; i < pages; i++) yield guestPage(i);
  }
  const chunks: Buffer[] = [];
  for await (const c of buildStream(makePrefix([['pc.ram', pages * PS]]), all(), makeSuffix(), { chunkBytes: 1 << 20 })) {
    chunks.push(c as Buffer);
  }
  return Buffer.concat(chunks);
}
