/**
 * What a destination already holds of a guest, so the source sends references instead of bytes
 * (the *have* exchange, protocol.ts).
 *
 * The holdings are the destination repository's latest snapshot of the VM with RAM whose disks
 * match the incoming ones (names, sizes, block size = the repository's chunk size):
 *   - its RAM pages, named by their 16-byte page hash. They are read once from the repository and
 *     kept, each distinct page once, in a private file in the VM's run directory, so a reference
 *     costs one 4 KiB pread when it arrives (not a chunk fetch and decompression);
 *   - its disks' block ids, in order: in an unencrypted repository a chunk id *is* the block's
 *     BLAKE3-256, so they are advertised without reading a byte; the new volumes start from these
 *     disks as their base, so an equal block needs nothing sent at all. An encrypted repository's
 *     ids are keyed (they must not reveal content): its disks are not advertised (RAM still is).
 *
 * Why the latest snapshot and not every one: the return trip of a laptop → desktop → laptop move
 * finds the snapshot the laptop left when the guest departed, which holds nearly everything; older
 * snapshots add little and cost a read each.
 *
 * The departure cache: reading a 1 GiB guest's RAM back from the repository (decompressing and
 * hashing every page) took ~5 s of the return trip, before anything could move. The host the guest
 * left already had that RAM as a file (the departure recorder's image) and passes over every page
 * when it stores the snapshot; it keeps the image and an index of its pages' hashes:
 *
 *   <data>/held/<vm>.ram     the image, sparse (a page's offset is its place in guest RAM)
 *   <data>/held/<vm>.index   "VMSNAP-HELD1\n" | snapshot id (64 hex) | u32 n | n × (16-byte page hash | u64 offset)
 *
 * The index names the snapshot it was made with; holdings use it only for that snapshot. Every
 * referenced page read from it is hashed again and must match (readHeldPages), so a damaged cache
 * fails a migration (the guest stays on its source) and never feeds a wrong page to a guest. One
 * cache per VM: a new departure replaces it, an arrival of the VM removes it. None is kept for an
 * encrypted repository: the guest's RAM would lie unencrypted on disk while the guest is away.
 */
import { promises as fsp, constants as fsc, readSync } from 'node:fs';
import * as path from 'node:path';
import type { FileHandle } from 'node:fs/promises';
import { blake3 } from '@napi-rs/blake-hash';
import { atomicWriteFile, createTempFile } from '../util/fs.js';
import type { Repository } from '../store/repository.js';
import type { Snapshot, StreamRecord } from '../store/manifest.js';
import { loadStoredRam, ramPages } from '../vm/ram-store.js';
import { PAGE_SIZE } from '../migstream/index.js';
import { PAGE_HASH_BYTES, type DiskOffer } from './protocol.js';
import { FrameError } from './channel.js';

export function pageHash(page: Uint8Array): Buffer {
  return blake3(page).subarray(0, PAGE_HASH_BYTES);
}

export interface Holdings {
  snapshot: Snapshot | null;
  /** Page hash (latin1 key) → offset of that page in `pageFile`. */
  pages: Map<string, number>;
  /** `owned`: a private temp file, removed on release (otherwise the departure cache, kept). */
  pageFile: { handle: FileHandle; path: string; owned: boolean } | null;
  /** Disk name → the base disk stream the new volume starts from (advertised block by block). */
  disks: Map<string, StreamRecord>;
  /** Whether block ids are plain BLAKE3 (unencrypted repository): only then are disks advertised. */
  plainBlockIds: boolean;
  /** The advertised block ids as a set (built on the first reference). */
  blockSet?: Set<string>;
}

export function noHoldings(): Holdings {
  return { snapshot: null, pages: new Map(), pageFile: null, disks: new Map(), plainBlockIds: false };
}

