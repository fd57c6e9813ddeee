/**
 * Copying snapshots between repositories (`vmsnap copy`, `vmsnap sync`): local to S3 and back, or
 * between any two backends.
 *
 * Only chunks the target lacks travel. Two modes:
 *  - same keys (both unencrypted, or both opened with the same master key): chunk ids are equal in
 *    both repositories, so missing chunks are found by looking the source ids up in the target's
 *    index, and their stored blobs (compressed, sealed) are copied byte for byte after verifying
 *    that they decode to their id. The manifest is copied unchanged: same snapshot id.
 *  - different keys: ids are keyed BLAKE3 under each repository's id key, so every chunk is read
 *    and decrypted with the source key; its target id is computed with the target key, and it is
 *    compressed and sealed for the target only when the target lacks that id. The manifest's chunk
 *    lists are rewritten with target ids; it gets a new id and `meta.copyOf` = the source id, which
 *    is how a later copy recognises it. Chunk mappings learnt from the parent's copy (same stream,
 *    same position) avoid reading chunks again for incremental copies.
 *
 * Resumable: the manifest is written last; packs are indexed every FLUSH_EVERY_PACKS packs; and on
 * start, packs in the target that no index file names (uploaded by a run that was killed before its
 * index write) are adopted by reading only their descriptions. So a restarted copy sends nothing
 * that reached the target before. Holds a shared lock on both repositories (prune cannot run).
 */
import { encodeIndexFile } from './chunk-index.js';
import { IntegrityError, NotFoundError, UsageError } from './errors.js';
import { contentHash, ID_SIZE, idHex, isZeroId } from './hash.js';
import type { ChunkLocation } from './chunk-index.js';
import type { Snapshot, SnapshotSummary, StreamRecord } from './manifest.js';
import { readPackEntries, type PackEntry } from './pack.js';
import { mapLimit, type Repository } from './repository.js';
import { acquireLock } from './lock.js';

/** Ranged reads merge chunks of one pack separated by at most this many bytes... */
const MERGE_GAP = 1 << 20;
/** ...into ranges of at most this size. */
const MAX_RANGE = 16 << 20;
const READ_CONCURRENCY = 3;
/** Write an index file after this many new packs (bounds what an interrupted copy must adopt). */
export const FLUSH_EVERY_PACKS = 8;

export interface CopyProgress {
  snapshot: string;
  chunksDone: number;
  chunksTotal: number;
  bytesSent: number;
}

export interface CopyOptions {
  onProgress?: (p: CopyProgress) => void;
}

export interface CopiedSnapshot {
  source: string;
  target: string;
  vm: string;
  /** The target already had this snapshot: nothing was done. */
  alreadyPresent: boolean;
  /** Distinct non-zero chunks the snapshot references. */
  chunks: number;
  /** Of those, chunks the target already held. */
  present: number;
  /** Chunks stored into the target. */
  sent: number;
  /** Stored (compressed, sealed) bytes added to the target. */
  bytesSent: number;
  /** Stored bytes read from the source. */
  bytesRead: number;
}

export interface CopyReport {
  mode: 'same-keys' | 're-encrypt';
  snapshots: CopiedSnapshot[];
  /** Packs found unindexed in the target and adopted (left by an interrupted run). */
  adoptedPacks: number;
  packsWritten: number;
  /** Listed snapshots that were gone from the source when their turn came (forgotten meanwhile). */
  vanished: string[];
}

/** Whether chunk ids and sealed blobs mean the same in both repositories. */
export function sameKeys(a: Repository, b: Repository): boolean {
  const ka = a.aeadKey;
  const kb = b.aeadKey;
  if (ka === null || kb === null) return ka === kb;
  if (!ka.equals(kb)) return false;
  const probe = Buffer.from('vmsnap copy key probe');
  return a.chunkId(probe).equals(b.chunkId(probe));
}


