/**
 * Helpers for the repository's end-to-end tests: run the compiled `vmsnap` CLI (bin/vmsnap.js ->
 * dist/), make temporary repositories and deterministic test images, and look at repository files.
 *
 * The CLI runs from dist/: `npm test` builds first. When a test file runs on its own
 * (`npx vitest run test/store/cli.test.ts`), `ensureBuiltAsync()` (or `ensureBuilt()`) runs `npm run build` once if any source
 * under src/ or cli/ is newer than dist/cli/main.js.
 *
 * dist/ is shared with everyone working in the tree, and a concurrent `npm run build` rewrites it
 * file by file. With VMSNAP_TEST_DIST=<dir> the tests use (and ensureBuilt() writes) a private build
 * there instead; it must lie inside the repository so that node_modules resolves:
 * `VMSNAP_TEST_DIST=.cache/test-dist npx vitest run test/store/crash.test.ts`.
 */
import { execFile, execFileSync, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, rmSync, statSync } from 'node:fs';
import { promisify } from 'node:util';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';

const execFileAsync = promisify(execFile);

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
export const BIN = path.join(ROOT, 'bin/vmsnap.js');

/** The compiled tree the tests run: dist/, or the private build named by VMSNAP_TEST_DIST. */
export function distDir(): string {
  const d = process.env.VMSNAP_TEST_DIST;
  return d ? path.resolve(ROOT, d) : path.join(ROOT, 'dist');
}

/** The script that runs the CLI: bin/vmsnap.js, or the private build's cli/main.js. */
export function cliEntry(): string {
  return process.env.VMSNAP_TEST_DIST ? path.join(distDir(), 'cli/main.js') : BIN;
}

function newestMtime(dir: string): number {
  let t = 0;
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    const p = path.join(dir, e.name);
    if (e.isDirectory()) t = Math.max(t, newestMtime(p));
    else if (e.name.endsWith('.ts')) t = Math.max(t, statSync(p).mtimeMs);
  }
  return t;
}

/** Builds synchronously if needed (blocks the worker while tsc runs; prefer ensureBuiltAsync). */
export function ensureBuilt(): void {
  if (upToDate()) return;
  if (process.env.VMSNAP_TEST_DIST) {
    execFileSync(process.execPath, [path.join(ROOT, 'node_modules/typescript/bin/tsc'), '-p', 'tsconfig.build.json', '--outDir', distDir()], { cwd: ROOT, stdio: 'pipe' });
  } else execFileSync('npm', ['run', 'build'], { cwd: ROOT, stdio: 'pipe' });
}

function upToDate(): boolean {
  const out = path.join(distDir(), 'cli/main.js');
  const built = existsSync(out) ? statSync(out).mtimeMs : 0;
  return built >= Math.max(newestMtime(path.join(ROOT, 'src')), newestMtime(path.join(ROOT, 'cli')));
}

/**
 * Builds dist/ (or the private build) if it is missing or older than the sources. Asynchronous, so
 * a slow build does not block the test worker's event loop (vitest's RPC times out), and guarded by
 * a lock directory, so test files starting in parallel build once.
 */
export async function ensureBuiltAsync(): Promise<void> {
  if (upToDate()) return;
  const lock = path.join(ROOT, '.cache', `build-lock-${path.basename(distDir())}`);
  mkdirSync(path.dirname(lock), { recursive: true });
  for (;;) {
    try {
      mkdirSync(lock);
      break;
    } catch {
      // Another test file is building; a lock older than 10 minutes belongs to a dead run.
      if (existsSync(lock) && Date.now() - statSync(lock).mtimeMs > 600_000) rmSync(lock, { recursive: true, force: true });
      await new Promise((r) => setTimeout(r, 500));
      if (!existsSync(lock) && upToDate()) return;
    }
  }
  try {
    if (upToDate()) return;
    if (process.env.VMSNAP_TEST_DIST) {
      await execFileAsync(process.execPath, [path.join(ROOT, 'node_modules/typescript/bin/tsc'), '-p', 'tsconfig.build.json', '--outDir', distDir()], { cwd: ROOT });
    } else await execFileAsync('npm', ['run', 'build'], { cwd: ROOT });
  } finally {
    rmSync(lock, { recursive: true, force: true });
  }
}

export interface RunResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  stdoutBytes: Buffer;
}

export interface RunOptions {
  env?: Record<string, string | undefined>;
  input?: Buffer;
  cwd?: string;
}

