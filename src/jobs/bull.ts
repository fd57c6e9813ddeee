/**
 * The fleet: jobs on BullMQ queues in Redis, one queue per host (`host-<id>`, key prefix `vmsnap`),
 * so a job for a guest runs on the agent of the host that has it. Each agent publishes its VMs in
 * a registry hash (`vmsnap:hosts`) with a heartbeat; submitting a job for a guest looks its host up
 * there (an unknown guest is an error, not a job no one will ever take).
 *
 * Policy, the same as the embedded runner's (src/jobs/embedded.ts): `attempts` tries with an
 * exponential backoff for retryable errors; a permanent error (bad input, a missing VM, a bug) is
 * thrown as BullMQ's UnrecoverableError so BullMQ does not retry it. Delivery is at least once (a
 * killed agent's active job becomes stalled and is run again after its lock expires): the
 * idempotency key, by default the job's id, makes a re-run take no second snapshot.
 *
 * Schedules are BullMQ job schedulers (`every`) on the host's queue, with their definitions in the
 * hash `vmsnap:schedules`; BullMQ fires a scheduler that missed slots (an agent down, Redis down)
 * once when it can, not once per missed slot.
 */
import { Queue, Worker, UnrecoverableError, type Job, type ConnectionOptions } from 'bullmq';
import { Redis } from 'ioredis';
import { errorRecord, isRetryable, UserFacingError, type ErrorRecord } from '../util/errors.js';
import { checkName } from '../store/manifest.js';
import type { ProgressEvent } from '../ops/progress.js';
import { guestOf, parseJobSpec, type AnyJobSpec, type JobRecord, type JobState } from './model.js';
import { runJob, type JobContext } from './handlers.js';
import { DEFAULT_RETRY, type JobHandler, type RetryPolicy } from './embedded.js';
import { parseSchedule, scheduleJobs, ScheduleError, type ScheduleDef } from './schedule.js';

export const PREFIX = 'vmsnap';
const HOSTS_KEY = `${PREFIX}:hosts`;
const SCHEDULES_KEY = `${PREFIX}:schedules`;

/** Redis could not be reached (or answered an error): retryable, the agent waits for it. */
export class RedisUnreachableError extends UserFacingError {
  override readonly name = 'RedisUnreachableError';
  readonly retryable = true;
}

/** A job names a guest no agent has (or a host no agent runs). */
export class UnknownGuestError extends UserFacingError {
  override readonly name = 'UnknownGuestError';
}

export function queueName(host: string): string {
  return `host-${checkName('host id', host)}`;
}

/** `redis://[:password@]host:port[/db]` as connection options (no offline queueing of requests). */
export function redisOptions(url: string): { host: string; port: number; db: number; password?: string; username?: string } {
  let u: URL;
  try {
    u = new URL(url);
  } catch {
    throw new RedisUnreachableError(`--redis must be a URL such as redis://127.0.0.1:6379, got ${JSON.stringify(url)}`);
  }
  if (u.protocol !== 'redis:') throw new RedisUnreachableError(`--redis must be a redis:// URL, got ${JSON.stringify(url)}`);
  const db = u.pathname.length > 1 ? Number(u.pathname.slice(1)) : 0;
  return {
    host: u.hostname || '127.0.0.1',
    port: u.port ? Number(u.port) : 6379,
    db: Number.isInteger(db) ? db : 0,
    ...(u.password ? { password: decodeURIComponent(u.password) } : {}),
    ...(u.username ? { username: decodeURIComponent(u.username) } : {}),
  };
}

/** Options for BullMQ's own connections (workers need maxRetriesPerRequest null). */
function bullConnection(url: string): ConnectionOptions {
  return { ...redisOptions(url), maxRetriesPerRequest: null };
}

/**
 * A plain connection for commands (registry, listings), checked at once: an unreachable Redis is
 * one clear error within `timeoutMs`, not a command hanging on reconnects.
 */
export async function connectRedis(url: string, timeoutMs = 5000): Promise<Redis> {
  const r = new Redis({ ...redisOptions(url), lazyConnect: true, maxRetriesPerRequest: 1, connectTimeout: timeoutMs, retryStrategy: () => null, enableOfflineQueue: false });
  // The socket's own error (ECONNREFUSED, ETIMEDOUT) says more than connect()'s "Connection is closed".
  let socketError: Error | null = null;
  r.on('error', (err: Error) => (socketError ??= err));
  try {
    await r.connect();
    await r.ping();
  } catch (err) {
    r.disconnect();
    throw new RedisUnreachableError(`cannot reach Redis at ${url}: ${(socketError ?? (err as Error)).message}`, { cause: err });
  }
  return r;
}

