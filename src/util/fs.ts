/**
 * File-system helpers shared by everything that writes under a root directory (the local backend,
 * copy-on-write volumes, VM state). Two rules live here and nowhere else:
 *  - containment: a path computed from untrusted parts must stay under its root;
 *  - atomic replacement: temp file in the same directory, fsync, rename, fsync the directory, so a
 *    crash leaves either the old or the new content, never a torn file;
 *  - temp files and new folders are private and cannot be hijacked (createTempFile, mkdirPrivate;
 *    docs/security.md states what that promises).
 */
import { randomBytes } from 'node:crypto';
import { promises as fsp, constants as fsc } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import * as path from 'node:path';
import { UserFacingError } from './errors.js';

export class PathEscapeError extends UserFacingError {
  override readonly name = 'PathEscapeError';
}

/** Joins `parts` under `root` and proves the result stays inside it (no `..`, no absolute parts). */
export function containedPath(root: string, ...parts: string[]): string {
  const base = path.resolve(root);
  for (const part of parts) {
    if (part.length === 0 || part.includes('\0') || path.isAbsolute(part)) {
      throw new PathEscapeError(`unsafe path component ${JSON.stringify(part)} under ${base}`);
    }
  }
  const full = path.resolve(base, ...parts);
  const rel = path.relative(base, full);
  if (rel === '' || rel.startsWith('..') || path.isAbsolute(rel)) {
    throw new PathEscapeError(`path ${JSON.stringify(parts.join('/'))} escapes ${base}`);
  }
  return full;
}

