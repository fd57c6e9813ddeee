/**
 * Promise wrappers over the callback fs API with raw descriptors: the NBD data path issues one of
 * these per request, and the callback API avoids FileHandle's extra bookkeeping per call.
 */
import * as fs from 'node:fs';

export function pread(fd: number, buf: Buffer, off: number, len: number, pos: number): Promise<void> {
  return new Promise((resolve, reject) => {
    const step = (done: number): void => {
      fs.read(fd, buf, off + done, len - done, pos + done, (err, n) => {
        if (err) return reject(err);
        if (n === 0) {
          // Past the end of the file: slots that were never written read as zeros.
          buf.fill(0, off + done, off + len);
          return resolve();
        }
        if (done + n < len) return step(done + n);
        resolve();
      });
    };
    step(0);
  });
}

export function pwritev(fd: number, bufs: readonly Buffer[], pos: number): Promise<void> {
  return new Promise((resolve, reject) => {
    const step = (list: readonly Buffer[], p: number): void => {
      fs.writev(fd, list as Buffer[], p, (err, n) => {
        if (err) return reject(err);
        let left = n;
        let i = 0;
        while (i < list.length && left >= list[i]!.length) left -= list[i++]!.length;
        if (i === list.length) return resolve();
        const rest = list.slice(i);
        rest[0] = rest[0]!.subarray(left);
        step(rest, p + n);
      });
    };
    step(bufs, pos);
  });
}

export function fdatasync(fd: number): Promise<void> {
  return new Promise((resolve, reject) => fs.fdatasync(fd, (err) => (err ? reject(err) : resolve())));
}

export function ftruncate(fd: number, len: number): Promise<void> {
  return new Promise((resolve, reject) => fs.ftruncate(fd, len, (err) => (err ? reject(err) : resolve())));
}

export function closeFd(fd: number): Promise<void> {
  return new Promise((resolve, reject) => fs.close(fd, (err) => (err ? reject(err) : resolve())));
}

/** open(2) returning the raw descriptor (a FileHandle would close it when garbage-collected). */
export function openFd(path: string, flags: string): Promise<number> {
  return new Promise((resolve, reject) => fs.open(path, flags, (err, fd) => (err ? reject(err) : resolve(fd))));
}