/** Distinct non-zero chunk ids of a snapshot. */
function distinctChunks(snap: Snapshot): Map<string, Buffer> {
  const out = new Map<string, Buffer>();
  for (const st of snap.streams)
    for (let o = 0; o < st.chunks.length; o += ID_SIZE) {
      const id = st.chunks.subarray(o, o + ID_SIZE);
      if (isZeroId(id)) continue;
      const k = id.toString('hex');
      if (!out.has(k)) out.set(k, Buffer.from(id));
    }
  return out;
}

interface Range {
  pack: string;
  offset: number;
  length: number;
  items: { id: Buffer; loc: ChunkLocation }[];
}

/** Groups chunks by pack and merges neighbours into ranged reads (few GETs on S3). */
async function planReads(src: Repository, ids: Buffer[]): Promise<Range[]> {
  let refreshed = false;
  const byPack = new Map<string, { id: Buffer; loc: ChunkLocation }[]>();
  for (const id of ids) {
    let loc = src.index.get(id);
    if (!loc && !refreshed) {
      refreshed = true;
      await src.refreshIndex();
      loc = src.index.get(id);
    }
    if (!loc) throw new IntegrityError(`source chunk ${id.toString('hex')} is not in the source index (missing data; run \`vmsnap check\` on the source)`);
    let l = byPack.get(loc.pack);
    if (!l) byPack.set(loc.pack, (l = []));
    l.push({ id, loc });
  }
  const ranges: Range[] = [];
  for (const [pack, items] of byPack) {
    items.sort((a, b) => a.loc.offset - b.loc.offset);
    let cur: Range | null = null;
    for (const it of items) {
      const end = it.loc.offset + it.loc.storedLength;
      if (cur && it.loc.offset - (cur.offset + cur.length) <= MERGE_GAP && end - cur.offset <= MAX_RANGE && it.loc.offset >= cur.offset + cur.length) {
        cur.length = end - cur.offset;
        cur.items.push(it);
      } else {
        cur = { pack, offset: it.loc.offset, length: it.loc.storedLength, items: [it] };
        ranges.push(cur);
      }
    }
  }
  return ranges;
}

/**
 * Indexes packs of `repo` that no index file names: a killed writer (copy, import) uploaded them
 * but died before its index write. Reads only each pack's end. Returns the number adopted.
 */
export async function adoptOrphanPacks(repo: Repository): Promise<number> {
  await repo.refreshIndex();
  const indexed = new Set(repo.index.packs());
  const orphans: { name: string; size: number }[] = [];
  for await (const o of repo.backend.list('packs')) if (!indexed.has(o.name)) orphans.push(o);
  if (orphans.length === 0) return 0;
  const adopted: { pack: string; entries: PackEntry[] }[] = [];
  await mapLimit(orphans, 4, async ({ name, size }) => {
    try {
      const entries = await readPackEntries((offset, length) => repo.backend.get('packs', name, { offset, length }), size, repo.aeadKey, name);
      adopted.push({ pack: name, entries });
    } catch {
      // Unreadable or foreign: leave it to check/prune.
    }
  });
  if (adopted.length === 0) return 0;
  const bytes = encodeIndexFile({ packs: adopted, superseded: [] }, repo.aeadKey);
  const indexName = contentHash(bytes).toString('hex');
  await repo.backend.put('index', indexName, bytes);
  for (const p of adopted) for (const e of p.entries) repo.index.add(e.id, p.pack, e);
  repo.indexFiles.add(indexName);
  return adopted.length;
}

/**
 * Copies `snapshots` (of `src`) into `dst`, oldest first. Snapshots the target already has are
 * skipped. See the module comment for what travels and how an interrupted copy resumes.
 */
/**
 * Copies snapshots (given as snapshots or summaries: each one's manifest is read from `src` when it
 * is copied, so a sync of a whole repository never holds every chunk list at once).
 */
