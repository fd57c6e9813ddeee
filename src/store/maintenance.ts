/**
 * Repository maintenance: forget, prune (mark and sweep with repacking), check and rebuild-index.
 *
 * Prune ordering (each step durable before the next, so a kill at any point loses nothing that a
 * snapshot references):
 *   1. under an exclusive lock, read every manifest — if any cannot be read, stop: its chunks are
 *      unknown, so nothing may be deleted;
 *   2. mark every referenced chunk; pinned snapshots (pins.ts) are live like any other, and a pin
 *      naming a snapshot whose manifest is gone (or an unreadable pin) stops prune: its holder
 *      still reads chunks no manifest names any more;
 *   3. copy the live chunks of mostly-garbage packs into new packs (blobs copied as stored, after
 *      verifying they decode to their id);
 *   4. write one new index file describing every live chunk, listing the index files it supersedes;
 *   5. delete the superseded index files;
 *   6. delete packs that hold no live chunk (fully garbage, repacked, or never indexed).
 * A crash after 4 leaves duplicate index entries (harmless: first wins, both locations exist);
 * after 5 only unreferenced packs, which the next prune deletes.
 */
import type { Backend } from './backend/contract.js';
import { ObjectNotFoundError } from './backend/contract.js';
import { ChunkIndex, encodeIndexFile, encodeIndexRows, decodeIndexFile, type IndexRow } from './chunk-index.js';
import { IntegrityError, NotFoundError, RepositoryError } from './errors.js';
import { contentHash, ID_SIZE, idHex, isZeroId } from './hash.js';
import { chunkCount, type Snapshot } from './manifest.js';
import { PACK_MAGIC, PACK_TRAILER, PackWriter, parseDescription, parseTrailer, readPackEntries, type PackEntry } from './pack.js';
import { mapLimit, PACK_TARGET, type Repository } from './repository.js';
import type { WriteSession } from './repository.js';
import { withLock } from './lock.js';
import { describePin, listPins, listPinsStrict } from './pins.js';

export class PruneError extends RepositoryError {
  override readonly name = 'PruneError';
}

export interface PruneOptions {
  /** Repack a pack when less than this fraction of its stored bytes is live (default 0.5). */
  repackBelow?: number;
  dryRun?: boolean;
  onProgress?: (msg: string) => void;
  /**
   * Leftovers of interrupted writes (a put killed before its rename) older than this are removed
   * (default one hour: the prune lock keeps out this repository's writers, but not a process that
   * was still writing when it lost its lock, nor a clock that is off).
   */
  leftoversOlderThanMs?: number;
}

export interface PruneStats {
  snapshots: number;
  liveChunks: number;
  packsDeleted: number;
  packsRepacked: number;
  packsWritten: number;
  bytesFreed: number;
  indexFilesReplaced: number;
  leftoversRemoved: number;
  /** Why removing leftovers failed (the prune itself had completed; a later prune tries again). */
  leftoversError?: string;
}


export interface LiveChunks {
  /** Snapshots read. */
  snapshots: number;
  /** live[i] = 1 when index entry i (ChunkIndex.ordinal) is referenced by some snapshot. */
  live: Uint8Array;
  /** Distinct referenced chunks that are indexed. */
  count: number;
  /** Referenced chunks the index does not know (hex ids; empty in a healthy repository). */
  missing: Set<string>;
}

/**
 * Marks every chunk the snapshots reference, one byte per index entry. Prune used to hold two Sets
 * of hex ids (101 bytes per id each, measured) and an object per live entry (243 bytes): ~450
 * bytes per live chunk, 1.4 GiB for the 3.2 million chunks of a 200 GiB repository.
 */
