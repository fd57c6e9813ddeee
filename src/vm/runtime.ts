/**
 * A running VM: its copy-on-write volumes served over NBD, its QEMU, and the operations that need
 * all of them at once (take, restore). One VmRuntime lives in each VM's supervisor process
 * (supervisor.ts), which owns the volumes for as long as the guest runs.
 *
 * Taking a live snapshot — how RAM, devices and disks are made to agree on one instant:
 *
 *       flush volumes       with the guest running: QEMU's stop-time flush then has little to do
 *   t0  QMP migrate         (capability background-snapshot) with the guest running: QEMU
 *                           populates and registers guest RAM for write-protection (its setup,
 *                           seconds on a fresh 1 GiB QEMU) while the guest runs on
 *   t1  QEMU: STOP          it pauses the vCPUs, drains in-flight disk requests (each answered by
 *                           our NBD server) and flushes every disk, saves device state, arms
 *                           userfaultfd write-protection
 *   t2  QEMU: RESUME        the guest runs again; every later guest write to RAM is first copied
 *                           into the stream by QEMU
 *   t2' disks cut           the volumes are frozen when RESUME is seen, before any later disk
 *                           request executes (stop-point-cut.ts says why that is exact)
 *   RAM streams in while the guest runs; then the frozen disk generations are written out.
 * RAM, device state and disks all describe t1..t2, when the guest executed nothing. The guest pause
 * is t2 - t1 by QEMU's own event timestamps, reported by `take` with the setup and the background
 * save (take-timeline.ts). A paused guest, a disk-only take (no migration) or a QMP socket that
 * cannot be read synchronously fall back to vmsnap pausing the guest first (`stop`, freeze,
 * `migrate`, `cont` at the first RAM record), which puts QEMU's setup inside the pause.
 *
 * Restore: kill QEMU, make each volume's base the snapshot's disk stream (dropping its overlay),
 * start a fresh QEMU with -incoming defer, feed it a stream rebuilt from the stored RAM and device
 * state, and `cont` if the guest was running when the snapshot was taken.
 */
import { execFile } from 'node:child_process';
import { promises as fsp, writeFileSync } from 'node:fs';
import { nativeHelper } from '../util/project.js';
import { Volume } from '../cow/volume.js';
import { NbdServer } from '../cow/nbd-server.js';
import { ensureParentChunks, snapshotVolume, type SnapshotStats } from '../cow/snapshot.js';
import type { DiskStream } from '../cow/chunk-store.js';
import { releaseBasePinIfUnused, withBasePin } from '../cow/base-pin.js';
import { repositoryPinner } from '../store/pins.js';
import type { Repository } from '../store/repository.js';
import type { MetaValue, Snapshot, StreamRecord } from '../store/manifest.js';
import { chooseAccel, detectQemu, dieWithParent, launchQemu, SUPPORTED_QEMU, type QemuBinary, type QemuProcess } from '../hypervisor/qemu.js';
import { captureSnapshot, restoreFromStream } from '../hypervisor/snapshot.js';
import { buildStream } from '../migstream/index.js';
import { loadBytes, loadStoredRam, ramPages, RamStreamWriter, storeBytes } from './ram-store.js';
import { VmConfigError, diskDir, loadDefinition, loadState, parseDefinition, saveState, vmPaths, type VmDefinition, type VmPaths } from './config.js';
import { UserFacingError } from '../util/errors.js';
import { resolveForVm } from './selectors.js';
import { RestoreDataError, verifyRestoreData } from './restore-check.js';
import { migrateOut, type MigrateOptions, type MigrateResult, type MigrateTarget } from '../migration/outgoing.js';
import { DepartureRecorder } from '../migration/departure.js';
import { keepDepartureCache, pageHash } from '../migration/holdings.js';
import type { PageRecord } from '../migstream/index.js';
import { nowMs, StopPointCut } from './stop-point-cut.js';
import { eventTimeMs } from '../hypervisor/qmp.js';
import { TakeTimeline, type TakeEvent } from './take-timeline.js';
import { launchDevices } from './devices.js';
import { changeMedium } from './media.js';
import { loadNvram, storeNvram } from './nvram.js';
import { writeNvram } from './create.js';
import { deviceShapeDifferences } from './devices.js';
import { freezeGuest, resyncGuest, type GuestResync, type QuiesceReport } from './quiesce.js';

export class VmOperationError extends UserFacingError {
  override readonly name = 'VmOperationError';
  constructor(
    readonly operation: 'start' | 'take' | 'restore' | 'stop' | 'resume',
    readonly step: string,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(`${operation}: ${step}: ${message}`, options);
  }
}

/** Runs one named step of an operation; a failure becomes a VmOperationError naming that step. */
function stepper(operation: VmOperationError['operation']) {
  return async <T>(name: string, fn: () => Promise<T>): Promise<T> => {
    try {
      return await fn();
    } catch (err) {
      if (err instanceof VmOperationError) throw err;
      throw new VmOperationError(operation, name, (err as Error).message, { cause: err });
    }
  };
}

export interface TakeOptions {
  message?: string;
  tags?: string[];
  diskOnly?: boolean;
  /** Freeze the guest's file systems through its agent around the disks' point in time (quiesce.ts). */
  quiesce?: boolean;
}

export interface TakeResult {
  snapshot: string;
  parent: string | null;
  diskOnly: boolean;
  note?: string;
  /**
   * Guest paused, ms. With pauseSource 'qemu-events' (a running guest: QEMU pauses it itself): from
   * QEMU's STOP to its RESUME event, by QEMU's timestamps. With 'vmsnap' (disk-only takes, or no
   * synchronous QMP reads): vmsnap's `stop` sent → `cont` answered. 0 for a guest that was paused.
   */
  pauseMs: number;
  pauseSource: 'qemu-events' | 'vmsnap';
  /** QEMU's migration setup (ms; null for disk-only) and whether the guest was paused during it. */
  setupMs: number | null;
  setupInPause: boolean | null;
  /** The background save after the pause: guest running again → RAM and device state stored (ms). */
  saveMs: number | null;
  /** Every step of the take in time order (take-timeline.ts). */
  timeline: TakeEvent[];
  /** QEMU's own downtime figure for the background snapshot (ms). */
  qemuDowntimeMs: number | null;
  durationMs: number;
  ramBytes: number;
  newBytes: number;
  storedBytes: number;
  dedupBytes: number;
  disks: Record<string, SnapshotStats>;
  /** With --quiesce: what the guest agent froze and thawed, or why not. */
  quiesce?: QuiesceReport;
}

