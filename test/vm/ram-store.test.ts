/**
 * RamStreamWriter: pages in any order become the same chunk ids whether partial chunks wait in
 * memory or in the spill file, zero pages are never stored, and a page sent twice is refused.
 */
import { describe, expect, it } from 'vitest';
import { randomBytes } from 'node:crypto';
import { MemoryBackend } from '../../src/store/backend/memory.js';
import { Repository } from '../../src/store/repository.js';
import { RamStreamWriter, RamCaptureError } from '../../src/vm/ram-store.js';
import type { PageRecord, StreamPrefix } from '../../src/migstream/index.js';

const PAGE = 4096;
const prefix: StreamPrefix = {
  bytes: Buffer.from('prefix'),
  machine: 'pc-i440fx-10.0',
  pageSize: PAGE,
  ramSectionId: 2,
  blocks: [
    { name: 'pc.ram', usedLength: 64 * PAGE * 16 }, // 64 chunks of 64 KiB
    { name: 'pc.bios', usedLength: 3 * PAGE }, // one short chunk
  ],
};

function pages(seed: number): PageRecord[] {
  const out: PageRecord[] = [];
  prefix.blocks.forEach((b, block) => {
    for (let off = 0; off < b.usedLength; off += PAGE) {
      const zero = (off / PAGE + seed) % 5 === 0;
      out.push(zero ? { block, offset: off, kind: 'zero' } : { block, offset: off, kind: 'page', data: randomBytes(PAGE) });
    }
  });
  return out;
}

/** Interleaves the pages so that every chunk stays incomplete until the very end. */
function scattered(list: PageRecord[]): PageRecord[] {
  const per = 16;
  const out: PageRecord[] = [];
  for (let k = 0; k < per; k++) for (let i = k; i < list.length; i += per) out.push(list[i]!);
  return out;
}

async function capture(list: PageRecord[], maxPartialInMemory: number) {
  const repo = await Repository.init(new MemoryBackend(), {});
  const w = new RamStreamWriter(repo, { maxPartialInMemory });
  const streams = await repo.write('test capture', async () => {
    w.onPrefix(prefix);
    for (let i = 0; i < list.length; i += 37) await w.onPages(list.slice(i, i + 37));
    await w.close();
    return w.streams();
  });
  await repo.close();
  return { streams, stats: w.stats };
}

describe('RamStreamWriter', () => {
  it('gives the same chunk ids in memory and through the spill file, for any page order', async () => {
    const list = pages(1);
    const inOrder = await capture(list, 10_000);
    const spilled = await capture(scattered(list), 2);
    const reversed = await capture([...list].reverse(), 1);
    expect(spilled.streams.map((s) => s.chunks.toString('hex'))).toEqual(inOrder.streams.map((s) => s.chunks.toString('hex')));
    expect(reversed.streams.map((s) => s.chunks.toString('hex'))).toEqual(inOrder.streams.map((s) => s.chunks.toString('hex')));
    expect(inOrder.stats.pages).toBe(list.length);
    expect(inOrder.stats.zeroPages).toBe(list.filter((p) => p.kind === 'zero').length);
    expect(inOrder.streams[1]!.size).toBe(3 * PAGE);
  });

  it('refuses a page sent twice (a stream that is not point-in-time)', async () => {
    const repo = await Repository.init(new MemoryBackend(), {});
    const w = new RamStreamWriter(repo);
    w.onPrefix(prefix);
    const list = pages(2).filter((p) => p.block === 1);
    await repo.write('test capture', async () => {
      await w.onPages(list);
      await expect(w.onPages([list[0]!])).rejects.toBeInstanceOf(RamCaptureError);
    });
    await repo.close();
  });

  it('refuses a page sent twice before its chunk is complete: a repeat never stands in for a missing page', async () => {
    const repo = await Repository.init(new MemoryBackend(), {});
    const w = new RamStreamWriter(repo);
    w.onPrefix(prefix);
    const list = pages(2).filter((p) => p.block === 1); // one chunk of 3 pages
    // Pages 0, 0, 1: counting alone would call the chunk complete with page 2 never sent.
    await expect(w.onPages([list[0]!, list[0]!, list[1]!])).rejects.toThrow(/was sent twice/);
    await repo.close();
  });
});
