/**
 * Capturing and restoring guest RAM + device state through QEMU's migration machinery.
 *
 * Capture (source QEMU, running or stopped):
 *
 *   vmsnap                                   QEMU
 *   query-migrate-capabilities  ───────────▶ refuse if a format-changing capability is on
 *   migrate-set-capabilities    ───────────▶ background-snapshot (point-in-time, guest keeps running)
 *   migrate-set-parameters      ───────────▶ max-bandwidth raised (the 128 MiB/s default throttles)
 *   listen on RUN/mig.sock
 *   migrate {uri: unix:RUN/mig.sock} ──────▶
 *                                 ◀──────── connect, stream (parser.ts layout) …, close
 *   query-migrate (polled)      ───────────▶ completed | failed (+ total-time, downtime)
 *
 * Restore (destination QEMU started with `-incoming defer`):
 *
 *   migrate-incoming {uri: unix:RUN/in.sock, exit-on-error: false} → QEMU listens
 *   connect, write the rebuilt stream, close
 *   query-migrate / query-status (polled) until the destination leaves `inmigrate`
 *
 * With exit-on-error false a bad stream leaves QEMU up and query-migrate says why
 * (e.g. "Illegal RAM offset"), which we put in the error.
 */
import { promises as fsp } from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { parseMigrationStream, type MigStreamSink, type ParsedStream } from '../migstream/index.js';
import type { QmpClient } from './qmp.js';
import { UserFacingError } from '../util/errors.js';

/** The capabilities vmsnap turns on for a snapshot; none of them changes the stream format. */
export const VMSNAP_CAPABILITIES: readonly string[] = ['background-snapshot'];

/**
 * Capabilities that may be on without changing the layout the parser accepts. Anything else that
 * is on (xbzrle, multifd, mapped-ram, x-ignore-shared, postcopy-ram, return-path, dirty-bitmaps,
 * compression, …) makes capture refuse rather than produce an unparseable stream.
 */
export const FORMAT_NEUTRAL_CAPABILITIES: ReadonlySet<string> = new Set([
  'background-snapshot',
  'events',
  'auto-converge',
  'validate-uuid',
  'late-block-activate',
]);

/** Bandwidth cap for snapshots: effectively unlimited (QEMU's default is 128 MiB/s). */
export const SNAPSHOT_MAX_BANDWIDTH = 64 * 1024 * 1024 * 1024;

export type CaptureStep = 'check-capabilities' | 'configure' | 'listen' | 'migrate' | 'stream' | 'complete';
export type RestoreStep = 'check-state' | 'migrate-incoming' | 'connect' | 'send' | 'load';

export class SnapshotCaptureError extends UserFacingError {
  override readonly name = 'SnapshotCaptureError';
  constructor(
    readonly step: CaptureStep,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(`snapshot capture failed at ${step}: ${message}`, options);
  }
}

export class SnapshotRestoreError extends UserFacingError {
  override readonly name = 'SnapshotRestoreError';
  constructor(
    readonly step: RestoreStep,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(`snapshot restore failed at ${step}: ${message}`, options);
  }
}

interface MigrationCapability {
  capability: string;
  state: boolean;
}

export interface MigrationInfo {
  status?: string;
  'total-time'?: number;
  downtime?: number;
  'setup-time'?: number;
  'error-desc'?: string;
  ram?: { transferred?: number; total?: number; 'dirty-sync-count'?: number };
}

export interface CaptureOptions {
  /** 'background' (default): point-in-time snapshot, guest keeps running. 'precopy': ordinary
   *  live migration (pages resent while the guest runs, then a short stop). */
  mode?: 'background' | 'precopy';
  maxBandwidth?: number;
  /** Directory for the listening socket (a private temp dir is created inside). */
  socketDir?: string;
  timeoutMs?: number;
  pollMs?: number;
  /**
   * Runs after everything that can be prepared is (capabilities, parameters, listening socket) and
   * immediately before `migrate`: the caller pauses the guest and freezes its disks here, so the
   * pause covers only migrate's own setup (see vm-runtime.ts).
   */
  beforeMigrate?: () => Promise<void>;
}

