/**
 * The per-VM supervisor: a detached process that owns a running VM's volumes, NBD server and QEMU
 * (VmRuntime), so the guest's disks stay served after the `vmsnap vm start` that launched it exits.
 * CLI commands talk to it over a unix socket in the VM's run directory (mode 0700), one request
 * per connection:
 *
 *   request  (one JSON line, ≤ 64 KiB)  { "op": K, ...SupervisorOps[K]["args"] }
 *   reply    (one JSON line)            { "ok": true, "result": SupervisorOps[K]["result"] }
 *                                     | { "ok": false, "error": ErrorRecord }
 *
 * SupervisorOps is the whole protocol: each request's arguments and the result it answers with,
 * so `callSupervisor` is typed end to end. An error crosses as an ErrorRecord (src/util/errors.ts):
 * its class name, message, operation and failed step, and whether it is user-facing and
 * retryable — so an internal bug in the supervisor is reported as a bug by the CLI, not printed
 * as if it were the user's mistake, and a caller (a job runner) can tell a retryable failure.
 *
 * The supervisor exits when QEMU exits (guest shutdown, crash or kill) after closing the NBD
 * server and checkpointing the volumes, or on `stop`. Its stdout/stderr go to run/supervisor.log.
 *
 * One VM, one supervisor, one QEMU: the supervisor claims run/supervisor.pid with O_EXCL (a stale
 * file, naming no live supervisor of this VM, is replaced), refuses to start while any QEMU of the
 * VM is alive (vm-processes.ts), and its QEMU dies with it (die-with-parent), so a supervisor
 * killed with SIGKILL cannot leave a guest behind that would write the disks a new one serves.
 */
import { spawn } from 'node:child_process';
import { existsSync, openSync, closeSync, promises as fsp } from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { readTail } from '../util/fs.js';
import { projectRoot } from '../util/project.js';
import { VmRuntime, type MigrateOutcome, type RestoreResult, type RuntimeStatus, type TakeOptions, type TakeResult } from './runtime.js';
import type { MigrateTarget } from '../migration/outgoing.js';
import { loadOrCreateIdentity } from '../migration/identity.js';
import { processAlive } from '../util/process.js';
import { readDepartedMarker, vmPaths, type VmPaths } from './config.js';
import { isSupervisorOf, vmProcesses, waitExited } from './processes.js';
import type { Repository } from '../store/repository.js';
import { errorRecord, isErrorRecord, RemoteError, UserFacingError, type ErrorRecord } from '../util/errors.js';

export class SupervisorError extends UserFacingError {
  override readonly name = 'SupervisorError';
}

type NoArgs = Record<never, never>;

/** Every request a supervisor answers: its arguments and its result. */
export interface SupervisorOps {
  status: { args: NoArgs; result: RuntimeStatus };
  take: { args: { options: TakeOptions }; result: TakeResult };
  restore: { args: { snapshot: string; fromOtherVm?: boolean }; result: RestoreResult };
  pause: { args: NoArgs; result: null };
  resume: { args: NoArgs; result: null };
  stop: { args: NoArgs; result: { stopping: true } };
  /** Moves the guest to another host; progress arrives as event lines before the reply. */
  migrate: { args: { target: MigrateTarget; options: MigrateRequestOptions }; result: MigrateOutcome };
  'migrate-cancel': { args: NoArgs; result: { cancelled: boolean } };
  /** The CD-ROM drive's medium (an absolute ISO path, or null: empty). */
  media: { args: { medium: string | null }; result: null };
  /** The guest's screen as a PNG file at this absolute path (written by QEMU). */
  screendump: { args: { file: string }; result: null };
}

export interface MigrateRequestOptions {
  maxDowntimeMs?: number;
  timeoutMs?: number;
  compress?: 'auto' | 'zstd' | 'lz4' | 'none';
  departure: boolean;
  /** Answer once the guest runs on the destination; store the departure snapshot after that. */
  departureInBackground?: boolean;
  /** Keep the VM here, stopped, instead of removing it once its departure state is stored. */
  keepSource?: boolean;
}
export type SupervisorOp = keyof SupervisorOps;
export type SupervisorRequest<K extends SupervisorOp = SupervisorOp> = K extends SupervisorOp ? { op: K } & SupervisorOps[K]['args'] : never;

