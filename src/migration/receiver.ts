/**
 * `vmsnap receive`: accepts migration connections and hands each to its own worker process
 * (`vmsnap __receive-one`, incoming.ts), which receives the guest and then stays as its supervisor.
 * The acceptor itself never reads a byte of a connection (pauseOnConnect): the socket is passed to
 * the worker as file descriptor 3, so a slow or hostile peer can hold one worker at most, and the
 * acceptor can exit while migrated guests keep running.
 */
import { spawn } from 'node:child_process';
import { closeSync, openSync } from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { projectRoot } from '../util/project.js';
import { UserFacingError } from '../util/errors.js';
import { loadOrCreateIdentity } from './identity.js';
import { sweepAbandonedIncoming } from './incoming.js';
import type { Repository } from '../store/repository.js';

export const DEFAULT_MIGRATION_PORT = 7780;
/** Workers alive at once: more connections wait in the listen backlog. */
const MAX_WORKERS = 4;

export class ReceiveError extends UserFacingError {
  override readonly name = 'ReceiveError';
}

export interface Listen {
  host: string;
  port: number;
}

/** Parses `ADDR:PORT`, `[v6]:PORT`, `ADDR` or `:PORT`. */
export function parseHostPort(s: string, defaultHost: string, what: string): Listen {
  const m = /^(?:\[([^\]]+)\]|([^:]*))(?::(\d+))?$/.exec(s);
  const port = m?.[3] !== undefined ? Number(m[3]) : DEFAULT_MIGRATION_PORT;
  if (!m || !Number.isInteger(port) || port < 0 || port > 65535) throw new ReceiveError(`${what} ${JSON.stringify(s)} is not HOST[:PORT] with a port of 0-65535 (0: any free port)`);
  return { host: m[1] ?? (m[2] || defaultHost), port };
}

export interface ReceiverOptions {
  dataDir: string;
  listen: Listen;
  /** Environment of the workers (repository location and password reach them here, never argv). */
  env: NodeJS.ProcessEnv;
  openRepo: () => Promise<Repository>;
  log: (msg: string) => void;
}

export interface Receiver {
  fingerprint: string;
  address: Listen;
  close(): Promise<void>;
}

export async function startReceiver(o: ReceiverOptions): Promise<Receiver> {
  const id = await loadOrCreateIdentity(o.dataDir);
  const repo = await o.openRepo().catch(() => null);
  await sweepAbandonedIncoming(o.dataDir, repo, o.log);
  await repo?.close();
  let workers = 0;
  const server = net.createServer({ pauseOnConnect: true }, (sock) => {
    if (workers >= MAX_WORKERS) {
      o.log(`refused a connection from ${sock.remoteAddress ?? '?'}: ${MAX_WORKERS} migrations already in progress`);
      sock.destroy();
      return;
    }
    const logFd = openSync(path.join(o.dataDir, 'receive.log'), 'a', 0o600);
    const child = spawn(process.execPath, [path.join(projectRoot(), 'bin', 'vmsnap.js'), '__receive-one'], {
      detached: true,
      stdio: ['ignore', logFd, logFd, sock],
      env: { UV_THREADPOOL_SIZE: '16', ...o.env, VMSNAP_DATA_DIR: o.dataDir },
    });
    closeSync(logFd);
    // The worker has its own copy of the connection now; ours is closed without a shutdown.
    sock.destroy();
    workers++;
    child.once('exit', () => workers--);
    child.once('error', (err) => o.log(`worker failed to start: ${err.message}`));
    child.unref();
    o.log(`connection from ${sock.remoteAddress ?? '?'}: worker pid ${child.pid ?? '?'}`);
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', (err: NodeJS.ErrnoException) =>
      reject(new ReceiveError(err.code === 'EADDRINUSE' ? `${o.listen.host}:${o.listen.port} is already in use (another \`vmsnap receive\`?)` : `cannot listen on ${o.listen.host}:${o.listen.port}: ${err.message}`)),
    );
    server.listen(o.listen.port, o.listen.host, () => resolve());
  });
  const addr = server.address() as net.AddressInfo;
  return {
    fingerprint: id.fingerprint,
    address: { host: o.listen.host, port: addr.port },
    close: () => new Promise<void>((r) => server.close(() => r())),
  };
}
