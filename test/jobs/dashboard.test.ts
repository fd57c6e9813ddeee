/**
 * The agent's dashboard in a real headless browser (Debian's chromium): `vmsnap agent --redis
 * --dashboard 127.0.0.1:PORT` with a VM the test created and a job the test ran; the page shows
 * both, bull-board's queue view lists the host's queue, and a screenshot is kept under
 * .cache/artifacts/jobs/ (gitignored). Then the access rules: a token is required off loopback,
 * and a wrong or missing one gets 401.
 */
import { execFile } from 'node:child_process';
import { mkdirSync, statSync } from 'node:fs';
import * as path from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { guestArtifacts } from '../../fixtures/guest/index.js';
import { ROOT } from '../helpers/cli.js';
import { RedisServer, freePort } from '../helpers/redis.js';
import { VmLab } from '../helpers/vm.js';
import { Fleet } from '../../src/jobs/bull.js';
import { DashboardError, startDashboard } from '../../src/jobs/dashboard.js';
import { AgentProcess, finished, labContext } from './helpers.js';

const run = promisify(execFile);
const ARTIFACTS = path.join(ROOT, '.cache', 'artifacts', 'jobs');

let redis: RedisServer;
let lab: VmLab;
let agent: AgentProcess | null = null;
let fleet: Fleet;
let url: string;

/** chromium --headless with the flags a root user in a container needs. */
async function chromium(args: string[]): Promise<string> {
  const r = await run('chromium', ['--headless', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--hide-scrollbars', ...args], { maxBuffer: 64 << 20, timeout: 120_000 });
  return r.stdout;
}

beforeAll(async () => {
  redis = await RedisServer.start();
  lab = await VmLab.create('jobs-dash');
  await lab.ok(['vm', 'create', 'dash-vm', '--memory', '64M', '--disk', '4M', '--kernel', guestArtifacts().bmElf, '--accel', 'tcg']);
  const port = await freePort();
  url = `http://127.0.0.1:${port}/`;
  agent = await AgentProcess.start(lab, ['--redis', redis.url, '--host-id', 'h1', '--dashboard', `127.0.0.1:${port}`]);
  await agent.waitLog(/dashboard at http:\/\/127\.0\.0\.1/);
  fleet = await Fleet.connect(redis.url);
}, 180_000);

afterAll(async () => {
  await agent?.stop('SIGTERM');
  await fleet?.close();
  await redis?.stop();
  await lab?.cleanup();
}, 60_000);

describe('dashboard', () => {
  it('shows the VM the test created and the job it ran, in a real browser; the queue view lists the host', async () => {
    const j = await fleet.submit({ kind: 'take', args: { vm: 'dash-vm' } });
    const r = await finished(fleet.queue('h1'), j.id);
    expect(r.state, r.job.failedReason).toBe('completed');
    const snap: string = r.job.returnvalue.snapshot;
    // The page caches the repository figures for 30 s: the agent served none before this job.
    const dom = await chromium(['--dump-dom', url]);
    expect(dom).toContain('data-vm="dash-vm"');
    expect(dom).toContain(`data-job="${j.id}"`);
    expect(dom).toContain(snap.slice(0, 12));
    expect(dom).toMatch(/dedup ratio <b id="dedup">[0-9.]+<\/b>/);
    mkdirSync(ARTIFACTS, { recursive: true });
    const shot = path.join(ARTIFACTS, 'dashboard.png');
    await chromium([`--screenshot=${shot}`, '--window-size=1280,1400', url]);
    expect(statSync(shot).size).toBeGreaterThan(10_000);
    // bull-board renders in the browser from its API: let its scripts run before the DOM is dumped.
    const queues = await chromium(['--virtual-time-budget=15000', '--dump-dom', `${url}queues`]);
    expect(queues).toContain('host-h1');
    await chromium([`--screenshot=${path.join(ARTIFACTS, 'queues.png')}`, '--window-size=1280,900', '--virtual-time-budget=15000', `${url}queues`]);
  }, 300_000);

  it('needs a token off loopback, and refuses a missing or wrong one', async () => {
    const ctx = labContext(lab, 'h1');
    const base = { dataDir: lab.dataDir, hostId: 'h1', openRepo: ctx.openRepo };
    await expect(startDashboard({ ...base, listen: '0.0.0.0:0' })).rejects.toThrow(DashboardError);
    await expect(startDashboard({ ...base, listen: 'nonsense' })).rejects.toThrow(/HOST:PORT/);
    const token = 'a-token-of-some-length-42';
    const d = await startDashboard({ ...base, listen: '127.0.0.1:0', token });
    try {
      expect((await fetch(d.url)).status).toBe(401);
      expect((await fetch(d.url, { headers: { authorization: 'Bearer wrong-token-wrong-token' } })).status).toBe(401);
      const ok = await fetch(d.url, { headers: { authorization: `Bearer ${token}` } });
      expect(ok.status).toBe(200);
      expect(await ok.text()).toContain('data-vm="dash-vm"');
      const viaQuery = await fetch(`${d.url}api/summary?token=${token}`);
      expect(viaQuery.status).toBe(200);
      const cookie = viaQuery.headers.get('set-cookie') ?? '';
      expect(cookie).toMatch(/HttpOnly; SameSite=Strict/);
      expect((await fetch(`${d.url}api/summary`, { headers: { cookie: cookie.split(';')[0]! } })).status).toBe(200);
    } finally {
      await d.close();
    }
  }, 120_000);
});