export async function copySnapshots(src: Repository, dst: Repository, snapshots: readonly SnapshotSummary[] | readonly Snapshot[], opts: CopyOptions = {}): Promise<CopyReport> {
  if (src.config.id === dst.config.id) throw new UsageError('source and target are the same repository');
  // The source is only read, but a prune there would delete packs while we read them.
  const srcLock = await acquireLock(src.backend, false, 'copy (source)');
  try {
    return await dst.write('copy', (session) =>
      copyLocked(src, dst, snapshots, opts, () => {
        srcLock.assertHeld();
        session.assertHeld();
      }),
    );
  } finally {
    await srcLock.release().catch(() => undefined);
  }
}

async function copyLocked(src: Repository, dst: Repository, snapshots: readonly (SnapshotSummary | Snapshot)[], opts: CopyOptions, assertLocked: () => void): Promise<CopyReport> {
  const same = sameKeys(src, dst);
  const report: CopyReport = { mode: same ? 'same-keys' : 're-encrypt', snapshots: [], adoptedPacks: 0, packsWritten: 0, vanished: [] };
  const packsBefore = dst.stats.packs;
  report.adoptedPacks = await adoptOrphanPacks(dst);

  // What the target already holds: by id (same keys) or by meta.copyOf (re-encrypted copies).
  const existing = await dst.listSnapshotSummaries(() => undefined);
  const byId = new Set(existing.map((s) => s.id));
  /** source snapshot id -> id of its re-encrypted copy in the target. */
  const byCopyOf = new Map<string, string>();
  for (const s of existing) if (typeof s.meta.copyOf === 'string') byCopyOf.set(s.meta.copyOf, s.id);
  /** source id -> target id of chunks (re-encrypt mode). */
  const idMap = new Map<string, Buffer>();

  const ordered = [...snapshots].sort((a, b) => a.time.localeCompare(b.time) || a.id.localeCompare(b.id));
  for (const listed of ordered) {
    const prior = same ? (byId.has(listed.id) ? listed.id : undefined) : byCopyOf.get(listed.id);
    if (prior) {
      report.snapshots.push({ source: listed.id, target: prior, vm: listed.vm, alreadyPresent: true, chunks: 0, present: 0, sent: 0, bytesSent: 0, bytesRead: 0 });
      continue;
    }
    let snap: Snapshot;
    try {
      snap = await src.readSnapshot(listed.id, { keep: false });
    } catch (err) {
      // A sync lists first; `forget` holds only a shared lock, so it may remove one before its turn.
      if (!(err instanceof NotFoundError)) throw err;
      report.vanished.push(listed.id);
      continue;
    }
    const entry: CopiedSnapshot = { source: snap.id, target: '', vm: snap.vm, alreadyPresent: false, chunks: 0, present: 0, sent: 0, bytesSent: 0, bytesRead: 0 };
    const chunks = distinctChunks(snap);
    entry.chunks = chunks.size;
    if (!same && snap.parent) await learnFromParent(src, dst, snap.parent, byCopyOf, idMap);

    // Which source chunks must be read.
    const toRead: Buffer[] = [];
    for (const [k, id] of chunks) {
      if (same) {
        if (dst.hasChunk(id)) entry.present++;
        else toRead.push(id);
      } else {
        const t = idMap.get(k);
        if (t && dst.hasChunk(t)) entry.present++;
        else toRead.push(id);
      }
    }
    let done = entry.present;
    const progress = () => opts.onProgress?.({ snapshot: snap.id, chunksDone: done, chunksTotal: chunks.size, bytesSent: entry.bytesSent });
    progress();
    let flushedAt = dst.stats.packs;
    const ranges = await planReads(src, toRead);
    await mapLimit(ranges, READ_CONCURRENCY, async (r) => {
      const buf = await src.backend.get('packs', r.pack, { offset: r.offset, length: r.length });
      entry.bytesRead += buf.length;
      for (const { id, loc } of r.items) {
        const stored = buf.subarray(loc.offset - r.offset, loc.offset - r.offset + loc.storedLength);
        // Verifies (and in re-encrypt mode, decrypts): a damaged chunk is never copied forward.
        const plain = src.openChunk(id, loc, stored);
        if (same) {
          if (!dst.hasChunk(id)) {
            await dst.addEncoded(id, loc.codec, Buffer.from(stored), loc.rawLength);
            entry.sent++;
            entry.bytesSent += stored.length;
          } else entry.present++;
        } else {
          const res = await dst.putChunk(plain);
          idMap.set(id.toString('hex'), res.id);
          if (res.isNew) {
            entry.sent++;
            entry.bytesSent += res.storedBytes;
          } else entry.present++;
        }
        done++;
      }
      progress();
      if (dst.stats.packs - flushedAt >= FLUSH_EVERY_PACKS) {
        flushedAt = dst.stats.packs;
        await dst.flush();
      }
    });

    const streams: StreamRecord[] = same ? snap.streams : snap.streams.map((st) => ({ ...st, chunks: mapChunkList(st.chunks, idMap) }));
    let parent = snap.parent;
    if (!same && parent !== null) parent = byCopyOf.get(parent) ?? null;
    const meta = same ? snap.meta : { ...snap.meta, copyOf: snap.id };
    await dst.flush();
    assertLocked(); // commit point: only while prune cannot have touched our unindexed packs
    const saved = await dst.saveSnapshot({
      vm: snap.vm,
      time: snap.time,
      host: snap.host,
      tags: snap.tags,
      parent,
      ...(snap.message !== undefined ? { message: snap.message } : {}),
      meta,
      streams,
    });
    if (same && saved.id !== snap.id) throw new IntegrityError(`internal: copied manifest of ${snap.id} got id ${saved.id}`);
    entry.target = saved.id;
    byId.add(saved.id);
    if (!same) byCopyOf.set(snap.id, saved.id);
    report.snapshots.push(entry);
  }
  await dst.flush();
  report.packsWritten = dst.stats.packs - packsBefore;
  return report;
}