export async function fsyncDir(dir: string): Promise<void> {
  const fh = await fsp.open(dir, fsc.O_RDONLY | fsc.O_DIRECTORY);
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/** Files and folders vmsnap creates are its user's alone: they hold keys, guest RAM and disks. */
export const PRIVATE_FILE_MODE = 0o600;
export const PRIVATE_DIR_MODE = 0o700;

/** Name prefix of every temp file (the local backend hides and later removes leftovers by it). */
export const TEMP_PREFIX = '.tmp-';

/**
 * The one way vmsnap creates a temporary file: in `target`'s own directory (the caller picks a
 * directory it controls: the target's, never a shared one like /tmp), under a name no one can
 * predict (random suffix), with O_CREAT|O_EXCL|O_NOFOLLOW so a planted file or symlink at that
 * name makes the open fail instead of being written through, and private (mode set with fchmod
 * after the open, so the umask cannot widen or narrow it). The caller renames or links the file
 * into place, or removes it.
 */
export async function createTempFile(target: string, mode: number = PRIVATE_FILE_MODE): Promise<{ path: string; fh: FileHandle }> {
  const dir = path.dirname(target);
  const flags = fsc.O_CREAT | fsc.O_EXCL | fsc.O_NOFOLLOW | fsc.O_RDWR;
  for (let attempt = 0; ; attempt++) {
    const tmp = path.join(dir, `${TEMP_PREFIX}${path.basename(target)}-${randomBytes(8).toString('hex')}`);
    try {
      const fh = await fsp.open(tmp, flags, mode);
      try {
        await fh.chmod(mode);
      } catch (err) {
        await fh.close().catch(() => undefined);
        await fsp.rm(tmp, { force: true });
        throw err;
      }
      return { path: tmp, fh };
    } catch (err) {
      // 64 random bits collide only when someone planted the name: try another a few times.
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST' || attempt >= 4) throw err;
    }
  }
}

/**
 * Writes `data` to `file` atomically and durably (temp file from createTempFile, fsync, rename,
 * fsync the directory), private unless `mode` says otherwise. With `exclusive`, fails with EEXIST
 * (leaving the existing file untouched) when `file` already exists; the check and the publish are
 * one link(2).
 */
export async function atomicWriteFile(
  file: string,
  data: Uint8Array | string,
  opts: { exclusive?: boolean; mode?: number } = {},
): Promise<void> {
  const dir = path.dirname(file);
  const { path: tmp, fh } = await createTempFile(file, opts.mode ?? PRIVATE_FILE_MODE);
  try {
    await fh.writeFile(data);
    await fh.sync();
  } catch (err) {
    await fh.close().catch(() => undefined);
    await fsp.rm(tmp, { force: true });
    throw err;
  }
  await fh.close();
  await publishTempFile(tmp, file, !!opts.exclusive);
  await fsyncDir(dir);
}

/**
 * Moves a finished temp file to its name: rename(2), which replaces the directory entry (a
 * symlink at `file` is replaced, never followed), or with `exclusive` link(2), which fails with
 * EEXIST where rename would replace. The temp file is gone afterwards either way.
 */
export async function publishTempFile(tmp: string, file: string, exclusive: boolean): Promise<void> {
  try {
    if (exclusive) {
      await fsp.link(tmp, file);
      await fsp.unlink(tmp);
    } else {
      await fsp.rename(tmp, file);
    }
  } catch (err) {
    await fsp.rm(tmp, { force: true });
    throw err;
  }
}

/**
 * Proves that `p` (which must be lexically under `root`, see containedPath) really is under it:
 * the deepest part of `p` that exists, symlinks resolved, lies under the root's real path. A
 * symlink planted inside a repository or VM folder that points out of it is refused instead of
 * being written through. Parts that do not exist yet cannot be links (creating them is the
 * caller's, with O_EXCL or mkdir).
 */
export async function assertInside(root: string, p: string): Promise<void> {
  const realRoot = await fsp.realpath(root);
  const base = path.resolve(root);
  const lexical = path.relative(base, path.resolve(p));
  if (lexical.startsWith('..') || path.isAbsolute(lexical)) throw new PathEscapeError(`path ${p} escapes ${base}`);
  let probe = path.resolve(p);
  for (;;) {
    try {
      const real = await fsp.realpath(probe);
      const rel = path.relative(realRoot, real);
      if (rel.startsWith('..') || path.isAbsolute(rel)) {
        throw new PathEscapeError(`${probe} leads out of ${base} (to ${real}) through a symbolic link; refusing to write there`);
      }
      return;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT' || probe === base) throw err;
      // A dangling symlink also says ENOENT: one that exists as a link is refused as it is.
      const st = await fsp.lstat(probe).catch(() => null);
      if (st?.isSymbolicLink()) throw new PathEscapeError(`${probe} is a dangling symbolic link inside ${base}; refusing to write through it`);
      probe = path.dirname(probe);
    }
  }
}

/**
 * Creates `dir` and its missing parents private (0700, set explicitly: the umask does not decide)
 * and returns the first directory it created (undefined if all existed), like mkdir -p. Existing
 * directories keep their mode (warnIfShared tells the user about those).
 */
export async function mkdirPrivate(dir: string): Promise<string | undefined> {
  const created = await fsp.mkdir(dir, { recursive: true, mode: PRIVATE_DIR_MODE });
  if (created !== undefined) {
    for (let d = path.resolve(dir); d.length >= created.length; d = path.dirname(d)) await fsp.chmod(d, PRIVATE_DIR_MODE);
  }
  return created;
}

const warnedShared = new Set<string>();

/**
 * Warns once per process on stderr when an existing repository or data folder can be read or
 * entered by other users (group/other bits set): it may hold keys, guest RAM and disks. Never
 * fails: a folder that cannot be inspected is not this check's business.
 */
export async function warnIfShared(dir: string, what: string, warn: (line: string) => void = (l) => process.stderr.write(l + '\n')): Promise<void> {
  const key = path.resolve(dir);
  if (warnedShared.has(key)) return;
  const st = await fsp.stat(key).catch(() => null);
  if (!st || (st.mode & 0o077) === 0) return;
  warnedShared.add(key);
  warn(
    `vmsnap: warning: ${what} ${key} is accessible to other users (mode ${(st.mode & 0o777).toString(8).padStart(4, '0')}); ` +
      `it may hold keys, guest memory and disks. Make it private: chmod -R go-rwx ${key}`,
  );
}

export async function exists(p: string): Promise<boolean> {
  try {
    await fsp.access(p);
    return true;
  } catch {
    return false;
  }
}

/**
 * The last `bytes` bytes of a file as UTF-8 ('' if it cannot be read). Reads only the tail: logs of
 * long-lived processes (a VM supervisor runs for days) must not be read whole to show an error.
 */
export async function readTail(file: string, bytes: number): Promise<string> {
  let fh: fsp.FileHandle | undefined;
  try {
    fh = await fsp.open(file, 'r');
    const { size } = await fh.stat();
    const length = Math.min(size, bytes);
    const buf = Buffer.alloc(length);
    const { bytesRead } = await fh.read(buf, 0, length, size - length);
    return buf.subarray(0, bytesRead).toString('utf8');
  } catch {
    return '';
  } finally {
    await fh?.close().catch(() => undefined);
  }
}