export async function markLiveChunks(
  index: ChunkIndex,
  snapshots: Iterable<Snapshot> | AsyncIterable<Snapshot>,
  onSnapshot?: (s: Snapshot) => void,
): Promise<LiveChunks> {
  const live = new Uint8Array(index.size);
  const missing = new Set<string>();
  let count = 0;
  let read = 0;
  for await (const s of snapshots) {
    read++;
    onSnapshot?.(s);
    for (const st of s.streams)
      for (let o = 0; o < st.chunks.length; o += ID_SIZE) {
        const id = st.chunks.subarray(o, o + ID_SIZE);
        if (isZeroId(id)) continue;
        const i = index.ordinal(id);
        // The index only grows (ordinals are stable), but an entry added after `live` was sized
        // would be neither marked nor reported: refuse rather than let prune doom its pack.
        if (i >= live.length) throw new Error('internal: the index grew while live chunks were being marked');
        if (i < 0) missing.add(idHex(id));
        else if (live[i] === 0) {
          live[i] = 1;
          count++;
        }
      }
  }
  return { snapshots: read, live, count, missing };
}

export async function prune(repo: Repository, opts: PruneOptions = {}): Promise<PruneStats> {
  return repo.write('prune', (session) => pruneLocked(repo, opts, session), { exclusive: true });
}

