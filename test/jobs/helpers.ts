/** Shared pieces of the job tests: a JobContext over a VmLab's data folder and repository, job waits. */
import { spawn, type ChildProcess } from 'node:child_process';
import type { Queue } from 'bullmq';
import { cliEntry } from '../helpers/cli.js';
import { openNonS3 } from '../../src/store/backend/open-local.js';
import { Repository } from '../../src/store/repository.js';
import { openCopyTarget } from '../../src/ops/copy.js';
import { GuestLocks, RepoGate } from '../../src/jobs/locks.js';
import type { JobContext } from '../../src/jobs/handlers.js';
import type { VmLab } from '../helpers/vm.js';

export function labContext(lab: VmLab, hostId: string, over: Partial<JobContext> = {}): JobContext {
  return {
    dataDir: lab.dataDir,
    hostId,
    openRepo: () => Repository.open(openNonS3(lab.repo).backend),
    supervisorEnv: () => Promise.resolve({ ...process.env, ...lab.env }),
    openTarget: (location, src, o) => openCopyTarget(openNonS3(location).backend, src, undefined, o.init),
    guests: new GuestLocks(),
    gate: new RepoGate(),
    ...over,
  };
}

export const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Waits until the BullMQ job is completed or failed; returns it. */
export async function finished(queue: Queue, id: string, timeoutMs = 120_000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const job = await queue.getJob(id);
    const state = job ? await job.getState() : 'missing';
    if (job && (state === 'completed' || state === 'failed')) return { job, state };
    if (Date.now() > deadline) throw new Error(`job ${id} still ${state} after ${timeoutMs} ms`);
    await sleep(200);
  }
}

/** The snapshots in the lab's repository, as `ls --json` lists them. */
export async function snapshots(lab: VmLab): Promise<{ id: string; vm: string; tags: string[]; meta: Record<string, unknown> }[]> {
  return lab.json(['ls']);
}

/** A `vmsnap agent` process of a lab, its stderr collected; `kill` by its pid. */
export class AgentProcess {
  log = '';
  private exited: Promise<number | null>;

  private constructor(readonly child: ChildProcess) {
    child.stderr!.setEncoding('utf8').on('data', (d: string) => (this.log += d));
    child.stdout!.resume();
    this.exited = new Promise((r) => child.once('exit', (code) => r(code)));
  }

  static async start(lab: VmLab, args: string[], env: Record<string, string> = {}): Promise<AgentProcess> {
    const child = spawn(process.execPath, [cliEntry(), 'agent', ...args], { env: { ...process.env, ...lab.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
    const a = new AgentProcess(child);
    await a.waitLog(/agent \S+: (taking jobs|running local schedules)/, 60_000);
    return a;
  }

  async waitLog(re: RegExp, timeoutMs = 120_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (!re.test(this.log)) {
      if (this.child.exitCode !== null) throw new Error(`the agent exited (${this.child.exitCode}):\n${this.log}`);
      if (Date.now() > deadline) throw new Error(`no ${re} in the agent's log within ${timeoutMs} ms:\n${this.log}`);
      await sleep(100);
    }
  }

  /** Sends `signal` and waits for the exit code. */
  async stop(signal: NodeJS.Signals = 'SIGTERM'): Promise<number | null> {
    if (this.child.exitCode === null && this.child.signalCode === null) this.child.kill(signal);
    return this.exited;
  }
}
