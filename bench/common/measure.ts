/**
 * Benchmark helpers shared by the bench/* suites: a work directory on a real disk (never tmpfs),
 * running a child process under GNU time to get its wall time and peak RSS, dropping the page
 * cache, measuring a directory's size, hashing a file, and printing a table.
 *
 * Every figure that compares two tools must be taken in the same run, on the same machine state:
 * these helpers only measure, the suites decide what to compare.
 */
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { createReadStream, promises as fsp, statfsSync, existsSync, writeFileSync } from 'node:fs';
import * as path from 'node:path';

const TMPFS_MAGIC = 0x01021994;
const GNU_TIME = '/usr/bin/time';

/**
 * The benchmarks' scratch root: $BENCH_DIR, else /var/tmp/vmsnap-bench. Refuses tmpfs (a RAM disk
 * would measure memory, not the disk a repository lives on, and eat the RAM the tools need).
 */
export function benchRoot(): string {
  const root = path.resolve(process.env.BENCH_DIR ?? '/var/tmp/vmsnap-bench');
  const probe = existingParent(root);
  if (statfsSync(probe).type === TMPFS_MAGIC) {
    throw new Error(`${root} is on tmpfs: set BENCH_DIR to a directory on a real disk`);
  }
  return root;
}

function existingParent(p: string): string {
  let d = p;
  while (!existsSync(d)) d = path.dirname(d);
  return d;
}

/** A fresh, empty directory `<root>/<name>` (removed first if it exists). */
export async function freshDir(root: string, name: string): Promise<string> {
  const dir = path.join(root, name);
  await fsp.rm(dir, { recursive: true, force: true });
  await fsp.mkdir(dir, { recursive: true });
  return dir;
}

export interface Measured {
  /** Wall-clock seconds of the child, measured by this process. */
  seconds: number;
  /** Peak resident set size of the child (GNU time %M, KiB → MiB). */
  peakRssMiB: number;
  /** User + system CPU seconds of the child. */
  cpuSeconds: number;
  stdout: string;
  stderr: string;
}

export interface RunOptions {
  env?: NodeJS.ProcessEnv;
  cwd?: string;
}

/** Runs `cmd args…` under /usr/bin/time and fails with its stderr if it exits non-zero. */
export async function measure(cmd: string, args: readonly string[], opts: RunOptions = {}): Promise<Measured> {
  if (!existsSync(GNU_TIME)) throw new Error(`${GNU_TIME} is missing: apt-get install time`);
  const marker = '@@bench-time@@';
  const start = process.hrtime.bigint();
  const { code, stdout, stderr } = await run(GNU_TIME, ['-f', `${marker} %M %U %S`, cmd, ...args], opts);
  const seconds = Number(process.hrtime.bigint() - start) / 1e9;
  const at = stderr.lastIndexOf(marker);
  const fields = at >= 0 ? stderr.slice(at + marker.length).trim().split(/\s+/).map(Number) : [];
  const childErr = at >= 0 ? stderr.slice(0, at) : stderr;
  if (code !== 0) throw new Error(`${cmd} ${args.join(' ')} exited ${code}:\n${childErr.slice(-4000)}`);
  const [rssKiB = NaN, user = NaN, sys = NaN] = fields;
  return { seconds, peakRssMiB: rssKiB / 1024, cpuSeconds: user + sys, stdout, stderr: childErr };
}

/** Runs a command, capturing its output. */
export function run(cmd: string, args: readonly string[], opts: RunOptions = {}): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { env: opts.env ?? process.env, cwd: opts.cwd, stdio: ['ignore', 'pipe', 'pipe'] });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout.on('data', (b: Buffer) => out.push(b));
    child.stderr.on('data', (b: Buffer) => err.push(b));
    child.on('error', reject);
    child.on('close', (code) => resolve({ code: code ?? -1, stdout: Buffer.concat(out).toString(), stderr: Buffer.concat(err).toString() }));
  });
}

/** Runs a command and throws unless it exits 0. Returns stdout. */
export async function check(cmd: string, args: readonly string[], opts: RunOptions = {}): Promise<string> {
  const r = await run(cmd, args, opts);
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ')} exited ${r.code}:\n${r.stderr.slice(-4000)}`);
  return r.stdout;
}

let dropWarned = false;
/**
 * Writes back dirty pages and drops the page cache, so a timed step reads from disk like a cold
 * backup would. Needs root; without it the benchmark goes on warm and says so once.
 */
export async function dropCaches(): Promise<boolean> {
  await check('sync', []);
  try {
    writeFileSync('/proc/sys/vm/drop_caches', '3\n');
    return true;
  } catch (err) {
    if (!dropWarned) console.warn(`warning: cannot drop page caches (${(err as Error).message}): timings are warm-cache`);
    dropWarned = true;
    return false;
  }
}

/** Sum of the apparent sizes of all files under `dir` (like `du -sb`, without directory entries). */
export async function dirBytes(dir: string): Promise<number> {
  let total = 0;
  const entries = await fsp.readdir(dir, { withFileTypes: true, recursive: true });
  for (const e of entries) {
    if (!e.isFile()) continue;
    const st = await fsp.stat(path.join(e.parentPath, e.name));
    total += st.size;
  }
  return total;
}

export async function sha256File(file: string): Promise<string> {
  const h = createHash('sha256');
  for await (const piece of createReadStream(file, { highWaterMark: 4 << 20 })) h.update(piece as Buffer);
  return h.digest('hex');
}

// ---- formatting ----

export const MiB = 1 << 20;
export const MB = 1e6;

export function fmt(n: number, digits = 1): string {
  if (!Number.isFinite(n)) return '–';
  return n.toFixed(digits);
}

export function mib(bytes: number, digits = 1): string {
  return fmt(bytes / MiB, digits);
}

/** A Markdown table (readable as plain text too), columns padded, numbers right-aligned. */
export function table(headers: readonly string[], rows: readonly (readonly string[])[]): string {
  const widths = headers.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const numeric = headers.map((_, i) => rows.length > 0 && rows.every((r) => /^[-+]?[\d.,]+[x%]?$|^–$/.test(r[i] ?? '')));
  const cell = (s: string, i: number) => (numeric[i] ? s.padStart(widths[i]!) : s.padEnd(widths[i]!));
  const line = (r: readonly string[]) => `| ${r.map((s, i) => cell(s, i)).join(' | ')} |`;
  const sep = `|${widths.map((w, i) => (numeric[i] ? `${'-'.repeat(w + 1)}:` : `${'-'.repeat(w + 2)}`)).join('|')}|`;
  return [line(headers), sep, ...rows.map(line)].join('\n');
}

/** Median of the finite values of `xs` (a failed measurement is NaN); NaN when there are none. */
export function median(xs: readonly number[]): number {
  const s = xs.filter((x) => Number.isFinite(x)).sort((a, b) => a - b);
  if (!s.length) return NaN;
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

/** The value after `--name` on the command line, as a string, or `dflt`. */
export function arg(name: string, dflt: string): string {
  const i = process.argv.indexOf(name);
  return i >= 0 ? (process.argv[i + 1] ?? dflt) : dflt;
}

/** The number after `--name` on the command line, or `dflt`. */
export function argNum(name: string, dflt: number): number {
  return Number(arg(name, String(dflt)));
}
