/**
 * Copy and sync between repositories (src/store/copy.ts) as library calls: snapshots named by
 * reference, or every snapshot (of one VM) the target lacks. Progress is chunks of the snapshot
 * being copied, with the bytes sent. Opening the target, and creating it when asked (same chunk
 * size and codec as the source, encrypted when it has a password), is here too.
 */
import type { Backend } from '../store/backend/contract.js';
import { Repository } from '../store/repository.js';
import { copySnapshots, syncRepositories, type CopyProgress, type CopyReport } from '../store/copy.js';
import { NotFoundError, UsageError } from '../store/errors.js';
import type { Snapshot } from '../store/manifest.js';
import { noProgress, reporter, type ProgressSink } from './progress.js';

export interface CopyArgs {
  /** Snapshot references (ids, prefixes, latest, VM:latest) in the source. */
  refs: string[];
}

export interface SyncArgs {
  /** Only this VM's snapshots. */
  vm?: string;
}

export type { CopyReport };

/** Opens the target repository at `backend`; with `init`, creates it if it does not exist. */
export async function openCopyTarget(backend: Backend, src: Repository, pw: string | undefined, init: boolean): Promise<Repository> {
  const open = () =>
    Repository.open(backend, {
      password: () => {
        if (pw === undefined) throw new UsageError('the target repository is encrypted: give its password with --to-password-file or VMSNAP_TO_PASSWORD');
        return Promise.resolve(pw);
      },
    });
  try {
    return await open();
  } catch (err) {
    if (!(err instanceof NotFoundError) || !init) throw err;
    await Repository.init(backend, { chunkSize: src.chunkSize, codec: src.config.codec, ...(pw !== undefined ? { password: pw } : {}) });
    return open();
  }
}

function copyProgress(sink: ProgressSink): (p: CopyProgress) => void {
  const r = reporter(sink);
  return (p) => r.count(`copying ${p.snapshot.slice(0, 12)}`, p.chunksDone, p.chunksTotal, 'chunks', p.bytesSent);
}

export async function copyByRefs(src: Repository, dst: Repository, args: CopyArgs, sink: ProgressSink = noProgress): Promise<CopyReport> {
  const snaps: Snapshot[] = [];
  for (const ref of args.refs) snaps.push(await src.resolveSnapshot(ref));
  const unique = [...new Map(snaps.map((s) => [s.id, s])).values()];
  return copySnapshots(src, dst, unique, { onProgress: copyProgress(sink) });
}

export async function syncRepos(src: Repository, dst: Repository, args: SyncArgs = {}, sink: ProgressSink = noProgress): Promise<CopyReport> {
  return syncRepositories(src, dst, { ...(args.vm !== undefined ? { vm: args.vm } : {}), onProgress: copyProgress(sink) });
}
