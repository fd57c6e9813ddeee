/**
 * A repository in a local directory: `<root>/<kind>/<name>`, with packs fanned out into
 * `<root>/packs/<first two characters>/<name>` so no directory grows past a few thousand entries
 * even for multi-terabyte repositories.
 *
 * Atomicity and durability come from `atomicWriteFile` (private temp file `.tmp-*` with a random
 * name, fsync, rename or link, fsync the directory). Temp files left behind by a crash are never listed or returned; they can be
 * removed by `removeLeftovers` (contract item 10), which prune calls.
 */
import { promises as fsp, type Dirent } from 'node:fs';
import * as path from 'node:path';
import { assertInside, atomicWriteFile, containedPath, fsyncDir, mkdirPrivate, PathEscapeError, TEMP_PREFIX } from '../../util/fs.js';
import {
  BackendError,
  destination,
  OBJECT_KINDS,
  OBJECT_NAME,
  ObjectNotFoundError,
  checkObjectName,
  checkRange,
  type Backend,
  type BackendCapabilities,
  type ByteRange,
  type ObjectInfo,
  type ObjectKind,
  type Leftover,
} from './contract.js';

/** errno codes that will not go away by retrying: the disk is full, read-only or forbidden. */
const PERMANENT_CODES = new Set([
  'ENOSPC',
  'EDQUOT',
  'EACCES',
  'EPERM',
  'EROFS',
  'ENAMETOOLONG',
  'ENOTDIR',
  'EISDIR',
  'ELOOP',
  'EEXIST',
  'EINVAL',
  'EFBIG',
  // A local EIO is a failing disk or a yanked USB drive: retrying in a loop only hides it.
  'EIO',
]);
/** Transient conditions: resource exhaustion, interrupted calls, network filesystems timing out. */
const RETRYABLE_CODES = new Set(['EAGAIN', 'EBUSY', 'EMFILE', 'ENFILE', 'EINTR', 'ETIMEDOUT', 'ESTALE', 'ENOMEM']);

function errnoCode(err: unknown): string | undefined {
  if (typeof err === 'object' && err !== null && 'code' in err && typeof err.code === 'string') {
    return err.code;
  }
  return undefined;
}

/** Wraps a file-system error as a BackendError naming the failed step and the object. */
export function localError(step: string, what: string, err: unknown): BackendError {
  if (err instanceof BackendError) return err;
  // A planted symlink leading out of the repository: its own message says where and why.
  if (err instanceof PathEscapeError) return new BackendError(`local backend: ${step} ${what} refused: ${err.message}`, false, { cause: err });
  const code = errnoCode(err) ?? 'unknown error';
  // Unknown codes are permanent: retrying an error nobody understood only delays reporting it.
  const retryable = RETRYABLE_CODES.has(code) && !PERMANENT_CODES.has(code);
  const reason = code === 'ENOSPC' ? 'no space left on device' : code === 'EACCES' || code === 'EPERM' ? 'permission denied' : code;
  return new BackendError(`local backend: ${step} ${what} failed: ${reason}`, retryable, { cause: err });
}

export class LocalBackend implements Backend {
  readonly capabilities: BackendCapabilities = { local: true, requestCost: false, atomicCreate: true };
  readonly location: string;
  readonly root: string;
  /** Directories known to exist, so steady-state puts skip mkdir. */
  private readonly knownDirs = new Set<string>();
  private closed = false;

  constructor(root: string) {
    this.root = path.resolve(root);
    this.location = this.root;
  }

  private dirOf(kind: ObjectKind, name: string): string {
    return kind === 'packs' ? containedPath(this.root, kind, name.slice(0, 2)) : containedPath(this.root, kind);
  }

  private fileOf(kind: ObjectKind, name: string): string {
    if (this.closed) throw new BackendError(`local backend ${this.root} is closed`, false);
    checkObjectName(kind, name);
    try {
      return path.join(this.dirOf(kind, name), name);
    } catch (err) {
      // Unreachable with a valid name; kept so a future name rule change cannot open an escape.
      if (err instanceof PathEscapeError) throw new BackendError(err.message, false, { cause: err });
      throw err;
    }
  }

