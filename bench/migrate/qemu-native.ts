/**
 * bench/migrate/qemu-native: QEMU's own live migration of the fixture guest WITH its local disk,
 * the way Proxmox (PVE/QemuMigrate.pm) and libvirt (qemu_migration.c) do it, between two network
 * namespaces. The measurements are bench/migrate/common.ts's, shared with any other method.
 *
 *   npx tsx bench/migrate/qemu-native.ts [--profile proxmox|libvirt|proxmox,libvirt] [--link-mbit 1000] [--runs 1]
 *        [--mem-mib 1024] [--workload-mib 256] [--rate 12800] [--disk-gib 4] [--data-gib 1] ...
 *
 * Sequence (source QEMU in A, destination QEMU in B):
 *   B  start QEMU `-incoming defer -S` on a blank raw disk (node disk0)
 *   B  nbd-server-start B:10809; block-export-add disk0 writable      (the mirror's target)
 *   B  migrate-set-capabilities (as A); migrate-incoming tcp:B:4444
 *   A  blockdev-add nbd client node → B:10809/disk0
 *   A  blockdev-mirror disk0 → nbd, sync full; wait for READY             ← total time starts
 *   A  [proxmox] block-job-change copy-mode write-blocking; wait actively-synced
 *   A  migrate-set-capabilities / -parameters (profile); migrate tcp:B:4444
 *   A  poll query-migrate; [proxmox] double downtime-limit after 5 stalled seconds (cap 2000 ms)
 *   A  completed (A paused) → block-job-cancel mirror (READY: completes, target consistent)
 *   A  blockdev-del the nbd node;  B  nbd-server-stop; cont; query-status running     ← total time ends
 * Profiles (what each tool sets when the user sets nothing):
 *   proxmox  auto-converge + xbzrle (cache 10% of RAM), downtime-limit 100 ms (migrate_downtime
 *            0.1 s) doubled while stalled, max-bandwidth 16 GiB/s, mirror switched to active mode
 *            (QEMU >= 8.2)
 *   libvirt  no capabilities, QEMU's downtime-limit (300 ms), max-bandwidth unlimited, mirror in
 *            background copy mode (no VIR_MIGRATE_NON_SHARED_SYNCHRONOUS_WRITES)
 * On --timeout-s: migrate_cancel, block-job-cancel --force, the guest stays on A; the run is
 * reported failed ("did not converge").
 */
import * as path from 'node:path';
import { QmpClient, type QmpEvent } from '../../src/hypervisor/qmp.js';
import { BenchUsageError, blankDisk, Console, parseScenarioArgs, qemuArgv, runBench, sleep, type Leg, type MigrationMethod, type MigrationOutcome, type ScenarioContext, type SourceGuest } from './common.js';
import type { NetnsPair, Side } from '../../test/helpers/netns.js';
import { openSync, closeSync } from 'node:fs';

const MIGRATION_PORT = 4444;
const NBD_PORT = 10809;
const MIRROR_JOB = 'mirror0';

export type Profile = 'proxmox' | 'libvirt';

interface QemuHost {
  qmp: QmpClient;
  console: Console;
  pid: number;
}

interface MigrateInfo {
  status: string;
  'total-time'?: number;
  downtime?: number;
  'setup-time'?: number;
  'expected-downtime'?: number;
  'error-desc'?: string;
  ram?: { transferred: number; remaining: number; total: number; mbps: number; 'dirty-sync-count': number; 'dirty-pages-rate'?: number };
  'xbzrle-cache'?: { bytes: number; pages: number; 'cache-miss-rate': number };
  'cpu-throttle-percentage'?: number;
}

interface BlockJobInfo {
  device: string;
  ready: boolean;
  status: string;
  len: number;
  offset: number;
  'actively-synced'?: boolean;
}