/** What a running VM reports about itself (`vm show`, `vm ls`). */
export interface RuntimeStatus {
  name: string;
  /** QEMU's run state (running, paused, inmigrate, …), or stopped. */
  state: string;
  pid: number | null;
  accel: string | null;
  qemuVersion: string | null;
  hydration: { done: number; total: number; finished: boolean } | null;
}

export interface RestoreResult {
  snapshot: string;
  runState: string;
  /** Old QEMU killed → new QEMU running the snapshot (the guest runs nothing in between), ms. */
  loadMs: number;
  /** Each step of the restore with its time (ms since the epoch), for profiling (issue 13). */
  timeline: TakeEvent[];
  /** The guest agent's clock set (and thaw) after a restore that left the guest running. */
  guest?: GuestResync;
}

export interface RuntimeOptions {
  dataDir: string;
  name: string;
  /** Opens the repository (lazily: a VM runs without one until the first snapshot). */
  openRepo: () => Promise<Repository>;
  /** Start from this snapshot (its disks must already be the volumes' bases, or restore does it). */
  restore?: string;
  /** `restore` may be a snapshot of another VM (the caller confirmed it: selectors.ts). */
  restoreFromOtherVm?: boolean;
  /**
   * Copy every base block into the volumes' overlays in the background while the guest runs, so a
   * clone or restore stops depending on the repository (e.g. S3). Bytes per second, 0 = unlimited.
   */
  hydrate?: number;
  log?: (msg: string) => void;
  /**
   * Start QEMU waiting for an incoming migration (-incoming defer), paused (-S): the guest runs
   * only when the migration's COMMIT says so (src/migration/incoming.ts).
   */
  incoming?: boolean;
  /** Boot QEMU paused (-S): the guest runs at a later `cont` (a cold migration's COMMIT). */
  paused?: boolean;
}

export interface MigrateOutcome extends MigrateResult {
  /** The snapshot of the guest's state at departure, kept here for the return trip (or null). */
  departure: string | null;
  departureError?: string;
  /**
   * The departure snapshot is still being stored (`departureInBackground`): the guest already runs
   * on the destination; `departureStored` settles when it is kept.
   */
  departurePending?: boolean;
}

export class VmRuntime {
  private repoPromise: Promise<Repository> | null = null;
  qemu: QemuProcess | null = null;
  private qemuBin: QemuBinary | null = null;
  private busy: Promise<unknown> = Promise.resolve();
  private stopping = false;
  /** Set during a --quiesce take: thaws the guest once the take's `cont` ran. */
  private thawOnResume: (() => Promise<unknown>) | null = null;
  private hydration: { abort: AbortController; done: number; total: number; finished: boolean; running: Promise<void> } | null = null;
  /** Resolves when QEMU exits without being asked to by restore. */
  readonly ended: Promise<void>;
  private endedResolve!: () => void;

  private constructor(
    readonly def: VmDefinition,
    readonly paths: VmPaths,
    readonly volumes: Map<string, Volume>,
    readonly nbd: NbdServer,
    private readonly opts: RuntimeOptions,
  ) {
    this.ended = new Promise((r) => (this.endedResolve = r));
  }

  private log(msg: string): void {
    this.opts.log?.(msg);
  }

  repo(): Promise<Repository> {
    this.repoPromise ??= this.opts.openRepo();
    this.repoPromise.catch(() => (this.repoPromise = null));
    return this.repoPromise;
  }

  static async start(opts: RuntimeOptions): Promise<VmRuntime> {
    const def = await loadDefinition(opts.dataDir, opts.name);
    const paths = vmPaths(opts.dataDir, opts.name);
    await fsp.mkdir(paths.runDir, { recursive: true, mode: 0o700 });
    const volumes = new Map<string, Volume>();
    let rt: VmRuntime | null = null;
    const nbd = new NbdServer();
    try {
      let repo: Repository | null = null;
      const needRepo = opts.restore !== undefined || (await anyBase(paths, def));
      if (needRepo) repo = await opts.openRepo();
      for (const d of def.disks) {
        const v = await Volume.open(diskDir(paths, d.name), repo ? { store: repo } : {});
        volumes.set(d.name, v);
        nbd.addExport(d.name, v);
      }
      await fsp.rm(paths.nbdSocket, { force: true });
      await nbd.listen({ socketPath: paths.nbdSocket });
      rt = new VmRuntime(def, paths, volumes, nbd, opts);
      if (repo) rt.repoPromise = Promise.resolve(repo);
      if (opts.restore !== undefined) {
        const r = repo!;
        const ref = opts.restore;
        const res = await r.write('restore', () => rt!.restoreLocked(ref, { fromOtherVm: !!opts.restoreFromOtherVm }, r));
        if (res.runState === 'running') void resyncGuest(rt.agentSocket()).then((g) => rt!.log(`after the restore: ${g.warning ?? `guest clock set${g.thawed ? `, ${g.thawed} file system(s) thawed` : ''}`}`));
      }
      else await rt.launch(!!opts.incoming, !!opts.incoming || !!opts.paused);
      rt.startHydration();
      return rt;
    } catch (err) {
      if (rt) await rt.shutdown().catch(() => undefined);
      else {
        await nbd.close().catch(() => undefined);
        for (const v of volumes.values()) await v.close().catch(() => undefined);
      }
      throw err;
    }
  }

  /** A VM whose QEMU waits, paused, for an incoming migration (its volumes already exist). */
  static startIncoming(opts: Omit<RuntimeOptions, 'incoming' | 'restore'>): Promise<VmRuntime> {
    return VmRuntime.start({ ...opts, incoming: true });
  }

