/**
 * VM operations as library calls: take, restore and clone. Take and restore are the runtime's own
 * (src/vm/runtime.ts): through the VM's supervisor while it runs, `takeStopped` / a supervisor
 * started on the snapshot otherwise; this layer only chooses the path and reports it, so the CLI
 * and the job handlers take the same path.
 *
 * The caller supplies a VmOpsContext: where the VMs live, how the repository is opened (with its
 * password), and the environment a supervisor this call starts gets (the repository and password
 * it opens on its own).
 */
import { promises as fsp } from 'node:fs';
import type { Repository } from '../store/repository.js';
import { NotFoundError, UsageError } from '../store/errors.js';
import { checkTags } from '../store/manifest.js';
import { repositoryPinner } from '../store/pins.js';
import { cloneVolume } from '../cow/snapshot.js';
import { readBasePin, releaseBasePin, type BasePin } from '../cow/base-pin.js';
import { checkVmPathsFit, diskDir, loadDefinition, parseDefinition, saveState, vmPaths } from '../vm/config.js';
import { cloneDefinition, writeNewVm } from '../vm/create.js';
import { loadNvram } from '../vm/nvram.js';
import { callSupervisor, isRunning, spawnSupervisor } from '../vm/supervisor.js';
import { resolveForVm, resolveUnscoped } from '../vm/selectors.js';
import { checkRestorable, takeStopped, VmOperationError, type TakeOptions, type TakeResult } from '../vm/runtime.js';
import { loadBytes } from '../vm/ram-store.js';
import { noProgress, reporter, type ProgressSink } from './progress.js';

export interface VmOpsContext {
  dataDir: string;
  openRepo: () => Promise<Repository>;
  /** The environment of a supervisor this call starts (VMSNAP_REPO, and the password if any). */
  supervisorEnv: () => Promise<NodeJS.ProcessEnv>;
}

const short = (id: string) => id.slice(0, 12);

/** Runs `fn` with the context's repository, closed afterwards whatever happened. */
export async function withRepo<T>(ctx: Pick<VmOpsContext, 'openRepo'>, fn: (repo: Repository) => Promise<T>): Promise<T> {
  const repo = await ctx.openRepo();
  try {
    return await fn(repo);
  } finally {
    await repo.close();
  }
}

/** Snapshot a VM: RAM, devices and disks through its supervisor while it runs, disks only otherwise. */
export async function takeVm(ctx: VmOpsContext, name: string, opts: TakeOptions = {}, sink: ProgressSink = noProgress): Promise<TakeResult> {
  checkTags(opts.tags ?? []);
  await loadDefinition(ctx.dataDir, name);
  const paths = vmPaths(ctx.dataDir, name);
  const r = reporter(sink);
  const o = { ...(opts.message !== undefined ? { message: opts.message } : {}), tags: opts.tags ?? [], diskOnly: !!opts.diskOnly, quiesce: !!opts.quiesce };
  if (await isRunning(paths)) {
    r.phase('taking (live)');
    return callSupervisor(paths, { op: 'take', options: o });
  }
  // A stopped guest's file systems are as its shutdown left them: nothing to freeze.
  if (opts.quiesce) r.info(`vmsnap: note: VM ${name} is not running: --quiesce has nothing to freeze`);
  r.phase('taking (stopped: disks only)');
  return withRepo(ctx, (repo) => takeStopped(ctx.dataDir, name, repo, o));
}

/**
 * Resolves a restore target of a VM that is not running (selectors.ts: `latest` is its own; another
 * VM's snapshot needs its id and fromOtherVm) and checks its shape, before anything starts.
 * Returns the full snapshot id.
 */
