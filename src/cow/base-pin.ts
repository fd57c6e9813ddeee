/**
 * A volume's hold on the snapshot its base comes from (see src/store/pins.ts for the repository
 * side and the rules forget/prune/check obey).
 *
 *   <volume dir>/base.pin   JSON { "pin": "<pin id>", "snapshot": "<snapshot id>" }, written atomically
 *
 * Lifecycle (each step durable before the next, so a crash leaves at worst a pin nobody needs —
 * `vmsnap pins ls/rm` shows and removes it — never a volume reading an unpinned base):
 *   - clone / create from a snapshot: pin, then create the volume, then write base.pin;
 *   - restore in place (new base): pin the new snapshot, reset the volume, write base.pin, then
 *     unpin the old one;
 *   - the volume no longer depends on its base (every block hydrated and a snapshot taken since, so
 *     neither reads nor the next snapshot's chunk ids come from it): unpin, remove base.pin;
 *   - the volume is removed: unpin, then remove the directory.
 */
import { promises as fsp } from 'node:fs';
import { atomicWriteFile, containedPath } from '../util/fs.js';
import { UserFacingError } from '../util/errors.js';

/** What a volume needs from the repository to hold its base snapshot. */
export interface SnapshotPinner {
  /** Pins `snapshot` for `holder` (e.g. "vm1/disk0"); resolves with the pin id. */
  pin(snapshot: string, holder: string): Promise<string>;
  /** Removes a pin (idempotent). */
  unpin(pin: string): Promise<void>;
}

export interface BasePin {
  pin: string;
  snapshot: string;
}

export class BasePinError extends UserFacingError {
  override readonly name = 'BasePinError';
}

const FILE = 'base.pin';

/** The pin a volume holds, or null. */
export async function readBasePin(dir: string): Promise<BasePin | null> {
  let text: string;
  try {
    text = await fsp.readFile(containedPath(dir, FILE), 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw err;
  }
  try {
    const p = JSON.parse(text) as Partial<BasePin>;
    if (typeof p.pin === 'string' && typeof p.snapshot === 'string') return { pin: p.pin, snapshot: p.snapshot };
  } catch {
    // reported below
  }
  throw new BasePinError(`${containedPath(dir, FILE)} is damaged: its pin is unknown (see \`vmsnap pins ls\`)`);
}

async function writeBasePin(dir: string, p: BasePin): Promise<void> {
  await atomicWriteFile(containedPath(dir, FILE), JSON.stringify(p), { mode: 0o600 });
}

/**
 * Runs `use` (which creates or rebases the volume in `dir` on `snapshot`) with the snapshot pinned
 * first; records the pin, then drops the previous one. If `use` fails, the new pin is removed and
 * the old one kept.
 */
export async function withBasePin<T>(dir: string, pinner: SnapshotPinner, snapshot: string, holder: string, use: () => Promise<T>): Promise<T> {
  const pin = await pinner.pin(snapshot, holder);
  let out: T;
  let old: BasePin | null;
  try {
    old = await readBasePin(dir).catch(() => null);
    out = await use();
    await writeBasePin(dir, { pin, snapshot });
  } catch (err) {
    await pinner.unpin(pin).catch(() => undefined);
    throw err;
  }
  if (old && old.pin !== pin) await pinner.unpin(old.pin);
  return out;
}

/** Drops the volume's pin (before the volume is removed, or once it no longer needs its base). */
export async function releaseBasePin(dir: string, pinner: SnapshotPinner): Promise<BasePin | null> {
  const p = await readBasePin(dir);
  if (!p) return null;
  await pinner.unpin(p.pin);
  await fsp.rm(containedPath(dir, FILE), { force: true });
  return p;
}

/** Drops the pin of a volume that no longer depends on its base (Volume.dependsOnBase). */
export async function releaseBasePinIfUnused(dir: string, volume: { readonly dependsOnBase: boolean }, pinner: SnapshotPinner): Promise<BasePin | null> {
  if (volume.dependsOnBase) return null;
  return releaseBasePin(dir, pinner);
}
