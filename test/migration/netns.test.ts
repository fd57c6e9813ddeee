/**
 * Migration between two "hosts" — network namespaces joined by a veth pair, each with its own
 * data directory and repository — over a real (shaped, then cut) link.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { existsSync } from 'node:fs';
import * as path from 'node:path';
import { BIN } from '../helpers/cli.js';
import { NetnsPair, type Side } from '../helpers/netns.js';
import { VmLab } from '../helpers/vm.js';
import { expectArrived, expectRunningIntact, migrateResult, pair, startReceive, until, type Receiving } from './helpers.js';

const VM = 'roamer';
const root = process.getuid?.() === 0;

describe.skipIf(!root)('migration between network namespaces', () => {
  let net: NetnsPair;
  let a: VmLab;
  let b: VmLab;
  let rb: Receiving;

  /** Runs vmsnap for `lab` inside `side`'s namespace (what it starts, e.g. a supervisor, stays there). */
  const inside = (side: Side, lab: VmLab, args: string[], extraEnv: Record<string, string> = {}) => {
    const env = Object.entries({ ...lab.env, ...extraEnv }).map(([k, v]) => `${k}=${v}`);
    return net.exec(side, 'env', [...env, process.execPath, BIN, ...args], { timeoutMs: 600_000 });
  };

  beforeAll(async () => {
    net = await NetnsPair.create();
    a = await VmLab.create('mign-a');
    b = await VmLab.create('mign-b');
    await pair(a, b, { a: 'laptop', b: 'desktop' });
    await a.createLinuxVm(VM, { rate: 3000 });
    // The supervisor (and its QEMU) live in A's namespace; a cut link is noticed within 8 s.
    const st = await inside('a', a, ['vm', 'start', VM], { VMSNAP_MIGRATION_STALL_MS: '8000' });
    expect(st.code, st.stderr).toBe(0);
    a.adopt(VM);
    await a.rememberPids(VM);
    await a.waitLines(VM, 5);
    rb = await startReceive(b, net.addr.b, ['ip', 'netns', 'exec', net.ns.b, 'env', 'VMSNAP_MIGRATION_IDLE_MS=10000']);
  }, 300_000);

  afterAll(async () => {
    await rb?.stop();
    await a?.cleanup();
    await b?.cleanup();
    await net?.destroy();
  });

  const guestFineOnA = (): Promise<void> => expectRunningIntact(a, VM);


  it('the link cut during the RAM phase: the source notices, the guest runs on there, the destination discards', async () => {
    const m = inside('a', a, ['migrate', VM, `${net.addr.b}:${rb.port}`, '--pair', rb.fingerprint]);
    await until(() => existsSync(path.join(b.dataDir, 'vms', VM, 'run', 'mig-in.sock')), 'the RAM phase');
    await net.linkDown();
    const r = await m;
    expect(r.code).not.toBe(0);
    expect(r.stderr).toMatch(/migration failed in phase (ram|disk): the link stalled/);
    await guestFineOnA();
    await until(() => !existsSync(path.join(b.dataDir, 'vms', VM)), 'the destination to discard the VM', 60_000);
    await net.linkUp();
  }, 300_000);

  it('a guest dirtying memory faster than a 20 Mbit/s link: throttled to convergence, or stopped at --timeout with the guest running', async () => {
    await net.shape('a', 20);
    try {
      const r = await inside('a', a, ['--json', 'migrate', VM, `${net.addr.b}:${rb.port}`, '--pair', rb.fingerprint, '--timeout', '25', '--max-downtime', '500', '--no-departure-snapshot']);
      if (r.code === 0) {
        // Converged (auto-converge throttled the guest): it runs on B, intact.
        expect(migrateResult(r.stdout).vm).toBe(VM);
        await expectArrived(b, VM);
      } else {
        expect(r.stderr).toMatch(/phase ram: did not converge within 25 s/);
        await guestFineOnA();
        await until(() => !existsSync(path.join(b.dataDir, 'vms', VM)), 'the destination to discard the VM', 60_000);
      }
    } finally {
      await net.shape('a', null);
    }
  }, 300_000);
});