async function pruneLocked(repo: Repository, opts: PruneOptions, lock: WriteSession): Promise<PruneStats> {
  const log = opts.onProgress ?? (() => undefined);
  const repackBelow = opts.repackBelow ?? 0.5;
  // The session began by loading every index file (a writer may have committed since this process
  // opened the repository): their packs must be known, or they would look unreferenced.
  const unreadable: string[] = [];
  const seen = new Set<string>();
  // One manifest at a time: marking needs only the chunk ids, once.
  const used = await markLiveChunks(
    repo.index,
    repo.eachSnapshot((id, err) => unreadable.push(`${id.slice(0, 12)}: ${err.message}`)),
    (s) => seen.add(s.id),
  );
  if (unreadable.length) {
    throw new PruneError(`prune: reading snapshots: ${unreadable.length} manifest(s) unreadable, nothing deleted (${unreadable.join('; ')})`);
  }
  // Pinned snapshots were marked with the others (forget keeps their manifests). One whose manifest
  // is gone (an older vmsnap forgot it) cannot be marked, yet a volume still reads its chunks.
  let pins;
  try {
    pins = await listPinsStrict(repo);
  } catch (err) {
    throw new PruneError(`prune: ${(err as Error).message}`);
  }
  for (const [snap, held] of pins) {
    if (!seen.has(snap)) {
      throw new PruneError(
        `prune: snapshot ${snap.slice(0, 12)} is pinned (${held.map(describePin).join('; ')}) but its manifest is missing; its chunks cannot be told from garbage, nothing deleted (remove the pin with \`vmsnap pins rm\` once its holder no longer needs it)`,
      );
    }
  }
  for (const k of used.missing) {
    throw new PruneError(`prune: chunk ${k} is referenced but not indexed; run \`vmsnap check\` and \`vmsnap rebuild-index\` first, nothing deleted`);
  }
  const packFiles = new Map<string, number>();
  for await (const o of repo.backend.list('packs')) packFiles.set(o.name, o.size);

  // Live and total stored bytes per indexed pack. No object per entry: entries are streamed from
  // the index again where needed (a 200 GiB repository has ~3 million).
  const perPack = new Map<string, { live: number; total: number; liveCount: number }>();
  let ordinal = 0;
  // The index holds each id once (first location wins), so each live chunk is counted once.
  for (const e of repo.index.entries()) {
    let p = perPack.get(e.pack);
    if (!p) perPack.set(e.pack, (p = { live: 0, total: 0, liveCount: 0 }));
    p.total += e.storedLength;
    if (used.live[ordinal++] === 1) {
      p.live += e.storedLength;
      p.liveCount++;
    }
  }
  /** Live entries of the given packs, in index order. */
  function* liveIn(packs: ReadonlySet<string>): Generator<IndexRow> {
    let i = 0;
    for (const e of repo.index.entries()) if (used.live[i++] === 1 && packs.has(e.pack)) yield e;
  }
  const stats: PruneStats = { snapshots: used.snapshots, liveChunks: used.count, packsDeleted: 0, packsRepacked: 0, packsWritten: 0, bytesFreed: 0, indexFilesReplaced: 0, leftoversRemoved: 0 };
  const doomed = new Set<string>();
  const keepPacks: string[] = [];
  const toRepack: string[] = [];
  for (const [pack, size] of packFiles) {
    const p = perPack.get(pack);
    if (!p || p.live === 0) {
      doomed.add(pack);
      stats.bytesFreed += size;
    } else if (p.live < p.total * repackBelow) toRepack.push(pack);
    else keepPacks.push(pack);
  }
  for (const pack of perPack.keys()) {
    if (!packFiles.has(pack) && perPack.get(pack)!.live > 0) {
      throw new PruneError(`prune: pack ${pack} holds live chunks but is missing; run \`vmsnap check\`, nothing deleted`);
    }
  }
  log(`${used.snapshots} snapshots, ${used.count} live chunks; ${doomed.size} packs to delete, ${toRepack.length} to repack`);
  if (opts.dryRun) {
    stats.packsDeleted = doomed.size;
    stats.packsRepacked = toRepack.length;
    return stats;
  }

  // 3. repack live chunks of mostly-garbage packs.
  const written: { pack: string; entries: PackEntry[] }[] = [];
  let writer = new PackWriter();
  const cut = async () => {
    if (writer.count === 0) return;
    const { name, bytes, entries } = writer.finish(repo.aeadKey);
    await repo.backend.put('packs', name, bytes);
    written.push({ pack: name, entries });
    stats.packsWritten++;
    writer = new PackWriter();
  };
  const repackEntries = new Map<string, { id: Buffer; offset: number; storedLength: number; rawLength: number; codec: number }[]>(toRepack.map((p) => [p, []]));
  for (const e of liveIn(new Set(toRepack))) repackEntries.get(e.pack)!.push({ ...e, id: Buffer.from(e.id) });
  for (const pack of toRepack) {
    const bytes = await repo.backend.get('packs', pack);
    for (const e of repackEntries.get(pack)!) {
      const stored = bytes.subarray(e.offset, e.offset + e.storedLength);
      repo.openChunk(e.id, e, stored); // throws IntegrityError: never copy a damaged chunk forward
      writer.add(e.id, e.codec, Buffer.from(stored), e.rawLength);
      if (writer.byteLength >= PACK_TARGET) await cut();
    }
    doomed.add(pack);
    stats.packsRepacked++;
    stats.bytesFreed += packFiles.get(pack)!;
  }
  await cut();
  // Unencrypted repacking is deterministic: after a prune killed between writing a repacked pack and
  // its index, the leftover (unindexed, hence doomed) pack has exactly the name of the one just
  // rewritten, which the new index references — it must not be deleted with the garbage.
  for (const w of written) if (doomed.delete(w.pack)) stats.bytesFreed -= packFiles.get(w.pack) ?? 0;

  // 4-5. one index for everything live, superseding every existing index file. The marks are by
  // index position: the index must not have grown since (nothing in prune adds to it).
  if (repo.index.size !== used.live.length) throw new PruneError('prune: the index changed while pruning, nothing deleted; run prune again');
  const oldIndex = [...repo.indexFiles];
  for await (const o of repo.backend.list('index')) if (!repo.indexFiles.has(o.name)) oldIndex.push(o.name);
  const kept = new Set(keepPacks);
  const liveKept = keepPacks.reduce((n, pack) => n + perPack.get(pack)!.liveCount, 0);
  const rows = function* (): Generator<IndexRow> {
    yield* liveIn(kept);
    for (const w of written) for (const e of w.entries) yield { pack: w.pack, ...e };
  };
  const indexBytes = encodeIndexRows(
    [...keepPacks, ...written.map((w) => w.pack)],
    liveKept + written.reduce((n, w) => n + w.entries.length, 0),
    rows(),
    oldIndex,
    repo.aeadKey,
  );
  const indexName = contentHash(indexBytes).toString('hex');
  lock.assertHeld();
  await repo.backend.put('index', indexName, indexBytes);
  for (const name of oldIndex) if (name !== indexName) await repo.backend.delete('index', name);
  stats.indexFilesReplaced = oldIndex.length;

  // 6. packs nothing references any more.
  lock.assertHeld();
  await mapLimit([...doomed], 4, async (pack) => {
    await repo.backend.delete('packs', pack);
    stats.packsDeleted++;
  });

  // 7. what crashed writes left behind (never visible, never listed, but taking space).
  // The prune has completed by now: a failure here is reported, not turned into a failed prune.
  try {
    stats.leftoversRemoved = await repo.backend.removeLeftovers(opts.leftoversOlderThanMs ?? 60 * 60 * 1000);
  } catch (err) {
    stats.leftoversError = (err as Error).message;
  }
  log(`deleted ${stats.packsDeleted} packs, wrote ${stats.packsWritten}, freed ${stats.bytesFreed} bytes`);
  return stats;
}

