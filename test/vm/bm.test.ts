/**
 * Acceptance: the bare-metal self-checking guest under KVM when this machine's KVM can run it (here
 * a software nested hypervisor that emulates every instruction: tiny workload, sparse stamps),
 * else under TCG: take, run on, restore; the guest resumes at the snapshot point with zero errors.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { kvmUsable } from '../../fixtures/guest/index.js';
import { VmLab, checkResumed, last } from '../helpers/vm.js';

describe('bare-metal guest: take, run on, restore', () => {
  let lab: VmLab;
  let kvm = false;
  let rate = 200;
  let sweepMs = 2000;

  beforeAll(async () => {
    kvm = await kvmUsable();
    lab = await VmLab.create('bm');
    if (kvm) await lab.createBmVm('b1', { accel: 'kvm', memMiB: 1, rate: 200, slowCpu: true });
    else {
      rate = 2000;
      sweepMs = 1000;
      await lab.createBmVm('b1', { accel: 'tcg', memMiB: 8, rate });
    }
    await lab.start('b1');
  }, 180_000);

  afterAll(async () => {
    await lab?.cleanup();
  });

  it('resumes at the snapshot point with zero errors', async () => {
    const accel = (await lab.show('b1')).status.accel;
    console.log(`bare-metal guest under ${accel} (kvmUsable: ${kvm}), rate ${rate} pages/s`);
    expect(accel).toBe(kvm ? 'kvm' : 'tcg');
    // At least one full verify sweep before the snapshot.
    const boot = await lab.waitFor('b1', (s) => s.length >= 2 && last(s).uptimeMs - s[0]!.uptimeMs >= sweepMs + 500, "boot and a full sweep", 150_000);
    expect(last(boot).errors).toBe(0);
    expect(last(boot).pages).toBeGreaterThan(0);

    const w = await lab.takeWindow('b1', ['-m', 'bm']);
    console.log(`take (bare-metal, ${accel}): guest paused ${w.take.pauseMs.toFixed(1)} ms (QEMU downtime ${w.take.qemuDowntimeMs} ms), total ${w.take.durationMs.toFixed(0)} ms, new ${w.take.newBytes} B, RAM ${w.take.ramBytes} B`);
    expect(w.take.pauseMs).toBeGreaterThan(0);
    expect(w.take.pauseMs).toBeLessThan(10_000);

    const on = await lab.waitFor('b1', (s) => last(s).gen > w.after.gen + rate, 'the guest to run on', 120_000);
    const beforeRestore = last(on);
    expect(beforeRestore.errors).toBe(0);

    const r = await lab.json<{ runState: string; loadMs?: number }>(['restore', 'b1', w.take.snapshot]);
    expect(r.runState).toBe('running');
    await lab.rememberPids('b1');
    const post = await lab.waitGuestTime("b1", 0, sweepMs + 1000, 150_000);
    checkResumed(`bare-metal restore (loaded in ${r.loadMs?.toFixed(0)} ms)`, w, post, { genMargin: rate * 1.5, diskMargin: 0 });
    expect(post[0]!.gen).toBeLessThan(beforeRestore.gen);
    expect(await lab.errorLines('b1')).toEqual([]);
  }, 300_000);
});
