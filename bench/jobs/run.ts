/**
 * bench/jobs: the job queues' own cost, embedded runner vs BullMQ on a real redis-server.
 *
 * Both sides run the product's queue code (src/jobs/embedded.ts EmbeddedRunner + schedule.ts
 * EmbeddedScheduler; src/jobs/bull.ts Fleet + BullAgent) with the handler replaced by a stub
 * (the `handler` option both runners take), so what is measured is the queue, not an operation:
 *
 * - overhead: N empty jobs submitted and drained, jobs per second (submit of the first to
 *   completion of the last);
 * - latency: a schedule every `--every-ms`, how late each firing's handler starts after its due
 *   time (embedded: the previous firing + interval, as the scheduler defines it; BullMQ: the slot
 *   in the scheduler's job id `repeat:NAME:MILLIS`);
 * - drain: `--takes` take jobs for the VMs of 5 agents (host ids h1..h5, each publishing 10 VMs in
 *   the registry, one process), routed by Fleet.submit through the registry; each stub records
 *   (host, job id, idempotency key) and sleeps `--take-ms`. Exits 1 on a duplicate, a lost job or a
 *   job run on the wrong host.
 *
 * redis-server is started on a free loopback port (test/helpers/redis.ts) and stopped at the end.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { loadavg, tmpdir } from 'node:os';
import * as path from 'node:path';
import { EmbeddedRunner, systemClock, type JobHandler } from '../../src/jobs/embedded.js';
import { BullAgent, Fleet, type HostVm } from '../../src/jobs/bull.js';
import { EmbeddedScheduler, ScheduleFile, type ScheduleDef } from '../../src/jobs/schedule.js';
import type { JobContext } from '../../src/jobs/handlers.js';
import { RedisServer } from '../../test/helpers/redis.js';
import { arg, argNum, fmt, median, table } from '../common/measure.js';

const parts = arg('--part', 'overhead,latency,drain').split(',');
const N = argNum('--jobs', 2000);
const CONCURRENCY = argNum('--concurrency', 2);
const EVERY_MS = argNum('--every-ms', 2000);
const FIRINGS = argNum('--firings', 6);
const TAKES = argNum('--takes', 1000);
const TAKE_MS = argNum('--take-ms', 5);
const HOSTS = 5;
const VMS_PER_HOST = 10;

/** The handlers are stubs, so the agent context needs nothing but its host id. */
const ctxOf = (hostId: string) => ({ hostId }) as unknown as JobContext;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const EMPTY = { kind: 'check', args: {} } as const;

async function until(cond: () => boolean, timeoutMs: number): Promise<boolean> {
  const end = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > end) return false;
    await sleep(5);
  }
  return true;
}

async function startAgent(url: string, host: string, handler: JobHandler, vms: HostVm[] = []): Promise<{ agent: BullAgent; completed: () => number }> {
  const agent = await BullAgent.start({ url, ctx: ctxOf(host), concurrency: CONCURRENCY, listVms: async () => vms, handler, heartbeatMs: 60_000 });
  let n = 0;
  agent.worker.on('completed', () => n++);
  return { agent, completed: () => n };
}

// ---- (a) per-job overhead ----

async function overheadEmbedded(): Promise<{ s: number }> {
  const runner = new EmbeddedRunner({ ctx: ctxOf('local'), concurrency: CONCURRENCY, handler: async () => null });
  const t0 = performance.now();
  const ids = [];
  for (let i = 0; i < N; i++) ids.push(runner.submit(EMPTY).id);
  const recs = await Promise.all(ids.map((id) => runner.wait(id)));
  const s = (performance.now() - t0) / 1000;
  await runner.close();
  if (recs.some((r) => r.state !== 'completed')) throw new Error('an empty embedded job did not complete');
  return { s };
}

/**
 * Two BullMQ figures: submit-and-run (each Fleet.submit awaited, as `vmsnap` submits, the worker
 * already running) and worker-only (N jobs queued first, then the agent started and timed).
 */
async function overheadBull(url: string): Promise<{ s: number; submitS: number; workerS: number }> {
  const fleet = await Fleet.connect(url);
  try {
    let a = await startAgent(url, 'h1', async () => null);
    const t0 = performance.now();
    for (let i = 0; i < N; i++) await fleet.submit(EMPTY, { host: 'h1' });
    const submitS = (performance.now() - t0) / 1000;
    if (!(await until(() => a.completed() >= N, 300_000))) throw new Error(`BullMQ: only ${a.completed()} of ${N} empty jobs completed`);
    const s = (performance.now() - t0) / 1000;
    await a.agent.close();
    for (let i = 0; i < N; i++) await fleet.submit(EMPTY, { host: 'h1' });
    const t1 = performance.now();
    a = await startAgent(url, 'h1', async () => null);
    const done = await until(() => a.completed() >= N, 300_000);
    const workerS = (performance.now() - t1) / 1000;
    await a.agent.close();
    if (!done) throw new Error(`BullMQ worker-only: only ${a.completed()} of ${N} empty jobs completed`);
    return { s, submitS, workerS };
  } finally {
    await fleet.redis.flushall();
    await fleet.close();
  }
}

