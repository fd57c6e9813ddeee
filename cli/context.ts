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

export function loadFileConfig(): FileConfig {
  const file = path.join(xdg('config'), 'vmsnap', 'config.json');
  if (!existsSync(file)) return {};
  try {
    const c = JSON.parse(readFileSync(file, 'utf8')) as unknown;
    if (typeof c !== 'object' || c === null || Array.isArray(c)) throw new Error('not an object');
    return c as FileConfig;
  } catch (err) {
    throw new UsageError(`config file ${file} is invalid: ${(err as Error).message}`);
  }
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