export async function checkedRestoreTarget(ctx: VmOpsContext, name: string, ref: string, fromOtherVm: boolean): Promise<string> {
  return withRepo(ctx, async (repo) => {
    const snap = await resolveForVm(repo, ref, name, { fromOtherVm });
    if (!snap.streams.some((s) => s.name === 'vm-config')) throw new NotFoundError(`snapshot ${short(snap.id)} is not a VM snapshot`);
    await checkRestorable(repo, snap, await loadDefinition(ctx.dataDir, name)).catch((err: Error) => {
      throw new VmOperationError('restore', 'checking the snapshot', err.message, { cause: err });
    });
    return snap.id;
  });
}

export interface RestoreArgs {
  snapshot: string;
  /** The snapshot may be another VM's (by id): its RAM, devices and disks replace this VM's. */
  fromOtherVm?: boolean;
}

export interface RestoreOutcome {
  snapshot: string;
  runState: string;
  loadMs?: number;
  /** The guest agent's clock set after a live restore (a warning when no agent answered). */
  guest?: { warning?: string };
}

/** Puts a VM back to a snapshot: in place while it runs, or starts it on the snapshot. */
export async function restoreVm(ctx: VmOpsContext, name: string, args: RestoreArgs, sink: ProgressSink = noProgress): Promise<RestoreOutcome> {
  await loadDefinition(ctx.dataDir, name);
  const paths = vmPaths(ctx.dataDir, name);
  const fromOtherVm = !!args.fromOtherVm;
  const r = reporter(sink);
  if (await isRunning(paths)) {
    r.phase('restoring (live)');
    const res = await callSupervisor(paths, { op: 'restore', snapshot: args.snapshot, fromOtherVm });
    if (res.guest?.warning) r.warn(res.guest.warning);
    return res;
  }
  // Resolve and check first, so a bad reference fails before anything starts.
  r.phase('checking the snapshot');
  const ref = await checkedRestoreTarget(ctx, name, args.snapshot, fromOtherVm);
  r.phase('starting on the snapshot');
  await spawnSupervisor(ctx.dataDir, name, { restore: ref, restoreFromOtherVm: fromOtherVm, env: await ctx.supervisorEnv() });
  const st = await callSupervisor(paths, { op: 'status' });
  return { snapshot: ref, runState: st.state };
}

/** Pin options for a VM disk cloned from a snapshot (held as "<vm>/<disk>"). */
export function diskPin(repo: Repository, dataDir: string, snapshot: string, vm: string, disk: string) {
  return { pinner: repositoryPinner(repo, dataDir), snapshot, holder: `${vm}/${disk}` };
}

/**
 * Releases the pins of a VM's disks, found by the disk folders themselves (so a VM whose vm.json is
 * damaged can still be removed without leaving its snapshots pinned). With `unreachable`, a pin the
 * repository cannot be reached to remove (it cannot be opened, or the delete fails) is left there
 * and reported instead of failing: it only keeps its snapshot until `vmsnap pins rm`.
 */
export async function unpinDisks(dataDir: string, vmName: string, open: () => Promise<Repository>, unreachable?: (disk: string, pin: BasePin, err: Error) => void): Promise<void> {
  const paths = vmPaths(dataDir, vmName);
  const disks = await fsp.readdir(paths.disksDir).catch(() => [] as string[]);
  for (const disk of disks) {
    const dir = diskDir(paths, disk);
    const pin = await readBasePin(dir).catch(() => null);
    if (!pin) continue;
    try {
      await releaseBasePin(dir, repositoryPinner(await open(), dataDir));
    } catch (err) {
      if (!unreachable) throw err;
      unreachable(disk, pin, err as Error);
    }
  }
}

export interface CloneArgs {
  /** A VM snapshot (id, prefix, VM:latest). */
  snapshot: string;
  newVm: string;
  /** Start the clone on the snapshot (default true). */
  start?: boolean;
  /** Hydrate the clone's disks in the background at this many bytes/s (0 = unlimited). */
  hydrate?: number;
  /** The clone's own extra QEMU arguments instead of the source VM's. */
  qemuArgs?: string[];
  /** Copy the source VM's extra QEMU arguments as they are. */
  keepQemuArgs?: boolean;
}

