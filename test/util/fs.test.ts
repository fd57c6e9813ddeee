/** src/util/fs.ts: path containment and the log tail reader. */
import { mkdtemp, rm, stat, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { assertInside, containedPath, createTempFile, mkdirPrivate, PathEscapeError, readTail } from '../../src/util/fs.js';

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

describe('createTempFile, mkdirPrivate, assertInside', () => {
  it('temp files are private under umask 000, random, and never replace what is there', async () => {
    const old = process.umask(0);
    try {
      const target = path.join(dir, 'tmp-target');
      const a = await createTempFile(target);
      const b = await createTempFile(target);
      expect(a.path).not.toBe(b.path);
      expect(path.dirname(a.path)).toBe(dir);
      expect((await stat(a.path)).mode & 0o777).toBe(0o600);
      await a.fh.close();
      await b.fh.close();
      await rm(a.path);
      await rm(b.path);
      const made = path.join(dir, 'p1', 'p2');
      await mkdirPrivate(made);
      expect((await stat(made)).mode & 0o777).toBe(0o700);
      expect((await stat(path.dirname(made))).mode & 0o777).toBe(0o700);
    } finally {
      process.umask(old);
    }
  });

  it('assertInside refuses a symlink out of the root, a dangling one, and accepts real folders', async () => {
    const root = path.join(dir, 'root');
    await mkdirPrivate(path.join(root, 'ok'));
    await symlink(tmpdir(), path.join(root, 'out'));
    await symlink(path.join(dir, 'nowhere'), path.join(root, 'dangling'));
    await assertInside(root, path.join(root, 'ok', 'not-yet'));
    await expect(assertInside(root, path.join(root, 'out', 'x'))).rejects.toThrow(/leads out of .* through a symbolic link/);
    await expect(assertInside(root, path.join(root, 'dangling'))).rejects.toThrow(PathEscapeError);
    await expect(assertInside(root, path.join(root, '..', 'x'))).rejects.toThrow(PathEscapeError);
  });
});
