/**
 * File-system helpers shared by everything that writes under a root directory (the local backend,
 * copy-on-write volumes, VM state). Two rules live here and nowhere else:
 *  - containment: a path computed from untrusted parts must stay under its root;
 *  - atomic replacement: temp file in the same directory, fsync, rename, fsync the directory, so a
 *    crash leaves either the old or the new content, never a torn file.
 */
import { randomBytes } from 'node:crypto';
import { promises as fsp, constants as fsc } from 'node:fs';
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

/**
 * Writes `data` to `file` atomically and durably. With `exclusive`, fails with EEXIST (leaving the
 * existing file untouched) when `file` already exists; the check and the publish are one link(2).
 */
export async function atomicWriteFile(
  file: string,
  data: Uint8Array | string,
  opts: { exclusive?: boolean; mode?: number } = {},
): Promise<void> {
  const dir = path.dirname(file);
  const tmp = path.join(dir, `.tmp-${path.basename(file)}-${randomBytes(6).toString('hex')}`);
  const fh = await fsp.open(tmp, 'wx', opts.mode ?? 0o644);
  try {
    await fh.writeFile(data);
    await fh.sync();
  } catch (err) {
    await fh.close().catch(() => undefined);
    await fsp.rm(tmp, { force: true });
    throw err;
  }
  await fh.close();
  try {
    if (opts.exclusive) {
      // link(2) fails if the target exists, which rename(2) would silently replace.
      await fsp.link(tmp, file);
      await fsp.unlink(tmp);
    } else {
      await fsp.rename(tmp, file);
    }
  } catch (err) {
    await fsp.rm(tmp, { force: true });
    throw err;
  }
  await fsyncDir(dir);
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