/** The snapshot the holdings come from: the latest of `vm` with RAM and disks shaped like `disks`. */
export async function chooseHeldSnapshot(repo: Repository, vm: string, disks: readonly DiskOffer[], needRam = true): Promise<Snapshot | null> {
  // A cold migration moves disks only: a disk-only snapshot is as good a base as a live one.
  const summaries = (await repo.listSnapshotSummaries(() => undefined))
    .filter((s) => s.vm === vm && (!needRam || s.streams.some((x) => x.name === 'mig-prefix')))
    .sort((a, b) => (a.time < b.time ? 1 : a.time > b.time ? -1 : 0));
  for (const s of summaries) {
    const fits = disks.every((d) => s.streams.some((x) => x.kind === 'disk' && x.name === d.name && x.size === d.size && x.chunkSize === d.blockSize));
    if (!fits) continue;
    return repo.readSnapshot(s.id);
  }
  return null;
}

/** Reads the held snapshot's RAM into a page file and its disk streams; null snapshot → nothing. */
export async function loadHoldings(
  repo: Repository,
  snap: Snapshot | null,
  disks: readonly DiskOffer[],
  workDir: string,
  pages = true,
  cache?: { dataDir: string; vm: string },
): Promise<Holdings> {
  const h = noHoldings();
  if (!snap) return h;
  h.snapshot = snap;
  h.plainBlockIds = !repo.encrypted;
  for (const d of disks) {
    const s = snap.streams.find((x) => x.kind === 'disk' && x.name === d.name);
    if (s) h.disks.set(d.name, s);
  }
  // A cold migration sends no RAM: its page hashes would only cost the reading.
  if (!pages) return h;
  if (cache && (await useDepartureCache(h, cache.dataDir, cache.vm, snap.id))) return h;
  const ram = await loadStoredRam(repo, snap.streams);
  const file = await createTempFile(path.join(workDir, 'held-pages'));
  h.pageFile = { handle: file.fh, path: file.path, owned: true };
  let pos = 0;
  const batch: Buffer[] = [];
  let batchStart = 0;
  const flush = async () => {
    if (batch.length === 0) return;
    await file.fh.writev(batch, batchStart);
    batch.length = 0;
  };
  for await (const p of ramPages(repo, ram.ram)) {
    if (p.kind !== 'page' || !p.data) continue;
    const key = pageHash(p.data).toString('latin1');
    if (h.pages.has(key)) continue;
    if (batch.length === 0) batchStart = pos;
    batch.push(Buffer.from(p.data));
    h.pages.set(key, pos);
    pos += PAGE_SIZE;
    if (batch.length >= 256) await flush();
  }
  await flush();
  return h;
}

export async function releaseHoldings(h: Holdings): Promise<void> {
  if (!h.pageFile) return;
  await h.pageFile.handle.close().catch(() => undefined);
  if (h.pageFile.owned) await fsp.rm(h.pageFile.path, { force: true });
  h.pageFile = null;
}

const CACHE_MAGIC = Buffer.from('VMSNAP-HELD1\n');
const CACHE_ENTRY = PAGE_HASH_BYTES + 8;

export function departureCacheFiles(dataDir: string, vm: string): { dir: string; ram: string; index: string } {
  const dir = path.join(dataDir, 'held');
  return { dir, ram: path.join(dir, `${vm}.ram`), index: path.join(dir, `${vm}.index`) };
}

/**
 * Keeps a departed guest's RAM image (moved, not copied, from `imageFile`) with the index of its
 * pages, for the snapshot `snapshotId` (see the module header). The old index goes first, so a
 * crash part-way leaves no index that names the wrong image.
 */
export async function keepDepartureCache(dataDir: string, vm: string, snapshotId: string, imageFile: string, pages: readonly { hash: Buffer; pos: number }[]): Promise<void> {
  const f = departureCacheFiles(dataDir, vm);
  await fsp.mkdir(f.dir, { recursive: true, mode: 0o700 });
  await fsp.rm(f.index, { force: true });
  await fsp.rename(imageFile, f.ram);
  const index = Buffer.allocUnsafe(CACHE_MAGIC.length + 64 + 4 + pages.length * CACHE_ENTRY);
  let o = CACHE_MAGIC.copy(index, 0);
  o += index.write(snapshotId, o, 64, 'latin1');
  o = index.writeUInt32BE(pages.length, o);
  for (const p of pages) {
    o += p.hash.copy(index, o, 0, PAGE_HASH_BYTES);
    o = index.writeBigUInt64BE(BigInt(p.pos), o);
  }
  await atomicWriteFile(f.index, index);
}