// ---- (b) schedule latency ----

function schedule(host: string): ScheduleDef {
  return { name: 'bench', vm: 'vm1', everyMs: EVERY_MS, keep: { last: 1 }, host, created: new Date().toISOString() };
}

async function latencyEmbedded(): Promise<number[]> {
  const dir = mkdtempSync(path.join(tmpdir(), 'vmsnap-bench-jobs-'));
  const file = new ScheduleFile(dir);
  await file.add(schedule('local'));
  const started: { key: string; at: number }[] = [];
  const runner = new EmbeddedRunner({ ctx: ctxOf('local'), handler: async (_spec, run) => void started.push({ key: run.key, at: Date.now() }) });
  // The local agent's wiring (src/jobs/local.ts): each firing is submitted to the runner; tick 1 s.
  const sched = new EmbeddedScheduler(file, (f) => runner.submit(f.spec), { clock: systemClock, tickMs: 1000 });
  sched.start();
  try {
    await until(() => started.length >= FIRINGS + 1, (FIRINGS + 2) * (EVERY_MS + 1500));
  } finally {
    await sched.stop();
    await runner.close();
    rmSync(dir, { recursive: true, force: true });
  }
  // key sched:bench:<fired at>; the first firing (never fired before) is due at once, not measured.
  const fired = started.map((s) => ({ ...s, fired: Number(s.key.split(':').pop()) }));
  return fired.slice(1, FIRINGS + 1).map((f, i) => f.at - (fired[i]!.fired + EVERY_MS));
}

async function latencyBull(url: string): Promise<number[]> {
  const fleet = await Fleet.connect(url);
  const started: { key: string; at: number }[] = [];
  const { agent } = await startAgent(url, 'h1', async (_spec, run) => void started.push({ key: run.key, at: Date.now() }));
  try {
    await fleet.addSchedule(schedule('h1'));
    await until(() => started.length >= FIRINGS + 1, (FIRINGS + 2) * (EVERY_MS + 1500));
    await fleet.removeSchedule('bench');
  } finally {
    await agent.close();
    await fleet.redis.flushall();
    await fleet.close();
  }
  // key = the job id repeat:bench:<slot ms>; the first firing (at once on creation) is not measured.
  const bad = started.find((s) => !/^repeat:bench:\d+$/.test(s.key));
  if (bad) throw new Error(`unexpected scheduler job id ${bad.key}`);
  return started.slice(1, FIRINGS + 1).map((s) => s.at - Number(s.key.split(':').pop()));
}

// ---- (c) 1,000 takes across 5 hosts ----

