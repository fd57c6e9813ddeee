/**
 * Crash safety of import: a vmsnap process SIGKILLed at a seeded backend mutation (before, during or
 * after the Nth put/create/delete; test/helpers/store-crash-child.ts runs the CLI's own command
 * code) leaves a repository that `check --read-data` passes (warnings for unindexed packs allowed),
 * where every snapshot committed before the kill — and any the killed run managed to commit —
 * exports bit-identically, and where the import runs again and prune cleans up after it.
 * The prune half is in crash-prune.test.ts. Reproduce a failure with VMSNAP_CRASH_SEED=<seed>.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { cpSync } from 'node:fs';
import * as path from 'node:path';
import { ensureBuiltAsync, mixedImage, randomData, removeDir, tempDir, vmsnapOk } from '../helpers/cli.js';
import { cliCheckClean, countMutations, drive, image, killPoints, verify } from '../helpers/store-crash.js';

let work: string;

beforeAll(async () => {
  await ensureBuiltAsync();
  work = tempDir('vmsnap-crash-');
}, 120_000);

afterAll(() => {
  if (work) removeDir(work);
});

describe('SIGKILL during import', () => {
  it('leaves a repository that checks clean and exports every committed snapshot, at 24 seeded kill points', { timeout: 600_000 }, async () => {
    const a = mixedImage(768 << 10, 11);
    const imgA = image(work, 'a.img', a);
    const b = Buffer.from(a);
    randomData(64 << 10, 5).copy(b, 256 << 10); // 16 changed 4 KiB blocks
    const imgB = image(work, 'b.img', b);
    const imgC = image(work, 'c.img', mixedImage(512 << 10, 12));
    const imgD = image(work, 'd.img', Buffer.concat([a.subarray(0, 256 << 10), randomData(256 << 10, 13)]));

    const base = path.join(work, 'base');
    await vmsnapOk(base, ['init', '--chunk-size', '4096']);
    await vmsnapOk(base, ['import', imgA, '--vm', 'vm1']);
    const committed = await verify(base, [], new Map(), 'base', true);

    // The interrupted run: three imports in a row (a nightly job), each writing a lock, a pack, an
    // index file and a manifest, and deleting its lock.
    const commands = [
      ['import', imgB, '--vm', 'vm1'],
      ['import', imgC, '--vm', 'vm2', '--tag', 'x'],
      ['import', imgD, '--vm', 'vm1'],
    ];
    const total = await countMutations(work, base, commands);
    expect(total).toBeGreaterThanOrEqual(12);
    const seed = Number(process.env.VMSNAP_CRASH_SEED ?? 20261125);

    let reportedBeforeKill = 0;
    for (const [i, p] of killPoints(seed, total, 24).entries()) {
      const ctx = `seed ${seed}, kill #${i} ${p.mode} mutation ${p.n}/${total}`;
      const repo = path.join(work, `r${i}`);
      cpSync(base, repo, { recursive: true });
      const run = await drive(repo, commands, p.n, p.mode);
      expect(run.signal, `${ctx}: ${run.stderr}`).toBe('SIGKILL');
      const ids = await verify(repo, [], committed, ctx);
      // An import of the interrupted run that reported its snapshot saved before the kill is
      // committed too: it must survive (stdout is a pipe, written synchronously, so the line is
      // out only if the save had finished).
      const all = [...ids.values()].flat();
      for (const m of run.stdout.matchAll(/snapshot ([0-9a-f]{12}) saved/g)) {
        reportedBeforeKill++;
        expect(all.some((id) => id.startsWith(m[1]!)), `${ctx}: snapshot ${m[1]} was reported saved before the kill and is gone`).toBe(true);
      }
      if (i % 6 === 0) await cliCheckClean(repo, ctx);
      // Every few points: the imports run again to completion on the crashed repository, prune
      // collects what the crash left (and its stale lock does not block anything), and then the
      // repository is spotless and everything exports.
      if (i % 4 === 0) {
        const ids = await verify(repo, [...commands, ['prune']], committed, `${ctx}, after re-run and prune`, true);
        for (const c of commands) expect(ids.get(c[1]!)?.length ?? 0, ctx).toBeGreaterThan(0);
      }
      removeDir(repo);
    }
    // The kill points fall after some imports finished: the check above did look at some.
    expect(reportedBeforeKill).toBeGreaterThan(0);
  });
});
