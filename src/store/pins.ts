/**
 * Pins: references to snapshots held outside the repository's manifests.
 *
 *   pins/<random 32 hex>  JSON { "version": 1, "snapshot": "<id>", "host": "laptop",
 *                                "dataDir": "/home/u/.local/share/vmsnap", "holder": "vm1/disk0",
 *                                "created": "<ISO-8601>" }
 *                         sealed (AAD "pin") when the repository is encrypted
 *
 * A copy-on-write volume cloned or restored from a snapshot reads that snapshot's chunks lazily
 * (its base) and reuses its chunk ids in its next snapshot. Nothing in the repository says so, so a
 * `forget --prune` would delete data a live disk still reads. The volume therefore pins the snapshot
 * before it starts using it and unpins it when the volume is removed, gets another base, or no longer
 * depends on it (src/cow/base-pin.ts). The rules, which every maintainer obeys:
 *
 *   - `forget` never removes a pinned snapshot and says which pin kept it;
 *   - `prune` treats pinned snapshots as live, and refuses (deleting nothing) when a pin names a
 *     snapshot whose manifest is gone: its chunks can no longer be told apart from garbage, and the
 *     holder still reads them;
 *   - `check` reports pins naming missing snapshots and counts pins.
 *
 * Race between a pin and a concurrent `forget` (both hold only shared locks): the pinner writes the
 * pin, THEN checks that the manifest exists (else removes its pin and fails); `forget` lists pins,
 * deletes unpinned manifests, THEN lists pins again and writes back any deleted manifest that became
 * pinned meanwhile (manifests are content-addressed: writing one back is idempotent). With
 * read-after-write listings (backend contract 2), either the pinner sees the manifest gone and fails,
 * or `forget` sees the pin and restores the manifest: a pin that succeeded always names a snapshot.
 *
 * Format version: an older vmsnap knows nothing of pins and would forget and prune pinned
 * snapshots silently. So the first pin written into a repository raises its config version to
 * PINS_FORMAT_VERSION (format.ts); older releases then refuse the repository ("upgrade vmsnap")
 * instead of destroying a disk. Repositories that never held a pin keep version 1.
 */
import { randomBytes } from 'node:crypto';
import { hostname } from 'node:os';
import { ObjectNotFoundError } from './backend/contract.js';
import { open, seal } from './crypto.js';
import { FormatError, NotFoundError, RepositoryError } from './errors.js';
import { PINS_FORMAT_VERSION } from './format.js';
import type { Repository } from './repository.js';

export const PIN_AAD = Buffer.from('pin');
const PIN_ID = /^[0-9a-f]{32}$/;

export class PinError extends RepositoryError {
  override readonly name = 'PinError';
}

export interface PinInfo {
  version: 1;
  snapshot: string;
  host: string;
  dataDir: string;
  /** What holds it, e.g. `vm1/disk0` or `volume data1`. */
  holder: string;
  created: string;
}

export interface Pin extends PinInfo {
  id: string;
}

/** A pin that could not be read (damaged, newer version): kept, reported by check, never ignored. */
export interface UnreadablePin {
  id: string;
  error: string;
}

/** Who holds a pin: everything but the snapshot and the time is the caller's. */
export type PinHolder = Pick<PinInfo, 'dataDir' | 'holder'> & { host?: string };

function encodePin(repo: Repository, info: PinInfo): Buffer {
  const plain = Buffer.from(JSON.stringify(info));
  return repo.aeadKey ? seal(repo.aeadKey, plain, PIN_AAD) : plain;
}

function decodePin(repo: Repository, id: string, stored: Buffer): Pin {
  const plain = repo.aeadKey ? open(repo.aeadKey, stored, PIN_AAD, `pin ${id}`) : stored;
  let p: Partial<PinInfo>;
  try {
    p = JSON.parse(plain.toString('utf8')) as Partial<PinInfo>;
  } catch {
    throw new FormatError(`pin ${id} is not valid JSON`);
  }
  if (p.version !== 1) throw new FormatError(`pin ${id} has unsupported version ${JSON.stringify(p.version)}`);
  if (typeof p.snapshot !== 'string' || !/^[0-9a-f]{64}$/.test(p.snapshot)) throw new FormatError(`pin ${id} names no valid snapshot id`);
  for (const k of ['host', 'dataDir', 'holder', 'created'] as const) if (typeof p[k] !== 'string') throw new FormatError(`pin ${id} has no ${k}`);
  return { id, ...(p as PinInfo) };
}

/** Raises the repository's format version so that releases without pin support refuse it. */
async function requirePinsVersion(repo: Repository): Promise<void> {
  if (repo.config.version >= PINS_FORMAT_VERSION) return;
  const raw = JSON.parse((await repo.backend.get('config', 'config')).toString('utf8')) as Record<string, unknown>;
  if (typeof raw.version === 'number' && raw.version >= PINS_FORMAT_VERSION) return;
  // Concurrent upgraders write the same bytes; the config is otherwise unchanged.
  await repo.backend.put('config', 'config', Buffer.from(JSON.stringify({ ...raw, version: PINS_FORMAT_VERSION }, null, 2)));
  repo.config.version = PINS_FORMAT_VERSION;
}