/** Removes a VM's departure cache (it arrived here again, or is gone for good). */
export async function dropDepartureCache(dataDir: string, vm: string): Promise<void> {
  const f = departureCacheFiles(dataDir, vm);
  await fsp.rm(f.index, { force: true });
  await fsp.rm(f.ram, { force: true });
}

/** Fills `h.pages` from the departure cache when its index was made for `snapshotId`; false otherwise. */
async function useDepartureCache(h: Holdings, dataDir: string, vm: string, snapshotId: string): Promise<boolean> {
  const f = departureCacheFiles(dataDir, vm);
  const index = await fsp.readFile(f.index).catch(() => null);
  if (!index || index.length < CACHE_MAGIC.length + 68 || !index.subarray(0, CACHE_MAGIC.length).equals(CACHE_MAGIC)) return false;
  if (index.toString('latin1', CACHE_MAGIC.length, CACHE_MAGIC.length + 64) !== snapshotId) return false;
  const n = index.readUInt32BE(CACHE_MAGIC.length + 64);
  const start = CACHE_MAGIC.length + 68;
  if (index.length !== start + n * CACHE_ENTRY) return false;
  const fh = await fsp.open(f.ram, fsc.O_RDONLY | fsc.O_NOFOLLOW).catch(() => null);
  if (!fh) return false;
  for (let i = 0, o = start; i < n; i++, o += CACHE_ENTRY) {
    const key = index.toString('latin1', o, o + PAGE_HASH_BYTES);
    if (!h.pages.has(key)) h.pages.set(key, Number(index.readBigUInt64BE(o + PAGE_HASH_BYTES)));
  }
  h.pageFile = { handle: fh, path: f.ram, owned: false };
  return true;
}

/** The held pages the references in `hashes` name, in order, each checked against its hash. */
export async function readHeldPages(h: Holdings, hashes: Buffer): Promise<Buffer> {
  const n = hashes.length / PAGE_HASH_BYTES;
  const out = Buffer.allocUnsafe(n * PAGE_SIZE);
  if (!h.pageFile) throw new FrameError('record', 'a page reference, but this host advertised no pages');
  // The page file was just written by this process and sits in the page cache: synchronous reads,
  // one per run of pages that lie next to each other there too (RAM order, mostly), cost far less
  // than a thread-pool round trip per page.
  const fd = h.pageFile.handle.fd;
  let runStart = 0;
  let runPos = -1;
  const readRun = (end: number): void => {
    const len = (end - runStart) * PAGE_SIZE;
    let done = 0;
    while (done < len) {
      const got = readSync(fd, out, runStart * PAGE_SIZE + done, len - done, runPos + done);
      if (got === 0) throw new Error('the held page file is shorter than its index');
      done += got;
    }
  };
  for (let i = 0; i < n; i++) {
    const pos = h.pages.get(hashes.toString('latin1', i * PAGE_HASH_BYTES, (i + 1) * PAGE_HASH_BYTES));
    if (pos === undefined) throw new FrameError('record', 'a page reference to a page this host did not advertise');
    if (runPos >= 0 && pos === runPos + (i - runStart) * PAGE_SIZE) continue;
    if (runPos >= 0) readRun(i);
    runStart = i;
    runPos = pos;
  }
  if (runPos >= 0) readRun(n);
  // A page fed to the guest must be the page the source named: a damaged page file (the departure
  // cache lives on disk between trips) fails the migration — the guest stays on its source — and
  // the cache is dropped, so the next attempt reads the repository.
  for (let i = 0; i < n; i++) {
    if (!pageHash(out.subarray(i * PAGE_SIZE, (i + 1) * PAGE_SIZE)).equals(hashes.subarray(i * PAGE_HASH_BYTES, (i + 1) * PAGE_HASH_BYTES))) {
      if (!h.pageFile.owned) await fsp.rm(h.pageFile.path.replace(/\.ram$/, '.index'), { force: true });
      throw new Error(`a held page read from ${h.pageFile.path} does not match its hash (the file is damaged)`);
    }
  }
  return out;
}