type Reply = { ok: true; result: unknown } | { ok: false; error: ErrorRecord };

const OPS: ReadonlySet<string> = new Set<SupervisorOp>(['status', 'take', 'restore', 'pause', 'resume', 'stop', 'migrate', 'migrate-cancel', 'media', 'screendump']);

export async function runSupervisor(opts: {
  dataDir: string;
  name: string;
  restore?: string;
  restoreFromOtherVm?: boolean;
  hydrate?: number;
  openRepo: () => Promise<Repository>;
  removeMoved: RemoveMovedVm;
}): Promise<void> {
  const paths = vmPaths(opts.dataDir, opts.name);
  const log = (m: string) => process.stderr.write(`${new Date().toISOString()} ${m}\n`);
  await claimPidFile(paths, opts.name);
  let rt: VmRuntime;
  try {
    await refuseLeftovers(paths, opts.name);
    rt = await VmRuntime.start({ ...opts, log });
  } catch (err) {
    await fsp.rm(paths.supervisorPid, { force: true });
    throw err;
  }
  await serveRuntime(rt, paths, opts.dataDir, log, opts.removeMoved);
}

/**
 * Removes a VM that moved to another host from this one (its disks' pins, then its folder). Given
 * by the caller: it belongs to the operations layer (src/ops/migrate.ts), above this one.
 */
export type RemoveMovedVm = (vm: string, log: (m: string) => void) => Promise<void>;

/**
 * Serves a running VM's requests until QEMU exits or `stop`, then exits the process. Used by the
 * supervisor a `vm start` spawns and by the worker an incoming migration became (its pid file is
 * already claimed).
 */
export async function serveRuntime(rt: VmRuntime, paths: VmPaths, dataDir: string, log: (m: string) => void, removeMoved: RemoveMovedVm): Promise<never> {
  const ctx: HandlerContext = { rt, paths, dataDir, log, stop: () => void shutdown(), inflight: new Set(), migration: null, afterShutdown: null, removeMoved };
  // Requests being answered (ctx.inflight): when QEMU dies under a `take`, its error reply must
  // still reach the CLI before this process exits (otherwise it only sees the connection close).
  const inflight = ctx.inflight;
  const server = net.createServer((sock) => handle(ctx, sock));
  await fsp.rm(paths.supervisorSocket, { force: true });
  await new Promise<void>((res, rej) => server.once('error', rej).listen(paths.supervisorSocket, () => res()));
  log(`supervisor ready for ${rt.def.name}`);
  // One shutdown, awaited by every caller: rt.shutdown() resolves rt.ended, and a second caller
  // returning early let the CLI exit before the pid file was removed (a stale pid file stayed).
  let stopping: Promise<void> | null = null;
  const shutdown = (): Promise<void> =>
    (stopping ??= (async () => {
      server.close();
      // A moved guest's departure snapshot reads this QEMU's recording and the volumes: let it end.
      await rt.departureStored;
      await rt.shutdown();
      await Promise.race([Promise.allSettled([...inflight]), new Promise((r) => setTimeout(r, 30_000).unref())]);
      if (ctx.afterShutdown) await ctx.afterShutdown().catch((err: Error) => log(`after shutdown: ${err.message}`));
      await fsp.rm(paths.supervisorSocket, { force: true });
      await fsp.rm(paths.supervisorPid, { force: true });
      log('supervisor exiting');
      process.exit(0);
    })());
  process.on('SIGTERM', () => void shutdown());
  process.on('SIGINT', () => void shutdown());
  await rt.ended;
  await shutdown();
  return process.exit(0);
}

