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
 */
import { promises as fsp } from 'node:fs';
import * as path from 'node:path';
import type { FileHandle } from 'node:fs/promises';
import { blake3 } from '@napi-rs/blake-hash';
import { createTempFile } from '../util/fs.js';
import type { Repository } from '../store/repository.js';
import type { Snapshot, StreamRecord } from '../store/manifest.js';
import { loadStoredRam, ramPages } from '../vm/ram-store.js';
import { PAGE_SIZE } from '../migstream/index.js';
import { PAGE_HASH_BYTES, type DiskOffer } from './protocol.js';

export function pageHash(page: Uint8Array): Buffer {
  return blake3(page).subarray(0, PAGE_HASH_BYTES);
}

export interface Holdings {
  snapshot: Snapshot | null;
  /** Page hash (latin1 key) → offset of that page in `pageFile`. */
  pages: Map<string, number>;
  pageFile: { handle: FileHandle; path: string } | null;
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
export async function loadHoldings(repo: Repository, snap: Snapshot | null, disks: readonly DiskOffer[], workDir: string, pages = true): Promise<Holdings> {
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
  const ram = await loadStoredRam(repo, snap.streams);
  const file = await createTempFile(path.join(workDir, 'held-pages'));
  h.pageFile = { handle: file.fh, path: file.path };
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
  await fsp.rm(h.pageFile.path, { force: true });
  h.pageFile = null;
}