  /**
   * Moves the running guest to another host (src/migration/outgoing.ts). On success the guest
   * runs there and QEMU here is stopped in `postmigrate`; with `departure`, its final state is
   * then stored here as a snapshot (tag `departed`), so a later return trip sends only what
   * changed. On failure the guest runs on here.
   */
  migrate(target: MigrateTarget, o: MigrateOptions & { departure: boolean; departureInBackground?: boolean }): Promise<MigrateOutcome> {
    // With departureInBackground the answer goes out as soon as the guest runs on the destination;
    // the departure snapshot is stored after it, still inside `exclusive` (nothing else may use
    // the stopped QEMU and the volumes meanwhile).
    let answer!: (r: MigrateOutcome) => void;
    const answered = new Promise<MigrateOutcome>((res) => (answer = res));
    const whole = this.exclusive(async () => {
      const q = this.liveQemu('migrate');
      const recorder = o.departure ? new DepartureRecorder(this.paths.runDir) : undefined;
      try {
        const res = await migrateOut(
          {
            definition: this.def,
            qmp: q.qmp,
            qemu: { version: `${q.version.major}.${q.version.minor}.${q.version.micro}`, machine: q.machine, accel: q.accel },
            volumes: this.volumes,
            runDir: this.paths.runDir,
            nvramPath: this.paths.nvram,
          },
          target,
          {
            ...o,
            ...(recorder ? { recorder } : {}),
            // From COMMIT on the destination may run the guest: from then until this VM is gone from
            // here, the `departed` marker says so (`vm start` refuses it; a return trip's `receive`
            // here waits for the removal). Written before COMMIT, so no crash can leave it out.
            beforeCommit: () => writeFileSync(this.paths.departedMarker, `${process.pid}\n${target.host}:${target.port}\n`, { mode: 0o600 }),
          },
        );
        if (!recorder) return { ...res, departure: null };
        if (o.departureInBackground) answer({ ...res, departure: null, departurePending: true });
        try {
          const departure = await this.storeDeparture(q, recorder, `state when it moved to ${target.host}:${target.port}`);
          this.log(`departure snapshot ${departure} kept`);
          return { ...res, departure };
        } catch (err) {
          const departureError = (err as Error).message;
          this.log(`departure snapshot failed: ${departureError}`);
          return { ...res, departure: null, departureError };
        }
      } finally {
        await recorder?.dispose();
      }
    });
    this.departureStored = whole.then(
      () => undefined,
      () => undefined,
    );
    return o.departureInBackground ? Promise.race([answered, whole]) : whole;
  }

  /** Settles when the last migration's departure snapshot was stored (or failed, or none was asked). */
  departureStored: Promise<void> = Promise.resolve();

  /** What a snapshot of the running QEMU records about it: restore refuses what it cannot run. */
  private snapshotMeta(q: QemuProcess, type: 'live' | 'disk-only', runState: string): Record<string, MetaValue> {
    return {
      type,
      runState,
      qemuVersion: `${q.version.major}.${q.version.minor}.${q.version.micro}`,
      machine: q.machine,
      accel: q.accel,
      memoryMiB: this.def.memoryMiB,
      cpus: this.def.cpus,
    };
  }

  /**
   * Stores the state the guest left with: the RAM the migration relayed (departure.ts) and the
   * volumes, whose guest no longer writes (QEMU is in postmigrate). A snapshot like a live take's,
   * restorable here, and the holdings a return trip is measured against.
   */
  private async storeDeparture(q: QemuProcess, rec: DepartureRecorder, message: string): Promise<string> {
    if (!rec.prefix || !rec.tail) throw new Error('the migration stream was not recorded');
    const repo = await this.repo();
    const step = stepper('take');
    return repo.write('take', async () => {
      const state = await loadState(this.opts.dataDir, this.def.name);
      const parent = state.lastSnapshot ? await repo.readSnapshot(state.lastSnapshot).catch(() => null) : null;
      for (const [name, v] of this.volumes) ensureParentChunks(v, repo, parentDisk(parent, name) ?? v.parent);
      for (const v of this.volumes.values()) v.freeze();
      const w = new RamStreamWriter(repo, { spillDir: this.paths.runDir });
      const streams: StreamRecord[] = [];
      // The departure cache's index (holdings.ts); none is kept with an encrypted repository.
      const held: { hash: Buffer; pos: number }[] | null = repo.encrypted ? null : [];
      try {
        w.onPrefix(rec.prefix!);
        let batch: PageRecord[] = [];
        for await (const p of rec.pages()) {
          if (held && p.kind === 'page') held.push({ hash: pageHash(p.data!), pos: p.pos });
          batch.push(p.kind === 'page' ? { block: p.block, offset: p.offset, kind: p.kind, data: Buffer.from(p.data!) } : { block: p.block, offset: p.offset, kind: p.kind });
          if (batch.length >= 256) {
            await w.onPages(batch);
            batch = [];
          }
        }
        if (batch.length) await w.onPages(batch);
        streams.push(...(await w.metaStreams(rec.tail!)), ...w.streams());
      } finally {
        await w.close();
      }
      const { snap } = await commitSnapshot(repo, this.opts.dataDir, this.def, parent, streams, { tags: ['departed'], message }, step, {
        meta: this.snapshotMeta(q, 'live', 'running'),
        withVolume: (name, fn) => fn(this.volumes.get(name)!),
      });
      // The image becomes the holdings of the guest's return (a cache: the snapshot is committed).
      // Not with an encrypted repository: guest RAM would then stay on disk unencrypted for as long
      // as the guest is away; its return reads the snapshot back instead.
      if (held) {
        await keepDepartureCache(this.opts.dataDir, this.def.name, snap.id, rec.file, held).catch((err: Error) => this.log(`departure cache not kept: ${err.message}`));
      }
      return snap.id;
    });
  }

