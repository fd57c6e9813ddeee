/**
 * Acceptance: bad input to the VM verbs fails clearly and changes nothing — unknown VM, unknown
 * snapshot, a snapshot of a VM of another shape (memory, disk size), a snapshot whose meta names a
 * QEMU this vmsnap cannot restore (a manifest crafted from a real one). Afterwards the running VM is
 * the same QEMU, with the same state and last snapshot, and its guest ran on without errors.
 */
import { blake3 } from '@napi-rs/blake-hash';
import { promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { guestArtifacts } from '../../fixtures/guest/index.js';
import { VmLab, last, type ShowJson, type TakeJson } from '../helpers/vm.js';
import type { RunResult } from '../helpers/cli.js';

function expectClearError(r: RunResult, ...patterns: RegExp[]): void {
  expect(r.code, `expected a failure, got: ${r.stdout}`).not.toBe(0);
  expect(r.stderr).toMatch(/^vmsnap: /);
  expect(r.stderr, 'no stack trace').not.toMatch(/^\s+at /m);
  for (const p of patterns) expect(r.stderr).toMatch(p);
}

describe('bad input to the VM verbs', () => {
  let lab: VmLab;
  let snap: TakeJson;
  let shown: ShowJson;

  beforeAll(async () => {
    lab = await VmLab.create('bad');
    await lab.createLinuxVm('g', { rate: 200 });
    await lab.start('g');
    await lab.waitFor('g', (s) => s.length >= 2 && last(s).uptimeMs - s[0]!.uptimeMs >= 1200, 'boot');
    snap = await lab.json<TakeJson>(['take', 'g', '-m', 'good']);
    shown = await lab.show('g');
    expect(shown.status.state).toBe('running');
    expect(shown.lastSnapshot).toBe(snap.snapshot);
  });

  afterAll(async () => {
    await lab?.cleanup();
  });

  /** The running VM is untouched: same QEMU, state, last snapshot; its guest runs on cleanly. */
  async function unchanged(): Promise<void> {
    const now = await lab.show('g');
    expect(now.status.state).toBe('running');
    expect(now.status.pid).toBe(shown.status.pid);
    expect(now.lastSnapshot).toBe(snap.snapshot);
    const n = (await lab.statuses('g')).length;
    const s = await lab.waitLines('g', n + 2);
    // One console since boot: never restored, never restarted.
    for (let i = 1; i < s.length; i++) expect(s[i]!.uptimeMs).toBeGreaterThan(s[i - 1]!.uptimeMs);
    expect(last(s).errors).toBe(0);
    expect(last(s).diskErrors).toBe(0);
  }

  it('unknown VM', async () => {
    for (const args of [['take', 'nosuch'], ['restore', 'nosuch', snap.snapshot], ['vm', 'start', 'nosuch'], ['vm', 'show', 'nosuch'], ['vm', 'stop', 'nosuch']]) {
      const r = await lab.run(args);
      console.log(`${args.join(' ')}: ${r.stderr.trim()}`);
      expectClearError(r, /nosuch/);
    }
    expect((await lab.json<{ name: string }[]>(['vm', 'ls'])).map((v) => v.name)).toEqual(['g']);
    await unchanged();
  });

  it('unknown snapshot', async () => {
    for (const ref of ['0123456789ab', 'not-a-snapshot']) {
      const r = await lab.run(['restore', 'g', ref]);
      console.log(`restore g ${ref}: ${r.stderr.trim()}`);
      expectClearError(r, new RegExp(ref));
    }
    const c = await lab.run(['clone', '0123456789ab', 'g2']);
    console.log(`clone 0123456789ab g2: ${c.stderr.trim()}`);
    expectClearError(c, /0123456789ab/);
    expect((await lab.json<{ name: string }[]>(['vm', 'ls'])).map((v) => v.name)).toEqual(['g']);
    expect(await lab.snapshotIds()).toEqual([snap.snapshot]);
    await unchanged();
  });

  it('a snapshot of a VM of another shape (memory, disk size)', async () => {
    const a = guestArtifacts();
    // Other shapes, never started: `take` of a stopped VM makes a disk-only snapshot of it.
    await lab.ok(['vm', 'create', 'mem128', '--memory', '128M', '--disk', '64M', '--kernel', a.kernel, '--initrd', a.initrd, '--accel', 'tcg']);
    await lab.ok(['vm', 'create', 'disk32', '--memory', '256M', '--disk', '32M', '--kernel', a.kernel, '--initrd', a.initrd, '--accel', 'tcg']);
    lab.adopt('mem128');
    lab.adopt('disk32');
    const sMem = (await lab.json<TakeJson>(['take', 'mem128'])).snapshot;
    const sDisk = (await lab.json<TakeJson>(['take', 'disk32'])).snapshot;
    const ids = await lab.snapshotIds();

    // Another VM's snapshot needs --from-other-vm (test/vm/selectors.test.ts); with it, the shape
    // check must still refuse.
    const r1 = await lab.run(['restore', 'g', sMem, '--from-other-vm']);
    console.log(`restore g <128M snapshot>: ${r1.stderr.trim()}`);
    expectClearError(r1, /different shape/, /memory 128 MiB vs 256 MiB/);
    const r2 = await lab.run(['restore', 'g', sDisk, '--from-other-vm']);
    console.log(`restore g <32M-disk snapshot>: ${r2.stderr.trim()}`);
    expectClearError(r2, /different shape/, /disks/);
    await unchanged();

    // The other way round, onto a VM that is not running: it must stay shut off and unchanged.
    const r3 = await lab.run(['restore', 'mem128', snap.snapshot, '--from-other-vm']);
    console.log(`restore mem128 <256M snapshot>: ${r3.stderr.trim()}`);
    expectClearError(r3, /^vmsnap: restore: checking the snapshot: .*different shape \(memory 256 MiB vs 128 MiB\)/);
    const m = await lab.show('mem128');
    expect(m.status.state).toBe('shutoff');
    expect(m.lastSnapshot).toBe(sMem);
    expect(await lab.snapshotIds()).toEqual(ids);
  });

  it('a snapshot taken with a QEMU this vmsnap does not restore', async () => {
    // Craft it from the real one: same streams, meta says QEMU 7.2.0; unencrypted manifests are
    // named by the BLAKE3 of their plaintext JSON.
    const dir = path.join(lab.repo, 'snapshots');
    const plain = await fsp.readFile(path.join(dir, snap.snapshot));
    const m = JSON.parse(plain.toString('utf8')) as { meta: Record<string, unknown>; time: string };
    expect(m.meta.qemuVersion).toMatch(/^10\./);
    m.meta.qemuVersion = '7.2.0';
    m.time = new Date(Date.parse(m.time) + 1000).toISOString();
    const forged = Buffer.from(JSON.stringify(m));
    const id = blake3(forged).toString('hex');
    await fsp.writeFile(path.join(dir, id), forged);
    const shown7 = await lab.json<{ id: string; meta: Record<string, unknown> }>(['show', id]);
    expect(shown7.meta.qemuVersion).toBe('7.2.0');

    const r = await lab.run(['restore', 'g', id]);
    console.log(`restore g <QEMU 7.2 snapshot>: ${r.stderr.trim()}`);
    expectClearError(r, /QEMU 7\.2\.0/, /10\./);
    await unchanged();

    const c = await lab.run(['clone', id, 'old']);
    console.log(`clone <QEMU 7.2 snapshot> old: ${c.stderr.trim()}`);
    expectClearError(c, /^vmsnap: restore: checking the snapshot: .*taken with QEMU 7\.2\.0/);
    lab.adopt('old');
    const names = (await lab.json<{ name: string }[]>(['vm', 'ls'])).map((v) => v.name);
    expect(names, 'a refused clone leaves no VM behind').not.toContain('old');
    await unchanged();
  });
});
