/**
 * The job model: every operation a host daemon or a fleet agent runs, as a typed, serialisable
 * request (a JobSpec: kind, args, idempotency key) with a typed result. The same specs run under
 * the embedded runner (src/jobs/embedded.ts, no Redis) and under BullMQ (src/jobs/bull.ts); both
 * call the handlers of src/jobs/handlers.ts, which call the operations of src/ops.
 *
 * A payload comes from outside the process (a queue, a file): parseJobSpec checks every field and
 * refuses anything else with a JobPayloadError (bad input: never retried).
 */
import type { RetentionPolicy } from '../store/retention.js';
import type { CheckReport } from '../store/maintenance.js';
import type { ImportResult } from '../ops/import.js';
import type { ExportResult } from '../ops/export.js';
import type { CopyReport } from '../ops/copy.js';
import type { CloneResult, RestoreOutcome } from '../ops/vm.js';
import { badMigrateOption, type MigrateArgs, type MigrateOutcomeHere, type MigrationRecord } from '../ops/migrate.js';
import type { TakeResult } from '../vm/runtime.js';
import { STREAM_KINDS, type StreamKind } from '../store/manifest.js';
import { BadInputError, type ErrorRecord } from '../util/errors.js';
import type { ProgressEvent } from '../ops/progress.js';
import { createHash } from 'node:crypto';

export const JOB_KINDS = ['take', 'restore', 'clone', 'copy', 'sync', 'forget', 'check', 'import', 'export', 'schedule-run', 'migrate'] as const;
export type JobKind = (typeof JOB_KINDS)[number];

/** What a scheduled run does: a take of `vm`, the retention policy applied, a copy off the machine. */
export interface ScheduleRunArgs {
  schedule: string;
  vm: string;
  keep: RetentionPolicy;
  /** Sync this VM's snapshots to this repository after each take. */
  copyTo?: string;
}

export interface JobArgs {
  take: { vm: string; message?: string; tags?: string[]; diskOnly?: boolean };
  restore: { vm: string; snapshot: string; fromOtherVm?: boolean };
  clone: { snapshot: string; newVm: string; start?: boolean; hydrate?: number; qemuArgs?: string[]; keepQemuArgs?: boolean };
  /** `to`: the target repository; its password from the agent's VMSNAP_TO_PASSWORD or `toPasswordFile`. */
  copy: { refs: string[]; to: string; init?: boolean; toPasswordFile?: string };
  sync: { to: string; vm?: string; init?: boolean; toPasswordFile?: string };
  /** Forget by policy, then prune when something was removed and `prune` is set. */
  forget: { keep: RetentionPolicy; vm?: string; tag?: string; prune?: boolean };
  check: { readData?: boolean };
  /** A file on the agent's host (stdin has no meaning for a job). */
  import: { source: string; vm: string; tags?: string[]; stream?: string; kind?: StreamKind; message?: string };
  /** A new file on the agent's host (stdout has no meaning for a job). */
  export: { ref: string; target: string; force?: boolean };
  'schedule-run': ScheduleRunArgs;
  /**
   * Moves `vm` to `destination` (HOST:PORT or a paired host's name; its key must already be pinned
   * on the agent's host — a job never brings its own trust), live, or with `cold` stopped and
   * started there.
   */
  migrate: Omit<MigrateArgs, 'pair'>;
}

/**
 * A migrate job delivered again after it worked finds the VM gone and the move recorded under its
 * key: it reports that move (`alreadyMigrated`) instead of failing.
 */
export type MigrateJobResult = (MigrateOutcomeHere & { alreadyMigrated: false }) | (MigrationRecord & { alreadyMigrated: true });

/** A take that found its idempotency tag on an existing snapshot returns that one (`reused`). */
export type TakeJobResult = (TakeResult & { reused: false }) | { snapshot: string; reused: true };

export interface ScheduleRunResult {
  take: TakeJobResult;
  forgotten: string[];
  pruned: boolean;
  copied: number | null;
}

export interface JobResults {
  take: TakeJobResult;
  restore: RestoreOutcome;
  clone: CloneResult;
  copy: CopyReport;
  sync: CopyReport;
  forget: { removed: string[]; kept: string[]; pruned: boolean };
  check: CheckReport;
  import: ImportResult;
  export: ExportResult;
  'schedule-run': ScheduleRunResult;
  migrate: MigrateJobResult;
}

