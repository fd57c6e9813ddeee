/**
 * One handler per job kind: the operation of src/ops with the job's idempotency, its locks inside
 * the agent (src/jobs/locks.ts) and its progress. Both runners (embedded, BullMQ) call runJob; what
 * a handler throws keeps its verdicts (user-facing, retryable) for the runner to act on.
 */
import type { Repository } from '../store/repository.js';
import { takeVm, restoreVm, cloneVm, withRepo, type VmOpsContext } from '../ops/vm.js';
import { copyByRefs, syncRepos } from '../ops/copy.js';
import { checkRepository, forgetSnapshots, pruneRepository } from '../ops/maintenance.js';
import { importSnapshot } from '../ops/import.js';
import { exportSnapshot } from '../ops/export.js';
import { reporter, type ProgressSink } from '../ops/progress.js';
import { migrateVm, MigrateRequestError, readMigrationRecord } from '../ops/migrate.js';
import { loadDefinition } from '../vm/config.js';
import type { RetentionPolicy } from '../store/retention.js';
import { guestOf, idempotencyTag, type AnyJobSpec, type JobArgs, type JobKind, type JobResults, type TakeJobResult } from './model.js';
import { GuestLocks, RepoGate, waitWhileLocked, type LockWaitOptions } from './locks.js';

export interface JobContext extends VmOpsContext {
  hostId: string;
  /** Opens (with `init`, creates) a copy target repository like `src`. */
  openTarget(location: string, src: Repository, opts: { init: boolean; passwordFile?: string }): Promise<Repository>;
  /** Coordination between the jobs of this agent (shared by all its jobs). */
  guests: GuestLocks;
  gate: RepoGate;
  /** How long a job waits out another process's repository lock (tests shorten it). */
  lockWait?: Omit<LockWaitOptions, 'onWait'>;
}

export interface JobRun {
  /** The idempotency key in force: the spec's, or the job's id. */
  key: string;
  sink: ProgressSink;
}

/** Runs a repository step: through the agent's gate, waiting out other processes' locks. */
function gated<T>(ctx: JobContext, run: JobRun, mode: 'shared' | 'exclusive', fn: () => Promise<T>): Promise<T> {
  const r = reporter(run.sink);
  const attempt = () => waitWhileLocked(fn, { ...ctx.lockWait, onWait: (m, d) => r.info(`${m}; trying again in ${(d / 1000).toFixed(1)} s`) });
  return mode === 'shared' ? ctx.gate.shared(attempt) : ctx.gate.exclusive(attempt);
}

/**
 * A take that is safe to deliver twice: a snapshot of the VM carrying the key's tag means this job
 * already took it (the tag is in the manifest, written last), and that one is returned.
 */
async function takeOnce(ctx: JobContext, run: JobRun, args: JobArgs['take']): Promise<TakeJobResult> {
  const tag = idempotencyTag(run.key);
  const found = await withRepo(ctx, async (repo) => (await repo.listSnapshotSummaries(() => undefined)).find((s) => s.vm === args.vm && s.tags.includes(tag)));
  if (found) {
    reporter(run.sink).info(`snapshot ${found.id.slice(0, 12)} was already taken by this job (${tag})`);
    return { snapshot: found.id, reused: true };
  }
  const opts = { ...(args.message !== undefined ? { message: args.message } : {}), tags: [...(args.tags ?? []), tag], diskOnly: !!args.diskOnly };
  const r = await gated(ctx, run, 'shared', () => takeVm(ctx, args.vm, opts, run.sink));
  return { ...r, reused: false };
}

/** Forgets by policy (shared), then prunes (exclusive) if asked and something was removed. */
async function forgetThenPrune(ctx: JobContext, run: JobRun, keep: RetentionPolicy, filter: { vm?: string; tag?: string }, prune: boolean) {
  const f = await gated(ctx, run, 'shared', () => withRepo(ctx, (repo) => forgetSnapshots(repo, { policy: keep, ...filter }, run.sink)));
  const removed = f.decisions.flatMap((d) => d.remove.map((s) => s.id));
  const kept = f.decisions.flatMap((d) => d.keep.map((k) => k.snapshot.id));
  const pruned = prune && removed.length > 0;
  if (pruned) await gated(ctx, run, 'exclusive', () => withRepo(ctx, (repo) => pruneRepository(repo, {}, run.sink)));
  return { removed, kept, pruned };
}

