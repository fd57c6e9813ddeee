/**
 * End to end on a running VM: the bare-metal fixture guest (KVM when usable, else TCG), a real
 * redis-server, and `vmsnap agent --redis` processes. A schedule added with the CLI makes the agent
 * take live snapshots (RAM included) and apply retention; `vmsnap jobs --redis --json` shows the
 * runs; an agent killed with SIGKILL in the middle of a take is restarted, the job runs again and
 * exactly one snapshot carries its idempotency key.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { kvmUsable } from '../../fixtures/guest/index.js';
import { RedisServer } from '../helpers/redis.js';
import { VmLab } from '../helpers/vm.js';
import { Fleet } from '../../src/jobs/bull.js';
import type { JobRecord } from '../../src/jobs/model.js';
import { AgentProcess, finished, sleep, snapshots } from './helpers.js';

let redis: RedisServer;
let lab: VmLab;
let agent: AgentProcess | null = null;
let fleet: Fleet;
// A killed agent's job is taken up again once its lock expires: 4 s here instead of 30.
const AGENT_ENV = { VMSNAP_AGENT_LOCK_MS: '4000' };

beforeAll(async () => {
  redis = await RedisServer.start();
  lab = await VmLab.create('jobs-vm');
  const kvm = await kvmUsable();
  await lab.createBmVm('g1', kvm ? { accel: 'kvm', memMiB: 1, rate: 200, slowCpu: true } : { accel: 'tcg', memMiB: 8, rate: 2000 });
  await lab.start('g1');
  agent = await AgentProcess.start(lab, ['--redis', redis.url, '--host-id', 'h1'], AGENT_ENV);
  fleet = await Fleet.connect(redis.url);
}, 240_000);

afterAll(async () => {
  await agent?.stop('SIGKILL');
  await fleet?.close();
  await redis?.stop();
  await lab?.cleanup();
}, 60_000);

describe('vmsnap agent on a running VM', () => {
  it('a schedule takes live snapshots of the VM and applies its retention; jobs lists the runs', async () => {
    await lab.ok(['schedule', 'add', 'often', '--vm', 'g1', '--every', '3s', '--keep-last', '2', '--redis', redis.url]);
    const ls = await lab.json<{ name: string; host: string }[]>(['schedule', 'ls', '--redis', redis.url]);
    expect(ls).toMatchObject([{ name: 'often', host: 'h1' }]);
    const done = async () => (await lab.json<JobRecord[]>(['jobs', '--redis', redis.url])).filter((j) => j.kind === 'schedule-run' && j.state === 'completed');
    for (let i = 0; i < 200 && (await done()).length < 3; i++) await sleep(500);
    const runs = await done();
    expect(runs.length, agent!.log).toBeGreaterThanOrEqual(3);
    await lab.ok(['schedule', 'rm', 'often', '--redis', redis.url]);
    const take = (runs[0]!.result as { take: { snapshot: string; diskOnly: boolean; ramBytes: number } }).take;
    expect(take.diskOnly).toBe(false);
    expect(take.ramBytes).toBeGreaterThan(0);
    for (let i = 0; i < 100 && (await fleet.queue('h1').getActiveCount()) > 0; i++) await sleep(200);
    expect((await snapshots(lab)).filter((s) => s.tags.includes('schedule:often'))).toHaveLength(2);
  }, 300_000);

  it('an agent killed mid-take: the job runs again after a restart and makes exactly one snapshot', async () => {
    const q = fleet.queue('h1');
    const j = await fleet.submit({ kind: 'take', args: { vm: 'g1' }, key: 'kill-test' });
    for (let i = 0; i < 600 && (await (await q.getJob(j.id))?.getState()) !== 'active'; i++) await sleep(20);
    expect(await (await q.getJob(j.id))?.getState()).toBe('active');
    await agent!.stop('SIGKILL');
    agent = await AgentProcess.start(lab, ['--redis', redis.url, '--host-id', 'h1'], AGENT_ENV);
    const r = await finished(q, j.id, 180_000);
    expect(r.state, `${r.job.failedReason}\n${agent.log}`).toBe('completed');
    const tagged = (await snapshots(lab)).filter((s) => s.tags.includes('job:kill-test'));
    expect(tagged).toHaveLength(1);
    expect(r.job.returnvalue.snapshot).toBe(tagged[0]!.id);
    // The guest went on running through all of it.
    expect((await lab.show('g1')).status.state).toBe('running');
  }, 300_000);
});
