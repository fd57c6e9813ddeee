/**
 * Acceptance (issue 12 item 9, ambiguous selectors): a snapshot selector means what its context
 * says. `restore VM latest` is that VM's latest, never the repository's; another VM's snapshot
 * needs its id and --from-other-vm; where no VM is implied (clone, --disk-from) a bare `latest`
 * over several VMs is refused. Bare-metal VMs without disks (disk-only snapshots of stopped VMs:
 * cheap), each restore really starting the VM.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { VmLab } from '../helpers/vm.js';

describe('snapshot selectors in a VM context', () => {
  let lab: VmLab;
  let id1 = '';
  let id2 = '';

  beforeAll(async () => {
    lab = await VmLab.create('sel');
    await lab.createBmVm('s1', { accel: 'tcg', memMiB: 1, rate: 100 });
    await lab.createBmVm('s2', { accel: 'tcg', memMiB: 1, rate: 100 });
    id1 = (await lab.json<{ snapshot: string }>(['take', 's1'])).snapshot;
    // The repository's latest snapshot is now s2's.
    id2 = (await lab.json<{ snapshot: string }>(['take', 's2'])).snapshot;
  }, 120_000);

  afterAll(async () => {
    await lab?.cleanup();
  });

  it("restore VM latest is that VM's latest; another VM's snapshot needs its id and --from-other-vm", async () => {
    const byName = await lab.run(['restore', 's1', 's2:latest']);
    expect(byName.code).not.toBe(0);
    expect(byName.stderr).toMatch(/s2:latest is VM s2's latest snapshot, not s1's.*--from-other-vm/);
    const byId = await lab.run(['restore', 's1', id2.slice(0, 12)]);
    expect(byId.code).not.toBe(0);
    expect(byId.stderr).toContain(`snapshot ${id2.slice(0, 12)} was taken of VM s2, not s1`);
    expect(byId.stderr).toContain('--from-other-vm');
    expect((await lab.show('s1')).status.state).toBe('shutoff');

    // Stopped VM: resolved by the CLI.
    const r1 = await lab.json<{ snapshot: string }>(['restore', 's1', 'latest']);
    expect(r1.snapshot).toBe(id1);
    await lab.rememberPids('s1');
    // Running VM: resolved by its supervisor, by the same rules.
    const r2 = await lab.json<{ snapshot: string }>(['restore', 's1', 'latest']);
    expect(r2.snapshot).toBe(id1);
    const running = await lab.run(['restore', 's1', id2.slice(0, 12)]);
    expect(running.code).not.toBe(0);
    expect(running.stderr).toContain(`snapshot ${id2.slice(0, 12)} was taken of VM s2, not s1`);
    expect((await lab.show('s1')).lastSnapshot).toBe(id1);
    const r3 = await lab.json<{ snapshot: string }>(['restore', 's1', id2.slice(0, 12), '--from-other-vm']);
    expect(r3.snapshot).toBe(id2);
    await lab.rememberPids('s1');
    await lab.ok(['vm', 'stop', 's1']);
  }, 180_000);

  it('a bare latest where no VM is implied is refused while several VMs have snapshots', async () => {
    const clone = await lab.run(['clone', 'latest', 's3', '--no-start']);
    expect(clone.code).not.toBe(0);
    expect(clone.stderr).toMatch(/"latest" is ambiguous: the repository holds snapshots of VMs s1, s2/);
    const create = await lab.run(['vm', 'create', 's4', '--disk-from', 'latest:disk0']);
    expect(create.code).not.toBe(0);
    expect(create.stderr).toMatch(/"latest" is ambiguous/);
    expect((await lab.run(['vm', 'show', 's3'])).code).not.toBe(0);
    expect((await lab.run(['vm', 'show', 's4'])).code).not.toBe(0);
    const named = await lab.json<{ vm: string; snapshot: string }>(['clone', 's1:latest', 's3', '--no-start']);
    expect(named.snapshot).toBe(id1);
  }, 120_000);
});