// ---------------------------------------------------------------- check

export interface AffectedStream {
  snapshot: string;
  vm: string;
  stream: string;
}

export interface CheckProblem {
  severity: 'error' | 'warning';
  message: string;
  affected: AffectedStream[];
}

export interface CheckReport {
  problems: CheckProblem[];
  snapshots: number;
  packs: number;
  chunks: number;
  /** Pins (snapshots held by volumes, pins.ts), readable or not. */
  pins: number;
  readData: boolean;
}

export interface CheckOptions {
  readData?: boolean;
  onProgress?: (done: number, total: number) => void;
}

/**
 * Checks a repository. It opens its own view of the index (damaged index files are problems, not
 * crashes), so it works on a repository that `Repository.open` loaded before the damage.
 */
export async function check(repo: Repository, opts: CheckOptions = {}): Promise<CheckReport> {
  // Shared: writers may go on (what they add is consistent at every step), but no prune or
  // rebuild-index may delete index files and packs between our listing and our reads.
  return withLock(repo.backend, false, 'check', () => checkLocked(repo, opts));
}

async function checkLocked(repo: Repository, opts: CheckOptions): Promise<CheckReport> {
  const problems: CheckProblem[] = [];
  const backend = repo.backend;
  // Manifests are listed before index files: a writer writes its index file before its manifest,
  // so every manifest listed here has its index file in the listing below.
  const snapshotIds = await repo.snapshotIds();
  const index = new ChunkIndex(Math.max(1024, repo.index.size));
  const indexNames: string[] = [];
  for await (const o of backend.list('index')) indexNames.push(o.name);
  await mapLimit(indexNames, 8, async (name) => {
    try {
      const bytes = await backend.get('index', name);
      if (!repo.encrypted && contentHash(bytes).toString('hex') !== name) throw new IntegrityError(`index ${name}: content does not match its name`);
      decodeIndexFile(bytes, repo.aeadKey, name, index);
    } catch (err) {
      problems.push({ severity: 'error', message: `index file ${name.slice(0, 12)} is damaged: ${(err as Error).message} (run \`vmsnap rebuild-index\`)`, affected: [] });
    }
  });

  // Problems name the chunks they concern; the streams using those chunks are looked up once, at
  // the end, for the (few) chunks named. A map from every referenced chunk to its streams cost
  // hundreds of bytes per chunk and per snapshot sharing it: gigabytes for a long daily chain.
  const pending: { problem: CheckProblem; chunks: string[] }[] = [];
  const report = (problem: CheckProblem, chunks: string[]): void => {
    problems.push(problem);
    if (chunks.length) pending.push({ problem, chunks });
  };

  // One manifest at a time (all of them at once can be gigabytes of chunk lists).
  const missing: string[] = [];
  const missingSeen = new Set<string>();
  let snapshotCount = 0;
  const existing = new Set<string>();
  const unreadable = (id: string, err: Error): void => {
    if (err instanceof NotFoundError) return; // forgotten since the listing (forget holds a shared lock)
    existing.add(id); // exists, though unreadable (reported below)
    problems.push({ severity: 'error', message: `snapshot ${id.slice(0, 12)}: manifest unreadable: ${err.message}`, affected: [{ snapshot: id, vm: '?', stream: '*' }] });
  };
  for await (const s of repo.eachSnapshot(unreadable, snapshotIds)) {
    snapshotCount++;
    existing.add(s.id);
    for (const st of s.streams)
      for (let o = 0; o < st.chunks.length; o += ID_SIZE) {
        const id = st.chunks.subarray(o, o + ID_SIZE);
        if (isZeroId(id) || index.has(id)) continue;
        const k = idHex(id);
        if (!missingSeen.has(k)) {
          missingSeen.add(k);
          missing.push(k);
        }
      }
  }
  const pins = await listPins(repo);
  for (const u of pins.unreadable) {
    problems.push({ severity: 'error', message: `pin ${u.id.slice(0, 8)} is unreadable: ${u.error} (prune refuses to run while it exists; \`vmsnap pins rm ${u.id}\` once its holder is gone)`, affected: [] });
  }
  for (const p of pins.pins) {
    if (!existing.has(p.snapshot)) {
      problems.push({
        severity: 'error',
        message: `${describePin(p)} names snapshot ${p.snapshot.slice(0, 12)}, which does not exist: the volume reads chunks no manifest protects (hydrate or remove it; \`vmsnap pins rm ${p.id}\` if the holder is gone)`,
        affected: [{ snapshot: p.snapshot, vm: '?', stream: '*' }],
      });
    }
  }
  if (missing.length) {
    report({ severity: 'error', message: `${missing.length} referenced chunk(s) are not in the index (data missing or index damaged)`, affected: [] }, missing);
  }

  const packSizes = new Map<string, number>();
  for await (const o of backend.list('packs')) packSizes.set(o.name, o.size);
  // Entries by pack as ordinals into the index (an object per entry cost ~240 bytes each).
  const byPack = new Map<string, number[]>();
  let ordinal = 0;
  for (const e of index.entries()) {
    let l = byPack.get(e.pack);
    if (!l) byPack.set(e.pack, (l = []));
    l.push(ordinal++);
  }
  const entriesOf = (pack: string): ({ id: Buffer } & PackEntry)[] => (byPack.get(pack) ?? []).map((i) => index.entryAt(i));
  for (const pack of byPack.keys()) {
    const size = packSizes.get(pack);
    const entries = entriesOf(pack);
    if (size === undefined) {
      report({ severity: 'error', message: `pack ${pack.slice(0, 12)} is missing (${entries.length} chunks)`, affected: [] }, entries.map((e) => idHex(e.id)));
      continue;
    }
    const beyond = entries.filter((e) => e.offset + e.storedLength > size - PACK_TRAILER);
    if (beyond.length) {
      report(
        { severity: 'error', message: `pack ${pack.slice(0, 12)} is truncated: ${beyond.length} chunk(s) lie past its end (${size} bytes)`, affected: [] },
        beyond.map((e) => idHex(e.id)),
      );
    }
  }
  for (const pack of packSizes.keys()) {
    if (!byPack.has(pack)) problems.push({ severity: 'warning', message: `pack ${pack.slice(0, 12)} is not indexed (left by an interrupted write; prune removes it, or rebuild-index adopts it)`, affected: [] });
  }

  // Temp files of killed puts (a `kill -9` of an import leaves up to a pack's 32 MiB): invisible to
  // every listing above, so reported here; prune removes them once they are an hour old.
  const leftovers = await backend.leftovers();
  if (leftovers.length) {
    const bytes = leftovers.reduce((n, l) => n + l.size, 0);
    const oldest = Math.max(...leftovers.map((l) => l.ageMs));
    problems.push({
      severity: 'warning',
      message: `${leftovers.length} leftover temp file(s) of interrupted writes (${bytes} bytes, oldest ${Math.round(oldest / 60_000)} min; e.g. ${leftovers[0]!.name}): prune removes those older than an hour`,
      affected: [],
    });
  }

  if (opts.readData) {
    let done = 0;
    const packs = [...packSizes.keys()];
    await mapLimit(packs, 2, async (pack) => {
      const bad = await readPack(repo, pack, entriesOf(pack));
      if (bad) report({ severity: bad.severity, message: bad.message, affected: [] }, bad.chunks);
      opts.onProgress?.(++done, packs.length);
    });
  }

  await nameAffectedStreams(repo, pending);
  return { problems, snapshots: snapshotCount, packs: packSizes.size, chunks: index.size, pins: pins.pins.length + pins.unreadable.length, readData: !!opts.readData };
}

