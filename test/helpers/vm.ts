/**
 * Helpers for the VM acceptance tests (test/vm): a lab with its own data directory and repository
 * in a temp dir, the compiled CLI run against them, fixture-guest VMs, their serial consoles read
 * as `VMSNAP-STATUS` lines, and a cleanup that stops every VM and kills (by pid) any supervisor or
 * QEMU this lab started that is still alive.
 */
import type { TakeResult } from '../../src/vm/runtime.js';
import { execFileSync } from 'node:child_process';
import { promises as fsp, readFileSync } from 'node:fs';
import * as path from 'node:path';
import { expect } from 'vitest';
import { guestArtifacts, parseErrorLines, parseStatusLines, type GuestErrorLine, type GuestStatus } from '../../fixtures/guest/index.js';
import { ensureBuiltAsync, removeDir, tempDir, vmsnap, type RunResult } from './cli.js';

export type { GuestStatus };

export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

export interface LinuxVmOptions {
  memory?: string;
  disk?: string | null;
  /** A raw image the disk starts as (`--disk-from`), instead of a blank `disk`. */
  diskFrom?: string;
  /** Run the fixture's raw disk workload on /dev/vda (default); false leaves the disk to `extra` modes. */
  diskWorkload?: boolean;
  memMiB?: number;
  rate?: number;
  diskRate?: number;
  accel?: 'kvm' | 'tcg' | 'auto';
  extra?: Record<string, string | number>;
  /** Extra QEMU arguments (`vm create --qemu-arg`), e.g. a second QMP monitor for the test. */
  qemuArgs?: string[];
}

export interface BmVmOptions {
  memory?: string;
  accel: 'kvm' | 'tcg';
  memMiB: number;
  rate: number;
  slowCpu?: boolean;
}

/** `take --json` prints the TakeResult of src/vm/runtime.ts. */
export type TakeJson = TakeResult;

export interface ShowJson {
  name: string;
  memoryMiB: number;
  status: { state: string; pid?: number | null; accel?: string | null };
  lastSnapshot: string | null;
  serialLog: string;
}

/** What a take looked like from the guest's side: the last status before and the first after. */
export interface TakeWindow {
  take: TakeJson;
  before: GuestStatus;
  after: GuestStatus;
}

export class VmLab {
  readonly dataDir: string;
  readonly repo: string;
  readonly env: Record<string, string>;
  private readonly vms = new Set<string>();
  private readonly pids = new Set<number>();

  private constructor(readonly root: string, repo?: string) {
    this.dataDir = path.join(root, 'data');
    this.repo = repo ?? path.join(root, 'repo');
    this.env = { VMSNAP_DATA_DIR: this.dataDir, VMSNAP_REPO: this.repo };
  }

  /** A lab in a fresh temp dir with an initialised (unencrypted) repository. `repo` overrides its location. */
  static async create(prefix: string, opts: { repo?: (root: string) => string; init?: boolean } = {}): Promise<VmLab> {
    await ensureBuiltAsync();
    guestArtifacts();
    const root = tempDir(`vmsnap-vm-${prefix}-`);
    const lab = new VmLab(root, opts.repo?.(root));
    // Private, as vmsnap makes its own folders: a shared one earns a warning on every command.
    await fsp.mkdir(lab.dataDir, { recursive: true, mode: 0o700 });
    if (opts.init !== false) await lab.ok(['init']);
    return lab;
  }

  run(args: string[]): Promise<RunResult> {
    return vmsnap(null, args, { env: this.env });
  }

  async ok(args: string[]): Promise<RunResult> {
    const r = await this.run(args);
    if (r.code !== 0) throw new Error(`vmsnap ${args.join(' ')} exited ${r.code}: ${r.stderr}${r.stdout}`);
    return r;
  }

  async json<T>(args: string[]): Promise<T> {
    const r = await this.ok(['--json', ...args]);
    return JSON.parse(r.stdout) as T;
  }

  /** A VM running the Linux fixture guest (TCG by default): 256M, workload 64 MiB, one 64M disk with the disk workload. */
  async createLinuxVm(name: string, o: LinuxVmOptions = {}): Promise<void> {
    const a = guestArtifacts();
    const disk = o.disk === undefined ? '64M' : o.disk;
    const params: string[] = ['console=ttyS0', 'quiet', `vmsnap.mem=${o.memMiB ?? 64}`, `vmsnap.rate=${o.rate ?? 2000}`];
    if ((disk || o.diskFrom) && o.diskWorkload !== false) params.push('vmsnap.disk=/dev/vda');
    if (o.diskRate !== undefined) params.push(`vmsnap.disk_rate=${o.diskRate}`);
    for (const [k, v] of Object.entries(o.extra ?? {})) params.push(`vmsnap.${k}=${v}`);
    await this.ok([
      'vm', 'create', name, '--memory', o.memory ?? '256M', ...(o.diskFrom ? ['--disk-from', o.diskFrom] : disk ? ['--disk', disk] : []),
      '--kernel', a.kernel, '--initrd', a.initrd, '--append', params.join(' '), '--accel', o.accel ?? 'tcg',
      ...(o.qemuArgs ?? []).map((x) => `--qemu-arg=${x}`),
    ]);
    this.vms.add(name);
  }