interface HandlerContext {
  rt: VmRuntime;
  paths: VmPaths;
  dataDir: string;
  log: (m: string) => void;
  stop: () => void;
  inflight: Set<Promise<void>>;
  /** The migration in progress (one at a time: the runtime serialises it with take/restore). */
  migration: AbortController | null;
  /** Run once QEMU and the volumes are closed, before the process exits (a moved VM's removal). */
  afterShutdown: (() => Promise<void>) | null;
  removeMoved: RemoveMovedVm;
}

/**
 * Makes this process the VM's one supervisor: creates run/supervisor.pid exclusively. A file left
 * by a supervisor that died (its pid is no supervisor of this VM now) is replaced once.
 */
async function claimPidFile(paths: VmPaths, name: string): Promise<void> {
  for (let attempt = 0; ; attempt++) {
    try {
      await fsp.writeFile(paths.supervisorPid, String(process.pid), { flag: 'wx', mode: 0o600 });
      return;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST' || attempt > 0) throw err;
      const other = Number((await fsp.readFile(paths.supervisorPid, 'utf8').catch(() => '')).trim());
      if (other > 0 && other !== process.pid && isSupervisorOf(other, name)) throw new SupervisorError(`VM ${name} is already running (supervisor pid ${other})`);
      await fsp.rm(paths.supervisorPid, { force: true });
    }
  }
}

/** Refuses to start a VM while a QEMU of it is alive: two guests would write one disk. */
async function refuseLeftovers(paths: VmPaths, name: string): Promise<void> {
  const { qemus } = await vmProcesses(paths, name);
  if (qemus.length) {
    throw new SupervisorError(
      `VM ${name}: QEMU (pid ${qemus.join(', ')}) of this VM is still running without its supervisor; ` +
        `starting another would let two guests write one disk. Run \`vmsnap vm stop ${name}\` to end it (the guest's unsaved state is lost).`,
    );
  }
}

function handle(ctx: HandlerContext, sock: net.Socket): void {
  const { log, inflight } = ctx;
  let buf = '';
  sock.setEncoding('utf8');
  sock.on('error', () => undefined);
  sock.on('data', (d: string) => {
    buf += d;
    const nl = buf.indexOf('\n');
    if (nl < 0) {
      if (buf.length > 1 << 16) sock.destroy();
      return;
    }
    const line = buf.slice(0, nl);
    buf = '';
    const answered = (async () => {
      let reply: Reply;
      try {
        const req = parseRequest(line);
        log(`request ${req.op}`);
        // Events (a migration's progress) go out as lines before the reply.
        const event = (e: unknown): void => {
          if (!sock.destroyed) sock.write(JSON.stringify({ event: e }) + '\n');
        };
        // The client going away mid-migration (Ctrl-C missed, kill -9 of `vmsnap migrate`) cancels
        // it: nobody would learn where the guest ended up otherwise.
        if (req.op === 'migrate') sock.once('close', () => ctx.migration?.abort());
        reply = { ok: true, result: await dispatch(ctx, req, event) };
      } catch (err) {
        const e = err as Error;
        log(`error: ${e.stack ?? e.message}`);
        reply = { ok: false, error: errorRecord(err) };
      }
      await new Promise<void>((res) => {
        if (sock.destroyed) return res();
        sock.once('close', () => res());
        sock.end(JSON.stringify(reply) + '\n');
      });
    })();
    inflight.add(answered);
    void answered.finally(() => inflight.delete(answered));
  });
}

