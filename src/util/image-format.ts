/**
 * Disk images given by the user (`vm create --disk-from FILE`, `import FILE`): what format they
 * are in, and their guest-visible bytes.
 *
 * The format is what `qemu-img info` detects, never assumed from the name. Raw images are read as
 * they are. qcow2, qed, vmdk, vdi, vhdx and vpc images are read through `qemu-img convert` into a
 * private sparse raw temp file beside the destination (holes stay holes), after `qemu-img check`
 * has found no corruption (a truncated qcow2 otherwise converts "successfully" to zeros). An image
 * with a backing file or an external data file is refused: it would pull in another file's bytes,
 * chosen by whoever made the image. Any other format is refused, naming it.
 *
 * A size that is not a multiple of the destination's block size is padded with zeros up to the
 * next multiple, with a notice stating both sizes (the volume stores whole blocks; the guest sees
 * the padded size).
 */
import { execFile } from 'node:child_process';
import { promises as fsp } from 'node:fs';
import { promisify } from 'node:util';
import { dataExtents } from './sparse.js';
import { createTempFile } from './fs.js';
import { UserFacingError } from './errors.js';
import { childEnv } from './process.js';

const execFileP = promisify(execFile);

/** `copyTo` reads the image in pieces of this size, with at most COPY_IN_FLIGHT writes pending. */
const COPY_PIECE = 4 << 20;
const COPY_IN_FLIGHT = 4;

export class ImageFormatError extends UserFacingError {
  override readonly name = 'ImageFormatError';
}

/** Formats read through `qemu-img convert`. */
const CONVERTIBLE = new Set(['qcow2', 'qed', 'vmdk', 'vdi', 'vhdx', 'vpc']);

export interface ImageInfo {
  format: string;
  /** Guest-visible size in bytes. */
  virtualSize: number;
  backingFile?: string;
  dataFile?: string;
}

async function qemuImg(args: string[], what: string): Promise<{ stdout: string; code: number }> {
  try {
    const { stdout } = await execFileP('qemu-img', args, { maxBuffer: 16 << 20, env: childEnv() });
    return { stdout, code: 0 };
  } catch (err) {
    const e = err as NodeJS.ErrnoException & { code?: unknown; stdout?: string; stderr?: string };
    if (e.code === 'ENOENT') throw new ImageFormatError(`cannot ${what}: qemu-img is not installed (Debian: apt-get install qemu-utils)`);
    if (typeof e.code === 'number') return { stdout: e.stdout ?? '', code: e.code };
    throw new ImageFormatError(`cannot ${what}: ${(e.stderr ?? e.message).trim()}`);
  }
}

/** What `qemu-img info` says of `file` (format probed, not given). */
export async function probeImage(file: string): Promise<ImageInfo> {
  let stdout: string;
  try {
    // -U: an image that a running QEMU holds open can still be inspected.
    ({ stdout } = await execFileP('qemu-img', ['info', '-U', '--output=json', '--', file], { maxBuffer: 16 << 20, env: childEnv() }));
  } catch (err) {
    const e = err as NodeJS.ErrnoException & { stderr?: string };
    if (e.code === 'ENOENT' && !e.stderr) throw new ImageFormatError(`cannot inspect ${file}: qemu-img is not installed (Debian: apt-get install qemu-utils)`);
    throw new ImageFormatError(`${file} is not a readable disk image: ${(e.stderr ?? e.message).trim().replace(/^qemu-img: /, '')}`);
  }
  const j = JSON.parse(stdout) as { format?: unknown; 'virtual-size'?: unknown; 'backing-filename'?: unknown; 'format-specific'?: { data?: { 'data-file'?: unknown } } };
  if (typeof j.format !== 'string' || typeof j['virtual-size'] !== 'number') throw new ImageFormatError(`qemu-img info gave no format or size for ${file}`);
  return {
    format: j.format,
    virtualSize: j['virtual-size'],
    ...(typeof j['backing-filename'] === 'string' ? { backingFile: j['backing-filename'] } : {}),
    ...(typeof j['format-specific']?.data?.['data-file'] === 'string' ? { dataFile: j['format-specific'].data['data-file'] } : {}),
  };
}

/** Refuses what cannot be read as the image's own bytes (see the module comment). */
function checkReadable(file: string, info: ImageInfo): void {
  if (info.format !== 'raw' && !CONVERTIBLE.has(info.format)) {
    throw new ImageFormatError(`${file} is a ${info.format} image, which vmsnap cannot read; convert it to raw or qcow2 first (qemu-img convert -O raw ${file} disk.raw)`);
  }
  if (info.backingFile) {
    throw new ImageFormatError(`${file} is a ${info.format} image with a backing file (${info.backingFile}); make a standalone copy first (qemu-img convert -O qcow2 ${file} standalone.qcow2)`);
  }
  if (info.dataFile) throw new ImageFormatError(`${file} is a ${info.format} image whose data lives in another file (${info.dataFile}); convert it to a standalone image first`);
}

