/**
 * Acceptance (issue 12 item 4, process ownership): a VM's QEMU dies with its supervisor, and no
 * second QEMU of a VM ever starts beside a live one.
 *  - kill -9 of the supervisor: QEMU exits within seconds (die-with-parent), `vm ls` says shutoff
 *    with stale run files, and `vm start` brings up exactly one QEMU whose guest checks clean.
 *  - a QEMU of the VM alive without a supervisor (as an older vmsnap, or the helper missing, left
 *    it — here the same QEMU command line started by hand): `vm ls` says orphaned, `vm start`
 *    refuses naming the pid, `vm stop` ends it, and then `vm start` works.
 */
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { kvmUsable } from '../../fixtures/guest/index.js';
import { VmLab, alive, last, sleep } from '../helpers/vm.js';

interface LsRow {
  name: string;
  state: string;
  problem?: string;
}

describe('a VM whose supervisor is killed', () => {
  let lab: VmLab;

  beforeAll(async () => {
    const kvm = await kvmUsable();
    lab = await VmLab.create('orphan');
    if (kvm) await lab.createBmVm('o1', { accel: 'kvm', memMiB: 1, rate: 200, slowCpu: true });
    else await lab.createBmVm('o1', { accel: 'tcg', memMiB: 8, rate: 2000 });
    await lab.start('o1');
  }, 180_000);

  afterAll(async () => {
    await lab?.cleanup();
  });

  const ls = async (): Promise<LsRow> => (await lab.json<LsRow[]>(['vm', 'ls'])).find((r) => r.name === 'o1')!;

  it('takes its QEMU with it; vm start refuses beside an orphan and then runs exactly one QEMU', async () => {
    await lab.waitLines('o1', 2, 150_000);
    const { supervisor, qemu } = await lab.rememberPids('o1');
    expect(supervisor).toBeGreaterThan(0);
    expect(qemu).toBeGreaterThan(0);
    const qemuArgv = readFileSync(`/proc/${qemu}/cmdline`, 'utf8').split('\0').filter((a) => a !== '');
    expect(qemuArgv[0]).toMatch(/qemu-system/);

    process.kill(supervisor!, 'SIGKILL');
    const deadline = Date.now() + 10_000;
    while (alive(qemu!) && Date.now() < deadline) await sleep(50);
    expect(alive(qemu!), `QEMU ${qemu} outlived its supervisor ${supervisor}`).toBe(false);
    expect(lab.qemuPids('o1')).toEqual([]);
    const afterKill = await ls();
    expect(afterKill.state).toBe('shutoff');
    expect(afterKill.problem).toMatch(/stale run files/);

    // A QEMU of this VM alive without a supervisor: the same command line, started by hand.
    const orphan = spawn(qemuArgv[0]!, qemuArgv.slice(1), { stdio: 'ignore', detached: true });
    const orphanPid = orphan.pid!;
    const up = Date.now() + 30_000;
    while (!lab.qemuPids('o1').includes(orphanPid) && Date.now() < up) await sleep(50);
    expect(lab.qemuPids('o1')).toEqual([orphanPid]);
    const orphaned = await ls();
    expect(orphaned.state).toBe('orphaned');
    expect(orphaned.problem).toContain(String(orphanPid));

    const refused = await lab.run(['vm', 'start', 'o1']);
    expect(refused.code).not.toBe(0);
    expect(refused.stderr).toContain(`QEMU (pid ${orphanPid}) of this VM is still running without its supervisor`);
    expect(refused.stderr).toMatch(/vmsnap vm stop o1/);
    expect(lab.qemuPids('o1')).toEqual([orphanPid]);
    const sup = lab.supervisorPid('o1');
    expect(sup === null || !alive(sup), 'no supervisor was started').toBe(true);

    const stop = await lab.ok(['vm', 'stop', 'o1']);
    expect(stop.stdout).toContain(String(orphanPid));
    await new Promise<void>((r) => (orphan.exitCode !== null || orphan.signalCode !== null ? r() : orphan.once('exit', () => r())));
    expect(lab.qemuPids('o1')).toEqual([]);
    expect((await ls()).state).toBe('shutoff');

    // Restarted: one QEMU, the guest runs and checks itself clean.
    const linesBefore = (await lab.statuses('o1')).length;
    await lab.start('o1');
    const { qemu: q2 } = await lab.rememberPids('o1');
    expect(lab.qemuPids('o1')).toEqual([q2]);
    const s = await lab.waitFor('o1', (x) => x.length >= linesBefore + 3 || (x.length >= 3 && x.length < linesBefore), 'the restarted guest runs', 150_000);
    expect(last(s).errors).toBe(0);
    expect((await ls()).state).toBe('running');
  }, 300_000);
});