function mapChunkList(chunks: Buffer, idMap: Map<string, Buffer>): Buffer {
  const out = Buffer.alloc(chunks.length);
  for (let o = 0; o < chunks.length; o += ID_SIZE) {
    const id = chunks.subarray(o, o + ID_SIZE);
    if (isZeroId(id)) continue; // stays zero
    const t = idMap.get(id.toString('hex'));
    if (!t) throw new IntegrityError(`internal: no target id for chunk ${id.toString('hex')}`);
    t.copy(out, o);
  }
  return out;
}

/**
 * Re-encrypt mode: if the parent snapshot was copied before, its source and target manifests list
 * the same chunks in the same positions, which gives source id -> target id without reading data.
 */
async function learnFromParent(src: Repository, dst: Repository, parentId: string, byCopyOf: Map<string, string>, idMap: Map<string, Buffer>): Promise<void> {
  const copiedId = byCopyOf.get(parentId);
  if (!copiedId) return;
  let parent: Snapshot;
  let copied: Snapshot;
  try {
    parent = await src.readSnapshot(parentId, { keep: false });
    copied = await dst.readSnapshot(copiedId, { keep: false });
  } catch {
    return;
  }
  for (const st of parent.streams) {
    const tt = copied.streams.find((x) => x.name === st.name);
    if (!tt || tt.chunks.length !== st.chunks.length) continue;
    for (let o = 0; o < st.chunks.length; o += ID_SIZE) {
      const s = st.chunks.subarray(o, o + ID_SIZE);
      if (isZeroId(s)) continue;
      const k = idHex(s);
      if (!idMap.has(k)) idMap.set(k, Buffer.from(tt.chunks.subarray(o, o + ID_SIZE)));
    }
  }
}

/** Snapshots of `src` (optionally of one VM) that `copySnapshots` would copy to `dst`. */
export async function syncRepositories(src: Repository, dst: Repository, opts: CopyOptions & { vm?: string } = {}): Promise<CopyReport> {
  const all = (await src.listSnapshotSummaries()).filter((s) => opts.vm === undefined || s.vm === opts.vm);
  return copySnapshots(src, dst, all, opts);
}