/**
 * Fills each problem's `affected` with the snapshot streams that use any of its chunks, in one more
 * pass over the manifests (only when there are problems). A chunk's first four bytes screen out
 * nearly every id before any string is made. A manifest that cannot be read in this pass (it may
 * have been readable in the first) may use any of the chunks: it is named in every problem.
 */
async function nameAffectedStreams(repo: Repository, pending: readonly { problem: CheckProblem; chunks: string[] }[]): Promise<void> {
  if (!pending.length) return;
  const problemsOf = new Map<string, number[]>();
  const prefixes = new Set<number>();
  pending.forEach(({ chunks }, p) => {
    for (const k of chunks) {
      const list = problemsOf.get(k);
      if (list) {
        if (list[list.length - 1] !== p) list.push(p);
      } else problemsOf.set(k, [p]);
      prefixes.add(Buffer.from(k.slice(0, 8), 'hex').readUInt32BE(0));
    }
  });
  const found = pending.map(() => new Map<string, AffectedStream>());
  const unknown = (id: string): void => {
    for (const f of found) f.set(`${id}/*`, { snapshot: id, vm: '?', stream: '*' });
  };
  for await (const s of repo.eachSnapshot(unknown))
    for (const st of s.streams)
      for (let o = 0; o < st.chunks.length; o += ID_SIZE) {
        if (!prefixes.has(st.chunks.readUInt32BE(o))) continue;
        const ps = problemsOf.get(idHex(st.chunks.subarray(o, o + ID_SIZE)));
        if (!ps) continue;
        for (const p of ps) found[p]!.set(`${s.id}/${st.name}`, { snapshot: s.id, vm: s.vm, stream: st.name });
      }
  pending.forEach(({ problem }, p) => problem.affected.push(...found[p]!.values()));
}

