/**
 * Crash safety: a vmsnap process SIGKILLed at a random backend operation (chosen by seed, so every
 * failure is reproducible) during import and during prune leaves a repository that
 *  - `vmsnap check --read-data` passes (warnings for unindexed packs are allowed),
 *  - exports every snapshot committed before the kill bit-identically (and any snapshot that the
 *    killed process managed to commit, too),
 *  - accepts the interrupted operation again: a re-run completes and everything still exports.
 *
 * The kill points are real: test/helpers/store-crash-child.ts runs the CLI's own command code and
 * kills itself before, during or after the Nth put/create/delete of the local backend.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { cpSync, writeFileSync } from 'node:fs';
import * as path from 'node:path';
import { PassThrough } from 'node:stream';
import { LocalBackend } from '../../src/store/backend/local.js';
import { Repository } from '../../src/store/repository.js';
import { exportStream } from '../../src/store/streams.js';
import { ensureBuilt, mixedImage, randomData, removeDir, rng, runNode, sha256, tempDir, vmsnap, vmsnapOk, ROOT } from '../helpers/cli.js';

const DRIVER = path.join(ROOT, 'test/helpers/store-crash-child.ts');
const MODES = ['before', 'during', 'after'] as const;
type Mode = (typeof MODES)[number];

let work: string;
/** image file -> sha256 of its content */
const expected = new Map<string, string>();

function image(name: string, data: Buffer): string {
  const file = path.join(work, name);
  writeFileSync(file, data);
  expected.set(file, sha256(data));
  return file;
}

async function drive(repo: string, commands: string[][], killAt: number | null, mode: Mode) {
  const r = await runNode(['--import', 'tsx', DRIVER], [JSON.stringify({ repo, commands, killAt, mode })]);
  return r;
}

async function countMutations(base: string, commands: string[][]): Promise<number> {
  const repo = path.join(work, `count-${Math.random().toString(16).slice(2)}`);
  cpSync(base, repo, { recursive: true });
  const r = await drive(repo, commands, null, 'before');
  removeDir(repo);
  expect(r.code, r.stderr).toBe(0);
  const last = r.stdout.trim().split('\n').pop()!;
  return (JSON.parse(last) as { mutations: number }).mutations;
}

/** Exports every snapshot in-process; returns snapshot id -> sha256 of the export, keyed by source. */
async function exportAll(repoDir: string): Promise<Map<string, { id: string; hash: string }[]>> {
  const repo = await Repository.open(new LocalBackend(repoDir), { workers: 1 });
  const out = new Map<string, { id: string; hash: string }[]>();
  try {
    for (const s of await repo.listSnapshots()) {
      const st = s.streams[0]!;
      const parts: Buffer[] = [];
      const pt = new PassThrough();
      pt.on('data', (b: Buffer) => parts.push(b));
      await exportStream(repo, st, { writable: pt });
      const source = String(s.meta.source);
      const list = out.get(source) ?? [];
      list.push({ id: s.id, hash: sha256(Buffer.concat(parts)) });
      out.set(source, list);
    }
  } finally {
    await repo.close();
  }
  return out;
}

/** `vmsnap check --read-data` through the CLI: exit 0 and no problem of severity error. */
async function checkClean(repo: string, context: string): Promise<void> {
  const r = await vmsnap(repo, ['--json', 'check', '--read-data']);
  const report = JSON.parse(r.stdout || '{}') as { problems?: { severity: string; message: string }[] };
  const errors = (report.problems ?? []).filter((p) => p.severity === 'error');
  expect(errors, `${context}: ${r.stderr}`).toEqual([]);
  expect(r.code, `${context}: ${r.stderr}`).toBe(0);
}

/** Every snapshot present exports exactly its source; every snapshot of `committed` is present. */
async function verifyExports(repo: string, committed: Map<string, string[]>, context: string): Promise<Map<string, string[]>> {
  const all = await exportAll(repo);
  const ids = new Map<string, string[]>();
  for (const [source, list] of all) {
    for (const { id, hash } of list) expect(hash, `${context}: snapshot ${id} of ${source}`).toBe(expected.get(source));
    ids.set(source, list.map((x) => x.id));
  }
  for (const [source, list] of committed) {
    for (const id of list) expect(ids.get(source) ?? [], `${context}: committed snapshot ${id} of ${source} is gone`).toContain(id);
  }
  return ids;
}

beforeAll(() => {
  ensureBuilt();
  work = tempDir('vmsnap-crash-');
}, 120_000);

afterAll(() => {
  if (work) removeDir(work);
});

