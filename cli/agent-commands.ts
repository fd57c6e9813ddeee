/**
 * `vmsnap agent`, `vmsnap schedule add|ls|rm|run-now` and `vmsnap jobs`: the host daemon and its
 * schedules (src/jobs). With `--redis URL` (or VMSNAP_REDIS) jobs and schedules live in Redis
 * (BullMQ, one queue per host); without, the local agent runs them from `<dataDir>/schedules.json`
 * and keeps its job records under `<dataDir>/agent/`.
 */
import { hostname } from 'node:os';
import { readFileSync } from 'node:fs';
import type { Command } from 'commander';
import { UsageError } from '../src/store/errors.js';
import { checkName } from '../src/store/manifest.js';
import type { RetentionPolicy } from '../src/store/retention.js';
import { openCopyTarget } from '../src/ops/copy.js';
import { GuestLocks, RepoGate } from '../src/jobs/locks.js';
import type { JobContext } from '../src/jobs/handlers.js';
import { EmbeddedRunner } from '../src/jobs/embedded.js';
import type { Fleet } from '../src/jobs/bull.js';
import { hostVms, LocalAgent, localAgentPid, sendToLocalAgent } from '../src/jobs/local.js';
import { JobFileStore } from '../src/jobs/store.js';
import { formatInterval, parseInterval, ScheduleFile, scheduleJobs, type ScheduleDef } from '../src/jobs/schedule.js';
import type { JobRecord } from '../src/jobs/model.js';
import { dataDir, openBackendAt, vmOpsContext, type GlobalOptions } from './context.js';
import { humanBytes, printJson, shortId } from './output.js';

type Globals = () => GlobalOptions;

const int = (flag: string) => (v: string) => {
  const n = Number(v);
  if (!Number.isInteger(n) || n < 0) throw new UsageError(`${flag} must be a non-negative whole number, got ${JSON.stringify(v)}`);
  return n;
};

function redisUrl(o: { redis?: string }): string | undefined {
  return o.redis ?? process.env.VMSNAP_REDIS;
}

/** This host's id: --host-id, VMSNAP_HOST_ID, or the host name (made a safe name). */
function hostId(o: { hostId?: string }): string {
  const id = o.hostId ?? process.env.VMSNAP_HOST_ID ?? hostname().replace(/[^A-Za-z0-9._-]/g, '-');
  return checkName('host id', id);
}

