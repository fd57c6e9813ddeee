/**
 * Two "hosts" for migration tests: two VM labs (data directory + repository each), paired with
 * each other, and a `vmsnap receive` run on either. On loopback by default; the netns tests put
 * each host in its own network namespace.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { createInterface } from 'node:readline';
import { BIN } from '../helpers/cli.js';
import { expect } from 'vitest';
import { VmLab, last } from '../helpers/vm.js';
import type { MigrateResult } from '../../src/migration/outgoing.js';

export interface Receiving {
  proc: ChildProcess;
  port: number;
  fingerprint: string;
  stop(): Promise<void>;
}

/** Starts `vmsnap receive --listen HOST:0` for `lab` (optionally through a wrapper, e.g. `ip netns exec`). */
export async function startReceive(lab: VmLab, host = '127.0.0.1', wrap: string[] = []): Promise<Receiving> {
  const cmd = [...wrap, process.execPath, BIN, '--json', 'receive', '--listen', `${host}:0`];
  const proc = spawn(cmd[0]!, cmd.slice(1), { env: { ...process.env, ...lab.env }, stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  proc.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  const first = await new Promise<string>((resolve, reject) => {
    const rl = createInterface({ input: proc.stdout! });
    rl.once('line', resolve);
    proc.once('exit', (code) => reject(new Error(`vmsnap receive exited ${code}: ${stderr}`)));
  });
  const j = JSON.parse(first) as { listening: string; fingerprint: string };
  const port = Number(j.listening.split(':').pop());
  return {
    proc,
    port,
    fingerprint: j.fingerprint,
    stop: async () => {
      if (proc.exitCode !== null) return;
      proc.kill('SIGTERM');
      await new Promise((r) => proc.once('exit', r));
    },
  };
}

/** Pairs two labs both ways (each pins the other's key); `aAddr` is where B reaches A's receive. */
export async function pair(a: VmLab, b: VmLab, names: { a: string; b: string }, addrs: { a?: string; b?: string } = {}): Promise<void> {
  const fa = (await a.ok(['peer', 'id'])).stdout.trim();
  const fb = (await b.ok(['peer', 'id'])).stdout.trim();
  await a.ok(['peer', 'add', names.b, '--fingerprint', fb, ...(addrs.b ? ['--address', addrs.b] : [])]);
  await b.ok(['peer', 'add', names.a, '--fingerprint', fa, ...(addrs.a ? ['--address', addrs.a] : [])]);
}

/** What `migrate --json` prints: the migration's result (outgoing.ts) and what the CLI adds. */
export interface MigrateJson extends MigrateResult {
  vm: string;
  destination: string;
  departure: string | null;
  departureError?: string;
  departurePending?: boolean;
}

/** The final JSON object of `migrate --json` (event lines precede it). */
export function migrateResult(stdout: string): MigrateJson {
  const rest = stdout.split('\n').filter((l) => !l.startsWith('{"event"'));
  return JSON.parse(rest.join('\n')) as MigrateJson;
}

export interface Running {
  proc: ChildProcess;
  done: Promise<{ code: number | null; signal: NodeJS.Signals | null; stdout: string; stderr: string }>;
}

/** Starts a vmsnap command for `lab` without waiting for it (to kill or cancel it midway). */
export function spawnVmsnap(lab: VmLab, args: string[]): Running {
  const proc = spawn(process.execPath, [BIN, ...args], { env: { ...process.env, ...lab.env }, stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  proc.stdout!.on('data', (d: Buffer) => (stdout += d.toString()));
  proc.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  const done = new Promise<{ code: number | null; signal: NodeJS.Signals | null; stdout: string; stderr: string }>((resolve) =>
    proc.once('close', (code, signal) => resolve({ code, signal, stdout, stderr })),
  );
  return { proc, done };
}

/** Waits until `check()` is true (polling), or fails naming `what`. */
export async function until(check: () => boolean | Promise<boolean>, what: string, timeoutMs = 120_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** The guest runs on `lab` and, over five more status lines, reports no memory or disk error. */
export async function expectRunningIntact(lab: VmLab, vm: string): Promise<void> {
  expect((await lab.show(vm)).status.state).toBe('running');
  const n = (await lab.statuses(vm)).length;
  const s = await lab.waitLines(vm, n + 5);
  expect(last(s).errors).toBe(0);
  expect(last(s).diskErrors).toBe(0);
  expect(await lab.errorLines(vm)).toEqual([]);
}

/** A migrated guest runs on `lab` (adopted for cleanup), continuing with no memory or disk error. */
export async function expectArrived(lab: VmLab, vm: string): Promise<void> {
  lab.adopt(vm);
  await lab.rememberPids(vm);
  const s = await lab.waitLines(vm, 8);
  expect(last(s).errors).toBe(0);
  expect(await lab.errorLines(vm)).toEqual([]);
}

/**
 * Two paired hosts on loopback, "laptop" (a) and "desktop" (b), with `receive` running on b (and on
 * a with `receiveOnA`); each pins the other's key with the address of its `receive`, so a
 * migration names the peer. `stop` ends the receivers and cleans both labs up.
 */
export class PairedHosts {
  private constructor(
    readonly a: VmLab,
    readonly b: VmLab,
    public rb: Receiving,
    readonly ra: Receiving | null,
  ) {}

  static async create(prefix: string, o: { receiveOnA?: boolean } = {}): Promise<PairedHosts> {
    const a = await VmLab.create(`${prefix}-a`);
    const b = await VmLab.create(`${prefix}-b`);
    const ra = o.receiveOnA ? await startReceive(a) : null;
    const rb = await startReceive(b);
    await pair(a, b, { a: 'laptop', b: 'desktop' }, { ...(ra ? { a: `127.0.0.1:${ra.port}` } : {}), b: `127.0.0.1:${rb.port}` });
    return new PairedHosts(a, b, rb, ra);
  }

  /** Restarts b's `receive` (which sweeps what a killed worker left) and points a's pin at its new port. */
  async restartReceiveB(): Promise<void> {
    await this.rb.stop();
    this.rb = await startReceive(this.b);
    await this.a.ok(['peer', 'rm', 'desktop']);
    await this.a.ok(['peer', 'add', 'desktop', '--fingerprint', this.rb.fingerprint, '--address', `127.0.0.1:${this.rb.port}`]);
  }

  async stop(): Promise<void> {
    await this.ra?.stop();
    await this.rb.stop();
    await this.a.cleanup();
    await this.b.cleanup();
  }
}
