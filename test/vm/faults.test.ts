/**
 * Acceptance: faults during `take`.
 *  - QEMU killed (SIGKILL) while the RAM capture streams: the take fails with a clear error, no
 *    snapshot is committed, the repository checks clean, and the VM starts again and snapshots.
 *  - The repository's file system fills up during the RAM capture (a 40 MiB tmpfs; the first
 *    snapshot of the guest needs ~100 MiB): clear error, the guest keeps running, nothing visible.
 */
import { execFileSync } from 'node:child_process';
import { promises as fsp, readdirSync } from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { removeDir, tempDir } from '../helpers/cli.js';
import { VmLab, alive, last, sleep } from '../helpers/vm.js';

async function booted(lab: VmLab, name: string): Promise<void> {
  await lab.waitFor(name, (s) => s.length >= 2 && last(s).uptimeMs - s[0]!.uptimeMs >= 1200 && last(s).errors === 0, 'boot');
}

/** Resolves once the RAM capture of a take has begun (its migration socket directory exists). */
async function captureStarted(lab: VmLab, name: string, timeoutMs = 60_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (readdirSync(lab.runDir(name)).some((f) => f.startsWith('vmsnap-mig-'))) return;
    await sleep(10);
  }
  throw new Error('the RAM capture did not start');
}

describe('QEMU killed during take', () => {
  let lab: VmLab;

  beforeAll(async () => {
    lab = await VmLab.create('kill');
    await lab.createLinuxVm('k1', { rate: 2000 });
    await lab.start('k1');
  });

  afterAll(async () => {
    await lab?.cleanup();
  });

  it('fails clearly, commits nothing, checks clean, and the VM starts and snapshots again', async () => {
    await booted(lab, 'k1');
    const before = await lab.snapshotIds();
    expect(before).toEqual([]);
    const { qemu } = await lab.rememberPids('k1');
    expect(qemu).toBeGreaterThan(0);

    const take = lab.run(['take', 'k1']);
    await captureStarted(lab, 'k1');
    await sleep(150);
    process.kill(qemu!, 'SIGKILL');
    const r = await take;
    console.log(`take with QEMU killed: exit ${r.code}: ${r.stderr.trim()}`);
    expect(r.code).not.toBe(0);
    expect(r.stdout).not.toMatch(/snapshot [0-9a-f]{12} taken/);
    expect(r.stderr).toMatch(/take/i);
    expect(r.stderr).toMatch(/QEMU \(pid \d+\) exited during the snapshot \(killed by SIGKILL\); no snapshot was saved/);
    // Not an internal crash dump.
    expect(r.stderr).not.toMatch(/^\s+at /m);

    expect(await lab.snapshotIds()).toEqual(before);
    const check = await lab.run(['check', '--read-data']);
    expect(check.code, check.stderr + check.stdout).toBe(0);
    // The supervisor notices QEMU is gone and ends; the VM is shut off with its state unchanged.
    const deadline = Date.now() + 30_000;
    let show = await lab.show('k1');
    while (show.status.state !== 'shutoff' && Date.now() < deadline) {
      await sleep(200);
      show = await lab.show('k1');
    }
    expect(show.status.state).toBe('shutoff');
    expect(show.lastSnapshot).toBeNull();

    await lab.start('k1');
    await booted(lab, 'k1');
    const w = await lab.takeWindow('k1', ['-m', 'after the kill']);
    console.log(`take after restart: guest paused ${w.take.pauseMs.toFixed(1)} ms, new ${w.take.newBytes} B`);
    expect(await lab.snapshotIds()).toEqual([w.take.snapshot]);
    expect((await lab.show('k1')).lastSnapshot).toBe(w.take.snapshot);
    const check2 = await lab.run(['check']);
    expect(check2.code, check2.stderr).toBe(0);
  });
});