// ---- host registry ----

export interface HostVm {
  name: string;
  state: string;
  lastSnapshot: string | null;
}

export interface HostInfo {
  host: string;
  vms: HostVm[];
  heartbeat: string;
  /** The agent's dashboard address, if it serves one. */
  dashboard?: string;
}

export async function publishHost(redis: Redis, info: HostInfo): Promise<void> {
  await redis.hset(HOSTS_KEY, info.host, JSON.stringify(info));
}

export async function listHosts(redis: Redis): Promise<HostInfo[]> {
  const all = await redis.hgetall(HOSTS_KEY);
  const out: HostInfo[] = [];
  for (const v of Object.values(all)) {
    try {
      out.push(JSON.parse(v) as HostInfo);
    } catch {
      // someone else's garbage in our hash: not a host
    }
  }
  return out.sort((a, b) => a.host.localeCompare(b.host));
}

/** The host that has `vm` (by the agents' registry). */
export async function hostOf(redis: Redis, vm: string): Promise<string> {
  const hosts = (await listHosts(redis)).filter((h) => h.vms.some((v) => v.name === vm));
  if (!hosts.length) throw new UnknownGuestError(`no agent has a VM named ${vm} (agents: ${(await listHosts(redis)).map((h) => h.host).join(', ') || 'none'})`);
  if (hosts.length > 1) throw new UnknownGuestError(`VM ${vm} exists on several hosts (${hosts.map((h) => h.host).join(', ')}): name the host`);
  return hosts[0]!.host;
}

// ---- submitting and listing ----

export interface SubmitOptions {
  retry?: Partial<RetryPolicy>;
  /** The BullMQ job id (default: the spec's key, so one key is one job while the job exists). */
  jobId?: string;
}

function jobOpts(o: SubmitOptions = {}) {
  const retry = { ...DEFAULT_RETRY, ...o.retry };
  return { attempts: retry.attempts, backoff: { type: 'exponential' as const, delay: retry.backoffMs }, removeOnComplete: 500, removeOnFail: 500 };
}

/** A handle on the queues of a Redis: submitting, listing, schedules. Close it when done. */
export class Fleet {
  private readonly queues = new Map<string, Queue>();

  private constructor(
    readonly url: string,
    readonly redis: Redis,
  ) {}

  static async connect(url: string): Promise<Fleet> {
    return new Fleet(url, await connectRedis(url));
  }

  queue(host: string): Queue {
    let q = this.queues.get(host);
    if (!q) {
      q = new Queue(queueName(host), { connection: bullConnection(this.url), prefix: PREFIX });
      q.on('error', () => undefined); // commands report their own failures
      this.queues.set(host, q);
    }
    return q;
  }

  /** The host a job goes to: the guest's host, else `host`. */
  async route(spec: AnyJobSpec, host?: string): Promise<string> {
    if (host !== undefined) return checkName('host id', host);
    const vm = guestOf(spec);
    if (vm === null || spec.kind === 'clone') throw new UnknownGuestError(`a ${spec.kind} job names no guest of an existing host: give the host (--host)`);
    return hostOf(this.redis, vm);
  }

  /** Queues a job (payload checked first) on its host's queue; returns its id. */
  async submit(data: unknown, o: SubmitOptions & { host?: string } = {}): Promise<{ id: string; host: string }> {
    const spec = parseJobSpec(data);
    const host = await this.route(spec, o.host);
    const jobId = o.jobId ?? spec.key;
    const job = await this.queue(host).add(spec.kind, spec, { ...jobOpts(o), ...(jobId !== undefined ? { jobId: jobId.replace(/:/g, '-') } : {}) });
    return { id: job.id!, host };
  }

  /** Every known host's jobs (newest first per state), as JobRecords. */
  async jobs(limit = 50): Promise<JobRecord[]> {
    const out: JobRecord[] = [];
    for (const h of await this.hostIds()) {
      const q = this.queue(h);
      const jobs = await q.getJobs(['active', 'waiting', 'delayed', 'prioritized', 'completed', 'failed'], 0, limit - 1, false);
      for (const j of jobs) if (j) out.push(await toRecord(h, j as Job));
    }
    return out.sort((a, b) => a.created.localeCompare(b.created));
  }

