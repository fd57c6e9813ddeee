/**
 * Issue 12, repository siblings through the compiled CLI: an import stopped by Ctrl-C (SIGINT) or
 * SIGTERM releases its lock; a damaged manifest is listed as damaged by `ls`, kept (and named) by
 * `forget`, reported by `check`; leftovers of a killed put are reported by `check`.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { mkdirSync, readdirSync, writeFileSync } from 'node:fs';
import * as path from 'node:path';
import { cliEntry, ensureBuiltAsync, randomData, removeDir, repoFiles, tempDir, vmsnap, vmsnapOk } from '../helpers/cli.js';

let dir: string;
beforeAll(async () => {
  await ensureBuiltAsync();
  dir = tempDir('vmsnap-integrity-');
}, 120_000);
afterAll(() => removeDir(dir));

describe('signals release locks', () => {
  for (const sig of ['SIGINT', 'SIGTERM'] as const) {
    it(`an import from stdin stopped by ${sig} leaves no lock, and prune runs right after`, async () => {
      const repo = path.join(dir, `sig-${sig}`);
      await vmsnapOk(repo, ['init']);
      const child = spawn(process.execPath, [cliEntry(), '--repo', repo, 'import', '-', '--vm', 'v'], { stdio: ['pipe', 'ignore', 'pipe'] });
      // The child dies with part of this still in the pipe: that EPIPE is expected, not a failure.
      child.stdin.on('error', () => undefined);
      child.stdin.write(randomData(1 << 20, 7)); // stdin stays open: the import waits for more
      for (let i = 0; i < 300 && repoFiles(repo, 'locks').length === 0; i++) await new Promise((r) => setTimeout(r, 20));
      expect(repoFiles(repo, 'locks')).toHaveLength(1);
      const exited = once(child, 'exit');
      child.kill(sig);
      const [code, signal] = (await exited) as [number | null, string | null];
      expect(signal).toBe(sig); // it still dies of the signal, as without the handler
      expect(code).toBeNull();
      expect(repoFiles(repo, 'locks')).toEqual([]);
      await vmsnapOk(repo, ['prune']);
    }, 60_000);
  }
});

describe('a damaged manifest', () => {
  it('is listed as damaged by ls, kept and named by forget, reported by check', async () => {
    const repo = path.join(dir, 'damaged');
    const img = path.join(dir, 'img');
    await vmsnapOk(repo, ['init']);
    for (let i = 0; i < 3; i++) {
      writeFileSync(img, randomData(200_000, 10 + i));
      await vmsnapOk(repo, ['import', img, '--vm', 'v']);
      await new Promise((r) => setTimeout(r, 10));
    }
    const names = () => repoFiles(repo, 'snapshots').map((f) => path.basename(f));
    const [badFile] = repoFiles(repo, 'snapshots');
    const bad = path.basename(badFile!);
    writeFileSync(badFile!, 'not a manifest');
    const ls = await vmsnap(repo, ['ls']);
    expect(ls.code).toBe(0);
    expect(ls.stdout).toMatch(new RegExp(`${bad.slice(0, 12)}\\s+DAMAGED`));
    expect(ls.stdout.split('\n').filter((l) => / v /.test(l))).toHaveLength(2);
    const forget = await vmsnap(repo, ['forget', '--keep-last', '1']);
    expect(forget.code).toBe(0);
    expect(forget.stderr).toMatch(new RegExp(`skipped snapshot ${bad.slice(0, 12)}: its manifest is damaged`));
    expect(names()).toContain(bad);
    expect(names()).toHaveLength(2); // the newest readable one and the damaged one
    const chk = await vmsnap(repo, ['check']);
    expect(chk.code).toBe(3);
    expect(chk.stdout).toMatch(new RegExp(`snapshot ${bad.slice(0, 12)}: manifest unreadable`));
  }, 60_000);
});

describe('leftovers of a killed put', () => {
  it('check reports the temp file a killed pack upload left; prune keeps it while young', async () => {
    const repo = path.join(dir, 'leftovers');
    await vmsnapOk(repo, ['init']);
    // What atomicWriteFile leaves when its process is killed before the rename: a `.tmp-` file in
    // the pack's fan-out directory (32 MiB for a whole pack; the size does not matter here).
    mkdirSync(path.join(repo, 'packs', 'ab'), { recursive: true });
    writeFileSync(path.join(repo, 'packs', 'ab', '.tmp-ab12-killed'), randomData(100_000, 3));
    const chk = await vmsnap(repo, ['check']);
    expect(chk.code).toBe(0); // a warning, not an error
    expect(chk.stdout).toMatch(/warning: 1 leftover temp file\(s\) of interrupted writes \(100000 bytes/);
    await vmsnapOk(repo, ['prune']);
    expect(readdirSync(path.join(repo, 'packs', 'ab'))).toEqual(['.tmp-ab12-killed']); // young: maybe a live put
  }, 60_000);
});