/** What the job handlers need, from this command's settings. */
export function jobContext(g: GlobalOptions, host: string): JobContext {
  return {
    ...vmOpsContext(g),
    hostId: host,
    guests: new GuestLocks(),
    gate: new RepoGate(),
    openTarget: async (location, src, o) => {
      let pw = process.env.VMSNAP_TO_PASSWORD;
      if (o.passwordFile) {
        try {
          pw = readFileSync(o.passwordFile, 'utf8').replace(/\r?\n$/, '');
        } catch (err) {
          throw new UsageError(`cannot read password file ${o.passwordFile}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
        }
      }
      return openCopyTarget(await openBackendAt(location), src, pw, o.init);
    },
  };
}

/**
 * BullMQ and ioredis take about 400 ms to load, paid by every vmsnap command if imported at the
 * top: only the commands that talk to Redis load them.
 */
async function bull(): Promise<typeof import('../src/jobs/bull.js')> {
  return import('../src/jobs/bull.js');
}

async function connectFleet(url: string): Promise<Fleet> {
  return (await bull()).Fleet.connect(url);
}

async function withFleet<T>(url: string, fn: (f: Fleet) => Promise<T>): Promise<T> {
  const fleet = await connectFleet(url);
  try {
    return await fn(fleet);
  } finally {
    await fleet.close();
  }
}

function readToken(file: string): string {
  let t: string;
  try {
    t = readFileSync(file, 'utf8').trim();
  } catch (err) {
    throw new UsageError(`cannot read the dashboard token file ${file}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
  if (t.length < 16) throw new UsageError(`the dashboard token in ${file} is too short: use at least 16 characters`);
  return t;
}

const log = (line: string) => process.stderr.write(`${new Date().toISOString()} ${line}\n`);

/**
 * Resolves at the first SIGINT or SIGTERM; a second one ends the process at once. The handlers stay
 * installed: a repository lock's own signal handler (src/store/lock.ts) then leaves the decision to
 * this one instead of killing the process while it finishes its running jobs.
 */
function untilSignal(): Promise<string> {
  return new Promise((resolve) => {
    let seen = false;
    const on = (s: NodeJS.Signals) => {
      if (seen) process.exit(128 + (s === 'SIGINT' ? 2 : 15));
      seen = true;
      resolve(s);
    };
    for (const s of ['SIGINT', 'SIGTERM'] as const) process.on(s, on);
  });
}

export function registerAgentCommands(program: Command, globals: Globals): void {
  program
    .command('agent')
    .description('run the host daemon: scheduled and queued jobs for this host (BullMQ on Redis with --redis, else local)')
    .option('--redis <url>', 'Redis to take jobs from, e.g. redis://127.0.0.1:6379 (env VMSNAP_REDIS)')
    .option('--host-id <id>', "this host's id in the fleet (env VMSNAP_HOST_ID; default: the host name)")
    .option('--concurrency <n>', 'jobs at once (jobs of one VM always one at a time)', int('--concurrency'), 2)
    .option('--dashboard <addr>', 'serve the dashboard at HOST:PORT (a loopback address unless a token is given)')
    .option('--dashboard-token-file <file>', 'a file holding the token the dashboard requires (needed to bind other than loopback)')
    .action(async (o: { redis?: string; hostId?: string; concurrency: number; dashboard?: string; dashboardTokenFile?: string }) => {
      const g = globals();
      const host = hostId(o);
      const url = redisUrl(o);
      const ctx = jobContext(g, host);
      const concurrency = Math.max(1, o.concurrency);
      const stops: (() => Promise<void>)[] = [];
      // Read before anything starts: a bad token file or address must not leave an agent half up.
      const token = o.dashboardTokenFile !== undefined ? readToken(o.dashboardTokenFile) : undefined;
      if (url) {
        // Reachability is checked once for a clear first line; later outages the worker rides out.
        await withFleet(url, async () => undefined);
        const agent = await (await bull()).BullAgent.start({
          url,
          ctx,
          concurrency,
          listVms: () => hostVms(ctx.dataDir),
          log,
          ...(process.env.VMSNAP_AGENT_LOCK_MS ? { lockDurationMs: Number(process.env.VMSNAP_AGENT_LOCK_MS) } : {}),
          ...(o.dashboard ? { dashboard: o.dashboard } : {}),
        });
        stops.push(() => agent.close());
        log(`agent ${host}: taking jobs from ${url} (queue host-${host}, concurrency ${concurrency})`);
      } else {
        const agent = new LocalAgent({ ctx, concurrency, log, ...(process.env.VMSNAP_AGENT_TICK_MS ? { tickMs: Number(process.env.VMSNAP_AGENT_TICK_MS) } : {}) });
        await agent.start();
        stops.push(() => agent.stop());
        log(`agent ${host}: running local schedules from ${new ScheduleFile(ctx.dataDir).file} (concurrency ${concurrency})`);
      }
      if (o.dashboard) {
        try {
          const { startDashboard } = await import('../src/jobs/dashboard.js');
          const d = await startDashboard({ listen: o.dashboard, dataDir: ctx.dataDir, hostId: host, openRepo: ctx.openRepo, ...(token ? { token } : {}), ...(url ? { redisUrl: url } : {}) });
          stops.push(() => d.close());
          log(`dashboard at ${d.url}`);
        } catch (err) {
          for (const s of stops.reverse()) await s();
          throw err;
        }
      }
      const sig = await untilSignal();
      log(`${sig}: finishing running jobs`);
      for (const s of stops.reverse()) await s();
    });

  const schedule = program.command('schedule').description('snapshots on a schedule, with retention, copies and checks');
  schedule
    .command('add <name>')
    .description('add a schedule: take VM every INTERVAL, forget by the --keep-* policy (and prune), optionally copy and check')
    .requiredOption('--vm <name>', 'the VM to snapshot')
    .requiredOption('--every <interval>', 'how often: 30s, 15m, 1h, 1d, 1w, hourly, daily, weekly')
    .option('--keep-last <n>', 'keep the n newest', int('--keep-last'))
    .option('--keep-hourly <n>', 'keep the newest of each of the last n hours', int('--keep-hourly'))
    .option('--keep-daily <n>', 'keep the newest of each of the last n days', int('--keep-daily'))
    .option('--keep-weekly <n>', 'keep the newest of each of the last n weeks', int('--keep-weekly'))
    .option('--keep-monthly <n>', 'keep the newest of each of the last n months', int('--keep-monthly'))
    .option('--copy-to <repo>', 'after each take, copy the VM\'s snapshots to this repository (created if missing)')
    .option('--check <interval>', 'check the repository this often (e.g. weekly)')
    .option('--host <id>', 'the host whose agent runs it (with --redis; default: the host that has the VM)')
    .option('--redis <url>', 'store it in Redis (env VMSNAP_REDIS)')
    .action(async (name: string, o: { vm: string; every: string; keepLast?: number; keepHourly?: number; keepDaily?: number; keepWeekly?: number; keepMonthly?: number; copyTo?: string; check?: string; host?: string; redis?: string }) => {
      const g = globals();
      checkName('schedule name', name);
      checkName('VM name', o.vm);
      const keep: RetentionPolicy = Object.fromEntries(
        Object.entries({ last: o.keepLast, hourly: o.keepHourly, daily: o.keepDaily, weekly: o.keepWeekly, monthly: o.keepMonthly }).filter(([, v]) => v !== undefined),
      );
      if (!Object.keys(keep).length) throw new UsageError('a schedule needs a retention policy: give at least one --keep-* option (snapshots would pile up forever)');
      const def: ScheduleDef = {
        name,
        vm: o.vm,
        everyMs: parseInterval('--every', o.every),
        keep,
        host: '',
        created: new Date().toISOString(),
        ...(o.copyTo !== undefined ? { copyTo: o.copyTo } : {}),
        ...(o.check !== undefined ? { checkEveryMs: parseInterval('--check', o.check) } : {}),
      };
      const url = redisUrl(o);
      if (url) {
        await withFleet(url, async (f) => {
          def.host = o.host !== undefined ? checkName('host id', o.host) : await f.route({ kind: 'take', args: { vm: o.vm } });
          await f.addSchedule(def);
        });
      } else {
        def.host = hostId({});
        await new ScheduleFile(dataDir()).add(def);
      }
      if (g.json) printJson(def);
      else console.log(`schedule ${name}: ${o.vm} every ${formatInterval(def.everyMs)} on ${def.host}${def.copyTo ? `, copied to ${def.copyTo}` : ''}${def.checkEveryMs ? `, checked every ${formatInterval(def.checkEveryMs)}` : ''}`);
    });

  schedule
    .command('ls')
    .description('list schedules')
    .option('--redis <url>', 'the schedules in Redis (env VMSNAP_REDIS)')
    .action(async (o: { redis?: string }) => {
      const g = globals();
      const url = redisUrl(o);
      const { list, next } = url
        ? await withFleet(url, async (f) => ({ list: await f.schedules(), next: await f.nextRuns() }))
        : { list: await new ScheduleFile(dataDir()).list(), next: await localNextRuns() };
      if (g.json) return printJson(list.map((s) => ({ ...s, next: next[s.name] !== undefined ? new Date(next[s.name]!).toISOString() : null })));
      if (!list.length) return console.log('no schedules');
      for (const s of list) {
        const keep = Object.entries(s.keep).map(([k, v]) => `${k} ${String(v)}`).join(', ');
        const n = next[s.name];
        console.log(`${s.name.padEnd(16)} ${s.vm.padEnd(14)} every ${formatInterval(s.everyMs).padEnd(5)} keep ${keep}${s.copyTo ? `; copy to ${s.copyTo}` : ''}${s.checkEveryMs ? `; check every ${formatInterval(s.checkEveryMs)}` : ''}; host ${s.host}; next ${n !== undefined ? new Date(n).toISOString() : '-'}`);
      }
    });

  schedule
    .command('rm <name>')
    .description('remove a schedule (jobs it already queued still run)')
    .option('--redis <url>', 'the schedules in Redis (env VMSNAP_REDIS)')
    .action(async (name: string, o: { redis?: string }) => {
      const url = redisUrl(o);
      const s = url ? await withFleet(url, (f) => f.removeSchedule(name)) : await new ScheduleFile(dataDir()).remove(name);
      if (globals().json) printJson({ removed: s.name });
      else console.log(`removed schedule ${s.name}`);
    });

  schedule
    .command('run-now <name>')
    .description('run a schedule once now (take, retention, copy); without an agent running, in this process')
    .option('--redis <url>', 'queue it in Redis (env VMSNAP_REDIS)')
    .action(async (name: string, o: { redis?: string }) => {
      const g = globals();
      const url = redisUrl(o);
      const stamp = Date.now();
      if (url) {
        const r = await withFleet(url, async (f) => {
          const s = (await f.schedules()).find((x) => x.name === name);
          if (!s) throw new UsageError(`no schedule named ${name} in Redis (see vmsnap schedule ls --redis ${url})`);
          return f.submit({ ...scheduleJobs(s).run, key: `sched:${name}#now:${stamp}` }, { host: s.host });
        });
        if (g.json) printJson(r);
        else console.log(`queued job ${r.id} on ${r.host}`);
        return;
      }
      const s = await new ScheduleFile(dataDir()).get(name);
      const spec = { ...scheduleJobs(s).run, key: `sched:${name}#now:${stamp}` };
      const agent = await localAgentPid(dataDir());
      if (agent !== null) {
        await sendToLocalAgent(dataDir(), spec);
        if (g.json) printJson({ queued: true, agent });
        else console.log(`handed to the local agent (pid ${agent}); see vmsnap jobs`);
        return;
      }
      const store = JobFileStore.forDataDir(dataDir());
      const runner = new EmbeddedRunner({ ctx: jobContext(g, hostId({})), store, concurrency: 1 });
      const rec = await runner.wait(runner.submit(spec).id);
      await runner.close();
      if (g.json) printJson(rec);
      else console.log(describeJob(rec));
      if (rec.state === 'failed') process.exitCode = 1;
    });

  program
    .command('jobs')
    .description('queued, running, finished and failed jobs with their progress')
    .option('--redis <url>', "every host's jobs in Redis (env VMSNAP_REDIS)")
    .option('--watch', 'redraw every second until interrupted')
    .option('--limit <n>', 'at most this many jobs per state and host', int('--limit'), 50)
    .action(async (o: { redis?: string; watch?: boolean; limit: number }) => {
      const g = globals();
      const url = redisUrl(o);
      const fleet = url ? await connectFleet(url) : null;
      try {
        const read = async () => (fleet ? await fleet.jobs(o.limit) : await JobFileStore.forDataDir(dataDir()).list());
        if (!o.watch) {
          const list = await read();
          if (g.json) printJson(list);
          else printJobs(list);
          return;
        }
        let stop = false;
        void untilSignal().then(() => (stop = true));
        while (!stop) {
          const list = await read();
          if (g.json) process.stdout.write(JSON.stringify(list) + '\n');
          else {
            if (process.stdout.isTTY) process.stdout.write('\x1b[2J\x1b[H');
            printJobs(list);
          }
          await new Promise((r) => setTimeout(r, 1000));
        }
      } finally {
        await fleet?.close();
      }
    });
}

async function localNextRuns(): Promise<Record<string, number>> {
  const file = new ScheduleFile(dataDir());
  const last = await file.lastFired();
  const out: Record<string, number> = {};
  for (const s of await file.list()) out[s.name] = last[s.name] !== undefined ? last[s.name]! + s.everyMs : Date.now();
  return out;
}

function bar(done: number, total: number | null): string {
  if (!total) return '';
  const w = 20;
  const n = Math.max(0, Math.min(w, Math.round((done / total) * w)));
  return `[${'#'.repeat(n)}${'.'.repeat(w - n)}] ${Math.floor((done / total) * 100)}%`;
}

function describeJob(j: JobRecord): string {
  const p = j.progress;
  const prog = p ? ` ${p.phase}: ${bar(p.done, p.total)} ${p.unit === 'bytes' ? humanBytes(p.done) : `${p.done}/${p.total ?? '?'} ${p.unit}`}` : j.phase ? ` ${j.phase}` : '';
  const res = j.result as { snapshot?: unknown; take?: { snapshot?: unknown } } | null;
  const snap = typeof res?.snapshot === 'string' ? res.snapshot : typeof res?.take?.snapshot === 'string' ? res.take.snapshot : null;
  return (
    `${j.id.padEnd(28)} ${j.host.padEnd(12)} ${String(j.kind).padEnd(13)} ${(j.vm ?? '-').padEnd(12)} ${j.state.padEnd(9)} try ${j.attempts}` +
    (j.state === 'active' || j.state === 'delayed' ? prog : '') +
    (snap ? ` snapshot ${shortId(snap)}` : '') +
    (j.error ? ` ${j.error.message}` : '')
  );
}

function printJobs(list: JobRecord[]): void {
  if (!list.length) return console.log('no jobs');
  console.log(`${'ID'.padEnd(28)} ${'HOST'.padEnd(12)} ${'KIND'.padEnd(13)} ${'VM'.padEnd(12)} STATE`);
  for (const j of list) console.log(describeJob(j));
}
