/** src/util/fs.ts: path containment and the log tail reader. */
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { containedPath, PathEscapeError, readTail } from '../../src/util/fs.js';

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(path.join(tmpdir(), 'vmsnap-utilfs-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe('readTail', () => {
  it('returns the last bytes of a file larger than asked, the whole of a smaller one, and "" for a missing one', async () => {
    const f = path.join(dir, 'log');
    const lines = Array.from({ length: 100_000 }, (_, i) => `line ${i}`).join('\n');
    await writeFile(f, lines);
    expect(await readTail(f, 20)).toBe(lines.slice(-20));
    expect(await readTail(f, 10 << 20)).toBe(lines);
    expect(await readTail(path.join(dir, 'absent'), 100)).toBe('');
  });
});

describe('containedPath', () => {
  it('joins inside the root and refuses anything that leaves it', () => {
    expect(containedPath(dir, 'a', 'b')).toBe(path.join(dir, 'a', 'b'));
    for (const bad of ['..', '../x', 'a/../../x', '/etc/passwd']) expect(() => containedPath(dir, bad)).toThrow(PathEscapeError);
  });
});