  private async launch(incoming: boolean, paused = false): Promise<QemuProcess> {
    this.qemuBin ??= await detectQemu();
    const accel = await chooseAccel({ force: this.def.accel, guestRunsUnderKvm: isBareMetal(this.def) });
    const { displayArgs, ...devices } = await launchDevices(this.def, this.paths);
    const q = await launchQemu({
      qemu: this.qemuBin,
      runDir: this.paths.runDir,
      accel,
      memoryMiB: this.def.memoryMiB,
      cpus: this.def.cpus,
      machine: this.def.machine,
      ...(this.def.kernel ? { kernel: this.def.kernel } : {}),
      ...(this.def.initrd ? { initrd: this.def.initrd } : {}),
      ...(this.def.append !== undefined ? { append: this.def.append } : {}),
      disks: this.def.disks.map((d) => ({ socketPath: this.paths.nbdSocket, exportName: d.name })),
      ...devices,
      incomingDefer: incoming,
      paused,
      extraArgs: [...(displayArgs ?? []), ...this.def.qemuArgs],
    });
    this.qemu = q;
    void q.exited.then(() => {
      if (this.qemu === q && !this.stopping) {
        this.log(`QEMU exited (pid ${q.pid})`);
        this.endedResolve();
      }
    });
    this.log(`QEMU ${`${q.version.major}.${q.version.minor}.${q.version.micro}`} pid ${q.pid} accel ${accel}${incoming ? ' (incoming)' : ''}`);
    return q;
  }

  /** Serialises operations: a take and a restore never overlap. */
  private exclusive<T>(fn: () => Promise<T>): Promise<T> {
    const p = this.busy.catch(() => undefined).then(fn);
    this.busy = p;
    return p;
  }

  /** Starts background hydration of every volume (when asked for), reporting blocks copied. */
  private startHydration(): void {
    if (this.opts.hydrate === undefined || this.hydration) return;
    const abort = new AbortController();
    const h = { abort, done: 0, total: 0, finished: false, running: Promise.resolve() };
    const perVolume = new Map<string, { done: number; total: number }>();
    h.running = (async () => {
      for (const [name, v] of this.volumes) {
        if (abort.signal.aborted) return;
        await v.hydrate({
          signal: abort.signal,
          ...(this.opts.hydrate ? { bytesPerSecond: this.opts.hydrate } : {}),
          onProgress: (done, total) => {
            perVolume.set(name, { done, total });
            h.done = [...perVolume.values()].reduce((a, x) => a + x.done, 0);
            h.total = [...perVolume.values()].reduce((a, x) => a + x.total, 0);
          },
        });
      }
      h.finished = !abort.signal.aborted;
      if (h.finished) {
        this.log(`hydration finished: ${h.done} blocks copied`);
        await this.releaseUnusedPins(await this.repo());
      }
    })().catch((err: unknown) => this.log(`hydration stopped: ${(err as Error).message}`));
    this.hydration = h;
  }

  private async stopHydration(): Promise<void> {
    const h = this.hydration;
    this.hydration = null;
    if (!h) return;
    h.abort.abort();
    await h.running;
  }

  async status(): Promise<RuntimeStatus> {
    const q = this.qemu;
    let state = 'stopped';
    if (q && !q.hasExited) state = (await q.qmp.execute<{ status: string }>('query-status').catch(() => ({ status: 'unknown' }))).status;
    const h = this.hydration;
    return {
      name: this.def.name,
      state,
      pid: q?.pid ?? null,
      accel: q?.accel ?? null,
      qemuVersion: q ? `${q.version.major}.${q.version.minor}.${q.version.micro}` : null,
      hydration: h ? { done: h.done, total: h.total, finished: h.finished } : null,
    };
  }

  pause(): Promise<void> {
    return this.exclusive(async () => void (await this.liveQemu('pause').qmp.execute('stop')));
  }
  /**
   * Runs the guest again, and says so only when QEMU reports it running: `cont` also "succeeds"
   * on a QEMU still waiting for its incoming state (it merely arms autostart), where nothing runs.
   */
  resume(): Promise<void> {
    return this.exclusive(async () => {
      const q = this.liveQemu('resume');
      const before = (await q.qmp.execute<{ status: string }>('query-status')).status;
      if (before === 'inmigrate') throw new VmOperationError('resume', 'checking the guest', `VM ${this.def.name} has no guest state loaded (QEMU is waiting for one: a restore did not finish); restore a snapshot or stop the VM`);
      await q.qmp.execute('cont');
      const after = (await q.qmp.execute<{ status: string }>('query-status')).status;
      if (after !== 'running') throw new VmOperationError('resume', 'resuming the guest', `QEMU reports the guest ${after}, not running`);
      // A migration whose destination never confirmed left the guest paused here, marked as
      // departed; resuming it here says it did not go.
      await fsp.rm(this.paths.departedMarker, { force: true });
    });
  }

  private agentSocket(): string | null {
    return this.def.agent ? this.paths.agentSocket : null;
  }

  /** The guest's screen, as QEMU shows it, into a PNG file. */
  screendump(file: string): Promise<void> {
    return this.exclusive(async () => {
      if (!this.def.video) throw new VmConfigError(`VM ${this.def.name} has no video adapter (it was created with --display none)`);
      await this.liveQemu('screendump').qmp.execute('screendump', { filename: file, format: 'png' });
    });
  }

  /** The CD-ROM drive's medium, changed in the running QEMU and in the definition (media.ts). */
  changeMedium(medium: string | null): Promise<void> {
    return this.exclusive(() => changeMedium(this.liveQemu('media').qmp, this.opts.dataDir, this.def, medium));
  }

  private liveQemu(op: string): QemuProcess {
    if (!this.qemu || this.qemu.hasExited) throw new VmOperationError('take', op, `VM ${this.def.name} is not running`);
    return this.qemu;
  }

