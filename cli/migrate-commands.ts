/**
 * `vmsnap receive` (destination) and `vmsnap migrate` (source): live migration between paired
 * hosts (src/migration/). The work happens in the VM's supervisor on the source and in a worker
 * per connection on the destination; these commands start it, show its progress and say where the
 * guest runs when they end.
 */
import * as net from 'node:net';
import type { Command } from 'commander';
import { UsageError } from '../src/store/errors.js';
import { addPeer, isFingerprint, listPeers, type Peer } from '../src/migration/identity.js';
import { DEFAULT_MIGRATION_PORT, parseHostPort, startReceiver } from '../src/migration/receiver.js';
import { receiveOne } from '../src/migration/incoming.js';
import { loadOrCreateIdentity } from '../src/migration/identity.js';
import type { MigrationEvent, MigrateTarget } from '../src/migration/outgoing.js';
import { callSupervisor, isRunning, serveRuntime, type MigrateRequestOptions } from '../src/vm/supervisor.js';
import { loadDefinition, vmPaths } from '../src/vm/config.js';
import { vmProcesses, waitExited } from '../src/vm/processes.js';
import { dataDir, openRepository, supervisorEnv, type GlobalOptions } from './context.js';
import { humanBytes, printJson } from './output.js';
import { removeStoppedVm } from './vm-commands.js';

type Globals = () => GlobalOptions;

interface MigrateFlags {
  pair?: string;
  keepSource?: boolean;
  maxDowntime: string;
  timeout: string;
  compress: string;
  departureSnapshot: boolean;
  cancel?: boolean;
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
      await serveRuntime(received.runtime, received.paths, dataDir(), log);
    });

  program
    .command('migrate <vm> [destination]')
    .description('move a running VM to a paired host (HOST[:PORT] or a peer name); if anything fails the guest keeps running here')
    .option('--pair <fingerprint>', 'pin the destination key now (as `vmsnap peer add` would), e.g. the one `vmsnap receive` printed there')
    .option('--keep-source', 'keep the VM here, stopped, instead of removing it')
    .option('--max-downtime <ms>', 'longest guest pause to allow at switchover', '300')
    .option('--timeout <seconds>', 'give up (the guest keeps running here) when not done by then', '600')
    .option('--compress <codec>', 'auto, zstd, lz4 or none', 'auto')
    .option('--no-departure-snapshot', 'do not keep the state at departure here (a return trip then sends everything)')
    .option('--cancel', 'cancel the migration of <vm> in progress')
    .action(async (name: string, dest: string | undefined, o: MigrateFlags) => {
      const g = globals();
      const paths = vmPaths(dataDir(), name);
      await loadDefinition(dataDir(), name);
      if (o.cancel) {
        const r = await callSupervisor(paths, { op: 'migrate-cancel' });
        if (g.json) printJson(r);
        else console.log(r.cancelled ? `cancelling the migration of ${name}` : `VM ${name} is not being migrated`);
        return;
      }
      if (!dest) throw new UsageError('migrate: name the destination (HOST[:PORT] or a paired host), or give --cancel');
      const options = migrateOptions(o);
      const { target, pinOnSuccess } = await resolveTarget(dest, o.pair);
      if (!(await isRunning(paths))) throw new UsageError(`VM ${name} is not running: live migration moves a running guest (start it, or use \`vmsnap copy\` for its snapshots)`);
      const render = progressRenderer(g, name);
      // Ctrl-C cancels the migration (the guest keeps running here) instead of leaving it behind.
      const onSigint = () => void callSupervisor(paths, { op: 'migrate-cancel' }).catch(() => undefined);
      process.on('SIGINT', onSigint);
      let r;
      try {
        r = await callSupervisor(paths, { op: 'migrate', target, options }, options.timeoutMs! + 300_000, render);
      } finally {
        process.off('SIGINT', onSigint);
        render.end();
      }
      // The key proved itself in the handshake of a migration that worked: now it is pinned.
      if (pinOnSuccess) await addPeer(dataDir(), pinOnSuccess).catch((err: Error) => console.error(`vmsnap: warning: could not pin ${pinOnSuccess.fingerprint}: ${err.message}`));
      // The supervisor stops its QEMU (postmigrate) and exits; then the VM goes unless kept.
      const procs = await vmProcesses(paths, name);
      await waitExited([procs.supervisor, ...procs.qemus].filter((p): p is number => typeof p === 'number'), 60_000);
      if (!o.keepSource) await removeStoppedVm(g, name);
      if (g.json) printJson({ vm: name, destination: `${target.host}:${target.port}`, kept: !!o.keepSource, ...r });
      else {
        console.log(
          `VM ${name} now runs on ${target.host}:${target.port}: ${(r.totalMs / 1000).toFixed(1)} s, guest paused ≈${r.pauseMs === null ? '?' : Math.round(r.pauseMs)} ms, ` +
            `${humanBytes(r.bytesSent)} sent, ${humanBytes(r.bytesSaved)} saved by references, zero blocks and compression` +
            (r.base ? ` (destination started from its snapshot ${r.base.slice(0, 12)})` : ''),
        );
        if (r.departure) console.log(`its state at departure is snapshot ${r.departure.slice(0, 12)} here (a return trip sends only what changed)`);
        if (r.departureError) console.error(`vmsnap: warning: the departure snapshot failed: ${r.departureError}`);
        console.log(o.keepSource ? `VM ${name} stays here, stopped` : `VM ${name} removed here (its snapshots stay in the repository)`);
      }
    });
}

function migrateOptions(o: MigrateFlags): MigrateRequestOptions {
  const maxDowntimeMs = Number(o.maxDowntime);
  const timeoutS = Number(o.timeout);
  if (!Number.isFinite(maxDowntimeMs) || maxDowntimeMs < 10 || maxDowntimeMs > 60_000) throw new UsageError(`--max-downtime ${o.maxDowntime}: give milliseconds between 10 and 60000`);
  if (!Number.isFinite(timeoutS) || timeoutS < 1 || timeoutS > 86_400) throw new UsageError(`--timeout ${o.timeout}: give seconds between 1 and 86400`);
  if (!['auto', 'zstd', 'lz4', 'none'].includes(o.compress)) throw new UsageError(`--compress ${o.compress}: give auto, zstd, lz4 or none`);
  return { maxDowntimeMs, timeoutMs: timeoutS * 1000, compress: o.compress as MigrateRequestOptions['compress'], departure: o.departureSnapshot };
}

/**
 * A peer name, or HOST[:PORT] whose key is pinned (`peer add`), or given now (`--pair`: used for
 * this connection, pinned only once a migration with it has worked — a mistyped key must not stay).
 */
async function resolveTarget(dest: string, pair: string | undefined): Promise<{ target: MigrateTarget; pinOnSuccess?: Omit<Peer, 'added'> }> {
  const peers = await listPeers(dataDir());
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