async function readPack(repo: Repository, pack: string, entries: ({ id: Buffer } & PackEntry)[]): Promise<{ severity: 'error'; message: string; chunks: string[] } | null> {
  let bytes: Buffer;
  try {
    bytes = await repo.backend.get('packs', pack);
  } catch (err) {
    if (err instanceof ObjectNotFoundError) return null; // reported by the structure check
    throw err;
  }
  const reasons: string[] = [];
  if (contentHash(bytes).toString('hex') !== pack) reasons.push('content does not match its name');
  const badChunks: string[] = [];
  for (const e of entries) {
    try {
      if (e.offset + e.storedLength > bytes.length) throw new IntegrityError('past the end of the pack');
      repo.openChunk(e.id, e, bytes.subarray(e.offset, e.offset + e.storedLength));
    } catch {
      badChunks.push(idHex(e.id));
    }
  }
  if (badChunks.length) reasons.push(`${badChunks.length} chunk(s) fail verification`);
  try {
    if (bytes.length < PACK_MAGIC.length + PACK_TRAILER || !bytes.subarray(0, PACK_MAGIC.length).equals(PACK_MAGIC)) throw new IntegrityError('bad pack header');
    const d = parseTrailer(bytes.subarray(bytes.length - PACK_TRAILER), bytes.length, pack);
    parseDescription(bytes.subarray(bytes.length - PACK_TRAILER - d, bytes.length - PACK_TRAILER), bytes.length, repo.aeadKey, pack);
  } catch (err) {
    reasons.push(`description unreadable: ${(err as Error).message}`);
  }
  if (!reasons.length) return null;
  return { severity: 'error', message: `pack ${pack.slice(0, 12)}: ${reasons.join('; ')}`, chunks: badChunks };
}

