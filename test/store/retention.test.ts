/**
 * Retention (src/store/retention.ts) against restic's semantics: the snapshot times and policies of
 * restic's internal/restic/snapshot_policy_test.go (TestApplyPolicy), with the kept sets of its
 * golden files testdata/policy_keep_snapshots_{13,17} and hand-derived ones for the simpler rules;
 * grouping by VM and by VM + tags; refusing an empty policy.
 */
import { describe, expect, it } from 'vitest';
import { applyRetention, policyIsEmpty, type RetentionPolicy } from '../../src/store/retention.js';
import type { Snapshot } from '../../src/store/manifest.js';
import { UsageError } from '../../src/store/errors.js';

// restic's testExpireSnapshots (times in UTC; ".1" = 100 ms later), with their tags.
const RESTIC_TIMES: [string, string[]?][] = [
  ['2014-09-01 10:20:30'], ['2014-09-02 10:20:30'], ['2014-09-05 10:20:30'], ['2014-09-06 10:20:30'], ['2014-09-08 10:20:30'],
  ['2014-09-09 10:20:30'], ['2014-09-10 10:20:30'], ['2014-09-11 10:20:30'], ['2014-09-20 10:20:30'], ['2014-09-22 10:20:30'],
  ['2014-08-08 10:20:30'], ['2014-08-10 10:20:30'], ['2014-08-12 10:20:30'], ['2014-08-13 10:20:30'], ['2014-08-13 10:20:30.1'],
  ['2014-08-15 10:20:30'], ['2014-08-18 10:20:30'], ['2014-08-20 10:20:30'], ['2014-08-21 10:20:30'], ['2014-08-22 10:20:30'],
  ['2014-10-01 10:20:30', ['foo']], ['2014-10-02 10:20:30', ['foo']], ['2014-10-05 10:20:30', ['foo']], ['2014-10-06 10:20:30', ['foo']],
  ['2014-10-08 10:20:30', ['foo']], ['2014-10-09 10:20:30', ['foo']], ['2014-10-10 10:20:30', ['foo']], ['2014-10-11 10:20:30', ['foo']],
  ['2014-10-20 10:20:30', ['foo']], ['2014-10-22 10:20:30', ['foo']], ['2014-11-08 10:20:30', ['foo']], ['2014-11-10 10:20:30', ['foo']],
  ['2014-11-12 10:20:30', ['foo']], ['2014-11-13 10:20:30', ['foo']], ['2014-11-13 10:20:30.1', ['bar']], ['2014-11-15 10:20:30', ['foo', 'bar']],
  ['2014-11-18 10:20:30'], ['2014-11-20 10:20:30'], ['2014-11-21 10:20:30'], ['2014-11-22 10:20:30'],
  ['2015-09-01 10:20:30'], ['2015-09-02 10:20:30'], ['2015-09-05 10:20:30'], ['2015-09-06 10:20:30'], ['2015-09-08 10:20:30'],
  ['2015-09-09 10:20:30'], ['2015-09-10 10:20:30'], ['2015-09-11 10:20:30'], ['2015-09-20 10:20:30'], ['2015-09-22 10:20:30'],
  ['2015-08-08 10:20:30'], ['2015-08-10 10:20:30'], ['2015-08-12 10:20:30'], ['2015-08-13 10:20:30'], ['2015-08-13 10:20:30.1'],
  ['2015-08-15 10:20:30'], ['2015-08-18 10:20:30'], ['2015-08-20 10:20:30'], ['2015-08-21 10:20:30'], ['2015-08-22 10:20:30'],
  ['2015-10-01 10:20:30'], ['2015-10-02 10:20:30'], ['2015-10-05 10:20:30'], ['2015-10-06 10:20:30'], ['2015-10-08 10:20:30'],
  ['2015-10-09 10:20:30'], ['2015-10-10 10:20:30'], ['2015-10-11 10:20:30'], ['2015-10-20 10:20:30'], ['2015-10-22 10:20:30'],
  ['2015-10-22 10:20:30'], ['2015-10-22 10:20:30', ['foo', 'bar']], ['2015-10-22 10:20:30', ['foo', 'bar']], ['2015-10-22 10:20:30', ['foo', 'bar']],
  ['2015-11-08 10:20:30'], ['2015-11-10 10:20:30'], ['2015-11-12 10:20:30'], ['2015-11-13 10:20:30'], ['2015-11-13 10:20:30.1'],
  ['2015-11-15 10:20:30'], ['2015-11-18 10:20:30'], ['2015-11-20 10:20:30'], ['2015-11-21 10:20:30'], ['2015-11-22 10:20:30'],
  ['2016-01-01 01:02:03'], ['2016-01-01 01:03:03'], ['2016-01-01 07:08:03'], ['2016-01-03 07:02:03'], ['2016-01-04 10:23:03'],
  ['2016-01-04 11:23:03'], ['2016-01-04 12:23:03'], ['2016-01-04 12:24:03'], ['2016-01-04 12:28:03'], ['2016-01-04 12:30:03'],
  ['2016-01-04 16:23:03'], ['2016-01-05 09:02:03'], ['2016-01-06 08:02:03'], ['2016-01-07 10:02:03'], ['2016-01-08 20:02:03'],
  ['2016-01-09 21:02:03'], ['2016-01-12 21:02:03'], ['2016-01-12 21:08:03'], ['2016-01-18 12:02:03'],
];

