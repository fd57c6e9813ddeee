/**
 * A migration that fails — wrong key, destination killed, source command killed, cancelled,
 * malformed frames — leaves the guest running on the source with zero errors, leaves nothing on
 * the destination, and names the phase; a fresh migration afterwards succeeds.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { existsSync, promises as fsp, readFileSync } from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { VmLab } from '../helpers/vm.js';
import { expectArrived, expectRunningIntact, migrateResult, pair, spawnVmsnap, startReceive, until, type Receiving } from './helpers.js';
import { openClientChannel } from '../../src/migration/channel.js';
import { loadOrCreateIdentity } from '../../src/migration/identity.js';
import { MSG } from '../../src/migration/protocol.js';

const VM = 'victim';

describe('migration faults: the guest stays on the source, the destination keeps nothing', () => {
  let a: VmLab;
  let b: VmLab;
  let rb: Receiving;

  beforeAll(async () => {
    a = await VmLab.create('migf-a');
    b = await VmLab.create('migf-b');
    await pair(a, b, { a: 'laptop', b: 'desktop' });
    // Busy enough that the migration lasts a few seconds: time to interfere.
    await a.createLinuxVm(VM, { rate: 3000 });
    await a.start(VM);
    await a.waitLines(VM, 5);
    rb = await startReceive(b);
  }, 300_000);

  afterAll(async () => {
    await rb?.stop();
    await a?.cleanup();
    await b?.cleanup();
  });

  const bHasNothing = async (): Promise<void> => {
    await until(async () => !existsSync(path.join(b.dataDir, 'vms', VM)), `the destination to discard ${VM}`, 60_000);
  };
  const guestFine = (): Promise<void> => expectRunningIntact(a, VM);

  const destWorker = (): number => Number(readFileSync(path.join(b.dataDir, 'vms', VM, 'incoming'), 'utf8').trim());
  // The cases that interrupt a move in its RAM phase must not see it finish first: with the
  // smallest pause allowed, the guest's 3000 pages/s keep it from converging for a while.
  const INTERRUPTIBLE = ['--max-downtime', '10'];
  const inRamPhase = () => existsSync(path.join(b.dataDir, 'vms', VM, 'run', 'mig-in.sock'));

  it('a destination with another key is refused before anything moves', async () => {
    const wrong = (await a.ok(['peer', 'id'])).stdout.trim(); // a valid fingerprint, not B's
    const r = await a.run(['migrate', VM, `127.0.0.1:${rb.port}`, '--pair', wrong]);
    expect(r.code).not.toBe(0);
    expect(r.stderr).toMatch(/presented key .* not the paired/);
    expect(r.stderr).toMatch(/phase connect|authenticate/);
    expect(existsSync(path.join(b.dataDir, 'vms'))).toBe(false);
    await guestFine();
  }, 120_000);

  it('a source the destination has not paired is refused before anything moves', async () => {
    await b.ok(['peer', 'rm', 'laptop']);
    try {
      const r = await a.run(['migrate', VM, `127.0.0.1:${rb.port}`, '--pair', rb.fingerprint]);
      expect(r.code).not.toBe(0);
      expect(r.stderr).toMatch(/not paired/);
      expect(existsSync(path.join(b.dataDir, 'vms', VM))).toBe(false);
      await guestFine();
    } finally {
      const fa = (await a.ok(['peer', 'id'])).stdout.trim();
      await b.ok(['peer', 'add', 'laptop', '--fingerprint', fa]);
    }
  }, 120_000);

  it('the destination killed during the RAM phase: source guest runs on, leftovers swept', async () => {
    const m = spawnVmsnap(a, ['migrate', VM, `127.0.0.1:${rb.port}`, '--pair', rb.fingerprint, ...INTERRUPTIBLE]);
    await until(inRamPhase, 'the RAM phase');
    process.kill(destWorker(), 'SIGKILL');
    const r = await m.done;
    expect(r.code).not.toBe(0);
    expect(r.stderr).toMatch(/migration failed in phase (ram|disk)/);
    await guestFine();
    // The killed worker could not clean up; the next `receive` sweeps what it left.
    await rb.stop();
    rb = await startReceive(b);
    await bHasNothing();
  }, 240_000);

  it('`vmsnap migrate` killed mid-way cancels: the guest runs on here, the destination discards', async () => {
    const m = spawnVmsnap(a, ['migrate', VM, `127.0.0.1:${rb.port}`, '--pair', rb.fingerprint, ...INTERRUPTIBLE]);
    await until(inRamPhase, 'the RAM phase');
    m.proc.kill('SIGKILL');
    await m.done;
    await bHasNothing();
    await guestFine();
  }, 240_000);

  it('`migrate --cancel` stops it cleanly, naming the phase', async () => {
    const m = spawnVmsnap(a, ['migrate', VM, `127.0.0.1:${rb.port}`, '--pair', rb.fingerprint, ...INTERRUPTIBLE]);
    await until(inRamPhase, 'the RAM phase');
    await a.ok(['migrate', VM, '--cancel']);
    const r = await m.done;
    expect(r.code).not.toBe(0);
    expect(r.stderr).toMatch(/phase \w+: cancelled/);
    await bHasNothing();
    await guestFine();
  }, 240_000);

  it('malformed and out-of-order frames end the connection; nothing is created', async () => {
    // Not the protocol at all.
    await new Promise<void>((resolve) => {
      const s = net.connect(rb.port, '127.0.0.1', () => s.end(Buffer.from('GET / HTTP/1.0\r\n\r\n')));
      s.on('close', () => resolve());
      s.on('error', () => resolve());
      s.resume();
    });
    // Authenticated, then a RAM record before any request.
    const sock = net.connect(rb.port, '127.0.0.1');
    await new Promise((r) => sock.once('connect', r));
    const ch = await openClientChannel(sock, { identity: await loadOrCreateIdentity(a.dataDir), authorize: (fp) => (fp === rb.fingerprint ? true : 'wrong') });
    await ch.send(MSG.RAM_RAW, Buffer.from([0, 0, 0, 0, 4, 1, 2, 3, 4]));
    // The destination answers a protocol violation with ABORT (or just closes), and then closes.
    const answer = await ch.receive().catch(() => null);
    expect(answer === null || answer.type === MSG.ABORT, `unexpected answer type ${answer?.type}`).toBe(true);
    expect(await ch.receive().catch(() => null)).toBeNull();
    ch.destroy();
    // A request whose body is not JSON.
    const sock2 = net.connect(rb.port, '127.0.0.1');
    await new Promise((r) => sock2.once('connect', r));
    const ch2 = await openClientChannel(sock2, { identity: await loadOrCreateIdentity(a.dataDir), authorize: () => true });
    await ch2.send(MSG.REQUEST, Buffer.from('{not json'));
    await ch2.receive().catch(() => null);
    ch2.destroy();
    await new Promise((r) => setTimeout(r, 1000));
    expect(await fsp.readdir(path.join(b.dataDir, 'vms')).catch(() => [])).toEqual([]);
    const log = await fsp.readFile(path.join(b.dataDir, 'receive.log'), 'utf8');
    expect(log).toMatch(/protocol violation|malformed REQUEST/);
  }, 120_000);

  it('after all that, a fresh migration succeeds', async () => {
    const r = await a.run(['--json', 'migrate', VM, `127.0.0.1:${rb.port}`, '--pair', rb.fingerprint, '--wait']);
    expect(r.code, r.stderr).toBe(0);
    expect(migrateResult(r.stdout).vm).toBe(VM);
    await expectArrived(b, VM);
  }, 240_000);
});