/** A disk image opened for copying its guest-visible bytes into a volume (openDiskImage). */
export interface DiskImage {
  readonly format: string;
  /** Guest-visible bytes of the image. */
  readonly imageSize: number;
  /** imageSize rounded up to the block size: the disk's size. */
  readonly size: number;
  /** Calls `write` for each data-holding range, in order, in pieces of at most 1 MiB (holes are skipped: they read as zeros). */
  copyTo(write: (offset: number, data: Buffer) => Promise<void>): Promise<void>;
  /** Removes the converted temp file, if any. */
  close(): Promise<void>;
}

/**
 * Opens a user's disk image for a disk of `blockSize`-byte blocks. `tempNear`: a path in a private
 * directory of the caller's where a converted copy may be written (its name is made unpredictable).
 * `notice` gets one line when the size is padded.
 */
export async function openDiskImage(file: string, opts: { blockSize: number; tempNear: string; notice: (line: string) => void }): Promise<DiskImage> {
  const info = await probeImage(file);
  checkReadable(file, info);
  let rawPath = file;
  let temp: string | undefined;
  if (info.format !== 'raw') {
    const check = await qemuImg(['check', '-U', '-f', info.format, '--', file], `check ${file}`);
    // 0: clean, 3: only leaked clusters (harmless), 63: this format has no checks.
    if (check.code === 1 || check.code === 2) {
      throw new ImageFormatError(`${file} is a corrupt ${info.format} image (qemu-img check found errors; see qemu-img check ${file})`);
    }
    const t = await createTempFile(opts.tempNear);
    temp = t.path;
    try {
      await t.fh.truncate(info.virtualSize);
      await t.fh.close();
      // -n --target-is-zero: write into the fresh sparse file, leaving zero ranges as holes.
      const r = await qemuImg(['convert', '-U', '-f', info.format, '-O', 'raw', '-n', '--target-is-zero', '--', file, temp], `read ${file}`);
      if (r.code !== 0) throw new ImageFormatError(`cannot read the ${info.format} image ${file}: qemu-img convert failed (exit ${r.code})`);
    } catch (err) {
      await t.fh.close().catch(() => undefined);
      await fsp.rm(temp, { force: true });
      throw err;
    }
    rawPath = temp;
  }
  const imageSize = info.format === 'raw' ? (await fsp.stat(file)).size : info.virtualSize;
  if (imageSize === 0) {
    if (temp) await fsp.rm(temp, { force: true });
    throw new ImageFormatError(`${file} is empty: a disk needs at least one block`);
  }
  const size = Math.ceil(imageSize / opts.blockSize) * opts.blockSize;
  if (size !== imageSize) {
    opts.notice(`note: ${file} is ${imageSize} bytes, not a multiple of the ${opts.blockSize}-byte block size; the disk is ${size} bytes, padded with zeros`);
  }
  return {
    format: info.format,
    imageSize,
    size,
    async copyTo(write) {
      const fh = await fsp.open(rawPath, 'r');
      // Reads and writes overlap (a few pieces in flight), each piece read into its own buffer
      // that the write keeps: reading, copying and writing one piece at a time took 3x `cp`.
      const inFlight = new Set<Promise<void>>();
      let failed: unknown = null;
      try {
        for (const e of (await dataExtents(rawPath, imageSize)) ?? [{ offset: 0, length: imageSize }]) {
          for (let off = e.offset; off < e.offset + e.length; ) {
            const n = Math.min(COPY_PIECE, e.offset + e.length - off);
            const piece = Buffer.allocUnsafe(n);
            const { bytesRead } = await fh.read(piece, 0, n, off);
            if (bytesRead === 0) throw new ImageFormatError(`${file} ended at ${off} bytes, expected ${imageSize} (did it shrink while it was read?)`);
            const w: Promise<void> = write(off, piece.subarray(0, bytesRead)).then(
              () => void inFlight.delete(w),
              (err: unknown) => {
                inFlight.delete(w);
                failed ??= err;
              },
            );
            inFlight.add(w);
            if (inFlight.size >= COPY_IN_FLIGHT) await Promise.race(inFlight);
            if (failed) throw failed;
            off += bytesRead;
          }
        }
      } finally {
        await Promise.all(inFlight);
        await fh.close();
      }
      if (failed) throw failed;
    },
    async close() {
      if (temp) await fsp.rm(temp, { force: true });
    },
  };
}

/**
 * For `import` of a disk stream: a regular file that qemu-img recognises as a container format
 * (not raw) is refused, since import stores bytes as they are and the guest would see the
 * container. `--kind file` stores any file's bytes unchanged on purpose.
 */
export async function refuseContainerImage(file: string): Promise<void> {
  const info = await probeImage(file).catch(() => null);
  if (info && info.format !== 'raw') {
    throw new ImageFormatError(
      `${file} is a ${info.format} image: import stores a disk's raw bytes. Convert it first (qemu-img convert -O raw ${file} disk.raw), ` +
        `create a VM from it with vm create --disk-from, or store the file as it is with --kind file`,
    );
  }
}