const iso = (t: string) => new Date(`${t.replace(' ', 'T')}${t.includes('.') ? '00' : '.000'}Z`).toISOString();

function snap(i: number, time: string, vm = 'vm1', tags: string[] = []): Snapshot {
  return { id: i.toString(16).padStart(64, '0'), vm, time, host: 'h', tags, parent: null, meta: {}, streams: [] };
}

const resticSnapshots = () => RESTIC_TIMES.map(([t, tags], i) => snap(i, iso(t), 'vm1', tags ?? []));

/** Kept times, newest first (as restic's golden files list them). */
function keptTimes(policy: RetentionPolicy, snaps = resticSnapshots()): string[] {
  const [d, ...rest] = applyRetention(snaps, policy);
  expect(rest).toHaveLength(0);
  expect(d!.keep.length + d!.remove.length).toBe(snaps.length);
  return d!.keep.map((k) => k.snapshot.time);
}

const T = (...ts: string[]) => ts.map(iso);

describe('restic TestApplyPolicy', () => {
  it('keep-last N keeps the N newest', () => {
    expect(keptTimes({ last: 10 })).toEqual(
      T('2016-01-18 12:02:03', '2016-01-12 21:08:03', '2016-01-12 21:02:03', '2016-01-09 21:02:03', '2016-01-08 20:02:03', '2016-01-07 10:02:03', '2016-01-06 08:02:03', '2016-01-05 09:02:03', '2016-01-04 16:23:03', '2016-01-04 12:30:03'),
    );
    expect(keptTimes({ last: 200 })).toHaveLength(RESTIC_TIMES.length);
  });

  it('keep-hourly 20 keeps the newest of each of the 20 newest hours', () => {
    const kept = keptTimes({ hourly: 20 });
    expect(kept).toHaveLength(20);
    // 2016-01-04 12:23, 12:24, 12:28, 12:30 share an hour: only 12:30 is kept.
    expect(kept).toContain(iso('2016-01-04 12:30:03'));
    expect(kept).not.toContain(iso('2016-01-04 12:28:03'));
    // 2016-01-12 21:02 and 21:08: only 21:08.
    expect(kept).not.toContain(iso('2016-01-12 21:02:03'));
  });

  it('keep-daily 3 keeps the newest of each of the 3 newest days', () => {
    expect(keptTimes({ daily: 3 })).toEqual(T('2016-01-18 12:02:03', '2016-01-12 21:08:03', '2016-01-09 21:02:03'));
  });

  it('keep-daily 3 + keep-weekly 4 (golden file policy_keep_snapshots_13; ISO weeks)', () => {
    expect(keptTimes({ daily: 3, weekly: 4 })).toEqual(T('2016-01-18 12:02:03', '2016-01-12 21:08:03', '2016-01-09 21:02:03', '2016-01-03 07:02:03'));
  });

  it('keep-daily 7 weekly 2 monthly 3 yearly 10 (golden file policy_keep_snapshots_17)', () => {
    expect(keptTimes({ daily: 7, weekly: 2, monthly: 3, yearly: 10 })).toEqual(
      T('2016-01-18 12:02:03', '2016-01-12 21:08:03', '2016-01-09 21:02:03', '2016-01-08 20:02:03', '2016-01-07 10:02:03', '2016-01-06 08:02:03', '2016-01-05 09:02:03', '2015-11-22 10:20:30', '2015-10-22 10:20:30', '2014-11-22 10:20:30'),
    );
  });

  it('keep-monthly 6 and keep-yearly 10', () => {
    expect(keptTimes({ monthly: 6 })).toEqual(T('2016-01-18 12:02:03', '2015-11-22 10:20:30', '2015-10-22 10:20:30', '2015-09-22 10:20:30', '2015-08-22 10:20:30', '2014-11-22 10:20:30'));
    expect(keptTimes({ yearly: 10 })).toEqual(T('2016-01-18 12:02:03', '2015-11-22 10:20:30', '2014-11-22 10:20:30'));
  });

  it('keep-last 5 + keep-daily 5: a snapshot kept by both rules counts once, with both reasons', () => {
    const [d] = applyRetention(resticSnapshots(), { last: 5, daily: 5 });
    expect(d!.keep.map((k) => k.snapshot.time)).toEqual(
      T('2016-01-18 12:02:03', '2016-01-12 21:08:03', '2016-01-12 21:02:03', '2016-01-09 21:02:03', '2016-01-08 20:02:03', '2016-01-07 10:02:03'),
    );
    expect(d!.keep[0]!.reasons).toEqual(['last', 'daily']);
    expect(d!.keep[2]!.reasons).toEqual(['last']);
    expect(d!.keep[5]!.reasons).toEqual(['daily']);
  });

  it('keep-tag keeps every snapshot carrying any of the tags', () => {
    const foo = keptTimes({ tags: ['foo'] });
    expect(foo).toHaveLength(RESTIC_TIMES.filter(([, t]) => t?.includes('foo')).length);
    const fooOrBar = keptTimes({ tags: ['foo', 'bar'] });
    expect(fooOrBar).toHaveLength(RESTIC_TIMES.filter(([, t]) => t?.includes('foo') || t?.includes('bar')).length);
  });

  it('periods are counted only where snapshots exist (gaps do not use up the count)', () => {
    const s = [snap(1, '2020-01-01T00:00:00Z'), snap(2, '2020-06-01T00:00:00Z'), snap(3, '2023-01-01T00:00:00Z')];
    expect(keptTimes({ daily: 3 }, s)).toHaveLength(3);
    expect(keptTimes({ yearly: 2 }, s)).toEqual(['2023-01-01T00:00:00Z', '2020-06-01T00:00:00Z']);
  });
});