  async hostIds(): Promise<string[]> {
    const fromRegistry = (await listHosts(this.redis)).map((h) => h.host);
    const fromSchedules = (await this.schedules()).map((s) => s.host);
    return [...new Set([...fromRegistry, ...fromSchedules])].sort();
  }

  // ---- schedules ----

  async schedules(): Promise<ScheduleDef[]> {
    const all = await this.redis.hgetall(SCHEDULES_KEY);
    return Object.values(all)
      .map((v) => parseSchedule(JSON.parse(v)))
      .sort((a, b) => a.name.localeCompare(b.name));
  }

  async addSchedule(s: ScheduleDef, o: SubmitOptions = {}): Promise<void> {
    if ((await this.redis.hsetnx(SCHEDULES_KEY, s.name, JSON.stringify(s))) === 0) throw new ScheduleError(`a schedule named ${s.name} exists (remove it first: vmsnap schedule rm ${s.name})`);
    const q = this.queue(s.host);
    const jobs = scheduleJobs(s);
    await q.upsertJobScheduler(s.name, { every: s.everyMs }, { name: 'schedule-run', data: jobs.run, opts: jobOpts(o) });
    if (jobs.check && s.checkEveryMs) await q.upsertJobScheduler(`${s.name}.check`, { every: s.checkEveryMs }, { name: 'check', data: jobs.check, opts: jobOpts(o) });
  }

  async removeSchedule(name: string): Promise<ScheduleDef> {
    const s = (await this.schedules()).find((x) => x.name === name);
    if (!s) throw new ScheduleError(`no schedule named ${name} (see vmsnap schedule ls)`);
    const q = this.queue(s.host);
    await q.removeJobScheduler(s.name);
    await q.removeJobScheduler(`${s.name}.check`);
    await this.redis.hdel(SCHEDULES_KEY, name);
    return s;
  }

  /** When each schedule fires next (ms since the epoch), by name. */
  async nextRuns(): Promise<Record<string, number>> {
    const out: Record<string, number> = {};
    for (const h of await this.hostIds()) for (const js of await this.queue(h).getJobSchedulers()) if (js.next !== undefined) out[js.key] = js.next;
    return out;
  }

  async close(): Promise<void> {
    for (const q of this.queues.values()) await q.close();
    this.redis.disconnect();
  }
}

const STATE: Record<string, JobState> = { waiting: 'queued', prioritized: 'queued', 'waiting-children': 'queued', delayed: 'delayed', active: 'active', completed: 'completed', failed: 'failed' };

async function toRecord(host: string, j: Job): Promise<JobRecord> {
  const state = STATE[await j.getState()] ?? 'queued';
  const data = j.data as { key?: unknown; args?: { vm?: unknown; newVm?: unknown } } | undefined;
  const progress = typeof j.progress === 'object' && j.progress !== null ? (j.progress as unknown as ProgressEvent & { phaseName?: string }) : null;
  const error: ErrorRecord | null = j.failedReason ? { name: 'Error', message: j.failedReason, userFacing: true, retryable: false } : null;
  const vm = typeof data?.args?.vm === 'string' ? data.args.vm : typeof data?.args?.newVm === 'string' ? data.args.newVm : null;
  return {
    id: j.id!,
    host,
    kind: j.name,
    key: typeof data?.key === 'string' ? data.key : j.id!,
    vm,
    state,
    attempts: j.attemptsMade,
    progress: progress && progress.type === 'progress' ? { type: 'progress', phase: progress.phase, done: progress.done, total: progress.total, unit: progress.unit, ...(progress.bytes !== undefined ? { bytes: progress.bytes } : {}) } : null,
    phase: progress?.phaseName ?? null,
    created: new Date(j.timestamp).toISOString(),
    started: j.processedOn ? new Date(j.processedOn).toISOString() : null,
    finished: j.finishedOn ? new Date(j.finishedOn).toISOString() : null,
    result: j.returnvalue ?? null,
    error,
  };
}

// ---- the agent's worker ----