/**
 * Pins `snapshot` for `holder`; resolves with the pin id once the pin is durable AND the snapshot is
 * known to exist after it (see the race rule above). Throws NotFoundError when it does not.
 */
export async function createPin(repo: Repository, snapshot: string, holder: PinHolder): Promise<string> {
  await requirePinsVersion(repo);
  const id = randomBytes(16).toString('hex');
  const info: PinInfo = { version: 1, snapshot, host: holder.host ?? hostname(), dataDir: holder.dataDir, holder: holder.holder, created: new Date().toISOString() };
  await repo.backend.put('pins', id, encodePin(repo, info));
  try {
    await repo.backend.stat('snapshots', snapshot);
  } catch (err) {
    await repo.backend.delete('pins', id).catch(() => undefined);
    if (err instanceof ObjectNotFoundError) throw new NotFoundError(`snapshot ${snapshot} does not exist (forgotten meanwhile?): nothing pinned`);
    throw err;
  }
  return id;
}

/** The pinning a copy-on-write volume needs (src/cow/base-pin.ts SnapshotPinner), for this host. */
export function repositoryPinner(repo: Repository, dataDir: string): { pin(snapshot: string, holder: string): Promise<string>; unpin(id: string): Promise<void> } {
  return {
    pin: (snapshot, holder) => createPin(repo, snapshot, { dataDir, holder }),
    unpin: (id) => removePin(repo, id),
  };
}

/** Removes a pin (idempotent). */
export async function removePin(repo: Repository, id: string): Promise<void> {
  if (!PIN_ID.test(id)) throw new PinError(`invalid pin id ${JSON.stringify(id)}: a pin id is 32 hex digits (see \`vmsnap pins ls\`)`);
  await repo.backend.delete('pins', id);
}

/** Every pin; damaged ones are listed apart, never dropped (a pin is a promise not to delete). */
export async function listPins(repo: Repository): Promise<{ pins: Pin[]; unreadable: UnreadablePin[] }> {
  const pins: Pin[] = [];
  const unreadable: UnreadablePin[] = [];
  for await (const o of repo.backend.list('pins')) {
    try {
      pins.push(decodePin(repo, o.name, await repo.backend.get('pins', o.name)));
    } catch (err) {
      if (err instanceof ObjectNotFoundError) continue; // removed while we listed
      unreadable.push({ id: o.name, error: (err as Error).message });
    }
  }
  pins.sort((a, b) => a.created.localeCompare(b.created) || a.id.localeCompare(b.id));
  return { pins, unreadable };
}

/** Pins by the snapshot they hold. */
export function pinsBySnapshot(pins: readonly Pin[]): Map<string, Pin[]> {
  const out = new Map<string, Pin[]>();
  for (const p of pins) {
    const l = out.get(p.snapshot);
    if (l) l.push(p);
    else out.set(p.snapshot, [p]);
  }
  return out;
}

/** One line naming who holds a pin, for forget's and check's output. */
export function describePin(p: Pin): string {
  return `pin ${p.id.slice(0, 8)} held by ${p.holder} on ${p.host} (${p.dataDir}) since ${p.created}`;
}

/**
 * Deletes the given snapshots unless pinned, obeying the race rule above. Resolves with the ids
 * actually removed and the snapshots kept because of a pin.
 */
export async function forgetUnpinned(repo: Repository, ids: readonly string[]): Promise<{ removed: string[]; pinned: Map<string, Pin[]> }> {
  const before = await listPinsStrict(repo);
  const pinned = new Map<string, Pin[]>();
  const removed: { id: string; bytes: Buffer }[] = [];
  for (const id of ids) {
    const p = before.get(id);
    if (p) {
      pinned.set(id, p);
      continue;
    }
    let bytes: Buffer;
    try {
      bytes = await repo.backend.get('snapshots', id);
    } catch (err) {
      if (err instanceof ObjectNotFoundError) continue;
      throw err;
    }
    await repo.deleteSnapshot(id);
    removed.push({ id, bytes });
  }
  if (removed.length) {
    const after = await listPinsStrict(repo);
    for (const r of removed) {
      const p = after.get(r.id);
      if (!p) continue;
      await repo.backend.put('snapshots', r.id, r.bytes);
      pinned.set(r.id, p);
    }
  }
  return { removed: removed.map((r) => r.id).filter((id) => !pinned.has(id)), pinned };
}

/** Pins by snapshot; an unreadable pin stops the caller (it may hold any snapshot). */
export async function listPinsStrict(repo: Repository): Promise<Map<string, Pin[]>> {
  const { pins, unreadable } = await listPins(repo);
  if (unreadable.length) {
    throw new PinError(`${unreadable.length} pin(s) unreadable (${unreadable.map((u) => `${u.id.slice(0, 8)}: ${u.error}`).join('; ')}): nothing deleted; remove them with \`vmsnap pins rm\` once their holders are gone`);
  }
  return pinsBySnapshot(pins);
}