async function drain(url: string): Promise<boolean> {
  const fleet = await Fleet.connect(url);
  const hosts = Array.from({ length: HOSTS }, (_, i) => `h${i + 1}`);
  const vmsOf = (h: string) => Array.from({ length: VMS_PER_HOST }, (_, j) => `vm-${h}-${j}`);
  const ran: { host: string; id: string; key: string; vm: string }[] = [];
  const agents = await Promise.all(
    hosts.map((h) =>
      startAgent(
        url,
        h,
        async (spec, run) => {
          ran.push({ host: h, id: run.id, key: run.key, vm: (spec.args as { vm: string }).vm });
          await sleep(TAKE_MS);
          return { snapshot: run.key, reused: false };
        },
        vmsOf(h).map((name) => ({ name, state: 'running', lastSnapshot: null })),
      ),
    ),
  );
  const allVms = hosts.flatMap(vmsOf);
  const submitted = new Map<string, string>(); // key -> host routed to
  let ok = true;
  try {
    const t0 = performance.now();
    for (let i = 0; i < TAKES; i++) {
      const key = `bench-take-${i}`;
      const r = await fleet.submit({ kind: 'take', args: { vm: allVms[i % allVms.length]! }, key });
      submitted.set(key, r.host);
    }
    const submitS = (performance.now() - t0) / 1000;
    const completed = () => agents.reduce((n, a) => n + a.completed(), 0);
    const done = await until(() => completed() >= TAKES, 300_000);
    const drainS = (performance.now() - t0) / 1000;
    await sleep(2000); // a late redelivery would show up here as a duplicate
    const counts = await Promise.all(hosts.map((h) => fleet.queue(h).getJobCounts('waiting', 'active', 'delayed', 'failed', 'prioritized')));
    const left = counts.reduce((n, c) => n + Object.values(c).reduce((a, b) => a + b, 0), 0);
    const byKey = new Map<string, number>();
    for (const r of ran) byKey.set(r.key, (byKey.get(r.key) ?? 0) + 1);
    const dups = [...byKey.values()].filter((n) => n > 1).length;
    const lost = [...submitted.keys()].filter((k) => !byKey.has(k)).length;
    const unknown = [...byKey.keys()].filter((k) => !submitted.has(k)).length;
    const wrongHost = ran.filter((r) => submitted.get(r.key) !== r.host || !r.vm.startsWith(`vm-${r.host}-`)).length;
    console.log(`\n## (c) ${TAKES} takes across ${HOSTS} hosts (concurrency ${CONCURRENCY} per agent, stub take ${TAKE_MS} ms)\n`);
    console.log(
      table(
        ['host', 'routed', 'ran', 'completed'],
        hosts.map((h, i) => [h, String([...submitted.values()].filter((x) => x === h).length), String(ran.filter((r) => r.host === h).length), String(agents[i]!.completed())]),
      ),
    );
    console.log(`\nsubmitted ${submitted.size} in ${fmt(submitS, 2)} s; all completed: ${done} after ${fmt(drainS, 2)} s (${fmt(TAKES / drainS, 0)} takes/s)`);
    console.log(`handler runs ${ran.length}, distinct keys ${byKey.size}, duplicates ${dups}, lost ${lost}, unknown ${unknown}, wrong host ${wrongHost}, left in queues ${left}`);
    ok = done && ran.length === TAKES && byKey.size === TAKES && dups === 0 && lost === 0 && unknown === 0 && wrongHost === 0 && left === 0;
    console.log(ok ? 'DRAIN OK: no duplicate, no lost job' : 'DRAIN FAILED');
  } finally {
    for (const a of agents) await a.agent.close();
    await fleet.redis.flushall();
    await fleet.close();
  }
  return ok;
}

function stats(xs: number[]): string[] {
  const s = [...xs].sort((a, b) => a - b);
  return [String(s.length), fmt(median(s), 0), fmt(s[0] ?? NaN, 0), fmt(s[s.length - 1] ?? NaN, 0)];
}

async function main(): Promise<number> {
  console.log(`# bench/jobs ${new Date().toISOString()} load ${loadavg().map((l) => l.toFixed(1)).join(' ')}`);
  const redis = await RedisServer.start();
  let ok = true;
  try {
    if (parts.includes('overhead')) {
      const e = await overheadEmbedded();
      const b = await overheadBull(redis.url);
      console.log(`\n## (a) per-job overhead: ${N} empty jobs, concurrency ${CONCURRENCY}\n`);
      console.log(
        table(
          ['runner', 'total s', 'jobs/s', 'ms/job'],
          [
            ['embedded', fmt(e.s, 3), fmt(N / e.s, 0), fmt((e.s * 1000) / N, 3)],
            [`BullMQ submit+run (submits ${fmt(b.submitS, 2)} s)`, fmt(b.s, 3), fmt(N / b.s, 0), fmt((b.s * 1000) / N, 3)],
            ['BullMQ worker only (queued first)', fmt(b.workerS, 3), fmt(N / b.workerS, 0), fmt((b.workerS * 1000) / N, 3)],
          ],
        ),
      );
      console.log(`\nembedded/BullMQ jobs/s: ${fmt(b.s / e.s, 1)}x submit+run, ${fmt(b.workerS / e.s, 1)}x worker only`);
    }
    if (parts.includes('latency')) {
      const [e, b] = await Promise.all([latencyEmbedded(), latencyBull(redis.url)]);
      console.log(`\n## (b) schedule latency: every ${EVERY_MS} ms, ${FIRINGS} firings after the first (handler start − due time, ms)\n`);
      console.log(table(['scheduler', 'firings', 'median', 'min', 'max'], [['embedded (tick 1 s)', ...stats(e)], ['BullMQ job scheduler', ...stats(b)]]));
      console.log(`\nembedded raw: ${e.join(' ')}\nBullMQ raw: ${b.join(' ')}`);
    }
    if (parts.includes('drain')) ok = (await drain(redis.url)) && ok;
  } finally {
    await redis.stop();
  }
  return ok ? 0 : 1;
}

main().then(
  (code) => process.exit(code),
  (err: unknown) => {
    console.error(err);
    process.exit(2);
  },
);
