/**
 * `vmsnap receive` (destination) and `vmsnap migrate` (source): live migration between paired
 * hosts (src/migration/). The work happens in the VM's supervisor on the source and in a worker
 * per connection on the destination; these commands start it, show its progress and say where the
 * guest runs when they end.
 */
import * as net from 'node:net';
import type { Command } from 'commander';
import { UsageError } from '../src/store/errors.js';
import { DEFAULT_MIGRATION_PORT, parseHostPort, startReceiver } from '../src/migration/receiver.js';
import { receiveOne } from '../src/migration/incoming.js';
import { loadOrCreateIdentity } from '../src/migration/identity.js';
import type { MigrationEvent } from '../src/migration/outgoing.js';
import { serveRuntime } from '../src/vm/supervisor.js';
import { cancelMigration, migrateVm, removeMovedVm, type Compression, type MigrateArgs } from '../src/ops/migrate.js';
import { dataDir, openRepository, supervisorEnv, vmOpsContext, type GlobalOptions } from './context.js';
import { humanBytes, printJson, progressSink } from './output.js';

type Globals = () => GlobalOptions;

interface MigrateFlags {
  pair?: string;
  keepSource?: boolean;
  maxDowntime: string;
  timeout: string;
  compress: string;
  departureSnapshot: boolean;
  wait?: boolean;
  cancel?: boolean;
  cold?: boolean;
}

export function registerMigrateCommands(program: Command, globals: Globals): void {
  program
    .command('receive')
    .description('accept VMs migrated from paired hosts (runs until stopped; each guest keeps running here after it arrives)')
    .option('--listen <addr:port>', `address to listen on`, `0.0.0.0:${DEFAULT_MIGRATION_PORT}`)
    .action(async (o: { listen: string }) => {
      const g = globals();
      const listen = parseHostPort(o.listen, '0.0.0.0', '--listen');
      const log = (m: string) => {
        if (!g.json) console.error(`vmsnap receive: ${m}`);
      };
      const r = await startReceiver({ dataDir: dataDir(), listen, env: await supervisorEnv(g), openRepo: () => openRepository(g), log });
      // One line: a long-running command's first output, read by whoever started it.
      if (g.json) process.stdout.write(JSON.stringify({ listening: `${r.address.host}:${r.address.port}`, fingerprint: r.fingerprint }) + '\n');
      else console.log(`listening on ${r.address.host}:${r.address.port}; this host's key: ${r.fingerprint}\n(pair from the source with: vmsnap peer add NAME --fingerprint ${r.fingerprint} --address HOST:${r.address.port})`);
      await new Promise<void>((resolve) => {
        const stop = () => void r.close().then(resolve);
        process.once('SIGINT', stop);
        process.once('SIGTERM', stop);
      });
    });

  program
    .command('__receive-one', { hidden: true })
    .action(async () => {
      const g = globals();
      const log = (m: string) => process.stderr.write(`${new Date().toISOString()} [${process.pid}] ${m}\n`);
      const sock = new net.Socket({ fd: 3, readable: true, writable: true });
      const received = await receiveOne(sock, { dataDir: dataDir(), identity: await loadOrCreateIdentity(dataDir()), openRepo: () => openRepository(g), log }).catch((err: Error) => {
        log(`incoming migration ended: ${err.message}`);
        return null;
      });
      if (!received) process.exit(1);
      // A stopped VM that arrived cold has nothing to serve: the worker's job is done.
      if (!received.runtime) process.exit(0);
      await serveRuntime(received.runtime, received.paths, dataDir(), log, (vm, warn) => removeMovedVm({ dataDir: dataDir(), openRepo: () => openRepository(g) }, vm, warn));
    });

  program
    .command('migrate <vm> [destination]')
    .description('move a VM to a paired host (HOST[:PORT] or a peer name): a running one live; with --cold, stopped and started there. If anything fails the VM stays here as it was')
    .option('--pair <fingerprint>', 'pin the destination key now (as `vmsnap peer add` would), e.g. the one `vmsnap receive` printed there')
    .option('--keep-source', 'keep the VM here, stopped, instead of removing it')
    .option('--cold', 'stop the VM (if it runs), ship its disks (only what the destination lacks) and start it there if it ran: for guests that cannot move live')
    .option('--max-downtime <ms>', 'longest guest pause to allow at switchover', '300')
    .option('--timeout <seconds>', 'give up (the guest keeps running here) when not done by then', '600')
    .option('--compress <codec>', 'auto, zstd, lz4 or none', 'auto')
    .option('--wait', 'return only once the state at departure is stored and the VM removed (or stopped, with --keep-source) here')
    .option('--no-departure-snapshot', 'do not keep the state at departure here (a return trip then sends everything)')
    .option('--cancel', 'cancel the migration of <vm> in progress')
    .action(async (name: string, dest: string | undefined, o: MigrateFlags) => {
      const g = globals();
      const ctx = vmOpsContext(g);
      if (o.cancel) {
        const cancelled = await cancelMigration(ctx, name);
        if (g.json) printJson({ cancelled });
        else console.log(cancelled ? `cancelling the migration of ${name}` : `VM ${name} is not being migrated`);
        return;
      }
      if (!dest) throw new UsageError('migrate: name the destination (HOST[:PORT] or a paired host), or give --cancel');
      const render = progressRenderer(g, name);
      // Ctrl-C cancels the migration (the guest keeps running here) instead of leaving it behind.
      const cancel = new AbortController();
      const onSigint = () => cancel.abort();
      process.on('SIGINT', onSigint);
      let r;
      try {
        r = await migrateVm(ctx, { vm: name, destination: dest, ...migrateArgs(o) }, progressSink('migrate', { bar: false, info: !g.quiet }), { onEvent: render, signal: cancel.signal });
      } finally {
        process.off('SIGINT', onSigint);
        render.end();
      }
      if (g.json) printJson(r);
      else {
        const where = r.destinationState === 'running' ? 'now runs on' : `is now on (${r.destinationState})`;
        console.log(
          `VM ${name} ${where} ${r.destination}: ${(r.totalMs / 1000).toFixed(1)} s` +
            (r.mode === 'live' ? `, guest paused ≈${r.pauseMs === null ? '?' : Math.round(r.pauseMs)} ms` : ', moved cold') +
            `, ${humanBytes(r.bytesSent)} sent, ${humanBytes(r.bytesSaved)} saved by references, zero blocks and compression` +
            (r.base ? ` (destination started from its snapshot ${r.base.slice(0, 12)})` : ''),
        );
        if (r.departure) console.log(`its state at departure is snapshot ${r.departure.slice(0, 12)} here (a return trip sends only what changed)`);
        if (r.departurePending) {
          console.log(`its state at departure is being stored here in the background (a return trip sends only what changed); then VM ${name} is ${r.kept ? 'kept here, stopped' : 'removed here (its snapshots stay in the repository)'}`);
        } else console.log(r.kept ? `VM ${name} stays here, stopped` : `VM ${name} removed here (its snapshots stay in the repository)`);
      }
    });
}