export interface JobSpec<K extends JobKind = JobKind> {
  kind: K;
  args: JobArgs[K];
  /**
   * The idempotency key: a job delivered twice with one key has its effect once (a take tags its
   * snapshot `job:<key>` and a re-run finds it). Absent, the runner uses the job's own id (BullMQ
   * keeps one id across retries and redeliveries; a job scheduler gives each firing its own).
   */
  key?: string;
}

export type AnyJobSpec = { [K in JobKind]: JobSpec<K> }[JobKind];

/** Where a job stands (the same words as BullMQ's states, `waiting` as `queued`). */
export type JobState = 'queued' | 'delayed' | 'active' | 'completed' | 'failed';

/** A job as `vmsnap jobs` and the dashboard show it, whichever runner ran it. */
export interface JobRecord {
  id: string;
  host: string;
  kind: JobKind | string;
  key: string | null;
  /** The guest it concerns, if any. */
  vm: string | null;
  state: JobState;
  attempts: number;
  progress: Extract<ProgressEvent, { type: 'progress' }> | null;
  phase: string | null;
  created: string;
  started: string | null;
  finished: string | null;
  result: unknown;
  error: ErrorRecord | null;
}

/** A job payload that is not a JobSpec: bad input, never retried. */
export class JobPayloadError extends BadInputError {
  override readonly name = 'JobPayloadError';
}

/** The snapshot tag that marks a take made by the job with this idempotency key. */
export function idempotencyTag(key: string): string {
  const clean = key.replace(/[^A-Za-z0-9._:@+-]/g, '-');
  // Tags are at most 128 characters (manifest SAFE_NAME): a longer key is named by its hash.
  return clean.length <= 120 ? `job:${clean}` : `job:${createHash('sha256').update(key).digest('hex').slice(0, 40)}`;
}

/** The guest a job works on: jobs for one guest never run at once, and run where the guest lives. */
export function guestOf(spec: AnyJobSpec): string | null {
  switch (spec.kind) {
    case 'take':
    case 'restore':
    case 'schedule-run':
    case 'migrate':
      return spec.args.vm;
    case 'clone':
      return spec.args.newVm;
    default:
      return null;
  }
}

// ---- payload checks ----

type Obj = Record<string, unknown>;
const fail = (what: string): never => {
  throw new JobPayloadError(`malformed job payload: ${what}`);
};
const isObj = (v: unknown): v is Obj => typeof v === 'object' && v !== null && !Array.isArray(v);

function str(o: Obj, k: string, required: true): string;
function str(o: Obj, k: string, required?: false): string | undefined;
function str(o: Obj, k: string, required = false): string | undefined {
  const v = o[k];
  if (v === undefined && !required) return undefined;
  if (typeof v !== 'string' || v.length === 0) return fail(`"${k}" must be a non-empty string`);
  return v;
}
function bool(o: Obj, k: string): boolean | undefined {
  const v = o[k];
  if (v === undefined) return undefined;
  if (typeof v !== 'boolean') return fail(`"${k}" must be true or false`);
  return v;
}
function num(o: Obj, k: string): number | undefined {
  const v = o[k];
  if (v === undefined) return undefined;
  if (typeof v !== 'number' || !Number.isFinite(v) || v < 0) return fail(`"${k}" must be a non-negative number`);
  return v;
}
function strs(o: Obj, k: string): string[] | undefined {
  const v = o[k];
  if (v === undefined) return undefined;
  if (!Array.isArray(v) || !v.every((x) => typeof x === 'string')) return fail(`"${k}" must be a list of strings`);
  return v as string[];
}
/** Keeps only the defined values (exactOptionalPropertyTypes: an absent field stays absent). */
function defined<T extends Obj>(o: T): T {
  return Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined)) as T;
}

const POLICY_KEYS = ['last', 'hourly', 'daily', 'weekly', 'monthly', 'yearly'] as const;
export function parsePolicy(v: unknown): RetentionPolicy {
  if (!isObj(v)) return fail('"keep" must be an object');
  for (const k of Object.keys(v)) if (!(POLICY_KEYS as readonly string[]).includes(k) && k !== 'tags') fail(`unknown retention key "${k}"`);
  const p: RetentionPolicy = {};
  for (const k of POLICY_KEYS) {
    const n = num(v, k);
    if (n !== undefined) {
      if (!Number.isInteger(n)) fail(`"keep.${k}" must be a whole number`);
      p[k] = n;
    }
  }
  const tags = strs(v, 'tags');
  if (tags) p.tags = tags;
  return p;
}