  /** A VM running the bare-metal fixture guest (multiboot ELF, no disk). */
  async createBmVm(name: string, o: BmVmOptions): Promise<void> {
    const a = guestArtifacts();
    const params = [`vmsnap.mem=${o.memMiB}`, `vmsnap.rate=${o.rate}`, ...(o.slowCpu ? ['vmsnap.words=8', 'vmsnap.sweep_ms=2000'] : [])];
    await this.ok(['vm', 'create', name, '--memory', o.memory ?? '64M', '--kernel', a.bmElf, '--append', params.join(' '), '--accel', o.accel]);
    this.vms.add(name);
  }

  /** Registers a VM made by other means (clone) for cleanup. */
  adopt(name: string): void {
    this.vms.add(name);
  }

  async start(name: string): Promise<void> {
    this.vms.add(name);
    await this.ok(['vm', 'start', name]);
    await this.rememberPids(name);
  }

  async show(name: string): Promise<ShowJson> {
    return this.json<ShowJson>(['vm', 'show', name]);
  }

  /** Records the VM's supervisor and QEMU pids so cleanup can kill them if `vm stop` cannot. */
  async rememberPids(name: string): Promise<{ supervisor: number | null; qemu: number | null }> {
    const sup = this.supervisorPid(name);
    if (sup) this.pids.add(sup);
    const st = await this.show(name).catch(() => null);
    const qemu = st?.status.pid ?? null;
    if (qemu) this.pids.add(qemu);
    return { supervisor: sup, qemu };
  }

  runDir(name: string): string {
    return path.join(this.dataDir, 'vms', name, 'run');
  }

  supervisorPid(name: string): number | null {
    try {
      const n = Number(readFileSync(path.join(this.runDir(name), 'supervisor.pid'), 'utf8').trim());
      return n > 0 ? n : null;
    } catch {
      return null;
    }
  }

  async serial(name: string): Promise<string> {
    return fsp.readFile(path.join(this.runDir(name), 'serial.log'), 'utf8').catch(() => '');
  }

  async statuses(name: string): Promise<GuestStatus[]> {
    return parseStatusLines(await this.serial(name));
  }

  async errorLines(name: string): Promise<GuestErrorLine[]> {
    return parseErrorLines(await this.serial(name));
  }

  async supervisorLog(name: string): Promise<string> {
    return fsp.readFile(path.join(this.runDir(name), 'supervisor.log'), 'utf8').catch(() => '');
  }

  /**
   * Waits until the console holds status lines for which `done(lines)` is true; returns them.
   * Fails with the console's tail when `timeoutMs` passes.
   */
  async waitFor(name: string, done: (s: GuestStatus[]) => boolean, what: string, timeoutMs = 90_000): Promise<GuestStatus[]> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const s = await this.statuses(name);
      if (done(s)) return s;
      if (Date.now() > deadline) {
        const tail = (await this.serial(name)).split('\n').slice(-8).join('\n');
        throw new Error(`VM ${name}: timed out after ${timeoutMs} ms waiting for ${what}; ${s.length} status lines; console tail:\n${tail}\nsupervisor log tail:\n${(await this.supervisorLog(name)).split('\n').slice(-10).join('\n')}`);
      }
      await sleep(100);
    }
  }

  /** Waits for at least `n` status lines in the (current) console log. */
  waitLines(name: string, n: number, timeoutMs?: number): Promise<GuestStatus[]> {
    return this.waitFor(name, (s) => s.length >= n, `${n} status lines`, timeoutMs);
  }

  /**
   * Waits until the guest has run (by its own clock) `guestMs` past the line at index `from`, so at
   * least one full memory verify sweep (1 s) covered everything; returns all lines.
   */
  waitGuestTime(name: string, from: number, guestMs: number, timeoutMs?: number): Promise<GuestStatus[]> {
    return this.waitFor(
      name,
      (s) => s.length > from && s[s.length - 1]!.uptimeMs - s[from]!.uptimeMs >= guestMs,
      `${guestMs} ms of guest time after status line ${from}`,
      timeoutMs,
    );
  }

  /**
   * `take --json` bracketed by the guest's status lines: the last one printed before the take
   * started and the first one printed after it returned. The snapshot point lies between them.
   */
  async takeWindow(name: string, args: string[] = []): Promise<TakeWindow> {
    const pre = await this.waitLines(name, 1);
    const before = pre[pre.length - 1]!;
    const take = await this.json<TakeJson>(['take', name, ...args]);
    // Lines already in the log when take returned may have been printed during it: use the next one.
    const countAtReturn = (await this.statuses(name)).length;
    const after = (await this.waitLines(name, countAtReturn + 1))[countAtReturn]!;
    return { take, before, after };
  }

  /** Snapshot ids, oldest first, from `ls --json`. */
  async snapshotIds(): Promise<string[]> {
    const r = await this.json<{ id: string }[]>(['ls']);
    return r.map((x) => x.id);
  }

  /**
   * Stops every VM of this lab, kills whatever of its supervisors and QEMUs still lives, removes the
   * temp dir — and then FAILS (throws) if anything had to be killed: `vm stop` must end every
   * process of a VM, and a QEMU left behind (e.g. by a supervisor that died) is a defect, not noise.
   */
  async cleanup(): Promise<void> {
    for (const name of this.vms) {
      await this.rememberPids(name).catch(() => undefined);
      if (this.supervisorPid(name)) await this.run(['vm', 'stop', name]).catch(() => undefined);
    }
    // Processes end a moment after `vm stop` returns (QEMU is reaped after the supervisor exits).
    const deadline = Date.now() + 5000;
    let left = this.leftovers();
    while (left.length && Date.now() < deadline) {
      await sleep(100);
      left = this.leftovers();
    }
    const described = left.map((p) => `${p} (${cmdline(p)})`);
    for (const pid of left) {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        // gone already
      }
    }
    removeDir(this.root);
    if (left.length) throw new Error(`cleanup of ${this.root}: processes were left running after \`vm stop\` and had to be killed: ${described.join(', ')}`);
  }

  /** Live supervisors and QEMUs of this lab (remembered pids, and anything naming its root). */
  leftovers(): number[] {
    return [...new Set([...this.pids, ...this.ourPids()])].filter((p) => this.owns(p));
  }

  /** Live QEMU processes of this lab's VM `name` (their command line names its run dir). */
  qemuPids(name: string): number[] {
    return this.ourPids().filter((p) => {
      const argv = fullArgv(p);
      return /qemu-system/.test(argv[0] ?? '') && argv.some((a) => a.includes(`${this.runDir(name)}/qmp.sock`));
    });
  }

  /** True when `pid` is a QEMU of this lab (its files are on the command line) or one of its supervisors. */
  owns(pid: number): boolean {
    try {
      const cmd = readFileSync(`/proc/${pid}/cmdline`, 'utf8');
      if (cmd.includes(this.root)) return true;
      if (!cmd.includes('__supervise')) return false;
      return readFileSync(`/proc/${pid}/environ`, 'utf8').split('\0').includes(`VMSNAP_DATA_DIR=${this.dataDir}`);
    } catch {
      return false;
    }
  }

  /** Live processes started for this lab: QEMUs name files under its root on their command line. */
  ourPids(): number[] {
    try {
      return execFileSync('pgrep', ['-f', this.root], { encoding: 'utf8' })
        .split('\n')
        .map(Number)
        .filter((p) => p > 0 && p !== process.pid);
    } catch {
      return [];
    }
  }
}