export interface CaptureResult extends ParsedStream {
  qemu: {
    status: string;
    totalTimeMs: number | undefined;
    downtimeMs: number | undefined;
    setupTimeMs: number | undefined;
    ramTransferred: number | undefined;
  };
  wallMs: number;
}

const TERMINAL = new Set(['completed', 'failed', 'cancelled']);
/** After a write error, how long QEMU gets to report its own reason before we report the write error. */
const SEND_ERROR_GRACE_MS = 10_000;

/** Refuses (with the list) when a capability that changes the stream format is on. */
export async function checkMigrationCapabilities(qmp: QmpClient): Promise<void> {
  const caps = await qmp.execute<MigrationCapability[]>('query-migrate-capabilities');
  const bad = caps.filter((c) => c.state && !FORMAT_NEUTRAL_CAPABILITIES.has(c.capability)).map((c) => c.capability);
  if (bad.length > 0) {
    throw new SnapshotCaptureError(
      'check-capabilities',
      `migration capabilities [${bad.join(', ')}] are on; they change the stream format vmsnap parses — turn them off`,
    );
  }
}

async function privateDir(parent: string | undefined, prefix: string): Promise<string> {
  return fsp.mkdtemp(path.join(parent ?? os.tmpdir(), prefix));
}

/**
 * Takes a snapshot of the QEMU behind `qmp`: streams the parsed RAM records into `sink` (the
 * prefix first), returns the verbatim prefix/suffix, stream statistics and QEMU's timings.
 */