/** A request line, checked: a client of another version or a stray writer gets a clear refusal. */
export function parseRequest(line: string): SupervisorRequest {
  let v: unknown;
  try {
    v = JSON.parse(line);
  } catch {
    throw new SupervisorError('malformed request (not JSON)');
  }
  const r = v as { op?: unknown; options?: unknown; snapshot?: unknown; fromOtherVm?: unknown; medium?: unknown; file?: unknown } | null;
  if (typeof r !== 'object' || r === null || typeof r.op !== 'string' || !OPS.has(r.op)) {
    throw new SupervisorError(`unknown request ${JSON.stringify(r?.op ?? null)}`);
  }
  if (r.op === 'take' && (typeof r.options !== 'object' || r.options === null)) throw new SupervisorError('take: options missing');
  if (r.op === 'restore' && typeof r.snapshot !== 'string') throw new SupervisorError('restore: snapshot missing');
  if (r.op === 'migrate') {
    const m = v as { target?: { host?: unknown; port?: unknown; fingerprint?: unknown }; options?: unknown };
    const t = m.target;
    if (!t || typeof t.host !== 'string' || typeof t.port !== 'number' || typeof t.fingerprint !== 'string' || typeof m.options !== 'object' || m.options === null) {
      throw new SupervisorError('migrate: target or options missing');
    }
  }
  if (r.op === 'media' && r.medium !== null && typeof r.medium !== 'string') throw new SupervisorError('media: medium missing');
  if (r.op === 'screendump' && (typeof r.file !== 'string' || !path.isAbsolute(r.file))) throw new SupervisorError('screendump: an absolute file path is needed');
  return r as SupervisorRequest;
}

/** The result of each request, with the type SupervisorOps gives it. */
async function dispatch(ctx: HandlerContext, req: SupervisorRequest, event: (e: unknown) => void): Promise<SupervisorOps[SupervisorOp]['result']> {
  const { rt, stop } = ctx;
  switch (req.op) {
    case 'status':
      return rt.status();
    case 'take':
      return rt.take(req.options);
    case 'restore':
      return rt.restore(req.snapshot, { fromOtherVm: req.fromOtherVm === true });
    case 'pause':
      await rt.pause();
      return null;
    case 'resume':
      await rt.resume();
      return null;
    case 'stop':
      setImmediate(stop);
      return { stopping: true };
    case 'migrate': {
      if (ctx.migration) throw new SupervisorError(`VM ${rt.def.name} is already being migrated`);
      const abort = new AbortController();
      ctx.migration = abort;
      try {
        const identity = await loadOrCreateIdentity(ctx.dataDir);
        const r = await rt.migrate(req.target, { ...req.options, identity, signal: abort.signal, onEvent: event });
        // The guest runs on the destination (the runtime marked this VM `departed` before COMMIT).
        const keep = req.options.keepSource === true;
        ctx.afterShutdown = async () => {
          if (keep) await fsp.rm(ctx.paths.departedMarker, { force: true });
          else await ctx.removeMoved(rt.def.name, ctx.log);
        };
        // This QEMU (postmigrate) and supervisor end once the departure snapshot is stored.
        void rt.departureStored.then(() => setImmediate(ctx.stop));
        return r;
      } finally {
        ctx.migration = null;
      }
    }
    case 'migrate-cancel': {
      const m = ctx.migration;
      m?.abort();
      return { cancelled: m !== null };
    }
    case 'media':
      await rt.changeMedium(req.medium);
      return null;
    case 'screendump':
      await rt.screendump(req.file);
      return null;
  }
}

/**
 * Sends one request to a VM's supervisor and returns its typed result. Throws SupervisorError when
 * it is not running or does not answer, and the supervisor's own error rebuilt as a RemoteError
 * (same name, message, step, user-facing and retryable verdicts) when the request failed there.
 */
