/**
 * Acceptance (issue 13): a take never leaves the guest paused while QEMU's migration setup runs —
 * checked by the order of events, not by timing. QEMU's setup of a background snapshot (populating
 * and write-protecting all of guest RAM) took seconds on a fresh 1 GiB QEMU, and a take that paused
 * the guest before `migrate` held it paused through all of it, on the first take after start most
 * of all. Now QEMU pauses the guest itself after its setup and vmsnap cuts the disks at that stop
 * (src/vm/stop-point-cut.ts).
 *
 * Two witnesses: the take's own timeline (--json), and a second, listen-only QMP monitor of the
 * test's own that sees QEMU's MIGRATION/STOP/RESUME events independently of vmsnap. The first take
 * after `vm start` and the one after it are both checked. Consistency of the cut itself (disk and
 * RAM from the same instant) is what test/vm/linux.test.ts proves with the self-checking guest.
 */
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { QmpClient, type QmpEvent } from '../../src/hypervisor/qmp.js';
import { eventTimeMs } from '../../src/hypervisor/qmp.js';
import { VmLab, last, type TakeJson } from '../helpers/vm.js';

describe('take: the guest is paused only after QEMU has finished its migration setup', () => {
  let lab: VmLab;
  let monitor: QmpClient;
  const seen: QmpEvent[] = [];

  beforeAll(async () => {
    lab = await VmLab.create('take-order');
    const sock = path.join(lab.root, 'events.sock');
    await lab.createLinuxVm('g', {
      rate: 2000,
      qemuArgs: ['-chardev', `socket,id=testqmp,path=${sock},server=on,wait=off`, '-mon', 'chardev=testqmp,mode=control'],
    });
    await lab.start('g');
    monitor = await QmpClient.connect(sock, { timeoutMs: 30_000 });
    monitor.events.on('event', (e: QmpEvent) => seen.push(e));
  });

  afterAll(async () => {
    monitor?.close();
    await lab?.cleanup();
  });

  const order = (t: TakeJson): string[] => t.timeline.map((e) => `${e.by}:${e.what}`);
  const at = (t: TakeJson, what: string): number => {
    const e = t.timeline.find((x) => x.what === what);
    expect(e, `${what} in the timeline: ${order(t).join(', ')}`).toBeDefined();
    return e!.at;
  };

  for (const which of ['first take after start', 'second take']) {
    it(which, async () => {
      // Booted, disk workload going: the guest is really writing memory and disk.
      await lab.waitFor('g', (s) => s.length >= 2 && last(s).diskSeq > 0, 'boot');
      const from = seen.length;
      const t = await lab.json<TakeJson>(['take', 'g']);
      const mine = seen.slice(from);
      console.log(`${which}: paused ${t.pauseMs.toFixed(1)} ms (${t.pauseSource}), setup ${t.setupMs?.toFixed(1)} ms, save ${t.saveMs?.toFixed(0)} ms | ${order(t).join(', ')}`);

      expect(t.pauseSource).toBe('qemu-events');
      expect(t.setupInPause).toBe(false);
      // vmsnap never paused the guest itself.
      expect(order(t)).not.toContain('vmsnap:stop sent');
      expect(order(t)).not.toContain('vmsnap:cont sent');
      // migrate → QEMU's setup done (MIGRATION active) → STOP → RESUME → disks cut → RAM saved.
      const steps = ['migrate sent', 'migration setup', 'migration active', 'STOP', 'RESUME', 'disks cut', 'RAM and device state saved'];
      const times = steps.map((s) => at(t, s));
      for (let i = 1; i < steps.length; i++) expect(times[i], `${steps[i - 1]} before ${steps[i]}`).toBeGreaterThanOrEqual(times[i - 1]! - 0.001);

      // The independent monitor saw exactly one pause, after QEMU reported its setup done.
      const names = mine.map((e) => (e.event === 'MIGRATION' ? `MIGRATION ${String(e.data.status)}` : e.event));
      const stops = mine.filter((e) => e.event === 'STOP');
      const resumes = mine.filter((e) => e.event === 'RESUME');
      expect(stops.length, names.join(', ')).toBe(1);
      expect(resumes.length, names.join(', ')).toBe(1);
      const active = mine.find((e) => e.event === 'MIGRATION' && e.data.status === 'active');
      expect(active, names.join(', ')).toBeDefined();
      expect(names.indexOf('MIGRATION active')).toBeLessThan(names.indexOf('STOP'));
      expect(eventTimeMs(active!)).toBeLessThanOrEqual(eventTimeMs(stops[0]!));
      expect(eventTimeMs(resumes[0]!)).toBeGreaterThanOrEqual(eventTimeMs(stops[0]!));
      // vmsnap reports the same pause QEMU's events show.
      expect(t.pauseMs).toBeCloseTo(eventTimeMs(resumes[0]!) - eventTimeMs(stops[0]!), 1);

      // The guest runs on with no memory or disk errors.
      const before = last(await lab.statuses('g'));
      const on = await lab.waitFor('g', (s) => last(s).gen > before.gen && last(s).diskSeq > before.diskSeq, 'the guest to run on');
      expect(last(on).errors).toBe(0);
      expect(last(on).diskErrors).toBe(0);
    });
  }
});