export async function captureSnapshot(qmp: QmpClient, sink: MigStreamSink, opts: CaptureOptions = {}): Promise<CaptureResult> {
  const t0 = performance.now();
  const mode = opts.mode ?? 'background';
  const timeoutMs = opts.timeoutMs ?? 600_000;
  const pollMs = opts.pollMs ?? 50;
  const step = async <T>(s: CaptureStep, f: () => Promise<T>): Promise<T> => {
    try {
      return await f();
    } catch (e) {
      if (e instanceof SnapshotCaptureError) throw e;
      throw new SnapshotCaptureError(s, (e as Error).message, { cause: e });
    }
  };

  await step('check-capabilities', () => checkMigrationCapabilities(qmp));
  await step('configure', async () => {
    const st = await qmp.execute<MigrationInfo>('query-migrate');
    if (st.status && !TERMINAL.has(st.status) && st.status !== 'none') {
      throw new Error(`a migration is already in progress (status ${st.status})`);
    }
    await qmp.execute('migrate-set-capabilities', {
      capabilities: [
        { capability: 'background-snapshot', state: mode === 'background' },
        { capability: 'events', state: true },
      ],
    });
    await qmp.execute('migrate-set-parameters', { 'max-bandwidth': opts.maxBandwidth ?? SNAPSHOT_MAX_BANDWIDTH });
  });

  const dir = await step('listen', () => privateDir(opts.socketDir, 'vmsnap-mig-'));
  const sockPath = path.join(dir, 'mig.sock');
  const server = net.createServer();
  let conn: net.Socket | undefined;
  let stopPoll = false;
  try {
    await step(
      'listen',
      () =>
        new Promise<void>((res, rej) => {
          server.once('error', rej);
          server.listen(sockPath, () => {
            server.off('error', rej);
            server.on('error', () => undefined);
            res();
          });
        }),
    );
    const accepted = new Promise<net.Socket>((res) => server.once('connection', res));

    // Watches for QEMU giving up (or the deadline) while we wait for / read the stream.
    let failure: ((e: Error) => void) | undefined;
    const failed = new Promise<never>((_, rej) => (failure = rej));
    failed.catch(() => undefined);
    const deadline = Date.now() + timeoutMs;
    // Until `migrate` returns, query-migrate still reports the previous migration: a take after a
    // cancelled one would read that old 'cancelled' and fail itself.
    let migrateIssued = false;
    const poll = (async (): Promise<void> => {
      while (!stopPoll) {
        await new Promise((r) => setTimeout(r, pollMs));
        if (stopPoll) return;
        let st: MigrationInfo;
        try {
          st = await qmp.execute<MigrationInfo>('query-migrate');
        } catch (e) {
          failure?.(new SnapshotCaptureError('stream', `QEMU stopped answering: ${(e as Error).message}`, { cause: e }));
          return;
        }
        if (migrateIssued && (st.status === 'failed' || st.status === 'cancelled')) {
          failure?.(new SnapshotCaptureError('stream', `QEMU reports migration ${st.status}: ${st['error-desc'] ?? 'no reason given'}`));
          return;
        }
        if (Date.now() > deadline) {
          failure?.(new SnapshotCaptureError('stream', `no completion within ${timeoutMs} ms`));
          return;
        }
      }
    })();

    if (opts.beforeMigrate) await step('migrate', opts.beforeMigrate);
    await step('migrate', () => qmp.execute('migrate', { uri: `unix:${sockPath}` }));
    migrateIssued = true;
    let parsed: ParsedStream;
    try {
      conn = await Promise.race([accepted, failed]);
      const parsing = parseMigrationStream(conn, sink);
      // If QEMU's failure wins the race, the parse still ends (socket destroyed below): not unhandled.
      parsing.catch(() => undefined);
      parsed = await Promise.race([parsing, failed]);
    } catch (e) {
      await qmp.execute('migrate_cancel').catch(() => undefined);
      if (e instanceof SnapshotCaptureError) throw e;
      throw new SnapshotCaptureError('stream', (e as Error).message, { cause: e });
    } finally {
      stopPoll = true;
      await poll;
    }

    const fin = await step('complete', async () => {
      for (;;) {
        const st = await qmp.execute<MigrationInfo>('query-migrate');
        if (st.status === 'completed') return st;
        if (st.status === 'failed' || st.status === 'cancelled') {
          throw new Error(`QEMU reports migration ${st.status}: ${st['error-desc'] ?? 'no reason given'}`);
        }
        if (Date.now() > deadline) throw new Error(`status still ${st.status} after ${timeoutMs} ms`);
        await new Promise((r) => setTimeout(r, pollMs));
      }
    });
    return {
      ...parsed,
      qemu: {
        status: fin.status ?? 'completed',
        totalTimeMs: fin['total-time'],
        downtimeMs: fin.downtime,
        setupTimeMs: fin['setup-time'],
        ramTransferred: fin.ram?.transferred,
      },
      wallMs: performance.now() - t0,
    };
  } finally {
    stopPoll = true;
    conn?.destroy();
    await new Promise<void>((r) => server.close(() => r()));
    await fsp.rm(dir, { recursive: true, force: true });
  }
}

export interface RestoreOptions {
  /**
   * QEMU's log file (QemuProcess.paths.qemuLog). QEMU reports the precise reason for a rejected
   * stream ("Can't find block …") only there; what it logged during the restore goes into the error.
   */
  qemuLog?: string;
  socketDir?: string;
  timeoutMs?: number;
  pollMs?: number;
}

export interface RestoreResult {
  /** Run state after loading: 'running' after a background/live snapshot, 'paused' from a stopped source. */
  runState: string;
  loadMs: number;
  migration: MigrationInfo;
}

/**
 * Feeds `stream` to a QEMU started with `-incoming defer` and waits until it has loaded it.
 */