async function transfer<T>(ctx: JobContext, to: { to: string; init?: boolean; toPasswordFile?: string }, fn: (src: Repository, dst: Repository) => Promise<T>): Promise<T> {
  return withRepo(ctx, async (src) => {
    const dst = await ctx.openTarget(to.to, src, { init: !!to.init, ...(to.toPasswordFile !== undefined ? { passwordFile: to.toPasswordFile } : {}) });
    try {
      return await fn(src, dst);
    } finally {
      await dst.close();
    }
  });
}

/**
 * A migrate that is safe to deliver twice. The move is recorded here under the job's key once it
 * worked; a re-delivery finds that record and reports the move. A VM that is not here with no such
 * record fails for good (MigrateRequestError: not retried) — retrying cannot bring it back.
 */
async function migrateOnce(ctx: JobContext, run: JobRun, args: JobArgs['migrate']): Promise<JobResults['migrate']> {
  const rec = await readMigrationRecord(ctx.dataDir, args.vm);
  if (rec && rec.key === run.key) {
    reporter(run.sink).info(`VM ${args.vm} was already migrated to ${rec.destination} by this job (${rec.at})`);
    return { ...rec, alreadyMigrated: true };
  }
  await loadDefinition(ctx.dataDir, args.vm).catch((err: Error) => {
    const moved = rec ? `; it was migrated to ${rec.destination} at ${rec.at} by another request` : '';
    throw new MigrateRequestError(`VM ${args.vm} is not on this host${moved} (${err.message})`);
  });
  // Shared, like a take: its departure snapshot commits into the repository (no prune meanwhile).
  return { ...(await gated(ctx, run, 'shared', () => migrateVm(ctx, { ...args, waitForDeparture: true }, run.sink, { key: run.key }))), alreadyMigrated: false };
}

type Handlers = { [K in JobKind]: (ctx: JobContext, run: JobRun, args: JobArgs[K]) => Promise<JobResults[K]> };

const HANDLERS: Handlers = {
  take: takeOnce,
  restore: (ctx, run, a) => gated(ctx, run, 'shared', () => restoreVm(ctx, a.vm, a, run.sink)),
  clone: (ctx, run, a) => gated(ctx, run, 'shared', () => cloneVm(ctx, a, run.sink)),
  copy: (ctx, run, a) => gated(ctx, run, 'shared', () => transfer(ctx, a, (src, dst) => copyByRefs(src, dst, a, run.sink))),
  sync: (ctx, run, a) => gated(ctx, run, 'shared', () => transfer(ctx, a, (src, dst) => syncRepos(src, dst, a.vm !== undefined ? { vm: a.vm } : {}, run.sink))),
  forget: (ctx, run, a) => forgetThenPrune(ctx, run, a.keep, { ...(a.vm !== undefined ? { vm: a.vm } : {}), ...(a.tag !== undefined ? { tag: a.tag } : {}) }, !!a.prune),
  check: (ctx, run, a) => gated(ctx, run, 'shared', () => withRepo(ctx, (repo) => checkRepository(repo, a, run.sink))),
  import: (ctx, run, a) => gated(ctx, run, 'shared', () => withRepo(ctx, (repo) => importSnapshot(repo, a, run.sink))),
  // A reader: no lock (docs/locks.md).
  export: (ctx, run, a) => withRepo(ctx, (repo) => exportSnapshot(repo, a, run.sink)),
  migrate: migrateOnce,
  'schedule-run': async (ctx, run, a) => {
    const r = reporter(run.sink);
    r.phase('take');
    const take = await takeOnce(ctx, run, { vm: a.vm, tags: [`schedule:${a.schedule}`] });
    r.phase('retention');
    const f = await forgetThenPrune(ctx, run, a.keep, { vm: a.vm }, true);
    let copied: number | null = null;
    if (a.copyTo !== undefined) {
      r.phase('copy');
      const rep = await gated(ctx, run, 'shared', () => transfer(ctx, { to: a.copyTo!, init: true }, (src, dst) => syncRepos(src, dst, { vm: a.vm }, run.sink)));
      copied = rep.snapshots.filter((s) => !s.alreadyPresent).length;
    }
    return { take, forgotten: f.removed, pruned: f.pruned, copied };
  },
};

/** Runs one job to its result; jobs for one guest run one at a time (ctx.guests). */
export function runJob(ctx: JobContext, spec: AnyJobSpec, run: JobRun): Promise<JobResults[JobKind]> {
  const handler = HANDLERS[spec.kind] as (ctx: JobContext, run: JobRun, args: unknown) => Promise<JobResults[JobKind]>;
  return ctx.guests.with(guestOf(spec), () => handler(ctx, run, spec.args));
}