describe('SIGKILL during import', () => {
  it('leaves a repository that checks clean and exports every committed snapshot, at 24 seeded kill points', async () => {
    const a = mixedImage(1 << 20, 11);
    const imgA = image('a.img', a);
    const b = Buffer.from(a);
    randomData(64 << 10, 5).copy(b, 256 << 10); // 16 changed 4 KiB blocks
    const imgB = image('b.img', b);
    const imgC = image('c.img', mixedImage(768 << 10, 12));
    const imgD = image('d.img', Buffer.concat([a.subarray(0, 512 << 10), randomData(512 << 10, 13)]));

    const base = path.join(work, 'import-base');
    await vmsnapOk(base, ['init', '--chunk-size', '4096']);
    await vmsnapOk(base, ['import', imgA, '--vm', 'vm1']);
    const committed = await verifyExports(base, new Map(), 'base');

    // The interrupted run: three imports in a row (like a nightly job), each with lock, pack, index,
    // manifest and unlock writes.
    const commands = [
      ['import', imgB, '--vm', 'vm1'],
      ['import', imgC, '--vm', 'vm2', '--tag', 'x'],
      ['import', imgD, '--vm', 'vm1'],
    ];
    const total = await countMutations(base, commands);
    expect(total).toBeGreaterThanOrEqual(12);

    const seed = Number(process.env.VMSNAP_CRASH_SEED ?? 20261125);
    const r = rng(seed);
    const points: { n: number; mode: Mode }[] = [];
    // Every mutation once with a random mode, then random ones up to 24.
    for (let n = 1; n <= total; n++) points.push({ n, mode: MODES[Math.floor(r() * 3)]! });
    while (points.length < 24) points.push({ n: 1 + Math.floor(r() * total), mode: MODES[Math.floor(r() * 3)]! });

    for (const [i, p] of points.entries()) {
      const ctx = `seed ${seed}, kill #${i} ${p.mode} mutation ${p.n}/${total}`;
      const repo = path.join(work, `import-${i}`);
      cpSync(base, repo, { recursive: true });
      const run = await drive(repo, commands, p.n, p.mode);
      expect(run.signal, `${ctx}: ${run.stderr}`).toBe('SIGKILL');
      await checkClean(repo, ctx);
      await verifyExports(repo, committed, ctx);
      // Every few points: the import runs again to completion on the crashed repository, then prune
      // collects what the crash left, and everything still checks and exports.
      if (i % 4 === 0) {
        const again = await drive(repo, commands, null, 'before');
        expect(again.code, `${ctx}: re-run: ${again.stderr}`).toBe(0);
        await vmsnapOk(repo, ['prune']);
        await checkClean(repo, `${ctx}, after re-run and prune`);
        const ids = await verifyExports(repo, committed, `${ctx}, after re-run and prune`);
        for (const c of commands) expect(ids.get(c[1]!)?.length ?? 0, ctx).toBeGreaterThan(0);
      }
      removeDir(repo);
    }
  });
});

describe('SIGKILL during prune', () => {
  it('loses nothing referenced, and a re-run of prune completes, at 24 seeded kill points', async () => {
    // x is shared by p and q; forgetting p leaves p's pack mostly garbage (repacked), forgetting
    // r leaves its pack fully garbage (deleted).
    const x = randomData(256 << 10, 21);
    const imgP = image('p.img', Buffer.concat([x, randomData(768 << 10, 22)]));
    const imgQ = image('q.img', Buffer.concat([x, mixedImage(512 << 10, 23)]));
    const imgR = image('r.img', randomData(512 << 10, 24));
    const imgS = image('s.img', mixedImage(512 << 10, 25));

    const base = path.join(work, 'prune-base');
    await vmsnapOk(base, ['init', '--chunk-size', '4096']);
    await vmsnapOk(base, ['import', imgP, '--vm', 'vm1']);
    await vmsnapOk(base, ['import', imgQ, '--vm', 'vm1']);
    await vmsnapOk(base, ['import', imgR, '--vm', 'vm2']);
    await vmsnapOk(base, ['import', imgS, '--vm', 'vm3']);
    const before = await verifyExports(base, new Map(), 'base');
    // Forget p (vm1 keeps q) and r (vm2 is forgotten entirely by a tag rule that matches nothing
    // there: keep-last 1 only for vm1, then r by id).
    await vmsnapOk(base, ['forget', '--vm', 'vm1', '--keep-last', '1']);
    const rId = before.get(imgR)![0]!;
    const rm = await vmsnap(base, ['forget', '--vm', 'vm2', '--keep-tag', 'nothing-has-this']);
    expect(rm.code, rm.stderr).toBe(0);
    const kept = await verifyExports(base, new Map(), 'base after forget');
    expect([...kept.keys()].sort()).toEqual([imgQ, imgS].sort());
    expect(kept.has(imgR), `snapshot ${rId} should be forgotten`).toBe(false);

    const commands = [['prune']];
    const total = await countMutations(base, commands);
    expect(total).toBeGreaterThanOrEqual(6);

    const seed = Number(process.env.VMSNAP_CRASH_SEED ?? 20261126);
    const r = rng(seed);
    const points: { n: number; mode: Mode }[] = [];
    for (let n = 1; n <= total; n++) for (const mode of MODES) points.push({ n, mode });
    while (points.length < 24) points.push({ n: 1 + Math.floor(r() * total), mode: MODES[Math.floor(r() * 3)]! });

    for (const [i, p] of points.entries()) {
      const ctx = `seed ${seed}, kill #${i} ${p.mode} mutation ${p.n}/${total}`;
      const repo = path.join(work, `prune-${i}`);
      cpSync(base, repo, { recursive: true });
      const run = await drive(repo, commands, p.n, p.mode);
      expect(run.signal, `${ctx}: ${run.stderr}`).toBe('SIGKILL');
      await checkClean(repo, ctx);
      await verifyExports(repo, kept, ctx);
      // The killed prune left a lock of a dead process: it is stale, so prune runs again.
      const again = await vmsnap(repo, ['prune']);
      expect(again.code, `${ctx}: prune re-run: ${again.stderr}`).toBe(0);
      await checkClean(repo, `${ctx}, after prune re-run`);
      await verifyExports(repo, kept, `${ctx}, after prune re-run`);
      // And once more: a prune after a complete prune has nothing left to delete.
      const third = await vmsnapOk(repo, ['--json', 'prune']);
      expect((JSON.parse(third.stdout) as { packsDeleted: number }).packsDeleted, ctx).toBe(0);
      removeDir(repo);
    }
  });
});