/** Starts a fixture-guest QEMU inside `side`'s namespace, its log in dir/<name>.log; QMP and console connected. */
async function startQemu(pair: NetnsPair, side: Side, dir: string, name: string, argvOf: (s: { qmp: string; serial: string }) => string[]): Promise<QemuHost> {
  const socks = { qmp: path.join(dir, `${name}.qmp`), serial: path.join(dir, `${name}.serial`) };
  const log = openSync(path.join(dir, `${name}.log`), 'w');
  const child = pair.spawn(side, 'qemu-system-x86_64', argvOf(socks), { stdio: ['ignore', log, log] });
  closeSync(log);
  const exited = new AbortController();
  child.on('exit', (code, sig) => exited.abort(`QEMU ${name} exited (${code ?? sig})`));
  const qmp = await QmpClient.connect(socks.qmp, { timeoutMs: 30_000, signal: exited.signal });
  const console = await Console.socket(socks.serial);
  return { qmp, console, pid: child.pid ?? -1 };
}

async function poll<T>(what: string, timeoutMs: number, fn: () => Promise<T | undefined>, everyMs = 100): Promise<T> {
  const deadline = performance.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v !== undefined) return v;
    if (performance.now() > deadline) throw new Error(`${what}: not within ${Math.round(timeoutMs / 1000)} s`);
    await sleep(everyMs);
  }
}