const ARG_PARSERS: { [K in JobKind]: (a: Obj) => JobArgs[K] } = {
  take: (a) => defined({ vm: str(a, 'vm', true), message: str(a, 'message'), tags: strs(a, 'tags'), diskOnly: bool(a, 'diskOnly') }),
  restore: (a) => defined({ vm: str(a, 'vm', true), snapshot: str(a, 'snapshot', true), fromOtherVm: bool(a, 'fromOtherVm') }),
  clone: (a) =>
    defined({ snapshot: str(a, 'snapshot', true), newVm: str(a, 'newVm', true), start: bool(a, 'start'), hydrate: num(a, 'hydrate'), qemuArgs: strs(a, 'qemuArgs'), keepQemuArgs: bool(a, 'keepQemuArgs') }),
  copy: (a) => {
    const refs = strs(a, 'refs');
    if (!refs?.length) fail('"refs" must name at least one snapshot');
    return defined({ refs: refs!, to: str(a, 'to', true), init: bool(a, 'init'), toPasswordFile: str(a, 'toPasswordFile') });
  },
  sync: (a) => defined({ to: str(a, 'to', true), vm: str(a, 'vm'), init: bool(a, 'init'), toPasswordFile: str(a, 'toPasswordFile') }),
  forget: (a) => defined({ keep: parsePolicy(a.keep), vm: str(a, 'vm'), tag: str(a, 'tag'), prune: bool(a, 'prune') }),
  check: (a) => defined({ readData: bool(a, 'readData') }),
  import: (a) => {
    const kind = str(a, 'kind');
    if (kind !== undefined && !(STREAM_KINDS as readonly string[]).includes(kind)) fail(`unknown stream kind ${JSON.stringify(kind)}`);
    const source = str(a, 'source', true);
    if (source === '-') fail('an import job reads a file on its host, not stdin');
    return defined({ source, vm: str(a, 'vm', true), tags: strs(a, 'tags'), stream: str(a, 'stream'), kind: kind as StreamKind | undefined, message: str(a, 'message') });
  },
  export: (a) => {
    const target = str(a, 'target', true);
    if (target === '-') fail('an export job writes a file on its host, not stdout');
    return defined({ ref: str(a, 'ref', true), target, force: bool(a, 'force') });
  },
  'schedule-run': (a) => defined({ schedule: str(a, 'schedule', true), vm: str(a, 'vm', true), keep: parsePolicy(a.keep), copyTo: str(a, 'copyTo') }),
  migrate: (a) => {
    for (const k of Object.keys(a)) if (!MIGRATE_KEYS.includes(k)) fail(`unknown migrate option "${k}"${k === 'pair' ? ' (pin the destination on the agent\'s host with `vmsnap peer add`)' : ''}`);
    const compress = str(a, 'compress');
    const args = defined({
      vm: str(a, 'vm', true),
      destination: str(a, 'destination', true),
      keepSource: bool(a, 'keepSource'),
      maxDowntimeMs: num(a, 'maxDowntimeMs'),
      timeoutMs: num(a, 'timeoutMs'),
      compress: compress as MigrateArgs['compress'],
      departure: bool(a, 'departure'),
      cold: bool(a, 'cold'),
    });
    const bad = badMigrateOption(args);
    if (bad) fail(bad);
    return args;
  },
};

const MIGRATE_KEYS: readonly string[] = ['vm', 'destination', 'keepSource', 'maxDowntimeMs', 'timeoutMs', 'compress', 'departure', 'cold'];

/** Checks a payload from outside (a queue, a file) and returns it typed; JobPayloadError otherwise. */
export function parseJobSpec(data: unknown): AnyJobSpec {
  if (!isObj(data)) return fail('not an object');
  const kind = data.kind;
  if (typeof kind !== 'string' || !(JOB_KINDS as readonly string[]).includes(kind)) return fail(`unknown job kind ${JSON.stringify(kind)} (known: ${JOB_KINDS.join(', ')})`);
  if (!isObj(data.args)) return fail('"args" must be an object');
  const key = str(data, 'key');
  const args = ARG_PARSERS[kind as JobKind](data.args);
  return { kind, args, ...(key !== undefined ? { key } : {}) } as AnyJobSpec;
}
