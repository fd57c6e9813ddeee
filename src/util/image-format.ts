/**
 * Disk images given by the user (`vm create --disk-from FILE`, `import FILE`): what format they
 * are in, and their guest-visible bytes.
 *
 * The format is what `qemu-img info` detects, never assumed from the name. Raw images are read as
 * they are. qcow2, qed, vmdk, vdi, vhdx and vpc images are read through `qemu-img convert` into a
 * private sparse raw temp file beside the destination (holes stay holes), after `qemu-img check`
 * has found no corruption in any layer (a truncated qcow2 otherwise converts "successfully" to
 * zeros). Any other format is refused, naming it.
 *
 * A backing chain (a qcow2 overlay on a base image, …) is followed as qemu-img follows it: each
 * layer's backing name resolved against that layer's own folder, an absolute name as it is, the
 * format the layer records for it (probed when it records none). The image's bytes are the
 * flattened chain. The backing names were chosen by whoever made the image, so each one is
 * checked before qemu-img reads it, and the chain is printed: it must exist, be a regular file
 * (not a device, FIFO, directory or a /proc, /sys or /dev entry), not loop back, be at most
 * MAX_CHAIN deep, be an image vmsnap reads — qcow2 & co, or raw with a whole number of 512-byte
 * sectors (an image naming /etc/shadow or a key file as its raw base is refused: such files are
 * not sector-sized) — and be of the format the layer records. A protocol name (nbd:, http:, json:)
 * and an external data file are refused. Left open: a hostile image may still name another
 * sector-sized image the user can read; the printed chain shows it.
 *
 * A size that is not a multiple of the destination's block size is padded with zeros up to the
 * next multiple, with a notice stating both sizes (the volume stores whole blocks; the guest sees
 * the padded size).
 */
import { execFile } from 'node:child_process';
import { promises as fsp } from 'node:fs';
import * as path from 'node:path';
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
  /** The backing name as the image records it. */
  backingFile?: string;
  /** That name resolved as qemu-img resolves it (against the image's folder). */
  fullBackingFile?: string;
  /** The backing file's format as the image records it (qemu probes it when absent). */
  backingFormat?: string;
  dataFile?: string;
}

/** Deepest backing chain followed (layers below the image). */
export const MAX_CHAIN = 16;

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
  const j = JSON.parse(stdout) as {
    format?: unknown;
    'virtual-size'?: unknown;
    'backing-filename'?: unknown;
    'full-backing-filename'?: unknown;
    'backing-filename-format'?: unknown;
    'format-specific'?: { data?: { 'data-file'?: unknown } };
  };
  if (typeof j.format !== 'string' || typeof j['virtual-size'] !== 'number') throw new ImageFormatError(`qemu-img info gave no format or size for ${file}`);
  return {
    format: j.format,
    virtualSize: j['virtual-size'],
    ...(typeof j['backing-filename'] === 'string' ? { backingFile: j['backing-filename'] } : {}),
    ...(typeof j['full-backing-filename'] === 'string' ? { fullBackingFile: j['full-backing-filename'] } : {}),
    ...(typeof j['backing-filename-format'] === 'string' ? { backingFormat: j['backing-filename-format'] } : {}),
    ...(typeof j['format-specific']?.data?.['data-file'] === 'string' ? { dataFile: j['format-specific'].data['data-file'] } : {}),
  };
}

/** Refuses a format vmsnap cannot read, and an external data file (see the module comment). */
function checkReadable(file: string, info: ImageInfo): void {
  if (info.format !== 'raw' && !CONVERTIBLE.has(info.format)) {
    throw new ImageFormatError(`${file} is a ${info.format} image, which vmsnap cannot read; convert it to raw or qcow2 first (qemu-img convert -O raw ${file} disk.raw)`);
  }
  if (info.dataFile) throw new ImageFormatError(`${file} is a ${info.format} image whose data lives in another file (${info.dataFile}); convert it to a standalone image first`);
}

/** A layer of a backing chain: its real path and what qemu-img says of it. */
export interface ChainLayer {
  path: string;
  info: ImageInfo;
}

/**
 * The backing chain below `file` (whose info is `top`), top first, each layer checked as the
 * module comment says; [] when it has no backing file. Throws ImageFormatError naming the layer
 * and its backing name.
 */
export async function backingChain(file: string, top: ImageInfo): Promise<ChainLayer[]> {
  const seen = new Set([await fsp.realpath(file)]);
  const chain: ChainLayer[] = [];
  let layer = file;
  let info = top;
  while (info.backingFile !== undefined) {
    const what = layer === file ? `${file} has a backing file ${info.backingFile} that` : `${file} has in its backing chain ${layer}, whose backing file ${info.backingFile}`;
    const resolved = info.fullBackingFile ?? info.backingFile;
    // qemu reads `proto:…` (nbd:, http:, json:{…}) as a protocol, not a file name.
    if (!resolved.startsWith('/') || /^json:|^[a-z][a-z0-9+.-]*:\/\//i.test(info.backingFile)) {
      throw new ImageFormatError(`${what} is not a file path (a protocol or json: name); vmsnap follows backing files only`);
    }
    if (chain.length === MAX_CHAIN) throw new ImageFormatError(`${file} has a backing chain deeper than ${MAX_CHAIN} images`);
    let real: string;
    try {
      real = await fsp.realpath(resolved);
    } catch {
      throw new ImageFormatError(`${what} is missing (${resolved} does not exist)`);
    }
    if (seen.has(real)) throw new ImageFormatError(`${what} loops back to ${real}, already in the chain`);
    const st = await fsp.stat(real);
    if (!st.isFile() || /^\/(proc|sys|dev)\//.test(real)) throw new ImageFormatError(`${what} is not a regular image file (${real})`);
    const below = await probeImage(real);
    if (below.format === 'raw' && (st.size === 0 || st.size % 512 !== 0)) {
      throw new ImageFormatError(`${what} is not a disk image: ${real} is ${st.size} bytes of raw data, not a whole number of 512-byte sectors`);
    }
    if (info.backingFormat !== undefined && info.backingFormat !== below.format) {
      throw new ImageFormatError(`${what} is recorded as ${info.backingFormat} but ${real} is a ${below.format} image`);
    }
    checkReadable(real, below);
    seen.add(real);
    chain.push({ path: real, info: below });
    layer = real;
    info = below;
  }
  return chain;
}

/** Runs `qemu-img check` on a non-raw layer; a corrupt one is refused, naming it. */
async function checkLayer(file: string, layer: string, format: string): Promise<void> {
  const check = await qemuImg(['check', '-U', '-f', format, '--', layer], `check ${layer}`);
  // 0: clean, 3: only leaked clusters (harmless), 63: this format has no checks.
  if (check.code === 1 || check.code === 2) {
    const which = layer === file ? file : `${file} has in its backing chain ${layer}, which`;
    throw new ImageFormatError(`${which} is a corrupt ${format} image (qemu-img check found errors; see qemu-img check ${layer})`);
  }
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
  // Absolute: qemu-img then resolves relative backing names against the image's folder.
  file = path.resolve(file);
  const info = await probeImage(file);
  checkReadable(file, info);
  const chain = await backingChain(file, info);
  for (const l of [{ path: file, info }, ...chain]) if (l.info.format !== 'raw') await checkLayer(file, l.path, l.info.format);
  if (chain.length) opts.notice(`note: ${file} has a backing chain; its disk is the flattened chain ${[file, ...chain.map((l) => l.path)].join(' -> ')}`);
  let rawPath = file;
  let temp: string | undefined;
  if (info.format !== 'raw') {
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
