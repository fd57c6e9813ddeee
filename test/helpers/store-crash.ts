/**
 * Shared parts of the crash tests (test/store/crash*.test.ts): run the crash driver
 * (store-crash-child.ts), choose seeded kill points, and verify a repository after a kill.
 */
import { cpSync, writeFileSync } from 'node:fs';
import * as path from 'node:path';
import { expect } from 'vitest';
import { removeDir, rng, runNode, sha256, vmsnap, ROOT } from './cli.js';

const DRIVER = path.join(ROOT, 'test/helpers/store-crash-child.ts');
export const MODES = ['before', 'during', 'after'] as const;
export type Mode = (typeof MODES)[number];

export interface Problem {
  severity: 'error' | 'warning';
  message: string;
}
export interface Verified {
  mutations: number;
  problems: Problem[];
  snapshots: { id: string; source: string; sha256: string }[];
}

/** Source image file -> sha256 of its content. */
export const expected = new Map<string, string>();

export function image(dir: string, name: string, data: Buffer): string {
  const file = path.join(dir, name);
  writeFileSync(file, data);
  expected.set(file, sha256(data));
  return file;
}

export async function drive(repo: string, commands: string[][], killAt: number | null, mode: Mode = 'before', verify = false) {
  return runNode(['--import', 'tsx', DRIVER], [JSON.stringify({ repo, commands, killAt, mode, verify })]);
}

function lastJson<T>(stdout: string): T {
  return JSON.parse(stdout.trim().split('\n').pop() ?? '{}') as T;
}

/** Runs `commands` to completion on a copy of `base` and returns how many mutations they make. */
export async function countMutations(work: string, base: string, commands: string[][]): Promise<number> {
  const repo = path.join(work, `count-${process.pid}-${Date.now()}`);
  cpSync(base, repo, { recursive: true });
  const r = await drive(repo, commands, null);
  removeDir(repo);
  expect(r.code, r.stderr).toBe(0);
  return lastJson<{ mutations: number }>(r.stdout).mutations;
}

/** Kill points: every mutation once (mode by seed), then random ones, at least `min` in all. */
export function killPoints(seed: number, total: number, min: number, allModes = false): { n: number; mode: Mode }[] {
  const r = rng(seed);
  const points: { n: number; mode: Mode }[] = [];
  for (let n = 1; n <= total; n++) {
    if (allModes) for (const mode of MODES) points.push({ n, mode });
    else points.push({ n, mode: MODES[Math.floor(r() * 3)]! });
  }
  while (points.length < min) points.push({ n: 1 + Math.floor(r() * total), mode: MODES[Math.floor(r() * 3)]! });
  return points;
}

/**
 * Runs `commands` (possibly none) and then verifies in the same process: check --read-data finds no
 * errors (and no problems at all with `strict`), every snapshot exports its source bit-identically,
 * and every id in `committed` is still there. Returns source -> snapshot ids.
 */
export async function verify(repo: string, commands: string[][], committed: Map<string, string[]>, context: string, strict = false): Promise<Map<string, string[]>> {
  const r = await drive(repo, commands, null, 'before', true);
  expect(r.code, `${context}: ${r.stderr}`).toBe(0);
  const v = lastJson<Verified>(r.stdout);
  const bad = v.problems.filter((p) => strict || p.severity === 'error');
  expect(bad, context).toEqual([]);
  const ids = new Map<string, string[]>();
  for (const s of v.snapshots) {
    expect(s.sha256, `${context}: snapshot ${s.id} of ${s.source}`).toBe(expected.get(s.source));
    ids.set(s.source, [...(ids.get(s.source) ?? []), s.id]);
  }
  for (const [source, list] of committed) {
    for (const id of list) expect(ids.get(source) ?? [], `${context}: committed snapshot ${id} of ${source} is gone`).toContain(id);
  }
  return ids;
}

/** The real CLI's `check --read-data`: exit 0 and no problem of severity error. */
export async function cliCheckClean(repo: string, context: string): Promise<void> {
  const r = await vmsnap(repo, ['--json', 'check', '--read-data']);
  const report = JSON.parse(r.stdout || '{}') as { problems?: Problem[] };
  expect((report.problems ?? []).filter((p) => p.severity === 'error'), `${context}: ${r.stderr}`).toEqual([]);
  expect(r.code, `${context}: ${r.stderr}`).toBe(0);
}