export interface CloneResult {
  vm: string;
  snapshot: string;
  started: boolean;
}

/**
 * A new VM from a snapshot: disks cloned copy-on-write (pinned), RAM restored when started. A clone
 * that fails leaves no VM folder and no pin behind.
 */
export async function cloneVm(ctx: VmOpsContext, args: CloneArgs, sink: ProgressSink = noProgress): Promise<CloneResult> {
  const start = args.start !== false;
  const newName = args.newVm;
  const qemuArgs = args.qemuArgs ?? [];
  const paths = vmPaths(ctx.dataDir, newName);
  if (await fsp.stat(paths.config).catch(() => null)) throw new UsageError(`VM ${newName} already exists`);
  checkVmPathsFit(ctx.dataDir, newName);
  const r = reporter(sink);
  r.phase('cloning disks');
  const snapId = await withRepo(ctx, async (repo) => {
    const snap = await resolveUnscoped(repo, args.snapshot);
    const cfg = snap.streams.find((s) => s.name === 'vm-config');
    if (!cfg) throw new UsageError(`snapshot ${short(snap.id)} is not a VM snapshot (no vm-config stream)`);
    // A clone gets its own MAC, and not the source's host port forwards (the ports are that VM's).
    const { def, droppedForwards } = cloneDefinition(parseDefinition(await loadBytes(repo, cfg), `snapshot ${short(snap.id)}`), newName);
    for (const f of droppedForwards) r.info(`vmsnap: note: port forward ${f.proto}:${f.hostPort}:${f.guestPort} of VM ${snap.vm} is not copied into ${newName} (the host port is that VM's)`);
    // Extra QEMU arguments may name host resources (a socket, a file, a port) that belong to
    // the source VM: copied silently, the clone would take them over.
    if (qemuArgs.length) def.qemuArgs = qemuArgs;
    else if (def.qemuArgs.length && !args.keepQemuArgs) {
      throw new UsageError(
        `VM ${snap.vm} was defined with extra QEMU arguments (${def.qemuArgs.join(' ')}), which may name sockets, files or ports it uses; ` +
          `give the clone its own with --qemu-arg (repeatable), or copy them as they are with --keep-qemu-args`,
      );
    }
    // Refuse before creating anything: a clone that cannot be restored must not leave a VM behind.
    if (start) {
      await checkRestorable(repo, snap, def).catch((err: Error) => {
        throw new VmOperationError('restore', 'checking the snapshot', err.message, { cause: err });
      });
    }
    await fsp.mkdir(paths.disksDir, { recursive: true, mode: 0o700 });
    try {
      let n = 0;
      for (const d of def.disks) {
        const s = snap.streams.find((x) => x.name === d.name && x.kind === 'disk');
        if (!s) throw new UsageError(`snapshot ${short(snap.id)} has no disk ${d.name}`);
        await (await cloneVolume(diskDir(paths, d.name), s, { store: repo, pin: diskPin(repo, ctx.dataDir, snap.id, newName, d.name) })).close();
        r.count('cloning disks', ++n, def.disks.length);
      }
      await writeNewVm(ctx.dataDir, def, (await loadNvram(repo, snap)) ?? undefined);
      await saveState(ctx.dataDir, newName, { lastSnapshot: null });
    } catch (err) {
      await unpinDisks(ctx.dataDir, def.name, () => Promise.resolve(repo)).catch(() => undefined); // a stale pin is safe: `pins rm`
      await fsp.rm(paths.dir, { recursive: true, force: true });
      throw err;
    }
    return snap.id;
  });
  // A clone is a new VM made from another's snapshot by definition: naming it was the confirmation.
  if (start) {
    r.phase('starting');
    await spawnSupervisor(ctx.dataDir, newName, { restore: snapId, restoreFromOtherVm: true, env: await ctx.supervisorEnv(), ...(args.hydrate !== undefined ? { hydrate: args.hydrate } : {}) });
  }
  return { vm: newName, snapshot: snapId, started: start };
}
