/**
 * The local agent (no Redis): an embedded runner, the embedded scheduler over
 * `<dataDir>/schedules.json`, and an inbox folder (`<dataDir>/agent/inbox/`) through which other
 * commands of the same user hand it jobs (`vmsnap schedule run-now`). Its pid is in
 * `<dataDir>/agent/agent.pid` while it runs; its job records in `<dataDir>/agent/jobs/`.
 */
import { promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import { atomicWriteFile, mkdirPrivate } from '../util/fs.js';
import { processAlive } from '../util/process.js';
import { UserFacingError } from '../util/errors.js';
import { listVms, loadState, vmPaths } from '../vm/config.js';
import { vmStatus } from '../vm/supervisor.js';
import { EmbeddedRunner, systemClock, type Clock, type RetryPolicy } from './embedded.js';
import { EmbeddedScheduler, ScheduleFile, type Firing } from './schedule.js';
import { JobFileStore } from './store.js';
import type { JobContext } from './handlers.js';
import type { HostVm } from './bull.js';
import type { AnyJobSpec, JobRecord } from './model.js';

export function agentDir(dataDir: string): string {
  return path.join(dataDir, 'agent');
}

/** The VMs of this host as the registry and the dashboard show them. */
export async function hostVms(dataDir: string): Promise<HostVm[]> {
  const out: HostVm[] = [];
  for (const name of await listVms(dataDir)) {
    const st = await vmStatus(vmPaths(dataDir, name), name).catch(() => ({ state: 'unknown' }));
    const last = await loadState(dataDir, name).catch(() => ({ lastSnapshot: null }));
    out.push({ name, state: st.state, lastSnapshot: last.lastSnapshot });
  }
  return out;
}

/** The pid of the local agent running on `dataDir`, if one is. */
export async function localAgentPid(dataDir: string): Promise<number | null> {
  const pid = Number(await fsp.readFile(path.join(agentDir(dataDir), 'agent.pid'), 'utf8').catch(() => ''));
  return pid > 0 && processAlive(pid) ? pid : null;
}

/** Hands a job to the local agent through its inbox; the agent queues it within a second. */
export async function sendToLocalAgent(dataDir: string, spec: AnyJobSpec): Promise<string> {
  const inbox = path.join(agentDir(dataDir), 'inbox');
  await mkdirPrivate(inbox);
  const name = `${Date.now()}-${randomBytes(4).toString('hex')}.json`;
  await atomicWriteFile(path.join(inbox, name), JSON.stringify(spec));
  return name;
}

export interface LocalAgentOptions {
  ctx: JobContext;
  concurrency?: number;
  retry?: Partial<RetryPolicy>;
  clock?: Clock;
  tickMs?: number;
  log?: (line: string) => void;
}

export class LocalAgent {
  readonly runner: EmbeddedRunner;
  readonly scheduler: EmbeddedScheduler;
  readonly store: JobFileStore;
  private stopped = false;
  private inboxLoop: Promise<void> | null = null;

  constructor(private readonly opts: LocalAgentOptions) {
    const dataDir = opts.ctx.dataDir;
    const clock = opts.clock ?? systemClock;
    this.store = JobFileStore.forDataDir(dataDir);
    this.runner = new EmbeddedRunner({ ctx: opts.ctx, store: this.store, clock, ...(opts.concurrency !== undefined ? { concurrency: opts.concurrency } : {}), ...(opts.retry ? { retry: opts.retry } : {}) });
    this.scheduler = new EmbeddedScheduler(new ScheduleFile(dataDir), (f) => this.fire(f), { clock, ...(opts.tickMs !== undefined ? { tickMs: opts.tickMs } : {}), onError: (e) => this.log(`schedules: ${e.message}`) });
  }

  private log(line: string): void {
    this.opts.log?.(line);
  }

  private fire(f: Firing): void {
    const rec = this.runner.submit(f.spec);
    this.log(`schedule ${f.schedule}: ${f.timer} queued as job ${rec.id}`);
    this.watch(rec);
  }

  private watch(rec: JobRecord): void {
    void this.runner.wait(rec.id).then((r) => this.log(`job ${r.id} (${r.kind}) ${r.state}${r.error ? `: ${r.error.name}: ${r.error.message}` : ''}`));
  }

  /** Queues the jobs waiting in the inbox (a malformed one is logged and dropped). */
  async drainInbox(): Promise<JobRecord[]> {
    const inbox = path.join(agentDir(this.opts.ctx.dataDir), 'inbox');
    const out: JobRecord[] = [];
    for (const n of (await fsp.readdir(inbox).catch(() => [] as string[])).sort()) {
      if (!n.endsWith('.json')) continue;
      const file = path.join(inbox, n);
      const text = await fsp.readFile(file, 'utf8').catch(() => null);
      await fsp.rm(file, { force: true });
      if (text === null) continue;
      try {
        const rec = this.runner.submit(JSON.parse(text));
        this.log(`job ${rec.id} (${rec.kind}) queued from the inbox`);
        this.watch(rec);
        out.push(rec);
      } catch (err) {
        this.log(`inbox: ${n} dropped: ${(err as Error).message}`);
      }
    }
    return out;
  }

  async start(): Promise<void> {
    const dir = agentDir(this.opts.ctx.dataDir);
    await mkdirPrivate(dir);
    const other = await localAgentPid(this.opts.ctx.dataDir);
    if (other !== null && other !== process.pid) throw new LocalAgentError(`an agent (pid ${other}) already runs on ${this.opts.ctx.dataDir}`);
    await atomicWriteFile(path.join(dir, 'agent.pid'), String(process.pid));
    await this.store.trim();
    this.scheduler.start();
    const clock = this.opts.clock ?? systemClock;
    this.inboxLoop = (async () => {
      while (!this.stopped) {
        await this.drainInbox().catch((err: Error) => this.log(`inbox: ${err.message}`));
        await clock.sleep(this.opts.tickMs ?? 1000);
      }
    })();
  }

  async stop(): Promise<void> {
    this.stopped = true;
    await this.scheduler.stop();
    await this.inboxLoop;
    await this.runner.close();
    await fsp.rm(path.join(agentDir(this.opts.ctx.dataDir), 'agent.pid'), { force: true });
  }
}

export class LocalAgentError extends UserFacingError {
  override readonly name = 'LocalAgentError';
}
