/**
 * Live migration end to end on real QEMU (TCG): two hosts on loopback, each with its own data
 * directory and repository, the Linux fixture guest checking its memory and disk throughout.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { existsSync, promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { VmLab, last } from '../helpers/vm.js';
import { migrateResult, pair, startReceive, type Receiving } from './helpers.js';

const VM = 'mover';

describe('vmsnap migrate / receive (loopback)', () => {
  let a: VmLab;
  let b: VmLab;
  const receivers: Receiving[] = [];

  beforeAll(async () => {
    a = await VmLab.create('mig-a');
    b = await VmLab.create('mig-b');
    await pair(a, b, { a: 'laptop', b: 'desktop' });
  });

  afterAll(async () => {
    for (const r of receivers) await r.stop();
    await a?.cleanup();
    await b?.cleanup();
  });

  it('moves a running guest and back: zero errors on both trips, the return trip sends only what changed', async () => {
    // A desktop-like workload: a few MB/s of memory writes, so each trip converges in a few rounds.
    await a.createLinuxVm(VM, { rate: 100, memMiB: 32, diskRate: 20 });
    await a.start(VM);
    const before = await a.waitLines(VM, 10);
    const rb = await startReceive(b);
    receivers.push(rb);

    const there = await a.run(['--json', 'migrate', VM, `127.0.0.1:${rb.port}`, '--pair', rb.fingerprint]);
    expect(there.code, there.stderr).toBe(0);
    const r1 = migrateResult(there.stdout);
    b.adopt(VM);
    await b.rememberPids(VM);
    // The command returns once the guest runs on B; A stores its departure state after that.
    expect(r1.departureError ?? null, JSON.stringify(r1)).toBeNull();
    expect(r1.departurePending, JSON.stringify(r1)).toBe(true);
    expect(r1.departure).toBeNull();
    // Running on the destination, continuing where it was.
    expect((await b.show(VM)).status.state).toBe('running');
    const onB = await b.waitLines(VM, 12);
    expect(onB[0]!.gen).toBeGreaterThan(last(before).gen);
    await b.waitGuestTime(VM, 0, 2500);
    const sb = await b.statuses(VM);
    expect(last(sb).errors).toBe(0);
    expect(last(sb).diskErrors).toBe(0);
    expect(await b.errorLines(VM)).toEqual([]);

    // Back to the laptop, which kept the state at departure. Started at once: if A is still
    // storing it, A's `receive` waits for that (and for the VM's removal there) before it answers.
    const ra = await startReceive(a);
    receivers.push(ra);
    const back = await b.run(['--json', 'migrate', VM, `127.0.0.1:${ra.port}`, '--pair', ra.fingerprint, '--wait']);
    expect(back.code, back.stderr).toBe(0);
    const r2 = migrateResult(back.stdout);
    a.adopt(VM);
    await a.rememberPids(VM);
    const departed = (await a.json<{ id: string; tags: string[] }[]>(['ls', '--vm', VM, '--tag', 'departed'])).map((x) => x.id);
    expect(departed).toHaveLength(1);
    expect(r2.base).toBe(departed[0]);
    // A's holdings came from the image it kept when the guest left (not read back from its repository),
    // and that cache is gone now that the guest is back.
    expect(await fsp.readFile(path.join(a.dataDir, 'receive.log'), 'utf8')).toMatch(/mover: holding \d+ pages \(from its departure cache\)/);
    expect(existsSync(path.join(a.dataDir, 'held', 'mover.index'))).toBe(false);
    // --wait: the departure snapshot is named, and the VM is already gone from B.
    expect(r2.departurePending ?? false).toBe(false);
    expect(String(r2.departure)).toMatch(/^[0-9a-f]{64}$/);
    expect(r2.ramRefs).toBeGreaterThan(1000);
    // Only what changed since the first move crosses: the pages the laptop still held crossed as
    // references, worth more than everything that was sent (what the guest changed meanwhile and
    // QEMU's resends of it), and the trip is well below the first one's cost.
    const trips = `first trip: ${JSON.stringify(r1)}\nreturn trip: ${JSON.stringify(r2)}`;
    expect(r2.ramRefs * 4096, trips).toBeGreaterThan(r2.bytesSent);
    expect(r2.bytesSent, trips).toBeLessThan(r1.bytesSent * 0.75);
    expect(existsSync(path.join(b.dataDir, 'vms', VM))).toBe(false);
    const onA = await a.waitLines(VM, 12);
    expect(onA[onA.length - 1]!.gen).toBeGreaterThan(last(sb).gen);
    await a.waitGuestTime(VM, 0, 2500);
    const sa = await a.statuses(VM);
    expect(last(sa).errors).toBe(0);
    expect(last(sa).diskErrors).toBe(0);
    expect(await a.errorLines(VM)).toEqual([]);
    console.log(`first trip: ${JSON.stringify(r1)}\nreturn trip: ${JSON.stringify(r2)}`);
  }, 600_000);

  it('the source killed -9 while it stores the departure state: the guest runs on at the destination, the source VM cannot start, and is removed cleanly', async () => {
    const rb = await startReceive(b);
    receivers.push(rb);
    const pid = a.supervisorPid(VM);
    expect(pid).not.toBeNull();
    const r = await a.run(['--json', 'migrate', VM, `127.0.0.1:${rb.port}`, '--pair', rb.fingerprint]);
    expect(r.code, r.stderr).toBe(0);
    expect(migrateResult(r.stdout).departurePending).toBe(true);
    // The command returned with the departure state still being stored on A.
    expect(existsSync(path.join(a.dataDir, 'vms', VM, 'departed'))).toBe(true);
    process.kill(pid!, 'SIGKILL');
    b.adopt(VM);
    await b.rememberPids(VM);
    const onB = await b.waitLines(VM, 5);
    expect(last(onB).errors).toBe(0);

    // The same VM must not run in two places: A refuses to start its copy, and says what to do.
    const start = await a.run(['vm', 'start', VM]);
    expect(start.code).not.toBe(0);
    expect(start.stderr).toMatch(/moved to 127\.0\.0\.1:\d+; its removal here did not finish: `vmsnap vm rm mover`/);
    await a.ok(['vm', 'rm', VM]);
    expect(existsSync(path.join(a.dataDir, 'vms', VM))).toBe(false);
    // What A committed before the kill is intact; an unfinished departure snapshot left no snapshot.
    await a.ok(['check']);
    const sb = await b.statuses(VM);
    expect(last(sb).errors).toBe(0);
    expect(last(sb).diskErrors).toBe(0);
    await b.ok(['vm', 'stop', VM]);
  }, 300_000);
});
