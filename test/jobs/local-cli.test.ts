/**
 * The host daemon without Redis, through the CLI: schedules in the data folder, `schedule run-now`
 * in-process when no agent runs and through the agent's inbox when one does, the local agent firing
 * schedules and applying retention, `vmsnap jobs --json`, and bad input (intervals, no policy, an
 * unreachable Redis) as clear errors. The VM is defined, not started (a stopped take).
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { existsSync } from 'node:fs';
import * as path from 'node:path';
import { guestArtifacts } from '../../fixtures/guest/index.js';
import { VmLab } from '../helpers/vm.js';
import { freePort } from '../helpers/redis.js';
import type { JobRecord } from '../../src/jobs/model.js';
import { AgentProcess, sleep, snapshots } from './helpers.js';

let lab: VmLab;
let agent: AgentProcess | null = null;

beforeAll(async () => {
  lab = await VmLab.create('jobs-local');
  await lab.ok(['vm', 'create', 'v1', '--memory', '64M', '--disk', '4M', '--kernel', guestArtifacts().bmElf, '--accel', 'tcg']);
}, 120_000);

afterAll(async () => {
  await agent?.stop('SIGKILL');
  await lab?.cleanup();
});

const jobs = () => lab.json<JobRecord[]>(['jobs']);

describe('local agent (no Redis)', () => {
  it('refuses bad schedules and an unreachable Redis with one clear line', async () => {
    const bad = await lab.run(['schedule', 'add', 's', '--vm', 'v1', '--every', 'soon', '--keep-last', '1']);
    expect([bad.code, bad.stderr.trim()]).toEqual([2, 'vmsnap: --every takes an interval such as 30s, 15m, 1h, 1d, 1w (or hourly, daily, weekly) of at least 1s, got "soon"']);
    const nokeep = await lab.run(['schedule', 'add', 's', '--vm', 'v1', '--every', '1h']);
    expect(nokeep.code).toBe(2);
    expect(nokeep.stderr).toMatch(/needs a retention policy/);
    const port = await freePort();
    const r = await lab.run(['jobs', '--redis', `redis://127.0.0.1:${port}`]);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(new RegExp(`^vmsnap: cannot reach Redis at redis://127.0.0.1:${port}: .*ECONNREFUSED`));
    const missing = await lab.run(['schedule', 'run-now', 'nosuch']);
    expect([missing.code, missing.stderr.trim()]).toEqual([2, 'vmsnap: no schedule named nosuch (see vmsnap schedule ls)']);
  }, 120_000);

  it('run-now without an agent runs the schedule here: take, then retention', async () => {
    await lab.ok(['schedule', 'add', 'hourly', '--vm', 'v1', '--every', '1h', '--keep-last', '1', '--check', 'weekly']);
    const ls = await lab.json<{ name: string; vm: string; everyMs: number; checkEveryMs: number }[]>(['schedule', 'ls']);
    expect(ls).toMatchObject([{ name: 'hourly', vm: 'v1', everyMs: 3_600_000, checkEveryMs: 7 * 86_400_000 }]);
    const first = await lab.json<JobRecord>(['schedule', 'run-now', 'hourly']);
    const second = await lab.json<JobRecord>(['schedule', 'run-now', 'hourly']);
    expect([first.state, second.state]).toEqual(['completed', 'completed']);
    const r2 = second.result as { take: { snapshot: string }; forgotten: string[] };
    expect(r2.forgotten).toEqual([(first.result as { take: { snapshot: string } }).take.snapshot]);
    const snaps = (await snapshots(lab)).filter((s) => s.vm === 'v1');
    expect(snaps.map((s) => s.id)).toEqual([r2.take.snapshot]);
    expect(snaps[0]!.tags).toContain('schedule:hourly');
    expect((await jobs()).filter((j) => j.kind === 'schedule-run' && j.state === 'completed')).toHaveLength(2);
    await lab.ok(['schedule', 'rm', 'hourly']);
    expect(await lab.json(['schedule', 'ls'])).toEqual([]);
  }, 180_000);

  it('the agent fires schedules, catches run-now through its inbox, and stops on SIGTERM', async () => {
    await lab.ok(['schedule', 'add', 'fast', '--vm', 'v1', '--every', '2s', '--keep-last', '2']);
    agent = await AgentProcess.start(lab, ['--host-id', 'laptop'], { VMSNAP_AGENT_TICK_MS: '200' });
    const runs = async () => (await jobs()).filter((j) => j.kind === 'schedule-run' && j.state === 'completed' && j.host === 'laptop');
    for (let i = 0; i < 300 && (await runs()).length < 3; i++) await sleep(300);
    expect((await runs()).length, agent.log).toBeGreaterThanOrEqual(3);
    const handed = await lab.ok(['schedule', 'run-now', 'fast']);
    expect(handed.stdout).toMatch(/handed to the local agent/);
    await agent.waitLog(/queued from the inbox/);
    await lab.ok(['schedule', 'rm', 'fast']);
    expect(await agent.stop('SIGTERM')).toBe(0);
    agent = null;
    expect(existsSync(path.join(lab.dataDir, 'agent', 'agent.pid'))).toBe(false);
    // Retention ran after each take: at most two of this schedule's snapshots are left.
    expect((await snapshots(lab)).filter((s) => s.tags.includes('schedule:fast')).length).toBeLessThanOrEqual(2);
    const text = await lab.ok(['jobs']);
    expect(text.stdout).toMatch(/schedule-run\s+v1\s+completed/);
  }, 240_000);
});