  take(opts: TakeOptions = {}): Promise<TakeResult> {
    return this.exclusive(async () => {
      const repo = await stepper('take')('opening the repository', () => this.repo());
      // --quiesce: frozen before the disks' point in time, thawed as soon as the guest runs again.
      const q = opts.quiesce ? await freezeGuest(this.agentSocket()) : null;
      this.thawOnResume = q ? q.thaw : null;
      try {
        // A write session from the first RAM page stored to the manifest: prune waits (docs/locks.md).
        const r = await repo.write('take', () => this.takeLocked(opts, repo));
        return q ? { ...r, quiesce: await q.thaw() } : r;
      } finally {
        this.thawOnResume = null;
        await q?.thaw();
      }
    });
  }

  private async takeLocked(opts: TakeOptions, repo: Repository): Promise<TakeResult> {
    const t0 = performance.now();
    const q = this.liveQemu('check');
    const step = stepper('take');
    const state = await loadState(this.opts.dataDir, this.def.name);
    const parent = state.lastSnapshot ? await repo.readSnapshot(state.lastSnapshot).catch(() => null) : null;
    const runState = (await q.qmp.execute<{ status: string }>('query-status')).status;
    const wasRunning = runState === 'running';
    const timeline = new TakeTimeline(q.qmp);
    let resumed: Promise<void> | null = wasRunning ? null : Promise.resolve();
    let tStop = 0;
    let tCont = 0;
    // Idempotent, and never awaited from inside the stream sink: `cont` runs VM-state notifiers that
    // write to write-protected guest RAM; QEMU's migration thread resolves those faults only while
    // it can write the stream, i.e. while we keep reading it. Awaiting `cont` before reading on
    // would deadlock once the socket buffer fills.
    const resume = (): Promise<void> => {
      resumed ??= (async () => {
        timeline.mark('cont sent');
        await q.qmp.execute('cont');
        tCont = performance.now();
        timeline.mark('cont answered');
        void this.thawOnResume?.();
      })();
      return resumed;
    };
    const storedBefore = repo.stats.storedBytes;
    const streams: StreamRecord[] = [];
    let ramWriter: RamStreamWriter | null = null;
    let qemuDowntimeMs: number | null = null;
    let cut: StopPointCut | null = null;
    let pauseMs = 0;
    const diskOnly = !!opts.diskOnly;
    // Decided before the freeze: a disk whose parent chunks were pruned is read whole this time.
    for (const [name, v] of this.volumes) {
      const missing = ensureParentChunks(v, repo, parentDisk(parent, name) ?? v.parent);
      if (missing) this.log(`disk ${name}: ${missing} chunk(s) of its last snapshot are gone (forgotten and pruned): reading the whole disk`);
    }
    const freezeAll = (): void => {
      for (const v of this.volumes.values()) v.freeze();
      timeline.mark('disks cut');
    };
    try {
      // `stop` (ours or QEMU's) makes QEMU flush every disk (NBD FLUSH → fdatasync of data and
      // journal here) while the guest is paused; flushing first, with the guest running, leaves that
      // flush only the last few milliseconds of writes (bench/take: stop alone took 2-98 ms, once 634 ms).
      if (wasRunning) await step('flushing disks', () => Promise.all([...this.volumes.values()].map((v) => v.flush())));
      // A running guest is paused by QEMU itself, after the migration setup, and the disks are cut
      // at that stop (stop-point-cut.ts): the setup never runs inside the pause.
      if (wasRunning && !diskOnly) cut = StopPointCut.arm(q.qmp, this.nbd, freezeAll);
      // Otherwise (a paused guest, a disk-only take, or a QMP socket we cannot read synchronously)
      // vmsnap pauses the guest and cuts the disks before anything else.
      const pauseAndFreeze = async (): Promise<void> => {
        if (cut) return timeline.mark('migrate sent');
        tStop = performance.now();
        if (wasRunning) {
          timeline.mark('stop sent');
          await step('pausing the guest', () => q.qmp.execute('stop'));
        }
        freezeAll();
        if (!diskOnly) timeline.mark('migrate sent');
      };
      if (diskOnly) {
        await pauseAndFreeze();
        await resume();
      } else {
        const onFirstPage = (): void => {
          timeline.mark('first RAM record');
          if (!cut) void resume().catch(() => undefined);
        };
        ramWriter = new RamStreamWriter(repo, { onFirstPage, spillDir: this.paths.runDir });
        const cap = await step('capturing RAM and device state', () =>
          captureSnapshot(q.qmp, ramWriter!, { socketDir: this.paths.runDir, beforeMigrate: pauseAndFreeze }),
        );
        timeline.mark('RAM and device state saved');
        if (cut) {
          if (cut.error) throw new VmOperationError('take', 'cutting the disks at QEMU\'s stop', `reading QEMU's events failed: ${cut.error.message}`, { cause: cut.error });
          if (!cut.done || !cut.stop || !cut.resume) {
            throw new VmOperationError('take', 'cutting the disks at QEMU\'s stop', `QEMU finished the snapshot without pausing and resuming the guest (STOP ${cut.stop ? 'seen' : 'not seen'}, RESUME ${cut.resume ? 'seen' : 'not seen'}): no consistent disk cut, no snapshot saved`);
          }
          pauseMs = eventTimeMs(cut.resume) - eventTimeMs(cut.stop);
        } else {
          await resume();
        }
        qemuDowntimeMs = cap.qemu.downtimeMs ?? null;
        streams.push(...(await step('storing device state', () => ramWriter!.metaStreams(cap.tail))), ...ramWriter.streams());
      }
    } catch (err) {
      cut?.disarm();
      await ramWriter?.close();
      // Whatever failed, the guest runs on: it must never stay paused because a snapshot failed.
      if (wasRunning) {
        if (cut) {
          // QEMU resumes the guest itself when its snapshot fails; make sure of it.
          const st = await q.qmp.execute<{ status: string }>('query-status').catch(() => null);
          if (st && st.status !== 'running') await q.qmp.execute('cont').catch(() => undefined);
        } else {
          // A failed `cont` above must not leave the guest paused: try once more.
          await resume().catch(() => q.qmp.execute('cont').catch(() => undefined));
        }
      }
      timeline.close();
      this.dropRepo(repo);
      throw await explainQemuExit(q, err);
    }
    cut?.disarm();
    if (!cut && wasRunning) pauseMs = tCont - tStop;
    const events = timeline.close();
    const phases = timeline.phases();
    if (process.env.VMSNAP_DEBUG_TAKE) this.log(`take timeline: ${timeline.summary()}`);
    await ramWriter?.close();
    try {
      const { snap, disks } = await commitSnapshot(repo, this.opts.dataDir, this.def, parent, streams, opts, step, {
        meta: this.snapshotMeta(q, diskOnly ? 'disk-only' : 'live', runState),
        withVolume: (name, fn) => fn(this.volumes.get(name)!),
      });
      if (!diskOnly) this.recollapseHugePages(q);
      await this.releaseUnusedPins(repo);
      const diskNew = Object.values(disks).reduce((a, d) => a + d.newBytes, 0);
      const ram = ramWriter?.stats;
      const ramBytes = ramWriter ? streams.filter((s) => s.kind === 'ram').reduce((a, s) => a + s.size, 0) : 0;
      return {
        snapshot: snap.id,
        parent: parent?.id ?? null,
        diskOnly,
        pauseMs,
        pauseSource: cut ? 'qemu-events' : 'vmsnap',
        ...phases,
        timeline: events,
        qemuDowntimeMs,
        durationMs: performance.now() - t0,
        ramBytes,
        newBytes: (ram?.newBytes ?? 0) + diskNew,
        storedBytes: repo.stats.storedBytes - storedBefore,
        dedupBytes: ram ? ram.dedupChunks * repo.chunkSize : 0,
        disks,
      };
    } catch (err) {
      this.dropRepo(repo);
      throw err;
    }
  }

