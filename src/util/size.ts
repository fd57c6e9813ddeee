/** Sizes typed by users: "4G", "512M", "1048576", "64KiB" (binary multiples). */
import { BadInputError } from './errors.js';

export class SizeError extends BadInputError {
  override readonly name = 'SizeError';
}

const SIZE_RE = /^(\d+)\s*([KMGT]?)(i?B)?$/i;
const MULT = { '': 1, K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40 } as const;

export function parseSize(text: string, what = 'size'): number {
  const m = SIZE_RE.exec(text.trim());
  if (!m) throw new SizeError(`invalid ${what} ${JSON.stringify(text)}: use a number with an optional K, M, G or T suffix (4G, 512M, 1048576)`);
  const n = Number(m[1]) * MULT[m[2]!.toUpperCase() as keyof typeof MULT];
  if (!Number.isSafeInteger(n) || n <= 0) throw new SizeError(`invalid ${what} ${JSON.stringify(text)}`);
  return n;
}