export async function callSupervisor<K extends SupervisorOp>(
  paths: VmPaths,
  req: SupervisorRequest<K>,
  timeoutMs = 600_000,
  onEvent?: (e: unknown) => void,
): Promise<SupervisorOps[K]['result']> {
  type T = SupervisorOps[K]['result'];
  if (!existsSync(paths.supervisorSocket)) throw new SupervisorError(`VM ${path.basename(paths.dir)} is not running`);
  return new Promise<T>((resolve, reject) => {
    const sock = net.connect(paths.supervisorSocket);
    let buf = '';
    const timer = setTimeout(() => {
      sock.destroy();
      reject(new SupervisorError(`VM ${path.basename(paths.dir)}: no answer from its supervisor within ${timeoutMs} ms`));
    }, timeoutMs);
    sock.setEncoding('utf8');
    sock.on('connect', () => sock.write(JSON.stringify(req) + '\n'));
    sock.on('data', (d: string) => {
      buf += d;
      // Event lines (`{"event":…}`) precede the reply, which is the last line.
      for (let nl = buf.indexOf('\n'); nl >= 0 && buf.startsWith('{"event"'); nl = buf.indexOf('\n')) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        try {
          onEvent?.((JSON.parse(line) as { event: unknown }).event);
        } catch {
          // a damaged progress line is dropped; the reply decides the outcome
        }
      }
    });
    sock.on('error', (err: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      reject(new SupervisorError(err.code === 'ECONNREFUSED' || err.code === 'ENOENT' ? `VM ${path.basename(paths.dir)} is not running` : `supervisor: ${err.message}`));
    });
    sock.on('end', () => {
      clearTimeout(timer);
      try {
        const r = JSON.parse(buf) as Reply;
        if (r.ok === true) resolve(r.result as T);
        else if (r.ok === false && isErrorRecord(r.error)) reject(new RemoteError(r.error));
        else reject(new SupervisorError(`VM ${path.basename(paths.dir)}: the supervisor answered something this vmsnap does not understand (see ${paths.supervisorLog})`));
      } catch {
        reject(new SupervisorError(`VM ${path.basename(paths.dir)}: the supervisor closed the connection without an answer (see ${paths.supervisorLog})`));
      }
    });
  });
}

export async function isRunning(paths: VmPaths): Promise<boolean> {
  try {
    await callSupervisor(paths, { op: 'status' }, 5000);
    return true;
  } catch {
    return false;
  }
}

/** What `vm ls` / `vm show` report: the supervisor's own status, or what the processes say. */
export interface VmStatus extends Partial<Omit<RuntimeStatus, 'state'>> {
  /** QEMU's run state (running, paused, inmigrate, …) or shutoff | orphaned | unresponsive. */
  state: string;
  /** Set when something is wrong beyond the state: orphaned QEMUs, stale run files. */
  problem?: string;
}

export async function vmStatus(paths: VmPaths, name: string): Promise<VmStatus> {
  if (existsSync(paths.incomingMarker)) return { state: 'incoming', pid: null, problem: 'arriving by live migration: it runs once the migration commits' };
  const fromSupervisor = await callSupervisor(paths, { op: 'status' }, 5000).catch(() => null);
  const procs = await vmProcesses(paths, name);
  if (fromSupervisor) {
    const strays = procs.qemus.filter((p) => p !== fromSupervisor.pid);
    return strays.length ? { ...fromSupervisor, problem: `other QEMU process(es) of this VM are alive: ${strays.join(', ')}` } : fromSupervisor;
  }
  if (procs.supervisor) return { state: 'unresponsive', pid: procs.qemus[0] ?? null, problem: `supervisor pid ${procs.supervisor} does not answer (log: ${paths.supervisorLog})` };
  if (procs.qemus.length) return { state: 'orphaned', pid: procs.qemus[0]!, problem: `QEMU pid ${procs.qemus.join(', ')} runs without its supervisor (its disks are not served); \`vmsnap vm stop ${name}\` ends it` };
  if (procs.stalePidFile || existsSync(paths.supervisorSocket)) return { state: 'shutoff', pid: null, problem: 'stale run files: its supervisor died without cleaning up (the next start replaces them)' };
  return { state: 'shutoff', pid: null };
}

/**
 * Ends a VM whose supervisor cannot be asked to stop: an unresponsive supervisor gets SIGTERM then
 * SIGKILL (its QEMU dies with it), an orphaned QEMU SIGKILL. Returns the pids ended.
 */
export async function forceStop(paths: VmPaths, name: string): Promise<number[]> {
  const procs = await vmProcesses(paths, name);
  const ended: number[] = [];
  const kill = (pid: number, sig: NodeJS.Signals) => {
    try {
      process.kill(pid, sig);
    } catch {
      // gone already
    }
  };
  if (procs.supervisor) {
    kill(procs.supervisor, 'SIGTERM');
    if ((await waitExited([procs.supervisor], 15_000)).length) kill(procs.supervisor, 'SIGKILL');
    ended.push(procs.supervisor);
  }
  const qemus = procs.supervisor ? await waitExited(procs.qemus, 5000) : procs.qemus;
  for (const q of qemus) kill(q, 'SIGKILL');
  ended.push(...qemus);
  const left = await waitExited(ended, 10_000);
  if (left.length) throw new SupervisorError(`VM ${name}: process(es) ${left.join(', ')} did not exit after SIGKILL`);
  await fsp.rm(paths.supervisorSocket, { force: true });
  await fsp.rm(paths.supervisorPid, { force: true });
  return ended;
}