/** Runs `node <script> ...args` and collects its output. Never throws on a non-zero exit. */
export function runNode(script: string[], args: string[], opts: RunOptions = {}): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const env: Record<string, string | undefined> = { ...process.env, VMSNAP_PASSWORD: undefined, VMSNAP_REPO: undefined, VMSNAP_PASSWORD_FILE: undefined, ...opts.env };
    // Keep any user config file out of the tests.
    env.XDG_CONFIG_HOME ??= path.join(tmpdir(), 'vmsnap-test-no-config');
    const child = spawn(process.execPath, [...script, ...args], { cwd: opts.cwd ?? ROOT, env: env as NodeJS.ProcessEnv, stdio: ['pipe', 'pipe', 'pipe'] });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout.on('data', (b: Buffer) => out.push(b));
    child.stderr.on('data', (b: Buffer) => err.push(b));
    child.on('error', reject);
    child.on('close', (code, signal) => {
      const stdoutBytes = Buffer.concat(out);
      resolve({ code, signal, stdout: stdoutBytes.toString('utf8'), stderr: Buffer.concat(err).toString('utf8'), stdoutBytes });
    });
    child.stdin.on('error', () => undefined);
    if (opts.input) child.stdin.end(opts.input);
    else child.stdin.end();
  });
}

/** Runs the compiled CLI: `vmsnap --repo <repo> ...args`. */
export function vmsnap(repo: string | null, args: string[], opts: RunOptions = {}): Promise<RunResult> {
  return runNode([cliEntry()], repo === null ? args : ['--repo', repo, ...args], opts);
}

/** Like vmsnap() but fails the test with the CLI's stderr when the exit code is not 0. */
export async function vmsnapOk(repo: string | null, args: string[], opts: RunOptions = {}): Promise<RunResult> {
  const r = await vmsnap(repo, args, opts);
  if (r.code !== 0) throw new Error(`vmsnap ${args.join(' ')} exited ${r.code}: ${r.stderr}`);
  return r;
}

export function tempDir(prefix = 'vmsnap-test-'): string {
  return mkdtempSync(path.join(tmpdir(), prefix));
}

export function removeDir(dir: string): void {
  rmSync(dir, { recursive: true, force: true });
}

/** A deterministic pseudo-random generator (xorshift32): test data and kill points from a seed. */
export function rng(seed: number): () => number {
  let x = seed >>> 0 || 0x9e3779b9;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x / 0x1_0000_0000;
  };
}

/** Deterministic incompressible bytes. */
export function randomData(size: number, seed: number): Buffer {
  const b = Buffer.allocUnsafe(size);
  let x = seed >>> 0 || 1;
  for (let i = 0; i + 4 <= size; i += 4) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    b.writeUInt32LE(x, i);
  }
  for (let i = size & ~3; i < size; i++) b[i] = i & 0xff;
  return b;
}

/**
 * An image with structure like a disk: zero runs, compressible text and random blocks, cut in
 * `block`-sized pieces chosen by `seed`.
 */
export function mixedImage(size: number, seed: number, block = 4096): Buffer {
  const buf = Buffer.alloc(size);
  const r = rng(seed);
  const text = Buffer.from('the quick brown fox jumps over the lazy dog; '.repeat(Math.ceil(block / 40)));
  for (let off = 0; off < size; off += block) {
    const n = Math.min(block, size - off);
    const k = r();
    if (k < 0.2) continue;
    if (k < 0.45) text.copy(buf, off, 0, n);
    else randomData(n, Math.floor(r() * 0xffffffff)).copy(buf, off);
  }
  return buf;
}

export function sha256(b: Uint8Array): string {
  return createHash('sha256').update(b).digest('hex');
}

/** All files of one kind in a local repository (packs are fanned out in two-character folders). */
export function repoFiles(repo: string, kind: 'packs' | 'index' | 'snapshots' | 'keys' | 'locks' | 'config'): string[] {
  const dir = path.join(repo, kind);
  if (!existsSync(dir)) return [];
  const out: string[] = [];
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    if (e.name.startsWith('.tmp-')) continue;
    const p = path.join(dir, e.name);
    if (e.isDirectory()) {
      for (const f of readdirSync(p)) if (!f.startsWith('.tmp-')) out.push(path.join(p, f));
    } else out.push(p);
  }
  return out.sort();
}

/** Sum of the sizes of the pack files. */
export function packBytes(repo: string): number {
  return repoFiles(repo, 'packs').reduce((s, f) => s + statSync(f).size, 0);
}

/**
 * Temp files an export (or any atomic write) left beside `target`: createTempFile names them
 * `.tmp-<name>-<random>` in the target's directory (and vmsnap before it `<name>.vmsnap-partial`).
 */
export function tempLeftovers(target: string): string[] {
  const base = path.basename(target);
  return readdirSync(path.dirname(target)).filter((n) => n.startsWith(`.tmp-${base}-`) || n === `${base}.vmsnap-partial`);
}
