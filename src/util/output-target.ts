/**
 * Where a command's output bytes go when the user names a path (`vmsnap export SNAP TARGET`).
 *
 * What a target is decides how it is written, and nothing is ever written through a path the user
 * did not name:
 *  - `-`: standard output, written in order;
 *  - a path that does not exist: a private temp file in the same directory (createTempFile:
 *    random name, O_EXCL|O_NOFOLLOW), holes left for zeros, fsynced, then linked into place so a
 *    failed or interrupted write never leaves a plausible-looking file, and a file that appeared
 *    meanwhile is not replaced;
 *  - an existing regular file: the same, renamed over it, only with `force` (the rename replaces
 *    the directory entry: a symlink there is replaced, never written through);
 *  - a block device (restoring a disk onto a drive): the device itself, opened without O_CREAT or
 *    O_TRUNC and with O_EXCL (Linux refuses a device that is mounted or otherwise claimed),
 *    written in order including zeros (the device holds old data), refused before the first byte
 *    if it is smaller than the output;
 *  - a character device (/dev/null, a tape) or a FIFO: the node itself, written in order;
 *  - anything else (a directory, a socket): refused.
 */
import { constants as fsc, promises as fsp, readFileSync } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import * as path from 'node:path';
import { BadInputError } from './errors.js';
import { createTempFile, fsyncDir, publishTempFile } from './fs.js';

/** The target the user named cannot be written as asked: bad usage (exit 2), nothing written. */
export class OutputTargetError extends BadInputError {
  override readonly name = 'OutputTargetError';
}

export type OutputKind = 'stdout' | 'new-file' | 'replace-file' | 'block-device' | 'char-device' | 'fifo';

export interface OutputTarget {
  readonly kind: OutputKind;
  /** Positional writes allowed, unwritten ranges read as zeros (a fresh temp file). */
  readonly file?: FileHandle;
  /** Sequential writes from the start, every byte written (devices, FIFOs, stdout). */
  readonly fd?: number;
  /** The path being written now (the temp file while a file is written), for WritebackAhead. */
  readonly writingPath?: string;
  /** Makes the output durable (with `fsync`) and, for a file, puts it in place. */
  commit(opts: { fsync: boolean }): Promise<void>;
  /** After a failure: closes and removes the temp file (a device is left as far as it was written). */
  abort(): Promise<void>;
}

export interface OutputOptions {
  /** Replace an existing regular file. */
  force?: boolean;
  /** How many bytes will be written (a smaller block device is refused). */
  size: number;
}

/** Opens `target` for writing `opts.size` bytes as the module comment describes. */
export async function openOutputTarget(target: string, opts: OutputOptions): Promise<OutputTarget> {
  if (target === '-') return sequential('stdout', 1, null);
  const st = await fsp.stat(target).catch((err: NodeJS.ErrnoException) => {
    if (err.code === 'ENOENT') return null;
    throw new OutputTargetError(`cannot write ${target}: ${err.code ?? err.message}`);
  });
  if (st === null) return tempFile(target, 'new-file');
  if (st.isFile()) {
    if (!opts.force) throw new OutputTargetError(`${target} already exists; add --force to replace it`);
    return tempFile(target, 'replace-file');
  }
  if (st.isBlockDevice()) {
    const capacity = blockDeviceSize(target, st.rdev);
    if (capacity < opts.size) {
      throw new OutputTargetError(`${target} holds ${capacity} bytes, too small for ${opts.size} bytes; nothing was written`);
    }
    // O_EXCL on a block device: EBUSY when it is mounted or in use by the kernel (a RAID, LVM).
    const fh = await fsp.open(target, fsc.O_WRONLY | fsc.O_EXCL).catch((err: NodeJS.ErrnoException) => {
      throw new OutputTargetError(`cannot write ${target}: ${err.code === 'EBUSY' ? 'the device is mounted or in use' : (err.code ?? err.message)}`);
    });
    return sequential('block-device', fh.fd, fh, target);
  }
  if (st.isCharacterDevice() || st.isFIFO()) {
    const fh = await fsp.open(target, fsc.O_WRONLY).catch((err: NodeJS.ErrnoException) => {
      throw new OutputTargetError(`cannot write ${target}: ${err.code ?? err.message}`);
    });
    return sequential(st.isFIFO() ? 'fifo' : 'char-device', fh.fd, fh);
  }
  const what = st.isDirectory() ? 'a directory (give the path of the file to write)' : st.isSocket() ? 'a socket' : 'not a file or device';
  throw new OutputTargetError(`cannot write ${target}: it is ${what}`);
}

function sequential(kind: OutputKind, fd: number, fh: FileHandle | null, writingPath?: string): OutputTarget {
  return {
    kind,
    fd,
    ...(writingPath ? { writingPath } : {}),
    async commit({ fsync }) {
      // Only a block device has a cache worth flushing; a FIFO or /dev/null has none (EINVAL).
      if (fsync && kind === 'block-device') await fh!.sync();
      await fh?.close();
    },
    async abort() {
      await fh?.close().catch(() => undefined);
    },
  };
}

async function tempFile(target: string, kind: 'new-file' | 'replace-file'): Promise<OutputTarget> {
  const { path: tmp, fh } = await createTempFile(target).catch((err: NodeJS.ErrnoException) => {
    throw new OutputTargetError(`cannot write ${target}: ${err.code === 'ENOENT' ? 'its directory does not exist' : (err.code ?? err.message)}`);
  });
  let open = true;
  return {
    kind,
    file: fh,
    writingPath: tmp,
    async commit({ fsync }) {
      if (fsync) await fh.sync();
      await fh.close();
      open = false;
      try {
        // A new file is linked (a file someone created meanwhile is not replaced); --force renames.
        await publishTempFile(tmp, target, kind === 'new-file');
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        if (code === 'EEXIST') throw new OutputTargetError(`${target} appeared while it was written; add --force to replace it`);
        throw new OutputTargetError(`cannot put the finished file in place at ${target}: ${code ?? (err as Error).message}`);
      }
      // The new name is durable only once the directory is flushed.
      if (fsync) await fsyncDir(path.dirname(path.resolve(target)));
    },
    async abort() {
      if (open) await fh.close().catch(() => undefined);
      open = false;
      await fsp.rm(tmp, { force: true });
    },
  };
}

/** A block device's size in bytes, from sysfs (its size file counts 512-byte sectors). */
function blockDeviceSize(target: string, rdev: number): number {
  // Linux's dev_t: minor in bits 0-7 and 20-31, major in bits 8-19 (and 32-43).
  const major = Math.floor(rdev / 256) & 0xfff;
  const minor = (rdev & 0xff) | (Math.floor(rdev / 4096) & 0xfff00);
  try {
    return Number(readFileSync(`/sys/dev/block/${major}:${minor}/size`, 'utf8').trim()) * 512;
  } catch (err) {
    throw new OutputTargetError(`cannot tell the size of block device ${target} (${(err as NodeJS.ErrnoException).code ?? (err as Error).message}); nothing was written`);
  }
}