  /**
   * Creates `dir` (and parents) durably (a new directory entry must itself reach the disk) and
   * private (0700 whatever the umask: packs hold guest RAM and disks, keys/ the wrapped keys), and
   * proves it lies inside the repository: a symlink planted in the repository that points out of it
   * is refused rather than written through (docs/security.md).
   */
  private async ensureDir(dir: string): Promise<void> {
    if (this.knownDirs.has(dir)) return;
    const created = await mkdirPrivate(dir);
    await assertInside(this.root, dir);
    if (created !== undefined) {
      // fsync every parent whose entry list changed, from the first created directory upwards.
      let d = dir;
      while (d.length >= created.length) {
        await fsyncDir(path.dirname(d));
        d = path.dirname(d);
      }
    }
    this.knownDirs.add(dir);
  }

  /** Writes via atomicWriteFile, recreating the folder once if it vanished since it was cached. */
  private async write(file: string, data: Uint8Array, exclusive: boolean): Promise<void> {
    const dir = path.dirname(file);
    await this.ensureDir(dir);
    try {
      await atomicWriteFile(file, data, { exclusive });
    } catch (err) {
      if (errnoCode(err) !== 'ENOENT') throw err;
      this.knownDirs.delete(dir);
      await this.ensureDir(dir);
      await atomicWriteFile(file, data, { exclusive });
    }
  }

  async put(kind: ObjectKind, name: string, data: Uint8Array): Promise<void> {
    const file = this.fileOf(kind, name);
    try {
      await this.write(file, data, false);
    } catch (err) {
      throw localError('put', `${kind}/${name}`, err);
    }
  }

  async create(kind: ObjectKind, name: string, data: Uint8Array): Promise<boolean> {
    const file = this.fileOf(kind, name);
    try {
      await this.write(file, data, true);
      return true;
    } catch (err) {
      if (errnoCode(err) === 'EEXIST') return false;
      throw localError('create', `${kind}/${name}`, err);
    }
  }

  async get(kind: ObjectKind, name: string, range?: ByteRange, into?: Uint8Array): Promise<Buffer> {
    const file = this.fileOf(kind, name);
    let fh: fsp.FileHandle;
    try {
      fh = await fsp.open(file, 'r');
    } catch (err) {
      // ENOTDIR: a path component is a file (a repository path that points at a file): no such object.
      if (errnoCode(err) === 'ENOENT' || errnoCode(err) === 'ENOTDIR') throw new ObjectNotFoundError(kind, name);
      throw localError('get (open)', `${kind}/${name}`, err);
    }
    try {
      const { size } = await fh.stat();
      const r = range ?? { offset: 0, length: size };
      checkRange(kind, name, r, size);
      const buf = destination(kind, name, r.length, into);
      let done = 0;
      while (done < r.length) {
        const { bytesRead } = await fh.read(buf, done, r.length - done, r.offset + done);
        if (bytesRead === 0) {
          // Objects are immutable once published; a short read means the file shrank under us.
          throw new BackendError(`local backend: ${kind}/${name} ended early at ${r.offset + done} bytes`, false);
        }
        done += bytesRead;
      }
      return buf;
    } catch (err) {
      throw localError('get (read)', `${kind}/${name}`, err);
    } finally {
      await fh.close();
    }
  }

  async stat(kind: ObjectKind, name: string): Promise<ObjectInfo> {
    const file = this.fileOf(kind, name);
    try {
      const st = await fsp.stat(file);
      if (!st.isFile()) throw new ObjectNotFoundError(kind, name);
      return { name, size: st.size };
    } catch (err) {
      if (errnoCode(err) === 'ENOENT' || errnoCode(err) === 'ENOTDIR') throw new ObjectNotFoundError(kind, name);
      throw localError('stat', `${kind}/${name}`, err);
    }
  }

