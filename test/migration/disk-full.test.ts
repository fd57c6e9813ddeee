/**
 * The destination's disk fills up during the move (pre-flight saw enough space; something else took
 * it meanwhile): the disk round fails there, the source names the phase, the guest runs on at the
 * source, and the destination keeps nothing. Once there is space again, the move works.
 *
 * The destination's VM folders sit on a small tmpfs of their own (mounted over `<data>/vms`), so
 * pre-flight — which measures the data directory — passes and the blocks then do not fit. Needs root.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { VmLab } from '../helpers/vm.js';
import { expectArrived, expectRunningIntact, migrateResult, pair, startReceive, until, type Receiving } from './helpers.js';

const VM = 'filler';
const root = process.getuid?.() === 0;

describe.skipIf(!root)('migration: the destination disk fills up mid-way', () => {
  let a: VmLab;
  let b: VmLab;
  let rb: Receiving;
  let mounted = '';

  beforeAll(async () => {
    a = await VmLab.create('migfull-a');
    b = await VmLab.create('migfull-b');
    await pair(a, b, { a: 'laptop', b: 'desktop' });
    // 48 MiB of random data on the guest's disk: it cannot be skipped, elided or compressed.
    const image = path.join(a.dataDir, 'random.img');
    await fsp.writeFile(image, randomBytes(48 << 20));
    await a.createLinuxVm(VM, { diskFrom: image, diskWorkload: false, rate: 500 });
    await a.start(VM);
    await a.waitLines(VM, 5);
    mounted = path.join(b.dataDir, 'vms');
    await fsp.mkdir(mounted, { recursive: true, mode: 0o700 });
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=16m,mode=0700', 'vmsnap-test-full', mounted]);
    rb = await startReceive(b);
  }, 300_000);

  afterAll(async () => {
    await rb?.stop();
    if (mounted) execFileSync('umount', ['-l', mounted], { stdio: 'ignore' });
    await a?.cleanup();
    await b?.cleanup();
  });

  it('fails naming the disk phase and the lack of space; the guest runs on here; the destination keeps nothing', async () => {
    const r = await a.run(['migrate', VM, `127.0.0.1:${rb.port}`, '--pair', rb.fingerprint]);
    expect(r.code, r.stdout).not.toBe(0);
    expect(r.stderr).toMatch(/migration failed in phase disk: .*(no space left on device|ENOSPC)/i);
    await expectRunningIntact(a, VM);
    await until(async () => (await fsp.readdir(mounted)).length === 0, 'the destination to discard the VM', 60_000);
    expect(existsSync(path.join(b.dataDir, 'held'))).toBe(false);
  }, 300_000);

  it('with space again, the same move succeeds', async () => {
    execFileSync('mount', ['-o', 'remount,size=256m', mounted]);
    const r = await a.run(['--json', 'migrate', VM, `127.0.0.1:${rb.port}`, '--pair', rb.fingerprint, '--wait']);
    expect(r.code, r.stderr).toBe(0);
    expect(migrateResult(r.stdout).vm).toBe(VM);
    await expectArrived(b, VM);
    await b.ok(['vm', 'stop', VM]);
  }, 300_000);
});