  /**
   * Rebuilds QEMU's transparent huge pages after a background snapshot split them (see
   * native/thp-collapse.c): without it every later snapshot pauses the guest several times longer.
   * Runs at low priority while the guest runs; best effort (needs Linux >= 6.1 and CAP_SYS_NICE).
   */
  private recollapseHugePages(q: QemuProcess): void {
    const helper = nativeHelper('thp-collapse');
    if (!helper || q.hasExited) return;
    const t0 = performance.now();
    const [cmd, args] = dieWithParent('nice', ['-n', '10', helper, String(q.pid)]);
    execFile(cmd, args, { timeout: 60_000 }, (err, stdout) => {
      const out = stdout.trim() || (err ? err.message : '');
      this.log(`huge pages re-collapsed in ${(performance.now() - t0).toFixed(0)} ms: ${out}`);
    });
  }

  /**
   * Unpins the base snapshots volumes no longer depend on (hydrated and snapshotted since). Best
   * effort: a pin left behind only keeps a snapshot longer; the next take tries again.
   */
  private releaseUnusedPins(repo: Repository): Promise<void> {
    return releaseUnusedPins(repo, this.opts.dataDir, this.paths, this.volumes, (l) => this.log(l));
  }

  /**
   * After a failed take the repository handle may be in a failed state (a pack upload failed):
   * the next take opens a fresh one. Volumes keep reading their base through the old handle,
   * which only needs its index and backend, so only its worker threads are released.
   */
  private dropRepo(repo: Repository): void {
    repo.abandon();
    this.repoPromise = null;
    void repo.close().catch(() => undefined);
  }

  /** Puts the VM on snapshot `ref`, resolved for this VM (selectors.ts: `latest` is its own). */
  restore(ref: string, o: { fromOtherVm: boolean }): Promise<RestoreResult> {
    return this.exclusive(async () => {
      const repo = await stepper('restore')('opening the repository', () => this.repo());
      // A shared lock for the restore's span: no prune may delete what it is reading and loading
      // (the snapshot is pinned only when the disks are reset, after RAM is in), and the session
      // begins by catching up with the repository (docs/locks.md).
      const r = await repo.write('restore', () => this.restoreLocked(ref, o, repo));
      // The guest resumed at the snapshot's moment: its clock is set to now (quiesce.ts).
      if (r.runState === 'running') r.guest = await resyncGuest(this.agentSocket());
      return r;
    });
  }

