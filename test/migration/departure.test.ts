/**
 * The departure recorder keeps the last content of every page it sees, whatever the order: runs of
 * consecutive pages are written together, and a ZERO record after a page must win over it even
 * while that page still waits in the pending run. Checked against a plain model on a random stream.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { DepartureRecorder } from '../../src/migration/departure.js';
import { PAGE_SIZE, type PageRecord, type StreamPrefix } from '../../src/migstream/index.js';

const dirs: string[] = [];
afterEach(() => {
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

function page(tag: number): Buffer {
  const b = Buffer.alloc(PAGE_SIZE);
  b.writeUInt32LE(tag, 0);
  b.writeUInt32LE(tag, PAGE_SIZE - 4);
  return b;
}

describe('DepartureRecorder', () => {
  it('ends with each page as the stream last left it (runs, jumps, zero after data, rewrites)', async () => {
    const dir = mkdtempSync(path.join(tmpdir(), 'vmsnap-departure-'));
    dirs.push(dir);
    const blocks = [
      { name: 'pc.ram', usedLength: 600 * PAGE_SIZE },
      { name: 'vga.vram', usedLength: 40 * PAGE_SIZE },
    ];
    const prefix = { bytes: Buffer.alloc(0), machine: 'pc', pageSize: PAGE_SIZE, ramSectionId: 1, blocks } as StreamPrefix;
    const rec = new DepartureRecorder(dir);
    const model = blocks.map((b) => new Array<number>(b.usedLength / PAGE_SIZE).fill(0));
    let seed = 7;
    const rand = (n: number) => {
      seed = (seed * 1103515245 + 12345) & 0x7fffffff;
      return seed % n;
    };
    let tag = 1;
    const feed = (block: number, p: number, zero: boolean) => {
      const r: PageRecord = zero ? { block, offset: p * PAGE_SIZE, kind: 'zero' } : { block, offset: p * PAGE_SIZE, kind: 'page', data: page(tag) };
      model[block]![p] = zero ? 0 : tag;
      tag++;
      rec.record(prefix, r);
    };
    // A first pass in address order (long runs, crossing the 1 MiB run size), then dirty rounds in
    // random order with zeros in between, some landing on pages of the still-pending run.
    for (let b = 0; b < blocks.length; b++) for (let p = 0; p < model[b]!.length; p++) feed(b, p, p % 9 === 4);
    for (let i = 0; i < 3000; i++) {
      const b = rand(10) < 8 ? 0 : 1;
      const start = rand(model[b]!.length);
      const len = 1 + rand(12);
      for (let p = start; p < Math.min(start + len, model[b]!.length); p++) feed(b, p, rand(5) === 0);
    }
    // A zero for a page of the run still pending, then the run goes on: the zero must win.
    for (const p of [100, 101, 102]) feed(0, p, false);
    feed(0, 101, true);
    feed(0, 103, false);
    rec.finish({ bytes: Buffer.alloc(0) } as never);
    const seen = blocks.map((b) => new Array<number>(b.usedLength / PAGE_SIZE).fill(-1));
    for await (const r of rec.pages()) seen[r.block]![r.offset / PAGE_SIZE] = r.kind === 'zero' ? 0 : r.data!.readUInt32LE(0);
    expect(seen).toEqual(model);
    await rec.dispose();
  });
});
