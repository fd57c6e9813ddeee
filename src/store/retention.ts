/**
 * Retention policies for `vmsnap forget`, with restic's semantics: snapshots are grouped (by VM, and
 * optionally by tag set); within a group, newest first, `keep-last N` keeps the N newest, and each
 * `keep-<period> N` keeps the newest snapshot of each of the N most recent periods that have one.
 * A snapshot kept by any rule is kept; `keep-tag T` keeps every snapshot carrying T. A policy that
 * keeps nothing is refused unless it is explicitly empty (guards against `forget` with no flags).
 */
import type { Snapshot } from './manifest.js';

/** What retention looks at: a snapshot, or a summary of one. */
export type RetentionSubject = Pick<Snapshot, 'id' | 'vm' | 'time' | 'tags'>;
import { UsageError } from './errors.js';

export interface RetentionPolicy {
  last?: number;
  hourly?: number;
  daily?: number;
  weekly?: number;
  monthly?: number;
  yearly?: number;
  tags?: string[];
}

export interface RetentionDecision<T extends RetentionSubject = Snapshot, H = never> {
  group: string;
  /** `held`: what kept it besides the policy (see keepHeld). */
  keep: { snapshot: T; reasons: string[]; held?: H[] }[];
  remove: T[];
}

/**
 * Moves the snapshots something outside the policy still holds (pins: a volume reads them) from
 * `remove` to `keep`, with the reason `pinned` and the holders: forget keeps them and says why.
 */
export function keepHeld<T extends RetentionSubject, H>(d: RetentionDecision<T>, held: ReadonlyMap<string, H[]>): RetentionDecision<T, H> {
  const kept = d.remove.filter((s) => held.has(s.id));
  return {
    group: d.group,
    keep: [...d.keep, ...kept.map((s) => ({ snapshot: s, reasons: ['pinned'], held: held.get(s.id)! }))],
    remove: d.remove.filter((s) => !held.has(s.id)),
  };
}

const PERIODS: [keyof RetentionPolicy, (d: Date) => string][] = [
  ['hourly', (d) => d.toISOString().slice(0, 13)],
  ['daily', (d) => d.toISOString().slice(0, 10)],
  ['weekly', (d) => isoWeek(d)],
  ['monthly', (d) => d.toISOString().slice(0, 7)],
  ['yearly', (d) => d.toISOString().slice(0, 4)],
];

function isoWeek(d: Date): string {
  const t = new Date(Date.UTC(d.getUTCFullYear(), d.getUTCMonth(), d.getUTCDate()));
  const day = t.getUTCDay() || 7;
  t.setUTCDate(t.getUTCDate() + 4 - day);
  const yearStart = new Date(Date.UTC(t.getUTCFullYear(), 0, 1));
  const week = Math.ceil(((t.getTime() - yearStart.getTime()) / 86_400_000 + 1) / 7);
  return `${t.getUTCFullYear()}-W${String(week).padStart(2, '0')}`;
}

export function policyIsEmpty(p: RetentionPolicy): boolean {
  return !p.last && !p.hourly && !p.daily && !p.weekly && !p.monthly && !p.yearly && !(p.tags && p.tags.length);
}

export function applyRetention<T extends RetentionSubject>(snapshots: T[], policy: RetentionPolicy, groupBy: 'vm' | 'vm,tags' = 'vm'): RetentionDecision<T>[] {
  if (policyIsEmpty(policy)) throw new UsageError('no retention rule given (use --keep-last, --keep-daily, ...): refusing to forget everything');
  for (const [k, v] of Object.entries(policy)) {
    if (k !== 'tags' && v !== undefined && (!Number.isInteger(v) || (v as number) < 0)) throw new UsageError(`--keep-${k} must be a non-negative whole number`);
  }
  const groups = new Map<string, T[]>();
  for (const s of snapshots) {
    const key = groupBy === 'vm' ? s.vm : `${s.vm} [${[...s.tags].sort().join(',')}]`;
    let g = groups.get(key);
    if (!g) groups.set(key, (g = []));
    g.push(s);
  }
  const out: RetentionDecision<T>[] = [];
  for (const [group, list] of groups) {
    list.sort((a, b) => Date.parse(b.time) - Date.parse(a.time) || b.id.localeCompare(a.id));
    const reasons = new Map<string, string[]>();
    const keep = (s: T, why: string) => {
      let r = reasons.get(s.id);
      if (!r) reasons.set(s.id, (r = []));
      r.push(why);
    };
    list.slice(0, policy.last ?? 0).forEach((s) => keep(s, 'last'));
    for (const [name, bucket] of PERIODS) {
      const n = policy[name] as number | undefined;
      if (!n) continue;
      const seen = new Set<string>();
      for (const s of list) {
        if (seen.size >= n) break;
        const b = bucket(new Date(s.time));
        if (seen.has(b)) continue;
        seen.add(b);
        keep(s, name);
      }
    }
    if (policy.tags?.length) for (const s of list) if (s.tags.some((t) => policy.tags!.includes(t))) keep(s, 'tag');
    out.push({
      group,
      keep: list.filter((s) => reasons.has(s.id)).map((s) => ({ snapshot: s, reasons: reasons.get(s.id)! })),
      remove: list.filter((s) => !reasons.has(s.id)),
    });
  }
  return out;
}