/** True when process `pid` exists. */
export function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/** The index of the first status line in `s`, or throws. */
export function first(s: GuestStatus[]): GuestStatus {
  if (!s.length) throw new Error('no status lines');
  return s[0]!;
}

export function last(s: GuestStatus[]): GuestStatus {
  if (!s.length) throw new Error('no status lines');
  return s[s.length - 1]!;
}

/**
 * Checks a guest's status lines after a restore (or clone) of the snapshot taken in `w`: the first
 * line lies between the window's bounds (before <= S <= after; plus `genMargin` / `diskMargin` for
 * the guest time between S and its first status), no memory or disk errors, and it runs on.
 */
export function checkResumed(what: string, w: TakeWindow, post: GuestStatus[], m: { genMargin: number; diskMargin: number }): void {
  const r0 = post[0]!;
  console.log(
    `${what}: window gen ${w.before.gen}..${w.after.gen} disk_seq ${w.before.diskSeq}..${w.after.diskSeq}; ` +
      `first after restore gen ${r0.gen} disk_seq ${r0.diskSeq}; ${post.length} lines, last gen ${last(post).gen} errors ${last(post).errors} disk_errors ${last(post).diskErrors}`,
  );
  expect(r0.gen, `${what}: first gen >= last gen before take`).toBeGreaterThanOrEqual(w.before.gen);
  expect(r0.gen, `${what}: first gen near the snapshot point`).toBeLessThan(w.after.gen + m.genMargin);
  expect(r0.diskSeq, `${what}: first disk_seq >= last before take`).toBeGreaterThanOrEqual(w.before.diskSeq);
  expect(r0.diskSeq, `${what}: first disk_seq near the snapshot point`).toBeLessThanOrEqual(w.after.diskSeq + m.diskMargin);
  for (const s of post) {
    expect(s.errors, `${what}: memory errors`).toBe(0);
    expect(s.diskErrors, `${what}: disk errors`).toBe(0);
  }
  for (let i = 1; i < post.length; i++) {
    expect(post[i]!.gen, `${what}: gen monotonic`).toBeGreaterThanOrEqual(post[i - 1]!.gen);
    expect(post[i]!.diskSeq, `${what}: disk_seq monotonic`).toBeGreaterThanOrEqual(post[i - 1]!.diskSeq);
  }
  expect(last(post).gen, `${what}: the guest runs on`).toBeGreaterThan(r0.gen);
}

function fullArgv(pid: number): string[] {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');
  } catch {
    return [];
  }
}

function cmdline(pid: number): string {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0').join(' ').slice(0, 160);
  } catch {
    return '?';
  }
}
