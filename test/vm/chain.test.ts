/**
 * Acceptance: a chain of 5 live snapshots with guest changes in between, each restored and verified
 * by the guest itself (modelled on Firecracker's test_5_snapshots: snapshot, restore, run on, take the
 * next snapshot from the restored VM), then the oldest restored again at the end of the chain. Each
 * snapshot after the first is incremental: it stores only what changed, far less than the first.
 *
 * The guest rewrites only 20 pages/s (scattered, so each rewrite can touch a different 64 KiB chunk)
 * and ~100 disk records/s: the changes between snapshots are a few MiB against the ~100 MiB the
 * first snapshot must store.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { VmLab, checkResumed, last, type TakeWindow } from '../helpers/vm.js';

const RATE = 20;
const DISK_RATE = 100;
const MARGINS = { genMargin: RATE * 1.5, diskMargin: DISK_RATE * 1.5 };

describe('Linux guest (TCG): a chain of 5 snapshots', () => {
  let lab: VmLab;

  beforeAll(async () => {
    lab = await VmLab.create('chain');
    await lab.createLinuxVm('c1', { rate: RATE });
    await lab.start('c1');
  });

  afterAll(async () => {
    await lab?.cleanup();
  });

  it('takes 5 snapshots with changes in between, restores and verifies each; increments are small', async () => {
    await lab.waitFor('c1', (s) => s.length >= 2 && last(s).diskSeq > 0 && last(s).uptimeMs - s[0]!.uptimeMs >= 1500, 'boot');
    const windows: TakeWindow[] = [];
    for (let i = 1; i <= 5; i++) {
      // Changes since the previous snapshot (or boot): memory pages and disk records.
      const from = last(await lab.statuses('c1'));
      await lab.waitFor('c1', (s) => last(s).gen >= from.gen + RATE * 1.5 && last(s).diskSeq >= from.diskSeq + DISK_RATE, `changes before snapshot ${i}`);
      const w = await lab.takeWindow('c1', ['-m', `chain ${i}`, '--tag', `s${i}`]);
      windows.push(w);
      console.log(`snapshot ${i} ${w.take.snapshot.slice(0, 12)}: guest paused ${w.take.pauseMs.toFixed(1)} ms, new ${w.take.newBytes} B, stored ${w.take.storedBytes} B, took ${w.take.durationMs.toFixed(0)} ms`);
      expect(w.take.parent).toBe(i === 1 ? null : windows[i - 2]!.take.snapshot);

      // Run on past the snapshot, then go back to it.
      await lab.waitFor('c1', (s) => last(s).gen > w.after.gen + RATE && last(s).diskSeq > w.after.diskSeq + DISK_RATE / 2, `the guest to run on after snapshot ${i}`);
      const r = await lab.json<{ runState: string; loadMs?: number }>(['restore', 'c1', w.take.snapshot]);
      expect(r.runState).toBe('running');
      await lab.rememberPids('c1');
      const post = await lab.waitGuestTime('c1', 0, 1600);
      checkResumed(`restore of snapshot ${i} (loaded in ${r.loadMs?.toFixed(0)} ms)`, w, post, MARGINS);
      expect(await lab.errorLines('c1')).toEqual([]);
    }

    // The oldest snapshot is still whole after four incremental ones were built on it.
    const w1 = windows[0]!;
    await lab.ok(['restore', 'c1', w1.take.snapshot]);
    const post = await lab.waitGuestTime('c1', 0, 1600);
    checkResumed('restore of snapshot 1 after the chain', w1, post, MARGINS);
    expect(await lab.errorLines('c1')).toEqual([]);

    const firstNew = w1.take.newBytes;
    const rest = windows.slice(1).map((w) => w.take.newBytes);
    console.log(`new bytes: snapshot 1 ${firstNew}; snapshots 2..5 ${rest.join(', ')} (${rest.map((b) => ((100 * b) / firstNew).toFixed(1) + '%').join(', ')} of the first)`);
    expect(firstNew).toBeGreaterThan(64 << 20); // the stamped 64 MiB workload area at least
    for (const b of rest) {
      expect(b).toBeGreaterThan(0);
      expect(b).toBeLessThan(firstNew / 4);
    }

    const ls = await lab.json<{ id: string }[]>(['ls']);
    expect(ls.map((s) => s.id).sort()).toEqual(windows.map((w) => w.take.snapshot).sort());
    const check = await lab.run(['check']);
    expect(check.code, check.stderr).toBe(0);
  });
});
