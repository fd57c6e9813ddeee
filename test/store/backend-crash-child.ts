/**
 * Child process for the LocalBackend crash test: puts objects forever (packs, index, and overwrites
 * of config) and prints `done <kind> <name>` after each put resolves, until the parent SIGKILLs it.
 * Content is a deterministic function of the name so the parent can verify every object it finds.
 */
import { LocalBackend } from '../../src/store/backend/local.js';

/** Deterministic pseudo-random content of a name-dependent size (xorshift32 seeded from the name). */
export function expectedContent(name: string): Buffer {
  let seed = 2166136261;
  for (let i = 0; i < name.length; i++) seed = Math.imul(seed ^ name.charCodeAt(i), 16777619) >>> 0;
  const size = 128 * 1024 + (seed % (1536 * 1024));
  const buf = Buffer.allocUnsafe(size - (size % 4));
  let x = seed || 1;
  for (let i = 0; i < buf.length; i += 4) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    buf.writeUInt32LE(x, i);
  }
  return buf;
}

async function main(root: string, round: string): Promise<void> {
  const b = new LocalBackend(root);
  for (let i = 0; ; i++) {
    const name = `r${round}n${i}`;
    await b.put('packs', name, expectedContent(name));
    process.stdout.write(`done packs ${name}\n`);
    await b.put('index', name, expectedContent(`idx${name}`));
    process.stdout.write(`done index ${name}\n`);
    await b.put('config', 'config', expectedContent(`config${name}`));
    process.stdout.write(`done config config${name}\n`);
  }
}

if (process.env.VMSNAP_CRASH_CHILD === '1') {
  const [root, round] = process.argv.slice(2);
  if (!root || !round) throw new Error('usage: backend-crash-child.ts ROOT ROUND');
  void main(root, round);
}