describe('grouping and refusals', () => {
  const mixed = () => [
    snap(1, '2026-01-01T00:00:00Z', 'vm1', ['a']),
    snap(2, '2026-01-02T00:00:00Z', 'vm1', ['b']),
    snap(3, '2026-01-03T00:00:00Z', 'vm1', ['a']),
    snap(4, '2026-01-01T00:00:00Z', 'vm2'),
    snap(5, '2026-01-04T00:00:00Z', 'vm2'),
  ];
  it('groups by VM: each VM keeps its own newest', () => {
    const d = applyRetention(mixed(), { last: 1 });
    expect(d.map((g) => [g.group, g.keep.map((k) => k.snapshot.id.slice(-1)), g.remove.map((s) => s.id.slice(-1))])).toEqual([
      ['vm1', ['3'], ['2', '1']],
      ['vm2', ['5'], ['4']],
    ]);
  });
  it('groups by VM and tag set', () => {
    const d = applyRetention(mixed(), { last: 1 }, 'vm,tags');
    expect(Object.fromEntries(d.map((g) => [g.group, g.keep.map((k) => k.snapshot.id.slice(-1))]))).toEqual({ 'vm1 [a]': ['3'], 'vm1 [b]': ['2'], 'vm2 []': ['5'] });
  });
  it('refuses an empty policy, and negative or fractional counts', () => {
    expect(policyIsEmpty({})).toBe(true);
    expect(policyIsEmpty({ tags: [] })).toBe(true);
    expect(policyIsEmpty({ last: 0 })).toBe(true);
    for (const p of [{}, { tags: [] }, { last: 0, daily: 0 }]) {
      expect(() => applyRetention(mixed(), p)).toThrow(UsageError);
      expect(() => applyRetention(mixed(), p)).toThrow(/refusing to forget everything/);
    }
    expect(() => applyRetention(mixed(), { last: -1 })).toThrow(/non-negative whole number/);
    expect(() => applyRetention(mixed(), { daily: 1.5 })).toThrow(/non-negative whole number/);
  });
  it('orders by instant, not by the text of the time (manifests may carry any ISO-8601 offset)', () => {
    // 01:00 at +05:00 is 20:00 UTC the day before: older than 21:00 UTC.
    const s = [snap(1, '2026-01-02T01:00:00+05:00'), snap(2, '2026-01-01T21:00:00Z')];
    const [d] = applyRetention(s, { last: 1 });
    expect(d!.keep.map((k) => k.snapshot.id.slice(-1))).toEqual(['2']);
  });
  it('an empty repository yields no decisions', () => {
    expect(applyRetention([], { last: 3 })).toEqual([]);
  });
});
