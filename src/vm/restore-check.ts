/**
 * What a restore verifies before it discards anything (the running guest, its disks' overlays):
 *
 *   device state   mig-prefix, mig-commands, device-state — read in full by loadStoredRam (each
 *                  chunk's content is checked against its id on read)
 *   RAM            every distinct chunk of every ram.<i> stream read and verified here. It is read
 *                  again while QEMU loads it: the price of never killing a guest for a snapshot
 *                  that cannot be loaded (RAM is the guest's size, local reads run at GB/s)
 *   disks          every chunk present in the index and every pack that holds one present and long
 *                  enough. Not read: a disk is read lazily for as long as the guest lives (and may be
 *                  terabytes); a chunk damaged inside an intact pack surfaces as a guest I/O error on
 *                  that block, and `check --read-data` finds it beforehand
 *
 * A failure is a RestoreDataError naming the snapshot, the stream, the chunk and (for disks) the pack.
 */
import type { Repository } from '../store/repository.js';
import { mapLimit } from '../store/repository.js';
import type { Snapshot, StreamRecord } from '../store/manifest.js';
import { chunkCount } from '../store/manifest.js';
import { ID_SIZE, idHex, isZeroId } from '../store/hash.js';
import { UserFacingError } from '../util/errors.js';

export class RestoreDataError extends UserFacingError {
  override readonly name = 'RestoreDataError';
}

interface ChunkRef {
  stream: string;
  index: number;
  id: Buffer;
  raw: number;
}

/** The distinct non-zero chunks of `streams`, each with the first place it is used. */
function distinctChunks(streams: readonly StreamRecord[]): ChunkRef[] {
  const seen = new Set<string>();
  const out: ChunkRef[] = [];
  for (const s of streams) {
    const n = chunkCount(s.size, s.chunkSize);
    for (let i = 0; i < n; i++) {
      const id = s.chunks.subarray(i * ID_SIZE, (i + 1) * ID_SIZE);
      if (isZeroId(id)) continue;
      const key = idHex(id);
      if (seen.has(key)) continue;
      seen.add(key);
      out.push({ stream: s.name, index: i, id, raw: Math.min(s.chunkSize, s.size - i * s.chunkSize) });
    }
  }
  return out;
}

export async function verifyRestoreData(repo: Repository, snap: Snapshot, ram: readonly StreamRecord[], disks: readonly StreamRecord[]): Promise<void> {
  const what = (c: ChunkRef) => `snapshot ${snap.id.slice(0, 12)} (VM ${snap.vm}): chunk ${idHex(c.id)} of stream ${c.stream} (chunk #${c.index})`;
  await mapLimit(distinctChunks(ram), 8, async (c) => {
    try {
      await repo.getChunk(c.id, c.raw);
    } catch (err) {
      throw new RestoreDataError(`${what(c)} cannot be read: ${(err as Error).message}`, { cause: err });
    }
  });
  const packs = new Map<string, { end: number; first: ChunkRef }>();
  for (const c of distinctChunks(disks)) {
    if (!repo.hasChunk(c.id)) throw new RestoreDataError(`${what(c)} is not in the repository (missing data; see \`vmsnap check\`)`);
    const loc = repo.locate(c.id);
    const p = packs.get(loc.pack);
    const end = loc.offset + loc.storedLength;
    if (!p) packs.set(loc.pack, { end, first: c });
    else if (end > p.end) p.end = end;
  }
  await mapLimit([...packs], 8, async ([pack, p]) => {
    const info = await repo.backend.stat('packs', pack).catch((err: Error) => err);
    if (info instanceof Error) throw new RestoreDataError(`${what(p.first)}: its pack ${pack} cannot be found: ${info.message}`, { cause: info });
    if (info.size < p.end) throw new RestoreDataError(`${what(p.first)}: its pack ${pack} is truncated (${info.size} bytes, chunks up to byte ${p.end} expected)`);
  });
}
