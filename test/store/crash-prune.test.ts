/**
 * Crash safety of prune: SIGKILL at every backend mutation of a prune that deletes a fully-garbage
 * pack, repacks a mostly-garbage one and replaces every index file (each mutation once in a seeded
 * mode — before, during or after it — plus seeded random points, 24 in all). Afterwards
 * `check --read-data` passes, the kept snapshots export bit-identically, and a re-run of prune
 * completes and leaves a repository with no problems at all. Reproduce with VMSNAP_CRASH_SEED=<seed>.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { cpSync } from 'node:fs';
import * as path from 'node:path';
import { ensureBuiltAsync, mixedImage, randomData, removeDir, tempDir, vmsnapOk } from '../helpers/cli.js';
import { cliCheckClean, countMutations, drive, image, killPoints, verify } from '../helpers/store-crash.js';

let work: string;

beforeAll(async () => {
  await ensureBuiltAsync();
  work = tempDir('vmsnap-crash-prune-');
}, 120_000);

afterAll(() => {
  if (work) removeDir(work);
});

describe('SIGKILL during prune', () => {
  it('loses nothing referenced, and a re-run of prune completes, at 24 kill points', { timeout: 600_000 }, async () => {
    // x is shared by p and q: forgetting p leaves p's pack 25 % live (repacked); forgetting r leaves
    // its pack fully garbage (deleted).
    const x = randomData(128 << 10, 21);
    const imgP = image(work, 'p.img', Buffer.concat([x, randomData(384 << 10, 22)]));
    const imgQ = image(work, 'q.img', Buffer.concat([x, mixedImage(256 << 10, 23)]));
    const imgR = image(work, 'r.img', randomData(256 << 10, 24));
    const imgS = image(work, 's.img', mixedImage(256 << 10, 25));

    const base = path.join(work, 'base');
    await vmsnapOk(base, ['init', '--chunk-size', '4096']);
    for (const [img, vm] of [[imgP, 'vm1'], [imgQ, 'vm1'], [imgR, 'vm2'], [imgS, 'vm3']] as const) await vmsnapOk(base, ['import', img, '--vm', vm]);
    await vmsnapOk(base, ['forget', '--vm', 'vm1', '--keep-last', '1']);
    await vmsnapOk(base, ['forget', '--vm', 'vm2', '--keep-tag', 'nothing-has-this']);
    const kept = await verify(base, [], new Map(), 'base after forget', true);
    expect([...kept.keys()].sort()).toEqual([imgQ, imgS].sort());

    const total = await countMutations(work, base, [['prune']]);
    // lock, repacked pack, new index, 4 old index deletes, 2 pack deletes, unlock
    expect(total).toBeGreaterThanOrEqual(8);
    const seed = Number(process.env.VMSNAP_CRASH_SEED ?? 20261126);

    for (const [i, p] of killPoints(seed, total, 24).entries()) {
      const ctx = `seed ${seed}, kill #${i} ${p.mode} mutation ${p.n}/${total}`;
      const repo = path.join(work, `r${i}`);
      cpSync(base, repo, { recursive: true });
      const run = await drive(repo, [['prune']], p.n, p.mode);
      expect(run.signal, `${ctx}: ${run.stderr}`).toBe('SIGKILL');
      await verify(repo, [], kept, ctx);
      if (i % 6 === 0) await cliCheckClean(repo, ctx);
      // The killed prune's lock belongs to a dead process: stale, so prune runs again, completes,
      // and leaves no unindexed pack, no damaged index, nothing.
      await verify(repo, [['prune']], kept, `${ctx}, after prune re-run`, true);
      removeDir(repo);
    }
  });
});