export function nativeMethod(profile: Profile): MigrationMethod {
  const srcOf = new WeakMap<SourceGuest, QemuHost>();
  return {
    name: `qemu-native-${profile}`,

    async startSource(ctx: ScenarioContext): Promise<SourceGuest> {
      const h = await startQemu(ctx.pair, 'a', ctx.dir, 'source', (s) => qemuArgv(ctx.guest, ctx.guest.disk, s));
      const src = { console: h.console };
      srcOf.set(src, h);
      return src;
    },

    async migrate(ctx: ScenarioContext, src: SourceGuest, leg: Leg): Promise<MigrationOutcome> {
      // `a` is the leg's source and `b` its destination, whichever hosts they are.
      const a = srcOf.get(src)!;
      const { pair, params: p, dir } = ctx;
      const B = pair.addr[leg.to];
      const tgtDisk = path.join(dir, `leg${leg.index}-target.raw`);
      await blankDisk(p, tgtDisk);
      const b = await startQemu(pair, leg.to, dir, `leg${leg.index}-destination`, (s) => qemuArgv(ctx.guest, tgtDisk, s, ['-incoming', 'defer', '-S']));
      const t0 = performance.now();
      const ms = () => Math.round(performance.now() - t0);
      const phases: Record<string, number> = {};
      // QEMU stamps its events with the host's wall clock: the source's last STOP and the
      // destination's RESUME bound the time no vCPU ran anywhere, whatever the guest's own load.
      const evUs = (e: QmpEvent) => e.timestamp.seconds * 1e6 + e.timestamp.microseconds;
      let stopUs = NaN;
      let resumeUs = NaN;
      a.qmp.events.on('STOP', (e: QmpEvent) => (stopUs = evUs(e)));
      b.qmp.events.on('RESUME', (e: QmpEvent) => (resumeUs = evUs(e)));

      // Capabilities must agree on both ends (xbzrle pages are only decoded when both have it on).
      const caps = profile === 'proxmox' ? ['auto-converge', 'xbzrle'] : [];
      const capList = caps.map((capability) => ({ capability, state: true }));
      if (capList.length) {
        await a.qmp.execute('migrate-set-capabilities', { capabilities: capList });
        await b.qmp.execute('migrate-set-capabilities', { capabilities: capList });
      }
      await b.qmp.execute('nbd-server-start', { addr: { type: 'inet', data: { host: B, port: String(NBD_PORT) } } });
      await b.qmp.execute('block-export-add', { type: 'nbd', id: 'exp0', 'node-name': 'disk0', name: 'disk0', writable: true });
      await b.qmp.execute('migrate-incoming', { uri: `tcp:${B}:${MIGRATION_PORT}` });

      await a.qmp.execute('blockdev-add', { driver: 'nbd', 'node-name': 'mirror-target', server: { type: 'inet', host: B, port: String(NBD_PORT) }, export: 'disk0' });
      await a.qmp.execute('blockdev-mirror', { 'job-id': MIRROR_JOB, device: 'disk0', target: 'mirror-target', sync: 'full' });
      let mirrorLen = 0;
      const jobs = () => a.qmp.execute<BlockJobInfo[]>('query-block-jobs');
      await poll('mirror READY', p.timeoutS * 1000, async () => {
        const j = (await jobs()).find((x) => x.device === MIRROR_JOB);
        if (!j) throw new Error('mirror job vanished before READY');
        mirrorLen = j.len;
        return j.ready ? j : undefined;
      }, 200);
      phases.mirror_ready_ms = ms();
      if (profile === 'proxmox') {
        await a.qmp.execute('block-job-change', { id: MIRROR_JOB, type: 'mirror', 'copy-mode': 'write-blocking' });
        await poll('mirror actively synced', 60_000, async () => ((await jobs()).find((x) => x.device === MIRROR_JOB)?.['actively-synced'] ? true : undefined));
        phases.mirror_active_ms = ms();
      }

      let downtimeLimit = profile === 'proxmox' ? 100 : 300;
      const migParams: Record<string, unknown> = { 'downtime-limit': downtimeLimit, 'max-bandwidth': profile === 'proxmox' ? 16 * 2 ** 30 : 2 ** 53 - 1 };
      if (profile === 'proxmox') migParams['xbzrle-cache-size'] = 2 ** Math.round(Math.log2((p.memMiB * 2 ** 20) / 10));
      await a.qmp.execute('migrate-set-parameters', migParams);
      await a.qmp.execute('migrate', { uri: `tcp:${B}:${MIGRATION_PORT}` });
      phases.migrate_start_ms = ms();

      // Proxmox's stall rule: once per second, count a poll whose remaining grew or is 0; after 5, double the limit.
      let last: MigrateInfo | undefined;
      let lastRem: number | undefined;
      let stalled = 0;
      let nextCheck = performance.now() + 1000;
      const limits: Array<[number, number]> = [[0, downtimeLimit]];
      // [ms, remaining MB, Mbit/s, dirty MB/s, syncs, throttle %], one every 5 s (also on stderr).
      const trace: number[][] = [];
      let nextTrace = performance.now() + 5000;
      try {
        last = await poll('migration completed', p.timeoutS * 1000 - ms(), async () => {
          const st = await a.qmp.execute<MigrateInfo>('query-migrate');
          if (st.status === 'completed') return st;
          if (st.status === 'failed' || st.status === 'cancelled') throw new Error(`migration ${st.status}: ${st['error-desc'] ?? ''}`);
          if (st.ram && performance.now() >= nextTrace) {
            nextTrace += 5000;
            const row = [ms(), Math.round(st.ram.remaining / 1e6), Math.round(st.ram.mbps), Math.round(((st.ram['dirty-pages-rate'] ?? 0) * 4096) / 1e5) / 10, st.ram['dirty-sync-count'], st['cpu-throttle-percentage'] ?? 0];
            trace.push(row);
            process.stderr.write(`  ${(row[0]! / 1000).toFixed(0)} s: remaining ${row[1]} MB, ${row[2]} Mbit/s, dirty ${row[3]} MB/s, ${row[4]} syncs, throttle ${row[5]}%\n`);
          }
          if (profile === 'proxmox' && st.ram && performance.now() >= nextCheck) {
            nextCheck += 1000;
            const rem = st.ram.remaining;
            if ((lastRem !== undefined && rem > lastRem) || rem === 0) stalled++;
            lastRem = rem;
            if (stalled > 5 && downtimeLimit < 2000) {
              stalled = 0;
              downtimeLimit = Math.min(2000, downtimeLimit * 2);
              limits.push([ms(), downtimeLimit]);
              await a.qmp.execute('migrate-set-parameters', { 'downtime-limit': downtimeLimit });
            }
          }
          last = st;
          return undefined;
        }, 50);
      } catch (e) {
        // Leave the guest running on A, as the tools do on failure.
        const ram = last?.ram;
        await a.qmp.execute('migrate_cancel').catch(() => undefined);
        await a.qmp.execute('block-job-cancel', { device: MIRROR_JOB, force: true }).catch(() => undefined);
        await poll('source running again', 30_000, async () => {
          const s = await a.qmp.execute<{ status: string }>('query-status');
          if (s.status === 'postmigrate') await a.qmp.execute('cont');
          return s.status === 'running' ? true : undefined;
        }).catch(() => undefined);
        const why = ram ? `remaining ${(ram.remaining / 1e6).toFixed(0)} MB, ${ram.mbps.toFixed(0)} Mbit/s, dirty ${(((ram['dirty-pages-rate'] ?? 0) * 4096) / 1e6).toFixed(1)} MB/s, ${ram['dirty-sync-count']} syncs, downtime-limit ${downtimeLimit} ms` : '';
        throw new Error(`${(e as Error).message.includes('not within') ? 'did not converge' : (e as Error).message} (${why}; trace ${JSON.stringify(trace)})`);
      }
      phases.migrate_completed_ms = ms();

      // A is paused in postmigrate: a READY mirror cancelled now completes with the target consistent.
      await a.qmp.execute('block-job-cancel', { device: MIRROR_JOB });
      await poll('mirror finished', 60_000, async () => ((await jobs()).some((x) => x.device === MIRROR_JOB) ? undefined : true), 20);
      phases.mirror_done_ms = ms();
      // The NBD client goes first (libvirt removes its node; an export with a client is "in use"),
      // then the server, which removes its exports.
      await a.qmp.execute('blockdev-del', { 'node-name': 'mirror-target' });
      await b.qmp.execute('nbd-server-stop');
      await b.qmp.execute('cont');
      await poll('destination running', 30_000, async () => ((await b.qmp.execute<{ status: string }>('query-status')).status === 'running' ? true : undefined), 10);
      phases.destination_running_ms = ms();
      if (Number.isNaN(resumeUs)) await b.qmp.waitEvent('RESUME', () => true, 5000).then((e) => (resumeUs = evUs(e))).catch(() => undefined);
      // The source has done its part: it quits, as the tools stop it after a successful move.
      await a.qmp.execute('quit').catch(() => undefined);
      a.qmp.close();
      const guest = { console: b.console };
      srcOf.set(guest, b);
      const ram = last.ram;
      return {
        guest,
        freezeMs: Math.round((resumeUs - stopUs) / 1000),
        qemu: {
          downtimeMs: last.downtime, totalMs: last['total-time'], setupMs: last['setup-time'],
          ramTransferred: ram?.transferred, dirtySyncs: ram?.['dirty-sync-count'], mbps: ram?.mbps,
        },
        destinationDisk: tgtDisk,
        details: { profile, phases, mirrorBytes: mirrorLen, downtimeLimits: limits, throttlePct: last['cpu-throttle-percentage'] ?? 0, xbzrle: last['xbzrle-cache'], trace },
      };
    },
  };
}

async function main(): Promise<void> {
  const { params, runs, extra } = parseScenarioArgs(process.argv.slice(2), { '--profile': 'proxmox' });
  const profiles = (extra['--profile'] ?? '').split(',');
  for (const pr of profiles) if (pr !== 'proxmox' && pr !== 'libvirt') throw new BenchUsageError(`--profile wants proxmox, libvirt or both (proxmox,libvirt), got ${pr}`);
  const results = await runBench(profiles.map((pr) => nativeMethod(pr as Profile)), params, runs);
  process.exitCode = results.every((r) => r.ok) ? 0 : 1;
}

if (import.meta.url === `file://${process.argv[1]}`) {
  main().catch((e: Error) => {
    console.error(e instanceof BenchUsageError ? `usage: ${e.message}` : e.stack);
    process.exit(2);
  });
}
