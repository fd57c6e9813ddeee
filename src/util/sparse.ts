/**
 * Where a file's data is: its data extents by SEEK_DATA/SEEK_HOLE, from the native helper
 * src/util/native/data-extents.c (Node has no lseek). Used by import to skip holes.
 */
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { nativeHelper } from './project.js';

/** A byte range of a file that holds data (everything outside such ranges reads as zeros). */
export interface Extent {
  offset: number;
  length: number;
}

const run = promisify(execFile);

/**
 * The data extents of the regular file at `path` if `size` still matches, or undefined when they
 * cannot be had (helper not built, an error): the caller then reads the whole file, which is
 * always correct. Extents are clipped to `size`.
 */
export async function dataExtents(path: string, size: number): Promise<Extent[] | undefined> {
  const helper = nativeHelper('data-extents');
  if (!helper) return undefined;
  let stdout: string;
  try {
    ({ stdout } = await run(helper, [path], { maxBuffer: 64 << 20 }));
  } catch {
    return undefined;
  }
  return parseExtents(stdout, size);
}

/** Parses the helper's output; undefined when it is malformed or describes another size. */
export function parseExtents(text: string, size: number): Extent[] | undefined {
  const out: Extent[] = [];
  let end = -1;
  let last = 0;
  for (const line of text.split('\n')) {
    if (line === '') continue;
    const m = /^(\d+) (\d+)$/.exec(line);
    if (m) {
      const offset = Number(m[1]);
      const length = Number(m[2]);
      if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < last || length <= 0) return undefined;
      out.push({ offset, length });
      last = offset + length;
      continue;
    }
    const e = /^end (\d+)$/.exec(line);
    if (!e) return undefined;
    end = Number(e[1]);
  }
  if (end !== size || last > size) return undefined;
  return out;
}
