/**
 * Issue 12, crash tests in the kill-point style for the VM path: kill -9 of a VM's supervisor at
 * seeded points during a live `take` (before the pause, inside it, while RAM streams, while disks
 * and the manifest are written). After each kill:
 *  - QEMU is gone within seconds (it dies with its supervisor: two guests never write one disk);
 *  - every snapshot listed is whole: `check --read-data` finds no error, and `prune` runs (the
 *    dead take's lock does not block it) and leaves the repository checking clean;
 *  - `vm start` brings the guest back from its disk, and it reports zero memory and disk errors.
 * At the end a take succeeds and the guest keeps reporting zero errors.
 * The Linux fixture guest (TCG) writes its disk as it runs, so the disks have dirty data to store.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { rng } from '../helpers/cli.js';
import { VmLab, alive, last, sleep } from '../helpers/vm.js';

const KILLS = 6;
const random = rng(0x6d2b79f5);
const rnd = (n: number): number => Math.floor(random() * n);

describe('kill -9 of the supervisor during take', () => {
  let lab: VmLab;

  beforeAll(async () => {
    lab = await VmLab.create('takekill');
    await lab.createLinuxVm('t1', { rate: 2000, diskRate: 200 });
  }, 180_000);

  afterAll(async () => {
    await lab?.cleanup();
  });

  it(`leaves a repository that checks clean and a VM that starts and snapshots, at ${KILLS} seeded kill points`, async () => {
    const booted = () => lab.waitFor('t1', (s) => s.length >= 2 && last(s).errors === 0 && last(s).diskErrors === 0, 'boot with zero errors');
    const outcomes: string[] = [];
    // One whole take first: its duration spreads the kill points over a take's life and a little
    // past it (the pause, the RAM stream, the disks, the commit, and sometimes after completion).
    await lab.start('t1');
    await booted();
    const t0 = Date.now();
    await lab.ok(['take', 't1', '-m', 'whole']);
    const takeMs = Date.now() - t0;
    await lab.ok(['vm', 'stop', 't1']);
    for (let k = 0; k < KILLS; k++) {
      await lab.start('t1');
      await booted();
      const { supervisor, qemu } = await lab.rememberPids('t1');
      expect(supervisor).toBeGreaterThan(0);
      const take = lab.run(['take', 't1', '-m', `kill ${k}`]);
      const delay = rnd(Math.round(takeMs * 1.2));
      await sleep(delay);
      process.kill(supervisor!, 'SIGKILL');
      const r = await take;
      outcomes.push(`${delay} ms: ${r.code === 0 ? 'take completed first' : 'take failed'}`);
      if (r.code !== 0) expect(r.stderr, 'a clear error, not a stack').not.toMatch(/^\s+at /m);

      const deadline = Date.now() + 10_000;
      while (qemu && alive(qemu) && Date.now() < deadline) await sleep(50);
      expect(qemu && alive(qemu), `QEMU ${qemu} outlived its supervisor`).toBe(false);
      expect(lab.qemuPids('t1')).toEqual([]);

      const check = await lab.run(['check', '--read-data']);
      expect(check.code, `check after kill ${k} (${delay} ms): ${check.stdout}${check.stderr}`).toBe(0);
      const prune = await lab.run(['prune']);
      expect(prune.code, `prune after kill ${k}: ${prune.stderr}`).toBe(0);
      const again = await lab.run(['check', '--read-data']);
      expect(again.code, `check after prune ${k}: ${again.stdout}${again.stderr}`).toBe(0);
    }
    console.log(`a whole take: ${takeMs} ms; kill points: ${outcomes.join('; ')}`);

    await lab.start('t1');
    await booted();
    const w = await lab.takeWindow('t1', ['-m', 'after the kills']);
    expect(w.take.snapshot).toMatch(/^[0-9a-f]{64}$/);
    const s = await lab.waitLines('t1', (await lab.statuses('t1')).length + 2);
    expect(last(s).errors).toBe(0);
    expect(last(s).diskErrors).toBe(0);
    const check = await lab.run(['check', '--read-data']);
    expect(check.code, check.stdout + check.stderr).toBe(0);
  }, 600_000);
});