export interface BullAgentOptions {
  url: string;
  ctx: JobContext;
  concurrency?: number;
  /** BullMQ's job lock: a killed agent's job is run again this long after it died (default 30 s). */
  lockDurationMs?: number;
  /** The host's VMs, published in the registry every `heartbeatMs` (default 10 s). */
  listVms: () => Promise<HostVm[]>;
  heartbeatMs?: number;
  dashboard?: string;
  log?: (line: string) => void;
  /** Replaces runJob behind the same worker (bench/jobs: the queue's own cost, no operation). */
  handler?: JobHandler;
}

/** Progress events stored on the BullMQ job: the latest progress, with the phase it belongs to. */
function jobSink(job: Job): { emit(e: ProgressEvent): void; flush(): Promise<void> } {
  let phase: string | null = null;
  let last = 0;
  let pending: Promise<unknown> = Promise.resolve();
  const put = (v: object) => {
    pending = pending.then(() => job.updateProgress(v).catch(() => undefined));
  };
  return {
    emit(e) {
      if (e.type === 'phase') {
        phase = e.phase;
        put({ type: 'phase', phase, phaseName: phase });
      } else if (e.type === 'progress' && Date.now() - last >= 250) {
        last = Date.now();
        put({ ...e, phaseName: phase });
      } else if (e.type === 'message') void job.log(`${e.level}: ${e.text}`).catch(() => undefined);
    },
    flush: () => pending.then(() => undefined),
  };
}

/** A running agent on Redis: its worker, its registry heartbeat. */
export class BullAgent {
  private timer: NodeJS.Timeout | null = null;

  private constructor(
    readonly worker: Worker,
    private readonly redis: Redis,
    private readonly opts: BullAgentOptions,
  ) {}

  static async start(opts: BullAgentOptions): Promise<BullAgent> {
    const host = opts.ctx.hostId;
    const log = opts.log ?? (() => undefined);
    const worker = new Worker(
      queueName(host),
      async (job: Job) => {
        let spec: AnyJobSpec;
        try {
          spec = parseJobSpec(job.data);
        } catch (err) {
          log(`job ${job.id}: ${(err as Error).message}`);
          throw new UnrecoverableError((err as Error).message);
        }
        const sink = jobSink(job);
        try {
          const run = { key: spec.key ?? job.id!, sink };
          return await (opts.handler ? opts.handler(spec, { ...run, id: job.id! }) : runJob(opts.ctx, spec, run));
        } catch (err) {
          const rec = errorRecord(err);
          log(`job ${job.id} (${spec.kind}) attempt ${job.attemptsMade + 1} failed: ${rec.name}: ${rec.message}${isRetryable(err) ? ' (retryable)' : ''}`);
          // BullMQ retries any error but this one: a permanent failure is not tried again.
          if (!isRetryable(err)) throw new UnrecoverableError(`${rec.name}: ${rec.message}`);
          throw new Error(`${rec.name}: ${rec.message}`);
        } finally {
          await sink.flush();
        }
      },
      {
        connection: bullConnection(opts.url),
        prefix: PREFIX,
        concurrency: opts.concurrency ?? 2,
        lockDuration: opts.lockDurationMs ?? 30_000,
        stalledInterval: Math.max(1000, Math.floor((opts.lockDurationMs ?? 30_000) / 2)),
        maxStalledCount: 3,
      },
    );
    let warned = 0;
    worker.on('error', (err) => {
      // Redis going away is reported at most once a minute; the worker reconnects by itself.
      if (Date.now() - warned > 60_000) {
        warned = Date.now();
        log(`redis: ${err.message} (retrying)`);
      }
    });
    const redis = new Redis({ ...redisOptions(opts.url), maxRetriesPerRequest: null });
    redis.on('error', () => undefined); // the worker's handler reports the outage
    const agent = new BullAgent(worker, redis, opts);
    await agent.heartbeat();
    agent.timer = setInterval(() => void agent.heartbeat(), opts.heartbeatMs ?? 10_000);
    return agent;
  }

  /** Publishes this host's VMs now (also after a VM was created, so jobs can be routed to it). */
  async heartbeat(): Promise<void> {
    try {
      const vms = await this.opts.listVms();
      await publishHost(this.redis, { host: this.opts.ctx.hostId, vms, heartbeat: new Date().toISOString(), ...(this.opts.dashboard ? { dashboard: this.opts.dashboard } : {}) });
    } catch (err) {
      this.opts.log?.(`heartbeat: ${(err as Error).message}`);
    }
  }

  async close(): Promise<void> {
    if (this.timer) clearInterval(this.timer);
    await this.worker.close();
    this.redis.disconnect();
  }
}