/**
 * Starts a VM's supervisor detached and waits until it answers (or dies: then its log tail is in
 * the error). `env` carries the repository location and password to the child.
 */
export async function spawnSupervisor(
  dataDir: string,
  name: string,
  opts: { restore?: string; restoreFromOtherVm?: boolean; hydrate?: number; env: NodeJS.ProcessEnv; timeoutMs?: number },
): Promise<void> {
  const paths = vmPaths(dataDir, name);
  await fsp.mkdir(paths.runDir, { recursive: true, mode: 0o700 });
  if (await isRunning(paths)) throw new SupervisorError(`VM ${name} is already running`);
  const incoming = await fsp.readFile(paths.incomingMarker, 'utf8').catch(() => null);
  if (incoming !== null) throw new SupervisorError(`VM ${name} is still arriving by live migration (worker pid ${incoming.trim()}); it runs once the migration commits, or disappears if it fails`);
  const departing = Number((await fsp.readFile(paths.departingMarker, 'utf8').catch(() => '')).trim());
  if (departing > 0 && processAlive(departing)) throw new SupervisorError(`VM ${name} is being moved to another host by a cold migration (pid ${departing}); it starts there, or again here if that fails`);
  const departed = await readDepartedMarker(paths);
  if (departed) throw new SupervisorError(`VM ${name} moved to ${departed.to}${departed.alive ? ' and is being removed here (its departure state is being stored)' : '; its removal here did not finish: `vmsnap vm rm ' + name + '` removes what is left here'}`);
  const procs = await vmProcesses(paths, name);
  if (procs.supervisor) throw new SupervisorError(`VM ${name}: its supervisor (pid ${procs.supervisor}) is alive but does not answer; \`vmsnap vm stop ${name}\` ends it (log: ${paths.supervisorLog})`);
  await refuseLeftovers(paths, name);
  await fsp.rm(paths.supervisorSocket, { force: true });
  const logFd = openSync(paths.supervisorLog, 'a');
  const bin = path.join(projectRoot(), 'bin', 'vmsnap.js');
  const args = [bin, '__supervise', name, ...(opts.restore ? ['--restore', opts.restore] : []), ...(opts.restoreFromOtherVm ? ['--from-other-vm'] : []), ...(opts.hydrate !== undefined ? ['--hydrate', String(opts.hydrate)] : [])];
  const child = spawn(process.execPath, args, {
    detached: true,
    stdio: ['ignore', logFd, logFd],
    // The NBD server's file I/O runs on libuv's thread pool: 4 threads (the default) cap a guest's
    // parallel random writes well below qemu-nbd's (bench/nbd/RESULTS.md).
    env: { UV_THREADPOOL_SIZE: '16', ...opts.env, VMSNAP_DATA_DIR: dataDir },
  });
  closeSync(logFd);
  let exited: number | null | undefined;
  child.once('exit', (code) => (exited = code));
  child.unref();
  const deadline = Date.now() + (opts.timeoutMs ?? 120_000);
  while (Date.now() < deadline) {
    if (exited !== undefined) break;
    if (existsSync(paths.supervisorSocket) && (await isRunning(paths))) return;
    await new Promise((r) => setTimeout(r, 50));
  }
  const logText = await readTail(paths.supervisorLog, 8192);
  const lastErr = logText.trim().split('\n').slice(-5).join(' | ');
  if (exited === undefined) child.kill('SIGKILL');
  throw new SupervisorError(`VM ${name} failed to start: ${lastErr || 'no output'} (log: ${paths.supervisorLog})`);
}