/** Rebuilds the index from pack descriptions alone and replaces every index file. */
export async function rebuildIndex(repo: Repository): Promise<{ packs: number; chunks: number; unreadable: string[] }> {
  return repo.write('rebuild-index', async () => {
    const packs: { pack: string; entries: PackEntry[] }[] = [];
    const unreadable: string[] = [];
    const names: { name: string; size: number }[] = [];
    for await (const o of repo.backend.list('packs')) names.push(o);
    await mapLimit(names, 4, async ({ name, size }) => {
      try {
        const entries = await readPackEntries((offset, length) => repo.backend.get('packs', name, { offset, length }), size, repo.aeadKey, name);
        packs.push({ pack: name, entries });
      } catch (err) {
        unreadable.push(`${name.slice(0, 12)}: ${(err as Error).message}`);
      }
    });
    const old: string[] = [];
    for await (const o of repo.backend.list('index')) old.push(o.name);
    const bytes = encodeIndexFile({ packs, superseded: old }, repo.aeadKey);
    const name = contentHash(bytes).toString('hex');
    await repo.backend.put('index', name, bytes);
    for (const o of old) if (o !== name) await repo.backend.delete('index', o);
    return { packs: packs.length, chunks: packs.reduce((s, p) => s + p.entries.length, 0), unreadable };
  }, { exclusive: true });
}

// ---------------------------------------------------------------- diff

export interface StreamDiff {
  stream: string;
  sizeA: number | null;
  sizeB: number | null;
  changedBytes: number;
  extents: { offset: number; length: number }[];
}

/** Which byte ranges differ between the same-named streams of two snapshots (chunk granularity). */
export function diffSnapshots(a: Snapshot, b: Snapshot): StreamDiff[] {
  const names = [...new Set([...a.streams.map((s) => s.name), ...b.streams.map((s) => s.name)])];
  return names.map((name) => {
    const sa = a.streams.find((s) => s.name === name);
    const sb = b.streams.find((s) => s.name === name);
    if (!sa || !sb) {
      const only = (sa ?? sb)!;
      return { stream: name, sizeA: sa?.size ?? null, sizeB: sb?.size ?? null, changedBytes: only.size, extents: only.size ? [{ offset: 0, length: only.size }] : [] };
    }
    const extents: { offset: number; length: number }[] = [];
    const cs = sa.chunkSize === sb.chunkSize ? sa.chunkSize : 0;
    const size = Math.max(sa.size, sb.size);
    if (!cs) return { stream: name, sizeA: sa.size, sizeB: sb.size, changedBytes: size, extents: [{ offset: 0, length: size }] };
    const n = chunkCount(size, cs);
    const na = chunkCount(sa.size, cs);
    const nb = chunkCount(sb.size, cs);
    let changed = 0;
    for (let i = 0; i < n; i++) {
      const same = i < na && i < nb && sa.chunks.compare(sb.chunks, i * ID_SIZE, (i + 1) * ID_SIZE, i * ID_SIZE, (i + 1) * ID_SIZE) === 0 && !(i === na - 1 && sa.size !== sb.size);
      if (same) continue;
      const offset = i * cs;
      const length = Math.min(cs, size - offset);
      changed += length;
      const last = extents[extents.length - 1];
      if (last && last.offset + last.length === offset) last.length += length;
      else extents.push({ offset, length });
    }
    return { stream: name, sizeA: sa.size, sizeB: sb.size, changedBytes: changed, extents };
  });
}

export type { Backend };
