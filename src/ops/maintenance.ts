/**
 * Repository upkeep as library calls: forget by a retention policy (optionally followed by a prune),
 * prune, check and the size figures of `vmsnap stats`. Each takes the lock its docs/locks.md row
 * names (forget a shared write session, prune an exclusive one, check a shared one) and reports
 * through a ProgressSink; the CLI and the job handlers call these, never the store pieces directly.
 */
import type { Repository } from '../store/repository.js';
import { check, markLiveChunks, prune, type CheckReport, type PruneStats } from '../store/maintenance.js';
import { applyRetention, keepHeld, type RetentionDecision, type RetentionPolicy } from '../store/retention.js';
import { forgetUnpinned, listPins, pinsBySnapshot, type Pin } from '../store/pins.js';
import type { SnapshotSummary } from '../store/manifest.js';
import { UsageError } from '../store/errors.js';
import { noProgress, reporter, type ProgressSink } from './progress.js';

export interface ForgetArgs {
  policy: RetentionPolicy;
  /** Only this VM's snapshots. */
  vm?: string;
  /** Only snapshots with this tag. */
  tag?: string;
  groupBy?: 'vm' | 'vm,tags';
  dryRun?: boolean;
  /** Prune afterwards (not with dryRun). */
  prune?: boolean;
}

export interface ForgetResult {
  decisions: RetentionDecision<SnapshotSummary, Pin>[];
  /** Manifests that could not be read: kept, never decided (`check` reports them). */
  damaged: { id: string; error: string }[];
  pruned: PruneStats | null;
}

/** Collects manifests `listSnapshotSummaries` could not read (for ls and forget). */
export function damagedCollector() {
  const list: { id: string; error: string }[] = [];
  return { list, add: (id: string, err: Error) => void list.push({ id, error: err.message }) };
}

export async function forgetSnapshots(repo: Repository, args: ForgetArgs, sink: ProgressSink = noProgress): Promise<ForgetResult> {
  const groupBy = args.groupBy ?? 'vm';
  if (groupBy !== 'vm' && groupBy !== 'vm,tags') throw new UsageError('--group-by must be "vm" or "vm,tags"');
  const r = reporter(sink);
  r.phase('forgetting');
  const damaged = damagedCollector();
  const decisions = await repo.write('forget', async () => {
    // A damaged manifest's VM, time and tags are unknown: no policy can decide it, so it is
    // kept (never deleted silently) and named.
    const snaps = (await repo.listSnapshotSummaries(damaged.add)).filter((s) => (!args.vm || s.vm === args.vm) && (!args.tag || s.tags.includes(args.tag)));
    for (const d of damaged.list) r.warn(`skipped snapshot ${d.id.slice(0, 12)}: its manifest is damaged (${d.error}); forget keeps it, \`vmsnap check\` reports it`);
    const decided = applyRetention(snaps, args.policy, groupBy);
    // A snapshot a volume still reads (a pin) is kept whatever the policy says, and says why.
    const doomed = decided.flatMap((d) => d.remove.map((s) => s.id));
    const pinned = args.dryRun ? pinsBySnapshot((await listPins(repo)).pins.filter((p) => doomed.includes(p.snapshot))) : (await forgetUnpinned(repo, doomed)).pinned;
    return decided.map((d) => keepHeld(d, pinned));
  });
  const pruned = args.prune && !args.dryRun ? await pruneRepository(repo, {}, sink) : null;
  return { decisions, damaged: damaged.list, pruned };
}

export interface PruneArgs {
  dryRun?: boolean;
  /** Repack packs with less live data than this fraction (0-1, default 0.5). */
  repackBelow?: number;
}

export async function pruneRepository(repo: Repository, args: PruneArgs = {}, sink: ProgressSink = noProgress): Promise<PruneStats> {
  const frac = args.repackBelow ?? 0.5;
  if (!(frac >= 0 && frac <= 1)) throw new UsageError('--repack-below must be between 0 and 1');
  const r = reporter(sink);
  r.phase('pruning');
  const st = await prune(repo, { dryRun: !!args.dryRun, repackBelow: frac, onProgress: (m) => r.info(m) });
  if (st.leftoversError) r.warn(`leftovers of interrupted writes were not removed: ${st.leftoversError}`);
  return st;
}

export interface CheckArgs {
  /** Download and verify every chunk. */
  readData?: boolean;
}

export async function checkRepository(repo: Repository, args: CheckArgs = {}, sink: ProgressSink = noProgress): Promise<CheckReport> {
  const r = reporter(sink);
  r.phase('checking');
  return check(repo, { readData: !!args.readData, onProgress: (done, total) => r.count('checking', done, total, 'items') });
}

export interface RepositoryStats {
  snapshots: number;
  /** Sum of the snapshots' stream sizes: what restoring every one would write. */
  logicalBytes: number;
  /** Bytes of the packs: what the repository occupies. */
  storedBytes: number;
  packs: number;
  chunks: number;
  liveChunks: number;
  indexMemoryBytes: number;
}

export async function repositoryStats(repo: Repository): Promise<RepositoryStats> {
  let logical = 0;
  const used = await markLiveChunks(repo.index, repo.eachSnapshot(), (s) => (logical += s.streams.reduce((b, st) => b + st.size, 0)));
  let packBytes = 0;
  let packs = 0;
  for await (const o of repo.backend.list('packs')) {
    packBytes += o.size;
    packs++;
  }
  return { snapshots: used.snapshots, logicalBytes: logical, storedBytes: packBytes, packs, chunks: repo.index.size, liveChunks: used.count + used.missing.size, indexMemoryBytes: repo.index.memoryBytes };
}
