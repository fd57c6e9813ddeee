/**
 * Acceptance: live snapshot and restore of the self-checking Linux guest (TCG), and a clone running
 * beside its original. The guest proves its own state: `gen` (memory write generation) and
 * `disk_seq` (last completed disk record) continue from the snapshot point and it reports no
 * memory or disk errors after full verify sweeps.
 *
 * What is provable about the snapshot point S (a generation): the last status printed before `take`
 * started has gen <= S, and the first printed after `take` returned has gen >= S. After a restore the
 * guest's first status line comes at most one status period (+ one 1 s catch-up tick, the
 * workload's cap) of guest time after S.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { VmLab, checkResumed, last, type TakeWindow } from '../helpers/vm.js';

const RATE = 2000; // pages per second
const DISK_RATE = 100; // records per second (the workload's default)
// Guest time between S and the first status after a restore: <= 0.2 s period + a 1 s catch-up cap.
const MARGINS = { genMargin: RATE * 1.5, diskMargin: DISK_RATE * 1.5 };

describe('Linux guest (TCG): take, run on, restore; clone beside the original', () => {
  let lab: VmLab;
  let window: TakeWindow;

  beforeAll(async () => {
    lab = await VmLab.create('linux');
    await lab.createLinuxVm('g1', { rate: RATE });
    await lab.start('g1');
  });

  afterAll(async () => {
    await lab?.cleanup();
  });

  it('restores the guest to the snapshot point with zero memory and disk errors', async () => {
    // Booted, disk workload going, at least one full verify sweep done.
    const boot = await lab.waitFor('g1', (s) => s.length >= 2 && last(s).diskSeq > 0 && last(s).uptimeMs - s[0]!.uptimeMs >= 1500, 'boot');
    expect(last(boot).errors).toBe(0);
    expect(last(boot).diskErrors).toBe(0);

    window = await lab.takeWindow('g1', ['-m', 'e2e']);
    const t = window.take;
    console.log(`take (Linux, TCG, 256M): guest paused ${t.pauseMs.toFixed(1)} ms (QEMU downtime ${t.qemuDowntimeMs} ms), total ${t.durationMs.toFixed(0)} ms, new ${t.newBytes} B, stored ${t.storedBytes} B, RAM ${t.ramBytes} B`);
    expect(t.pauseMs).toBeGreaterThan(0);
    expect(t.pauseMs).toBeLessThan(5000);
    expect(t.ramBytes).toBeGreaterThanOrEqual(256 * 1024 * 1024);
    expect(window.after.gen).toBeGreaterThanOrEqual(window.before.gen);

    // The guest runs on: memory and disk move well past the snapshot point.
    const on = await lab.waitFor(
      'g1',
      (s) => last(s).gen > window.after.gen + RATE * 4 && last(s).diskSeq > window.after.diskSeq + DISK_RATE * 2,
      'the guest to run on after take',
    );
    const beforeRestore = last(on);
    expect(beforeRestore.errors).toBe(0);
    expect(beforeRestore.diskErrors).toBe(0);

    const r = await lab.json<{ snapshot: string; runState: string; loadMs?: number }>(['restore', 'g1', t.snapshot]);
    console.log(`restore: ${r.runState}, loaded in ${r.loadMs?.toFixed(0)} ms`);
    expect(r.runState).toBe('running');
    await lab.rememberPids('g1');
    // The console log was truncated by the new QEMU: every line in it is post-restore.
    const post = await lab.waitGuestTime('g1', 0, 2500);
    checkResumed('restore', window, post, MARGINS);
    expect(last(post).diskSeq).toBeGreaterThan(post[0]!.diskSeq);
    // It really went back: the guest had run past this point before the restore.
    expect(post[0]!.gen).toBeLessThan(beforeRestore.gen);
    expect(post[0]!.diskSeq).toBeLessThan(beforeRestore.diskSeq);
    expect(await lab.errorLines('g1')).toEqual([]);
    expect((await lab.show('g1')).lastSnapshot).toBe(t.snapshot);
  });

  it('runs a clone beside its original; both report zero errors', async () => {
    expect(window, 'needs the snapshot of the previous test').toBeDefined();
    const c = await lab.json<{ vm: string; snapshot: string; started: boolean }>(['clone', window.take.snapshot, 'g1-clone']);
    lab.adopt('g1-clone');
    expect(c.started).toBe(true);
    await lab.rememberPids('g1-clone');
    const origFrom = (await lab.statuses('g1')).length;
    const clone = await lab.waitGuestTime('g1-clone', 0, 2500);
    checkResumed('clone', window, clone, MARGINS);
    const orig = await lab.waitFor('g1', (s) => s.length > origFrom + 3, 'the original to run on beside its clone');
    const o = orig.slice(origFrom);
    console.log(`original beside clone: gen ${o[0]!.gen}..${last(o).gen}, errors ${last(o).errors}, disk_errors ${last(o).diskErrors}`);
    for (const s of o) {
      expect(s.errors).toBe(0);
      expect(s.diskErrors).toBe(0);
    }
    expect(last(o).gen).toBeGreaterThan(o[0]!.gen);
    expect(await lab.errorLines('g1-clone')).toEqual([]);
    expect(await lab.errorLines('g1')).toEqual([]);
    const both = await lab.json<{ name: string; state: string }[]>(['vm', 'ls']);
    expect(both.map((v) => [v.name, v.state]).sort()).toEqual([['g1', 'running'], ['g1-clone', 'running']]);
    // Two QEMUs, two consoles.
    const [a, b] = [await lab.show('g1'), await lab.show('g1-clone')];
    expect(a.status.pid).not.toBe(b.status.pid);
  });
});