function migrateArgs(o: MigrateFlags): Omit<MigrateArgs, 'vm' | 'destination'> {
  const maxDowntimeMs = Number(o.maxDowntime);
  const timeoutS = Number(o.timeout);
  if (!Number.isFinite(maxDowntimeMs) || maxDowntimeMs < 10 || maxDowntimeMs > 60_000) throw new UsageError(`--max-downtime ${o.maxDowntime}: give milliseconds between 10 and 60000`);
  if (!Number.isFinite(timeoutS) || timeoutS < 1 || timeoutS > 86_400) throw new UsageError(`--timeout ${o.timeout}: give seconds between 1 and 86400`);
  if (!['auto', 'zstd', 'lz4', 'none'].includes(o.compress)) throw new UsageError(`--compress ${o.compress}: give auto, zstd, lz4 or none`);
  return {
    maxDowntimeMs,
    timeoutMs: timeoutS * 1000,
    compress: o.compress as Compression,
    departure: o.departureSnapshot,
    waitForDeparture: !!o.wait,
    keepSource: !!o.keepSource,
    cold: !!o.cold,
    ...(o.pair !== undefined ? { pair: o.pair } : {}),
  };
}

/** Progress on a terminal, phase lines otherwise, JSON event lines with --json. */
function progressRenderer(g: GlobalOptions, name: string): ((e: unknown) => void) & { end(): void } {
  const tty = process.stderr.isTTY && !g.json && !g.quiet;
  let lastPhase = '';
  let drew = false;
  const fn = ((raw: unknown) => {
    const e = raw as MigrationEvent;
    if (g.json) {
      process.stdout.write(JSON.stringify({ event: e }) + '\n');
      return;
    }
    if (g.quiet) return;
    const rate = (b: number) => `${humanBytes(b)}/s`;
    const line =
      `migrate ${name}: ${e.phase}` +
      (e.phase === 'ram' ? ` round ${e.round}, ${humanBytes(e.ramTransferred)} sent by QEMU, ${humanBytes(e.ramRemaining)} left, dirtying ${rate(e.dirtyRate)}` : '') +
      `, link ${rate(e.linkRate)}, ${humanBytes(e.bytesSent)} on the wire, ${humanBytes(e.bytesSaved)} saved` +
      (e.etaMs !== null ? `, ETA ${Math.ceil(e.etaMs / 1000)} s` : '');
    if (tty) {
      process.stderr.write(`\r\x1b[K${line}`);
      drew = true;
    } else if (e.phase !== lastPhase) console.error(line);
    lastPhase = e.phase;
  }) as ((e: unknown) => void) & { end(): void };
  fn.end = () => {
    if (drew) process.stderr.write('\n');
  };
  return fn;
}
