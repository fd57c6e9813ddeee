/**
 * Issue 12 item 7, the process side: with an encrypted repository, the QEMU a VM runs in has no
 * repository password in its environment (/proc/PID/environ), and neither QEMU's nor the
 * supervisor's command line (what `ps` shows every user) holds it. The supervisor needs the
 * password to open the repository and has it in its own environment, which only its user (and
 * root) can read (docs/security.md). Every file the run creates is private (umask 077).
 */
import { readFileSync, statSync } from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { kvmUsable } from '../../fixtures/guest/index.js';
import { VmLab } from '../helpers/vm.js';

const PASSWORD = 'pw-that-must-not-leak-7f3a';

describe('a running VM of an encrypted repository', () => {
  let lab: VmLab;
  beforeAll(async () => {
    lab = await VmLab.create('env', { init: false });
    lab.env.VMSNAP_PASSWORD = PASSWORD;
    await lab.ok(['init', '--encrypt']);
    const kvm = await kvmUsable();
    await lab.createBmVm('e1', kvm ? { accel: 'kvm', memMiB: 1, rate: 200, slowCpu: true } : { accel: 'tcg', memMiB: 8, rate: 2000 });
    await lab.start('e1');
  }, 180_000);
  afterAll(async () => {
    await lab?.cleanup();
  });

  it('QEMU has no password in its environment or command line; the supervisor none in its command line', async () => {
    const { supervisor, qemu } = await lab.rememberPids('e1');
    expect(qemu).toBeGreaterThan(0);
    expect(supervisor).toBeGreaterThan(0);
    const environ = readFileSync(`/proc/${qemu}/environ`, 'latin1').split('\0');
    expect(environ.length).toBeGreaterThan(1); // it was readable: the check below means something
    expect(environ.filter((v) => v.startsWith('VMSNAP_PASSWORD'))).toEqual([]);
    expect(environ.join('\n')).not.toContain(PASSWORD);
    for (const pid of [qemu!, supervisor!]) expect(readFileSync(`/proc/${pid}/cmdline`, 'latin1')).not.toContain(PASSWORD);
    // The supervisor does hold it (it opens the repository): private to its user, as /proc makes it.
    expect(statSync(`/proc/${supervisor}/environ`).mode & 0o077).toBe(0);
  });

  it("the VM's run folder (sockets, logs, pid files) is private", () => {
    const run = path.join(lab.dataDir, 'vms', 'e1', 'run');
    for (const f of ['supervisor.log', 'supervisor.pid', 'qemu.log', 'serial.log']) {
      const st = statSync(path.join(run, f), { throwIfNoEntry: false });
      if (st) expect(`${f} ${(st.mode & 0o777).toString(8)}`).toBe(`${f} 600`);
    }
    expect(statSync(run).mode & 0o077).toBe(0);
  });
});
