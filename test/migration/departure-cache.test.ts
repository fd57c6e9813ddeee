/**
 * The departure cache (src/migration/holdings.ts): the host a guest left keeps its RAM image and
 * the index of its pages, and a return trip's holdings come from it instead of the repository —
 * only for the snapshot the index names, and never a page that does not match its hash.
 */
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { randomBytes } from 'node:crypto';
import { existsSync, promises as fsp } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { departureCacheFiles, dropDepartureCache, keepDepartureCache, loadHoldings, pageHash, readHeldPages, releaseHoldings } from '../../src/migration/holdings.js';
import type { Repository } from '../../src/store/repository.js';
import type { Snapshot } from '../../src/store/manifest.js';

const PAGE = 4096;
const SNAP = 'ab'.repeat(32);
const OTHER = 'cd'.repeat(32);
// The cache path reads nothing from the repository; the other path fails at once on this fake.
const noRepo = new Proxy({}, { get: (_t, k) => (k === 'encrypted' ? false : () => { throw new Error(`repository used: ${String(k)}`); }) }) as unknown as Repository;
const snapshot = (id: string): Snapshot => ({ id, streams: [] }) as unknown as Snapshot;

describe('departure cache', () => {
  let dir: string;
  let pages: Buffer[];
  const write = async (): Promise<void> => {
    // An image as the recorder leaves it: pages at their RAM offsets, a hole at page 2.
    const image = path.join(dir, 'image.ram');
    const fh = await fsp.open(image, 'w');
    const held: { hash: Buffer; pos: number }[] = [];
    for (const [i, p] of pages.entries()) {
      if (i === 2) continue;
      await fh.write(p, 0, PAGE, i * PAGE);
      held.push({ hash: pageHash(p), pos: i * PAGE });
    }
    await fh.close();
    await keepDepartureCache(dir, 'vm1', SNAP, image, held);
    expect(existsSync(image)).toBe(false);
  };

  beforeEach(async () => {
    dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'vmsnap-held-'));
    pages = Array.from({ length: 5 }, () => randomBytes(PAGE));
  });
  afterEach(() => fsp.rm(dir, { recursive: true, force: true }));

  it('serves the snapshot it was made for, without reading the repository', async () => {
    await write();
    const h = await loadHoldings(noRepo, snapshot(SNAP), [], dir, true, { dataDir: dir, vm: 'vm1' });
    expect(h.pages.size).toBe(4);
    const want = [4, 0, 1];
    const got = await readHeldPages(h, Buffer.concat(want.map((i) => pageHash(pages[i]!))));
    expect(got.equals(Buffer.concat(want.map((i) => pages[i]!)))).toBe(true);
    await releaseHoldings(h);
    // Released holdings keep the cache (only an arrival drops it).
    expect(existsSync(departureCacheFiles(dir, 'vm1').ram)).toBe(true);
    await dropDepartureCache(dir, 'vm1');
    expect(existsSync(departureCacheFiles(dir, 'vm1').ram)).toBe(false);
    expect(existsSync(departureCacheFiles(dir, 'vm1').index)).toBe(false);
  });

  it('is not used for another snapshot, or with a damaged index', async () => {
    await write();
    await expect(loadHoldings(noRepo, snapshot(OTHER), [], dir, true, { dataDir: dir, vm: 'vm1' })).rejects.toThrow(/repository used|no mig-prefix stream/); // fell through to the repository
    const { index } = departureCacheFiles(dir, 'vm1');
    const bytes = await fsp.readFile(index);
    await fsp.writeFile(index, bytes.subarray(0, bytes.length - 3));
    await expect(loadHoldings(noRepo, snapshot(SNAP), [], dir, true, { dataDir: dir, vm: 'vm1' })).rejects.toThrow(/repository used|no mig-prefix stream/); // fell through to the repository
  });

  it('a page damaged on disk fails the read, naming the file, and the cache is dropped', async () => {
    await write();
    const { ram, index } = departureCacheFiles(dir, 'vm1');
    const h = await loadHoldings(noRepo, snapshot(SNAP), [], dir, true, { dataDir: dir, vm: 'vm1' });
    const fh = await fsp.open(ram, 'r+');
    await fh.write(Buffer.from([0xff ^ pages[3]![100]!]), 0, 1, 3 * PAGE + 100);
    await fh.close();
    await expect(readHeldPages(h, pageHash(pages[3]!))).rejects.toThrow(/does not match its hash \(the file is damaged\)/);
    await releaseHoldings(h);
    expect(existsSync(index)).toBe(false);
  });

  it('a reference to a page not held is a protocol violation', async () => {
    await write();
    const h = await loadHoldings(noRepo, snapshot(SNAP), [], dir, true, { dataDir: dir, vm: 'vm1' });
    await expect(readHeldPages(h, pageHash(pages[2]!))).rejects.toThrow(/did not advertise/);
    await releaseHoldings(h);
  });
});
