/**
 * Where the CLI's settings come from, in order of precedence: command-line flags, environment
 * (VMSNAP_REPO, VMSNAP_PASSWORD, VMSNAP_PASSWORD_FILE, VMSNAP_DATA_DIR), the config file
 * ($XDG_CONFIG_HOME/vmsnap/config.json: { "repo", "codec", "passwordFile", "encrypt" }), defaults
 * (repository at $XDG_DATA_HOME/vmsnap/repo, zstd, no encryption).
 */
import { readFileSync, existsSync } from 'node:fs';
import { homedir } from 'node:os';
import * as path from 'node:path';
import { createInterface } from 'node:readline';
import type { Backend } from '../src/store/backend/contract.js';
import { openNonS3 } from '../src/store/backend/open-local.js';
import type { BackendStats, StatsBackend } from '../src/store/backend/stats.js';
import { Repository } from '../src/store/repository.js';
import { UsageError } from '../src/store/errors.js';
import { warnIfShared } from '../src/util/fs.js';
import type { VmOpsContext } from '../src/ops/vm.js';

export interface GlobalOptions {
  repo?: string;
  passwordFile?: string;
  json?: boolean;
  quiet?: boolean;
  /** Count backend requests and bytes per operation; printed to stderr at exit (`--stats`). */
  stats?: boolean;
}

export interface FileConfig {
  repo?: string;
  codec?: 'zstd' | 'lz4' | 'none';
  passwordFile?: string;
  encrypt?: boolean;
  dataDir?: string;
}

export function xdg(kind: 'data' | 'config'): string {
  const env = kind === 'data' ? process.env.XDG_DATA_HOME : process.env.XDG_CONFIG_HOME;
  return env && path.isAbsolute(env) ? env : path.join(homedir(), kind === 'data' ? '.local/share' : '.config');
}

/** The type each config file key must have; any other key is refused (a typo must not be ignored). */
const CONFIG_KEYS: Record<keyof FileConfig, (v: unknown) => string | null> = {
  repo: (v) => (typeof v === 'string' && v.length > 0 ? null : 'must be a non-empty string (a directory or s3:...)'),
  codec: (v) => (v === 'zstd' || v === 'lz4' || v === 'none' ? null : 'must be "zstd", "lz4" or "none"'),
  passwordFile: (v) => (typeof v === 'string' && v.length > 0 ? null : 'must be a non-empty string (a file path)'),
  encrypt: (v) => (typeof v === 'boolean' ? null : 'must be true or false'),
  dataDir: (v) => (typeof v === 'string' && v.length > 0 ? null : 'must be a non-empty string (a directory)'),
};

/** The config file, every key checked: a wrong one is a UsageError naming the file and the key. */
export function loadFileConfig(): FileConfig {
  const file = path.join(xdg('config'), 'vmsnap', 'config.json');
  if (!existsSync(file)) return {};
  let c: unknown;
  try {
    c = JSON.parse(readFileSync(file, 'utf8')) as unknown;
  } catch (err) {
    throw new UsageError(`config file ${file} is invalid: ${(err as Error).message}`);
  }
  if (typeof c !== 'object' || c === null || Array.isArray(c)) throw new UsageError(`config file ${file} is invalid: not a JSON object`);
  for (const [key, value] of Object.entries(c)) {
    const check = CONFIG_KEYS[key as keyof FileConfig] as ((v: unknown) => string | null) | undefined;
    if (!check) throw new UsageError(`config file ${file}: unknown key ${JSON.stringify(key)} (known: ${Object.keys(CONFIG_KEYS).join(', ')})`);
    const problem = check(value);
    if (problem) throw new UsageError(`config file ${file}: "${key}" ${problem}, got ${JSON.stringify(value)}`);
  }
  return c as FileConfig;
}

/**
 * Warns (stderr, once per folder and command) when the local repository or the VM data folder
 * exists and other users can read or enter it (see warnIfShared; docs/security.md).
 */
export async function warnSharedFolders(opts: GlobalOptions): Promise<void> {
  const repo = repoLocation(opts);
  if (!repo.startsWith('s3:')) await warnIfShared(repo.replace(/^local:/, ''), 'repository');
  await warnIfShared(dataDir(), 'VM data folder');
}

export function dataDir(): string {
  return process.env.VMSNAP_DATA_DIR ?? loadFileConfig().dataDir ?? path.join(xdg('data'), 'vmsnap');
}

export function repoLocation(opts: GlobalOptions): string {
  return opts.repo ?? process.env.VMSNAP_REPO ?? loadFileConfig().repo ?? path.join(dataDir(), 'repo');
}

/** Backends opened while `--stats` is on, in opening order (see backendStatsReport). */
const statsBackends: { location: string; stats: StatsBackend }[] = [];
let statsEnabled = false;

/** Turns on request counting for every backend opened from now on (the global `--stats`). */
export function enableBackendStats(): void {
  statsEnabled = true;
}

/**
 * Opens the backend of a repository location: a path / local:PATH, s3://..., s3:http(s)://...
 * (see src/store/backend/open.ts). Remote backends retry; with `--stats` each is counted.
 */
