/** Shared pieces of the job tests: a JobContext over a VmLab's data folder and repository, job waits. */
import type { Queue } from 'bullmq';
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
