/**
 * Acceptance (issue 11, guest agent): every new VM has the org.qemu.guest_agent.0 channel; the
 * fixture guest here runs Debian's real qemu-guest-agent on it (build-agent.sh) and keeps a
 * file-system counter on an ext2 disk (`sync` in a loop: init.sh fs_counter mode).
 *  - the client (src/hypervisor/guest-agent.ts) synchronises and gets answers; freeze and thaw
 *    report the guest's file system
 *  - `take --quiesce` freezes the guest's file systems around the disks' point in time and thaws
 *    them after (the agent's answers are in the result), and the guest writes on after it
 *  - after `restore` of a snapshot taken earlier, the guest clock is within 2 s of the host's
 *    (without the agent it would be behind by the time since the snapshot), and a snapshot taken
 *    with --quiesce resumes thawed
 *  - a VM whose guest runs no agent: `take --quiesce` succeeds with a clear warning, and the
 *    client times out within its bound
 */
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { guestAgentInitrd, guestArtifacts } from '../../fixtures/guest/index.js';
import { sleep, VmLab, type TakeJson } from '../helpers/vm.js';
import { GuestAgent, GuestAgentTimeoutError } from '../../src/hypervisor/guest-agent.js';
import { vmPaths } from '../../src/vm/config.js';

const SYNCED = /VMSNAP-FSCOUNTER synced=(\d+)/g;

describe('guest agent', () => {
  let lab: VmLab;
  const agentSocket = (name: string) => vmPaths(lab.dataDir, name).agentSocket;

  async function lastSynced(name: string): Promise<number> {
    const m = [...(await lab.serial(name)).matchAll(SYNCED)];
    return m.length ? Number(m[m.length - 1]![1]) : -1;
  }

  async function waitSerial(name: string, re: RegExp, what: string, timeoutMs = 120_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (!re.test(await lab.serial(name))) {
      if (Date.now() > deadline) throw new Error(`VM ${name}: no ${what} within ${timeoutMs} ms; console tail:\n${(await lab.serial(name)).slice(-600)}`);
      await sleep(200);
    }
  }

  /** Waits until the counter moved past `v` (the guest's writes go on). */
  async function waitCounterPast(name: string, v: number): Promise<number> {
    const deadline = Date.now() + 60_000;
    for (;;) {
      const now = await lastSynced(name);
      if (now > v) return now;
      if (Date.now() > deadline) throw new Error(`VM ${name}: the file-system counter stayed at ${now} (frozen?)`);
      await sleep(200);
    }
  }

  beforeAll(async () => {
    lab = await VmLab.create('agent');
    const a = guestArtifacts();
    await lab.ok([
      'vm', 'create', 'ga', '--memory', '256M', '--disk', '64M', '--net', 'none', '--accel', 'tcg',
      '--kernel', a.kernel, '--initrd', guestAgentInitrd(),
      '--append', 'console=ttyS0 quiet rdinit=/agent-init vmsnap.fs_counter=/dev/vda',
    ]);
    await lab.ok([
      'vm', 'create', 'noga', '--memory', '256M', '--net', 'none', '--accel', 'tcg',
      '--kernel', a.kernel, '--initrd', a.initrd, '--append', 'console=ttyS0 quiet vmsnap.mem=16 vmsnap.rate=500',
    ]);
    await lab.start('ga');
    await waitSerial('ga', /VMSNAP-AGENT started/, 'agent start line');
    await waitSerial('ga', /VMSNAP-FSCOUNTER synced=3\b/, 'file-system counter');
  }, 240_000);

  afterAll(async () => {
    await lab?.cleanup();
  });

  it('talks to the real agent: sync, freeze and thaw of the guest file system, its clock', async () => {
    const a = await GuestAgent.connect(agentSocket('ga'), { syncTimeoutMs: 20_000 });
    try {
      expect(await a.freezeStatus()).toBe('thawed');
      expect(await a.freeze()).toBeGreaterThanOrEqual(1);
      expect(await a.freezeStatus()).toBe('frozen');
      expect(await a.thaw()).toBeGreaterThanOrEqual(1);
      expect(await a.freezeStatus()).toBe('thawed');
      expect(Math.abs((await a.getTime()) - Date.now())).toBeLessThan(5000);
    } finally {
      a.close();
    }
    // A second session right after: leftovers of the first do not confuse it.
    const b = await GuestAgent.connect(agentSocket('ga'), { syncTimeoutMs: 20_000 });
    b.close();
  }, 120_000);

  let quiesced: TakeJson;

  it('take --quiesce freezes the guest file systems for the snapshot and thaws them after', async () => {
    const before = await lastSynced('ga');
    quiesced = await lab.json<TakeJson>(['take', 'ga', '--quiesce']);
    console.log(`quiesced take: pause ${quiesced.pauseMs.toFixed(1)} ms, ${JSON.stringify(quiesced.quiesce)}`);
    expect(quiesced.quiesce?.warning).toBeUndefined();
    expect(quiesced.quiesce?.frozen).toBeGreaterThanOrEqual(1);
    expect(quiesced.quiesce?.thawed).toBe(quiesced.quiesce?.frozen);
    await waitCounterPast('ga', Math.max(before, await lastSynced('ga')));
    const a = await GuestAgent.connect(agentSocket('ga'), { syncTimeoutMs: 20_000 });
    expect(await a.freezeStatus().finally(() => a.close())).toBe('thawed');
  }, 120_000);

  it('after a restore the guest clock is the host\'s again, and a quiesced snapshot resumes thawed', async () => {
    const waitMs = 20_000;
    await sleep(waitMs);
    const r = await lab.json<{ runState: string; guest?: { clockSet: boolean; thawed: number; warning?: string } }>(['restore', 'ga', quiesced.snapshot]);
    expect(r.runState).toBe('running');
    expect(r.guest?.warning).toBeUndefined();
    expect(r.guest?.clockSet).toBe(true);
    expect(r.guest?.thawed, 'the snapshot was taken frozen: restore thaws it').toBeGreaterThanOrEqual(1);
    const a = await GuestAgent.connect(agentSocket('ga'), { syncTimeoutMs: 20_000 });
    try {
      const skew = (await a.getTime()) - Date.now();
      console.log(`guest clock after restoring a snapshot ${waitMs / 1000} s old: ${skew.toFixed(0)} ms from the host's`);
      expect(Math.abs(skew)).toBeLessThan(2000);
    } finally {
      a.close();
    }
    const v = await lastSynced('ga');
    await waitCounterPast('ga', v);
  }, 180_000);

  it('without an agent in the guest: take --quiesce warns and still snapshots; the client gives up in time', async () => {
    await lab.start('noga');
    await lab.waitLines('noga', 2, 120_000);
    const t0 = Date.now();
    await expect(GuestAgent.connect(agentSocket('noga'), { syncTimeoutMs: 1500 })).rejects.toBeInstanceOf(GuestAgentTimeoutError);
    expect(Date.now() - t0).toBeLessThan(10_000);
    const r = await lab.run(['--json', 'take', 'noga', '--quiesce']);
    expect(r.code, r.stderr).toBe(0);
    const take = JSON.parse(r.stdout) as TakeJson;
    expect(take.quiesce?.frozen).toBeNull();
    expect(take.quiesce?.warning).toMatch(/no guest agent answered .*crash-consistent only/);
    expect(path.basename(agentSocket('noga'))).toBe('agent.sock');
  }, 180_000);
});