export async function openBackendAt(location: string): Promise<Backend> {
  // The S3 SDK is loaded only for S3 locations: it costs tens of MiB and ~100 ms at start.
  const opened = location.startsWith('s3:')
    ? (await import('../src/store/backend/open.js')).openBackendDetailed(location, { stats: statsEnabled })
    : openNonS3(location, { stats: statsEnabled });
  if (opened.stats) statsBackends.push({ location: opened.backend.location, stats: opened.stats });
  return opened.backend;
}

/** Counters of every backend opened with `--stats`, summed per location (never holds credentials). */
export function backendStatsReport(): { location: string; stats: BackendStats }[] {
  const out = new Map<string, BackendStats>();
  for (const b of statsBackends) {
    const s = b.stats.snapshot();
    const acc = out.get(b.location);
    if (!acc) {
      out.set(b.location, s);
      continue;
    }
    for (const m of STATS_METHODS) {
      acc[m].requests += s[m].requests;
      acc[m].errors += s[m].errors;
      acc[m].bytes += s[m].bytes;
    }
    acc.listed += s.listed;
  }
  return [...out].map(([location, stats]) => ({ location, stats }));
}

const STATS_METHODS = ['put', 'create', 'get', 'stat', 'list', 'delete'] as const;

/**
 * Writes the `--stats` report to stderr: a table per backend, or with `--json` one line
 * `{"backendStats":[{location, stats}]}` (stdout stays the command's own output).
 */
export function printBackendStats(json: boolean): void {
  if (!statsEnabled) return;
  const report = backendStatsReport();
  if (json) {
    process.stderr.write(JSON.stringify({ backendStats: report }) + '\n');
    return;
  }
  for (const { location, stats } of report) {
    process.stderr.write(`backend requests for ${location}:\n`);
    for (const m of STATS_METHODS) {
      const c = stats[m];
      if (c.requests === 0) continue;
      const bytes = m === 'put' || m === 'create' ? `${c.bytes} bytes sent` : m === 'get' ? `${c.bytes} bytes received` : m === 'list' ? `${stats.listed} objects listed` : '';
      process.stderr.write(`  ${m.padEnd(7)} ${String(c.requests).padStart(7)} requests${c.errors ? ` (${c.errors} failed)` : ''}${bytes ? `, ${bytes}` : ''}\n`);
    }
  }
}

async function prompt(question: string): Promise<string> {
  if (!process.stdin.isTTY) throw new UsageError('a password is needed: set VMSNAP_PASSWORD or use --password-file');
  const rl = createInterface({ input: process.stdin, output: process.stderr, terminal: true });
  // Mute echo: readline writes what is typed through _writeToOutput.
  (rl as unknown as { _writeToOutput: (s: string) => void })._writeToOutput = (s: string) => {
    if (s.includes(question)) process.stderr.write(s);
  };
  try {
    return await new Promise<string>((resolve) => rl.question(question, resolve));
  } finally {
    rl.close();
    process.stderr.write('\n');
  }
}

/** The password from --password-file, VMSNAP_PASSWORD_FILE, VMSNAP_PASSWORD, the config, or a prompt. */
export async function password(opts: GlobalOptions, purpose: 'open' | 'new'): Promise<string> {
  const file = opts.passwordFile ?? process.env.VMSNAP_PASSWORD_FILE ?? loadFileConfig().passwordFile;
  if (file) {
    try {
      return readFileSync(file, 'utf8').replace(/\r?\n$/, '');
    } catch (err) {
      throw new UsageError(`cannot read password file ${file}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
    }
  }
  if (process.env.VMSNAP_PASSWORD !== undefined) return process.env.VMSNAP_PASSWORD;
  const first = await prompt(purpose === 'new' ? 'new repository password: ' : 'repository password: ');
  if (purpose === 'new' && (await prompt('repeat password: ')) !== first) throw new UsageError('passwords do not match');
  return first;
}

export async function openRepository(opts: GlobalOptions): Promise<Repository> {
  const backend = await openBackendAt(repoLocation(opts));
  return Repository.open(backend, { password: () => password(opts, 'open') });
}

/** The environment a supervisor needs to open the same repository without prompting. */
export async function supervisorEnv(g: GlobalOptions): Promise<NodeJS.ProcessEnv> {
  const env: NodeJS.ProcessEnv = { ...process.env, VMSNAP_REPO: repoLocation(g) };
  try {
    const backend = await openBackendAt(repoLocation(g));
    const cfg = JSON.parse((await backend.get('config', 'config')).toString()) as { encryption: unknown };
    if (cfg.encryption) env.VMSNAP_PASSWORD = await password(g, 'open');
  } catch {
    // No repository yet: the VM runs; `take` will say to run `vmsnap init`.
  }
  return env;
}

/** What the VM operations of src/ops/vm.ts need, from this command's settings. */
export function vmOpsContext(g: GlobalOptions): VmOpsContext {
  return { dataDir: dataDir(), openRepo: () => openRepository(g), supervisorEnv: () => supervisorEnv(g) };
}
