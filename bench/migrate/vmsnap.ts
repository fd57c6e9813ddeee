/**
 * bench/migrate/vmsnap: `vmsnap migrate` as a migration method for the shared scenario harness
 * (common.ts), and the bench that runs it side by side with QEMU's native migration.
 *
 *   npm run build && npx tsx bench/migrate/vmsnap.ts [--peers libvirt,proxmox] [--link-mbit 1000] [--return-trip 1] [scenario flags]
 *
 * Each host (network namespace) gets its own data directory and repository; the hosts pair with
 * each other (`peer add` both ways); the guest is created on A with `vm create --disk-from` the
 * scenario's filled raw image and started inside A's namespace (its supervisor and QEMU live there);
 * each leg starts `vmsnap receive` inside the destination's namespace and runs `vmsnap migrate`
 * inside the source's. The return trip finds the departure snapshot A kept.
 */
import * as path from 'node:path';
import { existsSync } from 'node:fs';
import { promises as fsp } from 'node:fs';
import { createInterface } from 'node:readline';
import { BIN } from '../../test/helpers/cli.js';
import type { Side } from '../../test/helpers/netns.js';
import { BenchUsageError, Console, parseScenarioArgs, runBench, type MigrationMethod, type ScenarioContext } from './common.js';
import { nativeMethod, type Profile } from './qemu-native.js';

const VM = 'bench-vm';

interface Host {
  env: string[];
  dataDir: string;
}

function hosts(ctx: ScenarioContext): Record<Side, Host> {
  const mk = (s: Side): Host => {
    const dataDir = path.join(ctx.dir, `vmsnap-${s}`, 'data');
    return { dataDir, env: [`VMSNAP_DATA_DIR=${dataDir}`, `VMSNAP_REPO=${path.join(ctx.dir, `vmsnap-${s}`, 'repo')}`] };
  };
  return { a: mk('a'), b: mk('b') };
}

async function vmsnap(ctx: ScenarioContext, side: Side, args: string[]): Promise<string> {
  const h = hosts(ctx)[side];
  const r = await ctx.pair.exec(side, 'env', [...h.env, process.execPath, BIN, ...args], { timeoutMs: 3_600_000 });
  if (r.code !== 0) throw new Error(`vmsnap ${args.join(' ')} on ${side}: exit ${r.code}: ${r.stderr.trim().split('\n').slice(-3).join(' | ')}`);
  return r.stdout;
}

export function vmsnapMethod(): MigrationMethod {
  return {
    name: 'vmsnap',
    async startSource(ctx) {
      const h = hosts(ctx);
      for (const s of ['a', 'b'] as const) {
        await fsp.mkdir(h[s].dataDir, { recursive: true, mode: 0o700 });
        await vmsnap(ctx, s, ['init']);
      }
      const fp = { a: (await vmsnap(ctx, 'a', ['peer', 'id'])).trim(), b: (await vmsnap(ctx, 'b', ['peer', 'id'])).trim() };
      await vmsnap(ctx, 'a', ['peer', 'add', 'host-b', '--fingerprint', fp.b]);
      await vmsnap(ctx, 'b', ['peer', 'add', 'host-a', '--fingerprint', fp.a]);
      const g = ctx.guest;
      await vmsnap(ctx, 'a', ['vm', 'create', VM, '--memory', `${g.memMiB}M`, '--disk-from', g.disk, '--kernel', g.kernel, '--initrd', g.initrd, '--append', g.append, '--accel', 'tcg']);
      await vmsnap(ctx, 'a', ['vm', 'start', VM]);
      return { console: Console.file(path.join(h.a.dataDir, 'vms', VM, 'run', 'serial.log')) };
    },
    async migrate(ctx, _src, leg) {
      const h = hosts(ctx);
      const to = h[leg.to];
      const recv = ctx.pair.spawn(leg.to, 'env', [...to.env, process.execPath, BIN, '--json', 'receive', '--listen', `${ctx.pair.addr[leg.to]}:0`], { stdio: ['ignore', 'pipe', 'inherit'] });
      const first = await new Promise<string>((resolve, reject) => {
        createInterface({ input: recv.stdout! }).once('line', resolve);
        recv.once('exit', (c) => reject(new Error(`vmsnap receive exited ${c}`)));
      });
      const { listening, fingerprint } = JSON.parse(first) as { listening: string; fingerprint: string };
      try {
        const out = await vmsnap(ctx, leg.from, ['--json', 'migrate', VM, listening, '--pair', fingerprint, '--timeout', String(ctx.params.timeoutS)]);
        const result = JSON.parse(out.split('\n').filter((l) => !l.startsWith('{"event"')).join('\n')) as Record<string, number | string | null>;
        return {
          guest: { console: Console.file(path.join(to.dataDir, 'vms', VM, 'run', 'serial.log')) },
          ...(typeof result.pauseMs === 'number' ? { freezeMs: Math.round(result.pauseMs) } : {}),
          qemu: { ...(typeof result.qemuDowntimeMs === 'number' ? { downtimeMs: result.qemuDowntimeMs } : {}), ...(typeof result.totalMs === 'number' ? { totalMs: Math.round(result.totalMs) } : {}) },
          details: { bytesSent: result.bytesSent, bytesSaved: result.bytesSaved, qemuBytes: result.qemuBytes, ramRefs: result.ramRefs, diskBlocksSent: result.diskBlocksSent, diskBlocksSkipped: result.diskBlocksSkipped, base: result.base, departure: result.departure, switchover: result.switchover, phases: result.phases, migrateMs: result.totalMs },
        };
      } finally {
        recv.kill('SIGTERM');
      }
    },
    // `migrate` returns once the guest runs on the destination; the source then stores the
    // departure snapshot and removes the VM. Measured here, outside the move's time.
    async settle(ctx, leg, migrateReturnedAt) {
      const dir = path.join(hosts(ctx)[leg.from].dataDir, 'vms', VM);
      const deadline = Date.now() + 600_000;
      while (existsSync(dir)) {
        if (Date.now() > deadline) throw new Error(`the VM was not removed from ${leg.from} within 600 s of the move`);
        await new Promise((r) => setTimeout(r, 100));
      }
      return { sourceSettledS: Math.round(performance.now() - migrateReturnedAt) / 1000 };
    },
  };
}

async function main(): Promise<void> {
  const { params, runs, extra } = parseScenarioArgs(process.argv.slice(2), { '--peers': 'libvirt' });
  const peers = (extra['--peers'] ?? '').split(',').filter(Boolean);
  for (const p of peers) if (p !== 'proxmox' && p !== 'libvirt') throw new BenchUsageError(`--peers wants proxmox, libvirt or both, got ${p}`);
  const results = await runBench([...peers.map((p) => nativeMethod(p as Profile)), vmsnapMethod()], params, runs);
  process.exitCode = results.every((r) => r.ok) ? 0 : 1;
}

if (import.meta.url === `file://${process.argv[1]}`) {
  main().catch((e: Error) => {
    console.error(e instanceof BenchUsageError ? `usage: ${e.message}` : e.stack);
    process.exit(2);
  });
}