describe('repository file system full during take', () => {
  let lab: VmLab | undefined;
  let mnt: string | undefined;
  let mounted = false;

  beforeAll(async () => {
    mnt = tempDir('vmsnap-vm-tmpfs-');
    try {
      execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=40m', 'tmpfs', mnt], { stdio: 'pipe' });
      mounted = true;
    } catch (err) {
      console.log(`cannot mount a tmpfs (${(err as Error).message.split('\n')[0]}): skipping`);
      return;
    }
    lab = await VmLab.create('full', { repo: () => path.join(mnt!, 'repo') });
    await lab.createLinuxVm('f1', { rate: 2000 });
    await lab.start('f1');
  });

  afterAll(async () => {
    await lab?.cleanup();
    if (mounted) {
      for (let i = 0; i < 20; i++) {
        try {
          execFileSync('umount', [mnt!], { stdio: 'pipe' });
          mounted = false;
          break;
        } catch {
          await sleep(250);
        }
      }
    }
    if (mnt && !mounted) removeDir(mnt);
  });

  it('fails clearly, the guest keeps running, no partial snapshot is visible', async (ctx) => {
    if (!lab) return ctx.skip();
    await booted(lab, 'f1');
    const df0 = execFileSync('df', ['-B1', '--output=avail', mnt!], { encoding: 'utf8' }).trim().split('\n')[1];
    const n0 = (await lab.statuses('f1')).length;

    const r = await lab.run(['take', 'f1']);
    console.log(`take on a full file system: exit ${r.code}: ${r.stderr.trim()} (free before: ${df0} B)`);
    expect(r.code).not.toBe(0);
    expect(r.stderr).toMatch(/take/i);
    expect(r.stderr).toMatch(/ENOSPC|no space|space left|full/i);
    expect(r.stderr).not.toMatch(/^\s+at /m);

    // The guest never stayed paused: it prints on, memory and disk clean.
    const after = await lab.waitFor('f1', (s) => s.length >= n0 + 10, 'status lines after the failed take');
    const tail = after.slice(n0);
    expect(last(tail).gen).toBeGreaterThan(tail[0]!.gen);
    for (const s of tail) {
      expect(s.errors).toBe(0);
      expect(s.diskErrors).toBe(0);
    }
    const show = await lab.show('f1');
    expect(show.status.state).toBe('running');
    expect(show.lastSnapshot).toBeNull();
    const { qemu, supervisor } = await lab.rememberPids('f1');
    expect(alive(qemu!) && alive(supervisor!)).toBe(true);

    // Nothing committed; what is there checks clean; no manifest or temp manifest left.
    expect(await lab.snapshotIds()).toEqual([]);
    const snapsDir = path.join(lab.repo, 'snapshots');
    expect(await fsp.readdir(snapsDir).catch(() => [])).toEqual([]);
    const check = await lab.run(['check']);
    console.log(`check after the failed take: exit ${check.code}: ${(check.stdout + check.stderr).trim().split('\n').slice(-2).join(' | ')}`);
    expect(check.code, check.stderr + check.stdout).toBe(0);

    // Space back (prune drops the unreferenced leftover): the same supervisor snapshots again.
    await lab.ok(['prune']);
    const dfPruned = execFileSync('df', ['-B1', '--output=avail', mnt!], { encoding: 'utf8' }).trim().split('\n')[1];
    const t = await lab.json<{ snapshot: string; newBytes: number }>(['take', 'f1', '--disk-only']);
    console.log(`free after prune: ${dfPruned} B; disk-only take after the failure: ${t.snapshot.slice(0, 12)}, new ${t.newBytes} B`);
    expect(await lab.snapshotIds()).toEqual([t.snapshot]);
    expect((await lab.show('f1')).lastSnapshot).toBe(t.snapshot);
    const s = await lab.waitLines('f1', (await lab.statuses('f1')).length + 2);
    expect(last(s).errors).toBe(0);
    expect(last(s).diskErrors).toBe(0);
    const check2 = await lab.run(['check', '--read-data']);
    expect(check2.code, check2.stderr + check2.stdout).toBe(0);
  });
});
