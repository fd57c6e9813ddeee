/**
 * Agents on BullMQ against a real redis-server (test/helpers/redis.ts): two hosts, each with its
 * own data folder and VM, sharing one repository. Jobs are routed by the agents' registry to the
 * host that has the guest; a re-delivered take makes no second snapshot; permanent errors are not
 * retried, retryable ones (a repository lock held past the wait) are; schedules fire and apply
 * their retention; agents ride out a Redis restart; an unreachable Redis is one clear error.
 *
 * The VMs are defined (vm create, one small disk) but not started: a take of a stopped VM is the
 * same job path (takeStopped) without the cost of booting guests; test/jobs/agent-vm.test.ts takes
 * a running VM.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { guestArtifacts } from '../../fixtures/guest/index.js';
import { RedisServer, freePort } from '../helpers/redis.js';
import { VmLab } from '../helpers/vm.js';
import { BullAgent, Fleet, listHosts, RedisUnreachableError, UnknownGuestError } from '../../src/jobs/bull.js';
import { hostVms } from '../../src/jobs/local.js';
import { JobPayloadError } from '../../src/jobs/model.js';
import { loadState } from '../../src/vm/config.js';
import { Repository } from '../../src/store/repository.js';
import { openNonS3 } from '../../src/store/backend/open-local.js';
import { finished, labContext, sleep, snapshots } from './helpers.js';
import { writeFileSync } from 'node:fs';
import * as path from 'node:path';

let redis: RedisServer;
let labA: VmLab;
let labB: VmLab;
let fleet: Fleet;
const agents: BullAgent[] = [];
const logs: string[] = [];

async function startAgent(lab: VmLab, host: string, lockWaitMs = 60_000): Promise<BullAgent> {
  const a = await BullAgent.start({
    url: redis.url,
    ctx: labContext(lab, host, { lockWait: { maxWaitMs: lockWaitMs } }),
    listVms: () => hostVms(lab.dataDir),
    heartbeatMs: 300,
    lockDurationMs: 5000,
    log: (l) => logs.push(`${host}: ${l}`),
  });
  agents.push(a);
  return a;
}

beforeAll(async () => {
  redis = await RedisServer.start();
  labA = await VmLab.create('fleet-a');
  labB = await VmLab.create('fleet-b', { repo: () => labA.repo, init: false });
  const elf = guestArtifacts().bmElf;
  for (const [lab, vm] of [[labA, 'a1'], [labB, 'b1']] as const) await lab.ok(['vm', 'create', vm, '--memory', '64M', '--disk', '4M', '--kernel', elf, '--accel', 'tcg']);
  await startAgent(labA, 'hostA');
  await startAgent(labB, 'hostB');
  fleet = await Fleet.connect(redis.url);
}, 180_000);

afterAll(async () => {
  for (const a of agents) await a.close().catch(() => undefined);
  await fleet?.close();
  await redis?.stop();
  await labA?.cleanup();
  await labB?.cleanup();
}, 60_000);

describe('agents on BullMQ', () => {
  it('routes each guest\'s job to the agent of its host', async () => {
    expect((await listHosts(fleet.redis)).map((h) => [h.host, h.vms.map((v) => v.name)])).toEqual([
      ['hostA', ['a1']],
      ['hostB', ['b1']],
    ]);
    const ja = await fleet.submit({ kind: 'take', args: { vm: 'a1' } });
    const jb = await fleet.submit({ kind: 'take', args: { vm: 'b1' } });
    expect([ja.host, jb.host]).toEqual(['hostA', 'hostB']);
    const ra = await finished(fleet.queue('hostA'), ja.id);
    const rb = await finished(fleet.queue('hostB'), jb.id);
    expect([ra.state, rb.state], logs.join('\n')).toEqual(['completed', 'completed']);
    // Each take read its own host's data folder (the other host has no such VM).
    expect((await loadState(labA.dataDir, 'a1')).lastSnapshot).toBe(ra.job.returnvalue.snapshot);
    expect((await loadState(labB.dataDir, 'b1')).lastSnapshot).toBe(rb.job.returnvalue.snapshot);
    const snaps = await snapshots(labA);
    expect(snaps.find((s) => s.id === ra.job.returnvalue.snapshot)?.tags).toContain(`job:${ja.id}`);
  }, 180_000);

  it('a take delivered again with the same idempotency key makes no second snapshot', async () => {
    const first = await fleet.submit({ kind: 'take', args: { vm: 'a1' }, key: 'nightly-0001' });
    const r1 = await finished(fleet.queue('hostA'), first.id);
    expect(r1.state).toBe('completed');
    // The same job again (as BullMQ re-delivers a job whose worker died): another job id, same key.
    const again = await fleet.submit({ kind: 'take', args: { vm: 'a1' }, key: 'nightly-0001' }, { jobId: 'nightly-0001-redelivered' });
    const r2 = await finished(fleet.queue('hostA'), again.id);
    expect(r2.state).toBe('completed');
    expect(r2.job.returnvalue).toEqual({ snapshot: r1.job.returnvalue.snapshot, reused: true });
    expect((await snapshots(labA)).filter((s) => s.tags.includes('job:nightly-0001'))).toHaveLength(1);
    // Submitted twice while the first exists, it is one BullMQ job.
    expect((await fleet.submit({ kind: 'take', args: { vm: 'a1' }, key: 'nightly-0001' })).id).toBe(first.id);
  }, 180_000);

  it('a permanent error fails at once; a malformed payload or an unknown guest never runs', async () => {
    const ghost = await fleet.submit({ kind: 'take', args: { vm: 'ghost' } }, { host: 'hostA', retry: { attempts: 5, backoffMs: 200 } });
    const r = await finished(fleet.queue('hostA'), ghost.id);
    expect(r.state).toBe('failed');
    expect(r.job.attemptsMade).toBe(1);
    expect(r.job.failedReason).toMatch(/ghost/);
    await expect(fleet.submit({ kind: 'take', args: {} })).rejects.toThrow(JobPayloadError);
    await expect(fleet.submit({ kind: 'take', args: { vm: 'nosuch' } })).rejects.toThrow(UnknownGuestError);
    // A payload put on the queue by something else than vmsnap: failed once, naming the problem.
    const raw = await fleet.queue('hostB').add('take', { kind: 'take', args: { vm: 42 } }, { attempts: 5 });
    const rr = await finished(fleet.queue('hostB'), raw.id!);
    expect([rr.state, rr.job.attemptsMade]).toEqual(['failed', 1]);
    expect(rr.job.failedReason).toMatch(/malformed job payload: "vm" must be a non-empty string/);
  }, 120_000);

  it('a repository lock held by another process: waited out, then retried with backoff, then done', async () => {
    const holderRepo = await Repository.open(openNonS3(labA.repo).backend);
    const held = await holderRepo.beginWrite('prune', { exclusive: true });
    // This agent gives up waiting after 300 ms: the LockedError fails the attempt (retryable).
    const impatient = await startAgent(labA, 'hostC', 300);
    const file = path.join(labA.root, 'small.img');
    writeFileSync(file, Buffer.alloc(256 * 1024, 7));
    const j = await fleet.submit({ kind: 'import', args: { source: file, vm: 'imported' } }, { host: 'hostC', retry: { attempts: 10, backoffMs: 300 } });
    const q = fleet.queue('hostC');
    for (let i = 0; i < 300 && ((await q.getJob(j.id))?.attemptsMade ?? 0) < 2; i++) await sleep(100);
    expect((await q.getJob(j.id))?.attemptsMade).toBeGreaterThanOrEqual(2);
    await held.end();
    await holderRepo.close();
    const r = await finished(q, j.id);
    expect(r.state, r.job.failedReason).toBe('completed');
    expect(r.job.attemptsMade).toBeGreaterThanOrEqual(3);
    expect((await snapshots(labA)).filter((s) => s.vm === 'imported')).toHaveLength(1);
    await impatient.close();
  }, 180_000);

  it('a schedule fires repeatedly and applies its retention', async () => {
    await fleet.addSchedule({ name: 'every2s', vm: 'b1', everyMs: 2000, keep: { last: 2 }, host: 'hostB', created: new Date().toISOString() });
    expect((await fleet.schedules()).map((s) => s.name)).toEqual(['every2s']);
    const q = fleet.queue('hostB');
    let done: string[] = [];
    for (let i = 0; i < 600 && done.length < 3; i++) {
      done = (await q.getJobs(['completed'])).filter((j) => j.name === 'schedule-run').map((j) => j.id!);
      await sleep(200);
    }
    expect(done.length, logs.join('\n')).toBeGreaterThanOrEqual(3);
    await fleet.removeSchedule('every2s');
    // Let a run that was already under way finish before counting.
    for (let i = 0; i < 100 && (await q.getActiveCount()) > 0; i++) await sleep(200);
    const scheduled = (await snapshots(labA)).filter((s) => s.tags.includes('schedule:every2s'));
    expect(scheduled).toHaveLength(2);
    expect(await fleet.schedules()).toEqual([]);
  }, 240_000);

  it('agents reconnect after Redis restarts and carry on', async () => {
    await redis.restart();
    // The registry was in the restarted (empty) Redis: the heartbeats publish it again.
    await fleet.close();
    fleet = await Fleet.connect(redis.url);
    for (let i = 0; i < 200 && (await listHosts(fleet.redis)).length < 2; i++) await sleep(200);
    const j = await fleet.submit({ kind: 'take', args: { vm: 'b1' } });
    const r = await finished(fleet.queue('hostB'), j.id);
    expect(r.state, r.job.failedReason).toBe('completed');
  }, 180_000);

  it('an unreachable Redis is one clear error', async () => {
    const port = await freePort();
    const t0 = Date.now();
    const err = await Fleet.connect(`redis://127.0.0.1:${port}`).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(RedisUnreachableError);
    expect((err as Error).message).toMatch(new RegExp(`cannot reach Redis at redis://127.0.0.1:${port}`));
    expect(Date.now() - t0).toBeLessThan(30_000);
  });
});
