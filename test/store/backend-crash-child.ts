/**
 * Child process for the LocalBackend crash test: puts objects forever (packs, index, and overwrites
 * of config) and prints `done <kind> <name>` after each put resolves, until the parent SIGKILLs it.
 * Content is a deterministic function of the name so the parent can verify every object it finds.
 */
import { promises as fsp } from 'node:fs';
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
    // `start` is printed once the content is ready, so a kill triggered by it lands inside the put.
    const pack = expectedContent(name);
    process.stdout.write(`start packs ${name}\n`);
    await b.put('packs', name, pack);
    process.stdout.write(`done packs ${name}\n`);
    const idx = expectedContent(`idx${name}`);
    process.stdout.write(`start index ${name}\n`);
    await b.put('index', name, idx);
    process.stdout.write(`done index ${name}\n`);
    const cfg = expectedContent(`config${name}`);
    process.stdout.write(`start config config${name}\n`);
    await b.put('config', 'config', cfg);
    process.stdout.write(`done config config${name}\n`);
  }
}

/**
 * With VMSNAP_CRASH_AT_PUBLISH=N the child kills itself at its N-th publish (rename or link of a
 * complete, fsynced temp file): a crash at the one point where a torn put is guaranteed to exist.
 */
function crashAtPublish(n: number): void {
  let calls = 0;
  const die = (): never => {
    process.kill(process.pid, 'SIGKILL');
    throw new Error('unreachable');
  };
  const { rename, link } = fsp;
  fsp.rename = async (...args: Parameters<typeof rename>) => (++calls >= n ? die() : rename(...args));
  fsp.link = async (...args: Parameters<typeof link>) => (++calls >= n ? die() : link(...args));
}

if (process.env.VMSNAP_CRASH_CHILD === '1') {
  const at = Number(process.env.VMSNAP_CRASH_AT_PUBLISH ?? 0);
  if (at > 0) crashAtPublish(at);
  const [root, round] = process.argv.slice(2);
  if (!root || !round) throw new Error('usage: backend-crash-child.ts ROOT ROUND');
  void main(root, round);
}