  private async restoreLocked(ref: string, o: { fromOtherVm: boolean }, repo: Repository): Promise<RestoreResult> {
    const step = stepper('restore');
    const timeline: TakeEvent[] = [];
    const mark = (what: string): void => void timeline.push({ at: nowMs(), what, by: 'vmsnap' });
    mark('restore started');
    const snap = await step('finding the snapshot', () => resolveForVm(repo, ref, this.def.name, o));
    // Everything is checked and read before anything changes: a refused restore leaves the VM as it
    // was (restore-check.ts says what is read and why disks are only checked for presence).
    await step('checking the snapshot', () => checkRestorable(repo, snap, this.def));
    const disks = this.def.disks.map((d) => snap.streams.find((x) => x.name === d.name)!);
    const ram = await step('verifying the snapshot data', async () => {
      const r =
        snap.meta.type === 'disk-only'
          ? null
          : await loadStoredRam(repo, snap.streams).catch((err: Error) => {
              throw new RestoreDataError(`snapshot ${snap.id.slice(0, 12)} (VM ${snap.vm}): device state cannot be read: ${err.message}`, { cause: err });
            });
      await verifyRestoreData(repo, snap, r?.ram ?? [], disks);
      return r;
    });
    mark('snapshot data verified');
    const nvram = await step('reading the firmware variables', () => loadNvram(repo, snap));
    const t0 = performance.now();
    await this.stopHydration();
    if (this.qemu && !this.qemu.hasExited) {
      this.stopping = true;
      await this.qemu.kill('SIGKILL');
      this.stopping = false;
    }
    // The fence: requests the killed guest left in our receive buffers are dropped and those
    // executing finish, before the new QEMU connects and long before any disk is reset (a write
    // landing after the reset would corrupt the restore).
    await step('disconnecting the old disks', () => this.nbd.disconnectClients());
    // The firmware variables are the snapshot's before the new QEMU opens them.
    if (nvram) await step('restoring the firmware variables', () => writeNvram(this.opts.dataDir, this.def, nvram));
    // The new QEMU starts paused (-S) and loads RAM and device state while the disks still hold
    // what they held: if loading fails, the VM stops with its disks as they were. The disks are
    // reset only once the guest state is in, and the guest runs only after that.
    mark('old QEMU killed');
    const q = await step('starting QEMU', () => this.launch(ram !== null, true));
    mark('new QEMU started');
    let runState = 'paused';
    let disksReset = false;
    let current = 'loading RAM and device state';
    try {
      if (ram) {
        const stream = buildStream(ram.prefix, ramPages(repo, ram.ram), ram.suffix, { commands: ram.commands });
        runState = (await restoreFromStream(q.qmp, stream, { qemuLog: q.paths.qemuLog })).runState;
        mark('RAM and device state loaded');
      }
      for (const [name, v] of this.volumes) {
        current = `resetting disk ${name}`;
        // The volume may have been opened without a store (it had no base): it reads the base from now on.
        v.setStore(repo);
        disksReset = true;
        // The new base is pinned before the volume reads it, the old one unpinned after (base-pin.ts).
        await withBasePin(diskDir(this.paths, name), repositoryPinner(repo, this.opts.dataDir), snap.id, `${this.def.name}/${name}`, () =>
          v.restoreBase(disks.find((d) => d.name === name)! as DiskStream),
        );
      }
      mark('disks reset');
      current = 'resuming the guest';
      if ((snap.meta.type === 'disk-only' || snap.meta.runState === 'running') && runState !== 'running') {
        await q.qmp.execute('cont');
        runState = (await q.qmp.execute<{ status: string }>('query-status')).status;
      }
    } catch (err) {
      // Never leave a QEMU waiting in `inmigrate` (or half-loaded) as if it were the VM: it is
      // killed, and with it the supervisor ends — the VM is stopped.
      await q.kill('SIGKILL').catch(() => undefined);
      const where = disksReset ? 'its disks may be partly reset to the snapshot' : 'its disks are as they were before the restore';
      throw new VmOperationError('restore', current, `${(err as Error).message}; the previous guest was already stopped, so the VM is now stopped (${where})`, { cause: err });
    }
    await saveState(this.opts.dataDir, this.def.name, { lastSnapshot: snap.id });
    if (this.qemu === q && this.hydration === null && this.volumes.size && !this.stopping) this.startHydration();
    mark('guest running');
    return { snapshot: snap.id, runState, loadMs: performance.now() - t0, timeline };
  }

  /** Stops QEMU (quit, then kill), closes NBD and the volumes. */
  async shutdown(): Promise<void> {
    this.stopping = true;
    await this.stopHydration();
    if (this.qemu && !this.qemu.hasExited) await this.qemu.quit(5000).catch(() => undefined);
    await this.nbd.close().catch(() => undefined);
    for (const v of this.volumes.values()) await v.close().catch(() => undefined);
    const repo = this.repoPromise ? await this.repoPromise.catch(() => null) : null;
    await repo?.close();
    this.endedResolve();
  }
}

/**
 * A take whose QEMU died under it fails with a stream or QMP error that hides the cause ("stream
 * truncated…"): when QEMU has exited (or exits within a moment), say so.
 */
async function explainQemuExit(q: QemuProcess, err: unknown): Promise<unknown> {
  const x = await Promise.race([q.exited, new Promise<null>((r) => setTimeout(() => r(null), 500).unref())]);
  if (!x) return err;
  const how = x.signal ? `killed by ${x.signal}` : `exit code ${x.code}`;
  const step = err instanceof VmOperationError ? err.step : 'capturing RAM and device state';
  const detail = err instanceof VmOperationError ? err.message.slice(`take: ${err.step}: `.length) : (err as Error).message;
  return new VmOperationError('take', step, `QEMU (pid ${q.pid}) exited during the snapshot (${how}); no snapshot was saved [${detail}]`, { cause: err });
}

function isBareMetal(def: VmDefinition): boolean {
  // A multiboot ELF (no initrd, no Linux bzImage) is what this machine's KVM can run; Linux guests
  // need real VMX/SVM. Users force either with --accel.
  return !!def.kernel && /\.elf$/.test(def.kernel) && !def.initrd;
}

async function anyBase(paths: VmPaths, def: VmDefinition): Promise<boolean> {
  for (const d of def.disks) {
    try {
      await fsp.access(`${diskDir(paths, d.name)}/base.chunks`);
      return true;
    } catch {
      // no base
    }
  }
  return false;
}

/** Refuses (clearly) a snapshot whose VM shape differs from `def`, before anything is changed. */
export async function checkRestorable(repo: Repository, snap: Snapshot, def: VmDefinition): Promise<void> {
  const cfgStream = snap.streams.find((s) => s.name === 'vm-config');
  if (!cfgStream) throw new Error(`snapshot ${snap.id.slice(0, 12)} is not a VM snapshot (it has no vm-config stream)`);
  const taken = parseDefinition(await loadBytes(repo, cfgStream), `snapshot ${snap.id.slice(0, 12)}`);
  const problems: string[] = [];
  if (taken.memoryMiB !== def.memoryMiB) problems.push(`memory ${taken.memoryMiB} MiB vs ${def.memoryMiB} MiB`);
  if (taken.machine !== def.machine) problems.push(`machine ${taken.machine} vs ${def.machine}`);
  if (taken.cpus !== def.cpus) problems.push(`cpus ${taken.cpus} vs ${def.cpus}`);
  const disksT = taken.disks.map((d) => `${d.name}:${d.size}`).join(',');
  const disksD = def.disks.map((d) => `${d.name}:${d.size}`).join(',');
  if (disksT !== disksD) problems.push(`disks [${disksT}] vs [${disksD}]`);
  problems.push(...deviceShapeDifferences(taken, def));
  if (problems.length) throw new Error(`snapshot ${snap.id.slice(0, 12)} was taken of a VM of a different shape (${problems.join('; ')})`);
  const qv = String(snap.meta.qemuVersion ?? '');
  const major = Number(/^(\d+)\./.exec(qv)?.[1] ?? NaN);
  if (snap.meta.type !== 'disk-only' && !(major >= SUPPORTED_QEMU.minMajor && major < SUPPORTED_QEMU.maxMajorExclusive)) {
    throw new Error(`snapshot ${snap.id.slice(0, 12)} was taken with QEMU ${qv || 'unknown'}; this vmsnap restores snapshots of QEMU ${SUPPORTED_QEMU.minMajor}.x`);
  }
  for (const d of def.disks) {
    const s = snap.streams.find((x) => x.name === d.name);
    if (!s || s.kind !== 'disk') throw new Error(`snapshot ${snap.id.slice(0, 12)} has no disk ${d.name}`);
  }
}

