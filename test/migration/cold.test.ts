/**
 * Cold migration (`migrate --cold`) on real QEMU, two hosts on loopback: a stopped VM arrives
 * stopped with its disk bit-exact and comes back sending only what changed; a running VM is
 * stopped, shipped and boots on the destination; a migration that fails (wrong key) starts the VM
 * here again and leaves nothing on the destination.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { existsSync, readFileSync } from 'node:fs';
import { createHash } from 'node:crypto';
import * as path from 'node:path';
import { VmLab } from '../helpers/vm.js';
import { Volume } from '../../src/cow/volume.js';
import { Repository } from '../../src/store/repository.js';
import { openNonS3 } from '../../src/store/backend/open-local.js';
import { diskDir, loadDefinition, vmPaths } from '../../src/vm/config.js';
import type { MigrateOutcomeHere } from '../../src/ops/migrate.js';
import { preflightCold } from '../../src/migration/cold.js';
import { loadOrCreateIdentity } from '../../src/migration/identity.js';
import { guestArtifacts } from '../../fixtures/guest/index.js';
import { expectArrived, expectRunningIntact, PairedHosts, spawnVmsnap, until } from './helpers.js';

/** SHA-256 of a stopped VM's first disk, read through its volume (holes and base chunks included). */
async function diskDigest(lab: VmLab, vm: string): Promise<string> {
  const def = await loadDefinition(lab.dataDir, vm);
  const repo = await Repository.open(openNonS3(lab.repo).backend);
  const v = await Volume.open(diskDir(vmPaths(lab.dataDir, vm), def.disks[0]!.name), { store: repo });
  try {
    const h = createHash('sha256');
    const step = 4 << 20;
    const buf = Buffer.alloc(step);
    for (let off = 0; off < v.size; off += step) {
      const n = Math.min(step, v.size - off);
      await v.read(off, n, buf);
      h.update(buf.subarray(0, n));
    }
    return h.digest('hex');
  } finally {
    await v.close();
    await repo.close();
  }
}

const result = (stdout: string): MigrateOutcomeHere => JSON.parse(stdout.split('\n').filter((l) => !l.startsWith('{"event"')).join('\n')) as MigrateOutcomeHere;