export async function restoreFromStream(
  qmp: QmpClient,
  stream: Readable | AsyncIterable<Uint8Array> | Iterable<Uint8Array>,
  opts: RestoreOptions = {},
): Promise<RestoreResult> {
  const t0 = performance.now();
  const timeoutMs = opts.timeoutMs ?? 600_000;
  const pollMs = opts.pollMs ?? 20;
  const deadline = Date.now() + timeoutMs;
  const wrap = (s: RestoreStep, e: unknown): SnapshotRestoreError =>
    e instanceof SnapshotRestoreError ? e : new SnapshotRestoreError(s, (e as Error).message, { cause: e });

  let status: { status: string };
  try {
    status = await qmp.execute<{ status: string }>('query-status');
  } catch (e) {
    throw wrap('check-state', e);
  }
  if (status.status !== 'inmigrate') {
    throw new SnapshotRestoreError(
      'check-state',
      `destination QEMU is '${status.status}', not 'inmigrate' (start it with -incoming defer)`,
    );
  }
  const logStart = opts.qemuLog ? await fileSize(opts.qemuLog) : 0;
  const logSince = async (): Promise<string> => {
    if (!opts.qemuLog) return '';
    const t = (await readFrom(opts.qemuLog, logStart)).trim();
    return t ? ` (QEMU log: ${t.slice(-2000)})` : '';
  };
  const dir = await privateDir(opts.socketDir, 'vmsnap-in-');
  const sockPath = path.join(dir, 'in.sock');
  let sock: net.Socket | undefined;
  try {
    try {
      await qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'events', state: true }] });
      await qmp.execute('migrate-incoming', { uri: `unix:${sockPath}`, 'exit-on-error': false });
    } catch (e) {
      throw wrap('migrate-incoming', e);
    }
    try {
      sock = await connectRetry(sockPath, Math.min(timeoutMs, 30_000));
    } catch (e) {
      throw wrap('connect', e);
    }
    sock.on('error', () => undefined); // surfaced through pipeline() or QEMU's own report
    let sendErr: unknown;
    let sendErrAt = 0;
    // A QEMU that stops reading would otherwise block the write forever.
    const sendTimer = setTimeout(
      () => sock?.destroy(new Error(`stream not consumed within ${timeoutMs} ms`)),
      Math.max(0, deadline - Date.now()),
    );
    try {
      await pipeline(stream instanceof Readable ? stream : Readable.from(stream, { objectMode: false }), sock);
    } catch (e) {
      // QEMU closes its end when it rejects the stream; its own reason is more useful than EPIPE.
      sendErr = e;
      sendErrAt = Date.now();
    } finally {
      clearTimeout(sendTimer);
    }
    let mig: MigrationInfo;
    for (;;) {
      try {
        mig = await qmp.execute<MigrationInfo>('query-migrate');
        status = await qmp.execute<{ status: string }>('query-status');
      } catch (e) {
        throw wrap('load', e);
      }
      if (mig.status === 'failed' || mig.status === 'cancelled') {
        const why = `${mig['error-desc'] ?? mig.status}${await logSince()}`;
        throw new SnapshotRestoreError('load', `QEMU rejected the stream: ${why}`, {
          cause: sendErr,
        });
      }
      if (mig.status === 'completed' && status.status !== 'inmigrate') break;
      if (sendErr !== undefined && Date.now() - sendErrAt > SEND_ERROR_GRACE_MS) throw wrap('send', sendErr);
      if (Date.now() > deadline) {
        throw new SnapshotRestoreError('load', `still ${mig.status}/${status.status} after ${timeoutMs} ms`);
      }
      await new Promise((r) => setTimeout(r, pollMs));
    }
    return { runState: status.status, loadMs: performance.now() - t0, migration: mig };
  } finally {
    sock?.destroy();
    await fsp.rm(dir, { recursive: true, force: true });
  }
}

async function connectRetry(p: string, timeoutMs: number): Promise<net.Socket> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      return await new Promise<net.Socket>((res, rej) => {
        const s = net.createConnection({ path: p });
        s.once('error', (e) => {
          s.destroy();
          rej(e);
        });
        s.once('connect', () => {
          s.removeAllListeners('error');
          res(s);
        });
      });
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if ((code !== 'ENOENT' && code !== 'ECONNREFUSED') || Date.now() > deadline) throw e;
      await new Promise((r) => setTimeout(r, 20));
    }
  }
}

async function fileSize(f: string): Promise<number> {
  try {
    return (await fsp.stat(f)).size;
  } catch {
    return 0;
  }
}

async function readFrom(f: string, start: number): Promise<string> {
  try {
    const b = await fsp.readFile(f);
    return b.subarray(Math.min(start, b.length)).toString('utf8');
  } catch {
    return '';
  }
}
