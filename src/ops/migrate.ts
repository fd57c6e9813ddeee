/**
 * Migration as a library call, shared by `vmsnap migrate` (cli/migrate-commands.ts) and the
 * `migrate` job kind (src/jobs/handlers.ts):
 *
 *  - live (default): the VM's supervisor moves the running guest (src/migration/outgoing.ts);
 *    this layer asks it to, relays its progress and, once the guest runs on the destination,
 *    removes the VM here (or keeps it stopped with `keepSource`);
 *  - cold (`cold`): the VM is stopped (a running one is stopped first, as `vm stop` stops it), its
 *    disks shipped (src/migration/cold.ts) and it is started on the destination if it ran here.
 *    Any failure before the destination took it leaves the VM here as it was: started again if
 *    it ran.
 *
 * Every successful migration leaves a record here (`<data>/migrations/<vm>.json`: where to, when,
 * by which job key), so a job delivered again after its guest moved finds that record and reports
 * the move instead of failing on a VM that is no longer here (at-least-once delivery).
 */
import { promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { UsageError } from '../store/errors.js';
import type { Repository } from '../store/repository.js';
import { BadInputError } from '../util/errors.js';
import { atomicWriteFile } from '../util/fs.js';
import { processAlive } from '../util/process.js';
import { Volume } from '../cow/volume.js';
import { detectQemu } from '../hypervisor/qemu.js';
import { addPeer, isFingerprint, listPeers, loadOrCreateIdentity, type Peer } from '../migration/identity.js';
import { parseHostPort } from '../migration/receiver.js';
import { migrateColdOut, preflightCold } from '../migration/cold.js';
import type { DiskShape, MigrateResult, MigrateTarget, MigrationEvent } from '../migration/outgoing.js';
import { diskDir, loadDefinition, vmPaths, type VmPaths } from '../vm/config.js';
import { callSupervisor, isRunning, spawnSupervisor } from '../vm/supervisor.js';
import { vmProcesses, waitExited } from '../vm/processes.js';
import { takeStopped } from '../vm/runtime.js';
import { noProgress, reporter, type ProgressSink } from './progress.js';
import { unpinDisks, withRepo, type VmOpsContext } from './vm.js';

export type Compression = 'auto' | 'zstd' | 'lz4' | 'none';

export interface MigrateArgs {
  vm: string;
  /** HOST[:PORT] or the name of a paired host (`vmsnap peer add`). */
  destination: string;
  /** A key fingerprint to trust for this destination (pinned once the migration worked). */
  pair?: string;
  /** Keep the VM here, stopped, instead of removing it. */
  keepSource?: boolean;
  /** Live: the longest guest pause allowed at switchover, ms (10..60000; default 300). */
  maxDowntimeMs?: number;
  /** Live: give up (the guest keeps running here) when not done by then, ms (1 s..24 h; default 600 s). */
  timeoutMs?: number;
  compress?: Compression;
  /** Keep the state at departure as a snapshot here (default true): a return trip sends only what changed. */
  departure?: boolean;
  /** Stop, ship the disks, start there (for guests that cannot move live). */
  cold?: boolean;
  /**
   * Live: return only once the departure snapshot is stored and the VM removed here (a job's
   * result then names the snapshot). Default: return as soon as the guest runs on the
   * destination; the VM's supervisor here stores the snapshot and removes the VM after that.
   */
  waitForDeparture?: boolean;
}

export interface MigrateOutcomeHere extends MigrateResult {
  vm: string;
  mode: 'live' | 'cold';
  destination: string;
  kept: boolean;
  /** The snapshot of the state at departure, kept here (null: none, or not stored yet). */
  departure: string | null;
  departureError?: string;
  /** The departure snapshot is being stored here after the command returned (see `waitForDeparture`). */
  departurePending?: boolean;
  /** What the VM is on the destination: running, or shutoff (a stopped VM cold-migrated). */
  destinationState: string;
}

/** What a migration leaves here once it worked. */
export interface MigrationRecord {
  vm: string;
  destination: string;
  mode: 'live' | 'cold';
  at: string;
  /** The idempotency key of the job that moved it (absent: the CLI). */
  key?: string;
}

/** A migrate request that cannot be carried out here (not a protocol failure). */
export class MigrateRequestError extends BadInputError {
  override readonly name = 'MigrateRequestError';
  readonly retryable = false;
}

export const MIGRATE_LIMITS = { maxDowntimeMs: [10, 60_000], timeoutMs: [1000, 86_400_000] } as const;

/** Checks the numeric options (the CLI and the job payload parser both call this). Returns the message of the first bad one, or null. */
export function badMigrateOption(a: Pick<MigrateArgs, 'maxDowntimeMs' | 'timeoutMs' | 'compress'>): string | null {
  for (const k of ['maxDowntimeMs', 'timeoutMs'] as const) {
    const v = a[k];
    const [lo, hi] = MIGRATE_LIMITS[k];
    if (v !== undefined && !(Number.isFinite(v) && v >= lo && v <= hi)) return `${k} ${v}: give a value between ${lo} and ${hi} ms`;
  }
  if (a.compress !== undefined && !['auto', 'zstd', 'lz4', 'none'].includes(a.compress)) return `compress ${JSON.stringify(a.compress)}: give auto, zstd, lz4 or none`;
  return null;
}

function recordPath(dataDir: string, vm: string): string {
  return path.join(dataDir, 'migrations', `${vm}.json`);
}

/** The last migration of `vm` away from this host, if any. */
export async function readMigrationRecord(dataDir: string, vm: string): Promise<MigrationRecord | null> {
  try {
    return JSON.parse(await fsp.readFile(recordPath(dataDir, vm), 'utf8')) as MigrationRecord;
  } catch {
    return null;
  }
}

/**
 * A peer name, or HOST[:PORT] whose key is pinned (`peer add`), or given now (`pair`: used for
 * this connection, pinned only once a migration with it has worked — a mistyped key must not stay).
 */
export async function resolveTarget(dataDir: string, dest: string, pair: string | undefined): Promise<{ target: MigrateTarget; pinOnSuccess?: Omit<Peer, 'added'> }> {
  const peers = await listPeers(dataDir);
  const byName = peers.find((p) => p.name === dest);
  if (byName) {
    if (!byName.address) throw new UsageError(`paired host ${dest} has no address: give HOST[:PORT], or \`vmsnap peer add ${dest} --fingerprint … --address HOST:PORT\``);
    const a = parseHostPort(byName.address, byName.address, `address of ${dest}`);
    if (pair && pair !== byName.fingerprint) throw new UsageError(`--pair ${pair} differs from the key pinned for ${dest} (${byName.fingerprint}); \`vmsnap peer rm ${dest}\` first if its key really changed`);
    return { target: { ...a, fingerprint: byName.fingerprint } };
  }
  const a = parseHostPort(dest, '', 'destination');
  if (!a.host) throw new UsageError(`destination ${JSON.stringify(dest)} names no host`);
  const addr = `${a.host}:${a.port}`;
  const known: Peer | undefined = peers.find((p) => p.address === addr || p.address === a.host);
  if (known) {
    if (pair && pair !== known.fingerprint) throw new UsageError(`--pair ${pair} differs from the key pinned for ${addr} (peer ${known.name}: ${known.fingerprint})`);
    return { target: { ...a, fingerprint: known.fingerprint } };
  }
  if (!pair) {
    throw new UsageError(
      `${addr} is not a paired host: pin its key first — \`vmsnap peer add NAME --fingerprint FP --address ${addr}\` with the fingerprint \`vmsnap receive\` prints there, or \`--pair FP\``,
    );
  }
  if (!isFingerprint(pair)) throw new UsageError(`--pair ${JSON.stringify(pair)} is not a key fingerprint (SHA256:… as \`vmsnap peer id\` prints it)`);
  // Already paired under a name (the address was not recorded, or changed): that pin is the trust.
  if (peers.some((p) => p.fingerprint === pair)) return { target: { ...a, fingerprint: pair } };
  const name = a.host.replace(/[^A-Za-z0-9._-]/g, '-');
  return { target: { ...a, fingerprint: pair }, pinOnSuccess: { name: peers.some((p) => p.name === name) ? `${name}-${a.port}` : name, fingerprint: pair, address: addr } };
}

export interface MigrateHooks {
  /** The migration's own progress (phase, rounds, rates), beside the ProgressSink's phases. */
  onEvent?: (e: MigrationEvent) => void;
  /** Cancels the migration (the guest stays, or runs again, here). */
  signal?: AbortSignal;
  /** Recorded with the migration (a job's idempotency key). */
  key?: string;
}

/** Moves a VM to another host, live or cold; see the module header. */
export async function migrateVm(ctx: VmOpsContext, args: MigrateArgs, sink: ProgressSink = noProgress, hooks: MigrateHooks = {}): Promise<MigrateOutcomeHere> {
  const bad = badMigrateOption(args);
  if (bad) throw new UsageError(`migrate: ${bad}`);
  const def = await loadDefinition(ctx.dataDir, args.vm);
  const paths = vmPaths(ctx.dataDir, args.vm);
  const { target, pinOnSuccess } = await resolveTarget(ctx.dataDir, args.destination, args.pair);
  const r = reporter(sink);
  const destination = `${target.host}:${target.port}`;
  const onEvent = (e: MigrationEvent): void => {
    hooks.onEvent?.(e);
    sink.emit({ type: 'progress', phase: e.phase, done: e.bytesSent, total: null, unit: 'bytes' });
  };
  let res: Omit<MigrateOutcomeHere, 'vm' | 'mode' | 'destination' | 'kept'>;
  if (!args.cold) {
    if (!(await isRunning(paths))) throw new MigrateRequestError(`VM ${args.vm} is not running: live migration moves a running guest (start it, or use --cold)`);
    r.phase('live migration');
    const departureInBackground = !args.waitForDeparture;
    const options = {
      maxDowntimeMs: args.maxDowntimeMs ?? 300,
      timeoutMs: args.timeoutMs ?? 600_000,
      compress: args.compress ?? 'auto',
      departure: args.departure !== false,
      departureInBackground,
      keepSource: !!args.keepSource,
    };
    const cancel = () => void callSupervisor(paths, { op: 'migrate-cancel' }).catch(() => undefined);
    hooks.signal?.addEventListener('abort', cancel, { once: true });
    const procs = await vmProcesses(paths, args.vm);
    try {
      const out = await callSupervisor(paths, { op: 'migrate', target, options }, options.timeoutMs + 300_000, (e) => onEvent(e as MigrationEvent));
      res = { ...out, destinationState: 'running' };
    } finally {
      hooks.signal?.removeEventListener('abort', cancel);
    }
    // The supervisor stores the departure snapshot, stops its QEMU (postmigrate), removes the VM
    // here (unless kept) and exits: waited for only when asked.
    if (res.departurePending) r.info(`the guest runs on ${destination}; its state at departure is being stored here, then the VM is ${args.keepSource ? 'kept here, stopped' : 'removed here'}`);
    else await waitExited([procs.supervisor, ...procs.qemus].filter((p): p is number => typeof p === 'number'), 600_000);
  } else {
    res = await migrateCold(ctx, args, target, paths, def.firmware === 'uefi', r, onEvent, hooks.signal);
  }
  await recordMigration(ctx.dataDir, { vm: args.vm, destination, mode: args.cold ? 'cold' : 'live', at: new Date().toISOString(), ...(hooks.key !== undefined ? { key: hooks.key } : {}) });
  // The key proved itself in the handshake of a migration that worked: now it is pinned.
  if (pinOnSuccess) await addPeer(ctx.dataDir, pinOnSuccess).catch((err: Error) => r.warn(`could not pin ${pinOnSuccess.fingerprint}: ${err.message}`));
  if (res.departureError) r.warn(`the departure snapshot failed: ${res.departureError}`);
  if (args.cold && !args.keepSource) {
    r.phase('removing the VM here');
    await removeMovedVm(ctx, args.vm, (m) => r.warn(m));
  }
  return { vm: args.vm, mode: args.cold ? 'cold' : 'live', destination, kept: !!args.keepSource, ...res };
}

/** Asks the supervisor of `vm` to cancel its live migration; false when none is in progress. */
export async function cancelMigration(ctx: Pick<VmOpsContext, 'dataDir'>, vm: string): Promise<boolean> {
  await loadDefinition(ctx.dataDir, vm);
  const paths = vmPaths(ctx.dataDir, vm);
  // A cold migration has no supervisor to ask: the process that runs it is the one to interrupt.
  const departing = Number((await fsp.readFile(paths.departingMarker, 'utf8').catch(() => '')).trim());
  if (departing > 0 && processAlive(departing)) {
    throw new MigrateRequestError(`VM ${vm} is being moved by a cold migration (pid ${departing}): interrupt the \`vmsnap migrate\` that runs it (Ctrl-C)`);
  }
  if (!(await isRunning(paths))) return false;
  return (await callSupervisor(paths, { op: 'migrate-cancel' })).cancelled;
}

async function qemuVersion(): Promise<string> {
  const v = (await detectQemu()).version;
  return `${v.major}.${v.minor}.${v.micro}`;
}

async function recordMigration(dataDir: string, rec: MigrationRecord): Promise<void> {
  await fsp.mkdir(path.join(dataDir, 'migrations'), { recursive: true, mode: 0o700 });
  await atomicWriteFile(recordPath(dataDir, rec.vm), JSON.stringify(rec) + '\n');
}

/**
 * The cold path: stop the VM if it runs, hold it (a `departing` marker `vm start` respects), ship
 * its disks, and take it back (start it again if it ran) on any failure before the destination
 * took it. Why a running VM is stopped rather than shut down: vmsnap has no guest-cooperative
 * shutdown yet, and `--cold` is the path for guests that cannot be moved otherwise; the disks are
 * then as `vm stop` leaves them (crash-consistent, as after a power cut). A guest shut down from
 * inside first moves with clean file systems.
 */
async function migrateCold(
  ctx: VmOpsContext,
  args: MigrateArgs,
  target: MigrateTarget,
  paths: VmPaths,
  uefi: boolean,
  r: ReturnType<typeof reporter>,
  onEvent: (e: MigrationEvent) => void,
  signal: AbortSignal | undefined,
): Promise<Omit<MigrateOutcomeHere, 'vm' | 'mode' | 'destination' | 'kept'>> {
  const wasRunning = await isRunning(paths);
  const marker = paths.departingMarker;
  await claimDeparting(marker, args.vm);
  let moved = false;
  let stopped = false;
  try {
    if (wasRunning) {
      // Asked first: a refusal (or a wrong key) must not cost the guest a reboot.
      r.phase('pre-flight');
      const def = await loadDefinition(ctx.dataDir, args.vm);
      const disks = new Map<string, DiskShape>();
      for (const d of def.disks) disks.set(d.name, await Volume.inspect(diskDir(paths, d.name)));
      await preflightCold(
        { definition: def, disks, qemuVersion: await qemuVersion(), ...(uefi ? { nvramPath: paths.nvram } : {}), start: true },
        target,
        { identity: await loadOrCreateIdentity(ctx.dataDir) },
      );
      r.phase('stopping the VM');
      stopped = true;
      await stopAndWait(paths, args.vm);
    }
    const out = await withRepo(ctx, async (repo) => {
      const volumes = await openVolumes(ctx.dataDir, paths, args.vm, repo);
      try {
        r.phase('cold migration');
        return await migrateColdOut(
          {
            definition: await loadDefinition(ctx.dataDir, args.vm),
            volumes,
            qemuVersion: await qemuVersion(),
            ...(uefi ? { nvramPath: paths.nvram } : {}),
            start: wasRunning,
          },
          target,
          { identity: await loadOrCreateIdentity(ctx.dataDir), ...(args.compress ? { compress: args.compress } : {}), ...(signal ? { signal } : {}), onEvent },
        );
      } finally {
        for (const v of volumes.values()) await v.close().catch(() => undefined);
      }
    });
    moved = true;
    // The disks as they left: a disk-only snapshot here, the base of a return trip.
    let departure: string | null = null;
    let departureError: string | undefined;
    if (args.departure !== false) {
      r.phase('keeping the state at departure');
      try {
        departure = (await withRepo(ctx, (repo) => takeStopped(ctx.dataDir, args.vm, repo, { tags: ['departed'], message: `disks when it moved to ${target.host}:${target.port} (cold)`, diskOnly: true }))).snapshot;
      } catch (err) {
        departureError = (err as Error).message;
      }
    }
    return { ...out, departure, ...(departureError !== undefined ? { departureError } : {}) };
  } finally {
    await fsp.rm(marker, { force: true });
    if (!moved && stopped) {
      r.phase('starting the VM here again');
      await spawnSupervisor(ctx.dataDir, args.vm, { env: await ctx.supervisorEnv() }).catch((err: Error) => r.warn(`VM ${args.vm} could not be started here again: ${err.message}`));
    }
  }
}

/** Makes this process the VM's only mover: `vm start` and another migrate refuse while it lives. */
async function claimDeparting(marker: string, vm: string): Promise<void> {
  for (let attempt = 0; ; attempt++) {
    try {
      await fsp.writeFile(marker, `${process.pid}\n`, { flag: 'wx', mode: 0o600 });
      return;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST' || attempt > 0) throw err;
      const pid = Number((await fsp.readFile(marker, 'utf8').catch(() => '')).trim());
      if (pid > 0 && processAlive(pid)) throw new MigrateRequestError(`VM ${vm} is already being migrated (pid ${pid})`);
      await fsp.rm(marker, { force: true });
    }
  }
}

/** `vm stop`: QEMU quits, the supervisor closes the volumes and exits. */
async function stopAndWait(paths: VmPaths, vm: string): Promise<void> {
  const procs = await vmProcesses(paths, vm);
  await callSupervisor(paths, { op: 'stop' });
  const left = await waitExited([procs.supervisor, ...procs.qemus].filter((p): p is number => typeof p === 'number'), 60_000);
  if (left.length) throw new MigrateRequestError(`VM ${vm} did not stop within 60 s (process(es) ${left.join(', ')})`);
}

async function openVolumes(dataDir: string, paths: VmPaths, vm: string, repo: Repository): Promise<Map<string, Volume>> {
  const def = await loadDefinition(dataDir, vm);
  const volumes = new Map<string, Volume>();
  try {
    for (const d of def.disks) volumes.set(d.name, await Volume.open(diskDir(paths, d.name), { store: repo }));
  } catch (err) {
    for (const v of volumes.values()) await v.close().catch(() => undefined);
    throw err;
  }
  return volumes;
}

/** Removes the moved VM here: its disks' pins (an unreachable repository only warns), then its folder. */
export async function removeMovedVm(ctx: Pick<VmOpsContext, 'dataDir' | 'openRepo'>, vm: string, warn: (m: string) => void): Promise<void> {
  let repo: Promise<Repository> | null = null;
  try {
    await unpinDisks(ctx.dataDir, vm, () => (repo ??= ctx.openRepo()), (disk, pin, err) =>
      warn(`disk ${disk} of VM ${vm} pins snapshot ${pin.snapshot.slice(0, 12)} and the repository could not be reached to release it (${err.message}); \`vmsnap pins rm ${pin.pin}\` removes it`),
    );
  } finally {
    const opened = repo ? await (repo as Promise<Repository>).catch(() => null) : null;
    await opened?.close();
  }
  await fsp.rm(vmPaths(ctx.dataDir, vm).dir, { recursive: true, force: true });
}
