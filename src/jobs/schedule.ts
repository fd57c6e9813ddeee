/**
 * Schedules: "snapshot VM every INTERVAL, keep by POLICY, copy to REPO, check every INTERVAL".
 *
 * A schedule is stored in `<dataDir>/schedules.json` (the local agent's, replaced atomically) or,
 * with Redis, as BullMQ job schedulers on the queue of the guest's host (src/jobs/bull.ts). Each
 * firing is a `schedule-run` job (take, retention, copy), and the check a `check` job on its own
 * interval.
 *
 * The embedded scheduler fires a schedule when its interval has passed since its last firing. A
 * laptop that slept through five intervals fires once when it wakes, not five times: the next due
 * time counts from the late firing, not from the missed slots. The clock is injectable (tests).
 */
import { promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { atomicWriteFile, mkdirPrivate } from '../util/fs.js';
import { BadInputError } from '../util/errors.js';
import { checkName } from '../store/manifest.js';
import type { RetentionPolicy } from '../store/retention.js';
import { parsePolicy, type AnyJobSpec } from './model.js';
import type { Clock } from './embedded.js';

export interface ScheduleDef {
  name: string;
  vm: string;
  /** Milliseconds between takes. */
  everyMs: number;
  keep: RetentionPolicy;
  copyTo?: string;
  /** Milliseconds between checks of the repository (none when absent). */
  checkEveryMs?: number;
  /** The host whose agent runs it. */
  host: string;
  created: string;
}

export class ScheduleError extends BadInputError {
  override readonly name = 'ScheduleError';
}

const UNITS: Record<string, number> = { s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000, w: 7 * 86_400_000 };
const WORDS: Record<string, number> = { hourly: UNITS.h!, daily: UNITS.d!, weekly: UNITS.w! };

/** `90s`, `15m`, `1h`, `2d`, `1w`, or hourly/daily/weekly, as milliseconds (at least one second). */
export function parseInterval(flag: string, v: string): number {
  const w = WORDS[v];
  if (w) return w;
  const m = /^(\d+(?:\.\d+)?)(s|m|h|d|w)$/.exec(v);
  const ms = m ? Math.round(Number(m[1]) * UNITS[m[2]!]!) : NaN;
  if (!(ms >= 1000)) throw new ScheduleError(`${flag} takes an interval such as 30s, 15m, 1h, 1d, 1w (or hourly, daily, weekly) of at least 1s, got ${JSON.stringify(v)}`);
  return ms;
}

export function formatInterval(ms: number): string {
  for (const [u, n] of [['w', UNITS.w!], ['d', UNITS.d!], ['h', UNITS.h!], ['m', UNITS.m!]] as const) if (ms % n === 0) return `${ms / n}${u}`;
  return `${ms / 1000}s`;
}

/** Checks a schedule from a file or a queue: ScheduleError naming what is wrong. */
export function parseSchedule(v: unknown): ScheduleDef {
  const o = v as Record<string, unknown>;
  if (typeof o !== 'object' || o === null) throw new ScheduleError('a schedule must be an object');
  const name = checkName('schedule name', o.name);
  const vm = checkName('VM name', o.vm);
  if (typeof o.everyMs !== 'number' || !(o.everyMs >= 1000)) throw new ScheduleError(`schedule ${name}: everyMs must be at least 1000`);
  if (o.checkEveryMs !== undefined && (typeof o.checkEveryMs !== 'number' || !(o.checkEveryMs >= 1000))) throw new ScheduleError(`schedule ${name}: checkEveryMs must be at least 1000`);
  if (o.copyTo !== undefined && (typeof o.copyTo !== 'string' || !o.copyTo)) throw new ScheduleError(`schedule ${name}: copyTo must be a repository location`);
  if (typeof o.host !== 'string' || typeof o.created !== 'string') throw new ScheduleError(`schedule ${name}: host and created must be strings`);
  let keep: RetentionPolicy;
  try {
    keep = parsePolicy(o.keep);
  } catch (err) {
    throw new ScheduleError(`schedule ${name}: ${(err as Error).message}`);
  }
  return {
    name,
    vm,
    everyMs: o.everyMs,
    keep,
    host: o.host,
    created: o.created,
    ...(o.copyTo !== undefined ? { copyTo: o.copyTo as string } : {}),
    ...(o.checkEveryMs !== undefined ? { checkEveryMs: o.checkEveryMs as number } : {}),
  };
}

/** The jobs one schedule fires: a run per `everyMs`, and a check per `checkEveryMs`. */
export function scheduleJobs(s: ScheduleDef): { run: AnyJobSpec; check: AnyJobSpec | null } {
  return {
    run: { kind: 'schedule-run', args: { schedule: s.name, vm: s.vm, keep: s.keep, ...(s.copyTo !== undefined ? { copyTo: s.copyTo } : {}) } },
    check: s.checkEveryMs !== undefined ? { kind: 'check', args: {} } : null,
  };
}

/** The local agent's schedules: `<dataDir>/schedules.json`, with when each last fired beside it. */
export class ScheduleFile {
  readonly file: string;
  readonly stateFile: string;

  constructor(dataDir: string) {
    this.file = path.join(dataDir, 'schedules.json');
    this.stateFile = path.join(dataDir, 'agent', 'schedule-state.json');
  }

  async list(): Promise<ScheduleDef[]> {
    const text = await fsp.readFile(this.file, 'utf8').catch((err: NodeJS.ErrnoException) => {
      if (err.code === 'ENOENT') return '[]';
      throw err;
    });
    let v: unknown;
    try {
      v = JSON.parse(text);
    } catch (err) {
      throw new ScheduleError(`${this.file} is not valid JSON: ${(err as Error).message}`);
    }
    if (!Array.isArray(v)) throw new ScheduleError(`${this.file} must hold a list of schedules`);
    return v.map(parseSchedule);
  }

  private async save(list: ScheduleDef[]): Promise<void> {
    await mkdirPrivate(path.dirname(this.file));
    await atomicWriteFile(this.file, JSON.stringify(list, null, 2) + '\n');
  }

  async add(s: ScheduleDef): Promise<void> {
    const list = await this.list();
    if (list.some((x) => x.name === s.name)) throw new ScheduleError(`a schedule named ${s.name} exists (remove it first: vmsnap schedule rm ${s.name})`);
    await this.save([...list, s]);
  }

  async remove(name: string): Promise<ScheduleDef> {
    const list = await this.list();
    const s = list.find((x) => x.name === name);
    if (!s) throw new ScheduleError(`no schedule named ${name} (see vmsnap schedule ls)`);
    await this.save(list.filter((x) => x !== s));
    return s;
  }

  async get(name: string): Promise<ScheduleDef> {
    const s = (await this.list()).find((x) => x.name === name);
    if (!s) throw new ScheduleError(`no schedule named ${name} (see vmsnap schedule ls)`);
    return s;
  }

  /** When each timer (`NAME` and `NAME#check`) last fired, ms since the epoch. */
  async lastFired(): Promise<Record<string, number>> {
    const text = await fsp.readFile(this.stateFile, 'utf8').catch(() => '{}');
    try {
      const v = JSON.parse(text) as unknown;
      return typeof v === 'object' && v !== null ? (v as Record<string, number>) : {};
    } catch {
      return {}; // lost state only means one early firing
    }
  }

  async saveLastFired(state: Record<string, number>): Promise<void> {
    await mkdirPrivate(path.dirname(this.stateFile));
    await atomicWriteFile(this.stateFile, JSON.stringify(state));
  }
}

/** A firing: the job to submit and its idempotency key (one per timer and firing time). */
export interface Firing {
  schedule: string;
  timer: 'run' | 'check';
  key: string;
  spec: AnyJobSpec;
}

/**
 * Decides which timers are due at `now` given when each last fired, and returns the firings with
 * the updated state. A timer never fired is due at once. Pure: the caller persists and submits.
 */
export function dueFirings(schedules: ScheduleDef[], last: Record<string, number>, now: number): { firings: Firing[]; state: Record<string, number> } {
  const state = { ...last };
  const firings: Firing[] = [];
  const names = new Set<string>();
  for (const s of schedules) {
    const jobs = scheduleJobs(s);
    const timers: [Firing['timer'], string, number, AnyJobSpec | null][] = [
      ['run', s.name, s.everyMs, jobs.run],
      ['check', `${s.name}#check`, s.checkEveryMs ?? 0, jobs.check],
    ];
    for (const [timer, id, every, spec] of timers) {
      if (!spec) continue;
      names.add(id);
      const prev = state[id];
      if (prev !== undefined && now - prev < every) continue;
      state[id] = now;
      firings.push({ schedule: s.name, timer, key: `sched:${id}:${now}`, spec: { ...spec, key: `sched:${id}:${now}` } });
    }
  }
  // A removed schedule's state goes with it.
  for (const k of Object.keys(state)) if (!names.has(k)) delete state[k];
  return { firings, state };
}

/** The local agent's scheduler: every `tickMs`, reads the schedules and submits what is due. */
export class EmbeddedScheduler {
  private stopped = false;
  private loop: Promise<void> | null = null;

  constructor(
    private readonly file: ScheduleFile,
    private readonly submit: (f: Firing) => void,
    private readonly opts: { clock: Clock; tickMs?: number; onError?: (err: Error) => void },
  ) {}

  /** One pass: submits the due firings and records them. Returns them (tests). */
  async tick(): Promise<Firing[]> {
    const schedules = await this.file.list();
    const { firings, state } = dueFirings(schedules, await this.file.lastFired(), this.opts.clock.now());
    // Recorded before submitting: a crash in between loses one firing rather than doubling it
    // (and a take's idempotency tag makes a doubled one harmless anyway).
    await this.file.saveLastFired(state);
    for (const f of firings) this.submit(f);
    return firings;
  }

  start(): void {
    this.loop = (async () => {
      while (!this.stopped) {
        await this.tick().catch((err: Error) => this.opts.onError?.(err));
        await this.opts.clock.sleep(this.opts.tickMs ?? 1000);
      }
    })();
  }

  async stop(): Promise<void> {
    this.stopped = true;
    await this.loop;
  }
}