/**
 * Unpins the base snapshots of the disks that no longer depend on them (hydrated and snapshotted
 * since). Call it only after the snapshot that made them independent is committed: until then its
 * chunk ids for clean blocks come from the base. Best effort: a pin left behind only keeps a
 * snapshot longer; the next take tries again.
 */
async function releaseUnusedPins(
  repo: Repository,
  dataDir: string,
  paths: VmPaths,
  disks: Iterable<[string, { readonly dependsOnBase: boolean }]>,
  log: (line: string) => void,
): Promise<void> {
  for (const [name, v] of disks) {
    await releaseBasePinIfUnused(diskDir(paths, name), v, repositoryPinner(repo, dataDir)).then(
      (p) => p && log(`disk ${name} no longer depends on snapshot ${p.snapshot.slice(0, 12)}: unpinned`),
      (err: Error) => log(`unpinning the base of disk ${name} failed (a later take retries): ${err.message}`),
    );
  }
}

/** The disk stream of `parent` that a disk's next snapshot diffs against, if the parent has that disk. */
function parentDisk(parent: Snapshot | null, disk: string): DiskStream | undefined {
  return parent?.streams.find((s) => s.name === disk && s.kind === 'disk');
}

/**
 * The end of every take: each disk's volume written against the parent's disk stream, the VM's
 * definition, the manifest committed after `streams` (RAM and device state, if any), and the
 * snapshot recorded as the VM's last (the next one's parent).
 */
async function commitSnapshot(
  repo: Repository,
  dataDir: string,
  def: VmDefinition,
  parent: Snapshot | null,
  streams: StreamRecord[],
  opts: TakeOptions,
  step: ReturnType<typeof stepper>,
  how: { meta: Record<string, MetaValue>; withVolume: <T>(disk: string, fn: (v: Volume) => Promise<T>) => Promise<T> },
): Promise<{ snap: Snapshot; disks: Record<string, SnapshotStats> }> {
  const disks: Record<string, SnapshotStats> = {};
  for (const d of def.disks) {
    const pd = parentDisk(parent, d.name);
    const r = await step(`writing disk ${d.name}`, () => how.withVolume(d.name, (v) => snapshotVolume(v, repo, pd ? { parent: pd } : {})));
    disks[d.name] = r.stats;
    streams.push({ name: d.name, kind: 'disk', size: r.stream.size, chunkSize: r.stream.chunkSize, chunks: r.stream.chunks });
  }
  streams.push(...(await step('storing the firmware variables', () => storeNvram(repo, dataDir, def))));
  streams.push(await storeBytes(repo, 'vm-config', 'config', Buffer.from(JSON.stringify(def))));
  const snap = await step('committing the snapshot', () =>
    repo.saveSnapshot({
      vm: def.name,
      tags: opts.tags ?? [],
      parent: parent?.id ?? null,
      ...(opts.message !== undefined ? { message: opts.message } : {}),
      meta: how.meta,
      streams,
    }),
  );
  await saveState(dataDir, def.name, { lastSnapshot: snap.id });
  return { snap, disks };
}

/** A snapshot of a VM that is not running: its disks only (there is no RAM to save). */
export function takeStopped(dataDir: string, name: string, repo: Repository, opts: TakeOptions = {}): Promise<TakeResult> {
  // A write session from the first pack to the manifest: prune waits (docs/locks.md).
  return repo.write('take', () => takeStoppedLocked(dataDir, name, repo, opts));
}

async function takeStoppedLocked(dataDir: string, name: string, repo: Repository, opts: TakeOptions): Promise<TakeResult> {
  const t0 = performance.now();
  const def = await loadDefinition(dataDir, name);
  const paths = vmPaths(dataDir, name);
  const state = await loadState(dataDir, name);
  const parent = state.lastSnapshot ? await repo.readSnapshot(state.lastSnapshot).catch(() => null) : null;
  const deps = new Map<string, { dependsOnBase: boolean }>();
  const { snap, disks } = await commitSnapshot(repo, dataDir, def, parent, [], opts, stepper('take'), {
    meta: { type: 'disk-only', runState: 'shutoff', machine: def.machine, memoryMiB: def.memoryMiB, cpus: def.cpus },
    withVolume: async (disk, fn) => {
      const v = await Volume.open(diskDir(paths, disk), { store: repo });
      try {
        const r = await fn(v);
        deps.set(disk, { dependsOnBase: v.dependsOnBase });
        return r;
      } finally {
        await v.close();
      }
    },
  });
  // As a live take does: pins the disks no longer need go, now that the snapshot is committed.
  const notes = [`VM ${name} is not running: took a disk-only snapshot (no RAM or device state)`];
  await releaseUnusedPins(repo, dataDir, paths, deps, (l) => notes.push(l));
  return {
    snapshot: snap.id,
    parent: parent?.id ?? null,
    diskOnly: true,
    note: notes.join('; '),
    pauseMs: 0,
    pauseSource: 'vmsnap',
    setupMs: null,
    setupInPause: null,
    saveMs: null,
    timeline: [],
    qemuDowntimeMs: null,
    durationMs: performance.now() - t0,
    ramBytes: 0,
    newBytes: Object.values(disks).reduce((a, d) => a + d.newBytes, 0),
    storedBytes: repo.stats.storedBytes,
    dedupBytes: 0,
    disks,
  };
}