  async *list(kind: ObjectKind): AsyncIterable<ObjectInfo> {
    checkObjectName(kind, 'x');
    if (this.closed) throw new BackendError(`local backend ${this.root} is closed`, false);
    const top = containedPath(this.root, kind);
    const dirs: string[] = [];
    if (kind === 'packs') {
      for (const e of await readDirOrEmpty(top, kind)) {
        if (e.isDirectory() && !e.name.startsWith('.')) dirs.push(path.join(top, e.name));
      }
    } else {
      dirs.push(top);
    }
    for (const dir of dirs) {
      const names = (await readDirOrEmpty(dir, kind))
        .filter((e) => e.isFile() && !e.name.startsWith(TEMP_PREFIX) && OBJECT_NAME.test(e.name))
        .map((e) => e.name);
      // Stat in small batches: sequential stats make listing 100k packs slow, unbounded ones hit EMFILE.
      for (let i = 0; i < names.length; i += 64) {
        const batch = names.slice(i, i + 64);
        const infos = await Promise.all(
          batch.map(async (n) => {
            try {
              return { name: n, size: (await fsp.stat(path.join(dir, n))).size };
            } catch (err) {
              // Deleted between readdir and stat: it is simply no longer there.
              if (errnoCode(err) === 'ENOENT') return undefined;
              throw localError('list (stat)', `${kind}/${n}`, err);
            }
          }),
        );
        for (const info of infos) if (info) yield info;
      }
    }
  }

  async delete(kind: ObjectKind, name: string): Promise<void> {
    const file = this.fileOf(kind, name);
    try {
      await fsp.unlink(file);
    } catch (err) {
      if (errnoCode(err) === 'ENOENT') return;
      throw localError('delete', `${kind}/${name}`, err);
    }
    try {
      // Deleting a lock must be durable too, or a crash could resurrect it.
      await fsyncDir(path.dirname(file));
    } catch (err) {
      throw localError('delete (fsync)', `${kind}/${name}`, err);
    }
  }

  /**
   * Removes temp files left behind by crashed puts that are older than `olderThanMs` (a live put in
   * another process may still be writing younger ones). Returns how many were removed.
   */
  async removeLeftovers(olderThanMs: number): Promise<number> {
    let removed = 0;
    for (const l of await this.leftovers()) {
      if (l.ageMs <= olderThanMs) continue;
      await fsp.rm(path.join(this.root, l.name), { force: true });
      removed++;
    }
    return removed;
  }

  /** Temp files of puts that never reached their rename (or are being written now), any age. */
  async leftovers(): Promise<Leftover[]> {
    const now = Date.now();
    const found: Leftover[] = [];
    const visit = async (dir: string, depth: number): Promise<void> => {
      let entries: Dirent[];
      try {
        entries = await fsp.readdir(dir, { withFileTypes: true });
      } catch (err) {
        if (errnoCode(err) === 'ENOENT') return;
        throw localError('cleanup (readdir)', dir, err);
      }
      for (const e of entries) {
        const p = path.join(dir, e.name);
        if (e.isDirectory() && depth > 0) await visit(p, depth - 1);
        else if (e.isFile() && e.name.startsWith(TEMP_PREFIX)) {
          const st = await fsp.stat(p).catch(() => undefined);
          if (st) found.push({ name: path.relative(this.root, p), size: st.size, ageMs: now - st.mtimeMs });
        }
      }
    };
    for (const kind of OBJECT_KINDS) {
      await visit(containedPath(this.root, kind), kind === 'packs' ? 1 : 0);
    }
    return found;
  }

  async close(): Promise<void> {
    this.closed = true;
  }
}

async function readDirOrEmpty(dir: string, kind: ObjectKind): Promise<Dirent[]> {
  try {
    return await fsp.readdir(dir, { withFileTypes: true });
  } catch (err) {
    // A kind nobody has written yet has no folder: that is an empty listing, not an error.
    if (errnoCode(err) === 'ENOENT') return [];
    throw localError('list (readdir)', `${kind}/`, err);
  }
}