describe('vmsnap migrate --cold (loopback)', () => {
  let h: PairedHosts;
  let a: VmLab;
  let b: VmLab;

  beforeAll(async () => {
    h = await PairedHosts.create('migc', { receiveOnA: true });
    ({ a, b } = h);
  }, 120_000);

  afterAll(() => h?.stop());

  it('a stopped VM arrives stopped with its disk bit-exact; the return trip sends only what changed', async () => {
    const VM = 'parked';
    await a.createLinuxVm(VM, { rate: 100, memMiB: 16, diskRate: 50 });
    await a.start(VM);
    await a.waitLines(VM, 6);
    await a.ok(['vm', 'stop', VM]);
    const before = await diskDigest(a, VM);

    const there = await a.run(['--json', 'migrate', VM, 'desktop', '--cold']);
    expect(there.code, there.stderr).toBe(0);
    const r1 = result(there.stdout);
    expect(r1).toMatchObject({ vm: VM, mode: 'cold', destinationState: 'shutoff', kept: false, base: null });
    expect(String(r1.departure)).toMatch(/^[0-9a-f]{64}$/);
    b.adopt(VM);
    expect(existsSync(path.join(a.dataDir, 'vms', VM))).toBe(false);
    expect((await b.show(VM)).status.state).toBe('shutoff');
    expect(await diskDigest(b, VM)).toBe(before);

    // Back, unchanged: the laptop holds the disks it had at departure; no block needs to cross.
    const back = await b.run(['--json', 'migrate', VM, 'laptop', '--cold']);
    expect(back.code, back.stderr).toBe(0);
    const r2 = result(back.stdout);
    a.adopt(VM);
    expect(r2.base).toBe(r1.departure);
    expect(r2.diskBlocksSent, JSON.stringify(r2)).toBe(0);
    expect(r2.diskBlocksSkipped).toBeGreaterThan(0);
    expect(r2.bytesSent, `there ${JSON.stringify(r1)}\nback ${JSON.stringify(r2)}`).toBeLessThan(r1.bytesSent);
    expect(existsSync(path.join(b.dataDir, 'vms', VM))).toBe(false);
    expect(await diskDigest(a, VM)).toBe(before);
    // And it still boots here.
    await a.start(VM);
    await expectRunningIntact(a, VM);
    await a.ok(['vm', 'stop', VM]);
    console.log(`there: ${JSON.stringify(r1)}\nback: ${JSON.stringify(r2)}`);
  }, 600_000);

  it('a running VM: refused before it is touched (wrong key); restarted here when the destination dies after the stop; then it boots on the destination', async () => {
    const VM = 'rebooter';
    await a.createLinuxVm(VM, { rate: 100, memMiB: 16, diskRate: 20 });
    await a.start(VM);
    await a.waitLines(VM, 4);

    // The key pinned for the destination is not the one it presents (as after a reinstall there):
    // the pre-flight, asked before the VM is stopped, fails, and the guest never stopped.
    const supervisor = a.supervisorPid(VM);
    const wrong = (await a.ok(['peer', 'id'])).stdout.trim(); // a valid fingerprint, not B's
    await a.ok(['peer', 'rm', 'desktop']);
    await a.ok(['peer', 'add', 'desktop', '--fingerprint', wrong, '--address', `127.0.0.1:${h.rb.port}`]);
    const bad = await a.run(['migrate', VM, 'desktop', '--cold']);
    expect(bad.code).not.toBe(0);
    expect(bad.stderr).toMatch(/migration failed in phase connect: .*presented key .* not the paired/);
    await a.ok(['peer', 'rm', 'desktop']);
    await a.ok(['peer', 'add', 'desktop', '--fingerprint', h.rb.fingerprint, '--address', `127.0.0.1:${h.rb.port}`]);
    expect(existsSync(path.join(b.dataDir, 'vms', VM))).toBe(false);
    expect(a.supervisorPid(VM)).toBe(supervisor);
    await expectRunningIntact(a, VM);

    // The destination dies once the VM was stopped here: it is started here again.
    const marker = path.join(b.dataDir, 'vms', VM, 'incoming');
    const worker = (): number => Number((existsSync(marker) ? readFileSync(marker, 'utf8') : '').trim());
    const m = spawnVmsnap(a, ['migrate', VM, 'desktop', '--cold']);
    await until(() => a.supervisorPid(VM) === null && worker() > 0, 'the VM stopped here and the destination receiving', 120_000);
    process.kill(worker(), 'SIGKILL');
    const killed = await m.done;
    expect(killed.code, killed.stderr).not.toBe(0);
    expect(killed.stderr).toMatch(/migration failed in phase \w+/);
    await a.rememberPids(VM);
    await expectRunningIntact(a, VM);
    await h.restartReceiveB();
    await until(() => !existsSync(path.join(b.dataDir, 'vms', VM)), 'the destination to discard the VM', 60_000);

    const moved = await a.run(['--json', 'migrate', VM, 'desktop', '--cold']);
    expect(moved.code, moved.stderr).toBe(0);
    expect(result(moved.stdout)).toMatchObject({ vm: VM, mode: 'cold', destinationState: 'running' });
    expect(existsSync(path.join(a.dataDir, 'vms', VM))).toBe(false);
    expect((await b.show(VM)).status.state).toBe('running');
    await expectArrived(b, VM);
  }, 600_000);

  it('the destination killed mid-way: the stopped VM stays here as it was, the destination keeps nothing; a fresh move then works', async () => {
    const VM = 'parked'; // left stopped here by the first test
    const digest = await diskDigest(a, VM);
    const marker = path.join(b.dataDir, 'vms', VM, 'incoming');
    const worker = (): number => Number((existsSync(marker) ? readFileSync(marker, 'utf8') : '').trim());
    const m = spawnVmsnap(a, ['migrate', VM, 'desktop', '--cold']);
    await until(() => worker() > 0, 'the destination worker', 60_000);
    process.kill(worker(), 'SIGKILL');
    const r = await m.done;
    expect(r.code).not.toBe(0);
    expect(r.stderr).toMatch(/migration failed in phase \w+/);
    expect((await a.show(VM)).status.state).toBe('shutoff');
    expect(existsSync(vmPaths(a.dataDir, VM).departingMarker)).toBe(false);
    expect(await diskDigest(a, VM)).toBe(digest);
    // The killed worker could not clean up; the next `receive` sweeps what it left.
    await h.restartReceiveB();
    await until(() => !existsSync(path.join(b.dataDir, 'vms', VM)), 'the destination to discard the VM', 60_000);

    // A fresh move afterwards works, from disks that read through a base snapshot here (the VM
    // came back onto its departure snapshot), onto the destination's own earlier snapshot of it.
    const again = await a.run(['--json', 'migrate', VM, 'desktop', '--cold']);
    expect(again.code, again.stderr).toBe(0);
    expect(result(again.stdout).base).toMatch(/^[0-9a-f]{64}$/);
    expect(await diskDigest(b, VM)).toBe(digest);
    expect(existsSync(path.join(a.dataDir, 'vms', VM))).toBe(false);
  }, 300_000);
});

describe('pre-flight of a cold migration (library call)', () => {
  let h: PairedHosts;

  beforeAll(async () => {
    h = await PairedHosts.create('migp');
  }, 120_000);

  afterAll(() => h?.stop());

  it.skipIf(!!(process.env.DISPLAY || process.env.WAYLAND_DISPLAY))('a VM with a local window (--display gtk) is refused by a destination outside a desktop session, before it is stopped', async () => {
    const g = guestArtifacts();
    await h.a.ok(['vm', 'create', 'windowed', '--memory', '64M', '--net', 'none', '--display', 'gtk', '--kernel', g.kernel, '--initrd', g.initrd]);
    const def = await loadDefinition(h.a.dataDir, 'windowed');
    const target = { host: '127.0.0.1', port: h.rb.port, fingerprint: h.rb.fingerprint };
    const src = { definition: def, disks: new Map(), qemuVersion: '10.0.0', start: true };
    const identity = await loadOrCreateIdentity(h.a.dataDir);
    await expect(preflightCold(src, target, { identity })).rejects.toThrow(/refused the migration: .*local window \(--display gtk\).*no DISPLAY or WAYLAND_DISPLAY/);
    // Arriving stopped needs no window: accepted, and the pre-flight creates nothing there.
    await preflightCold({ ...src, start: false }, target, { identity });
    expect(existsSync(path.join(h.b.dataDir, 'vms', 'windowed'))).toBe(false);
  }, 120_000);
});
