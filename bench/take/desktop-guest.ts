/**
 * bench/take/desktop-guest: the guest pause of `vmsnap take` for a real Debian 12 guest with a
 * display and a network attached (fixtures/debian: systemd, qemu-guest-agent, networkd, httpd;
 * booted from its disk), beside the Linux fixture guest with the same devices, in the same run.
 *
 *   npx tsx bench/take/desktop-guest.ts [--takes 5] [--gap-s 4] [--memory-mib 512] [--quiesce]
 *
 * Both VMs run at once (TCG, 1 vCPU, `--display vnc`, user network with a forwarded port), and
 * their takes alternate, so both see the same host load. The fixture guest rewrites 500 pages/s of
 * a 16 MiB area (`vmsnap.rate=500`); the Debian guest idles after boot as a desktop VM would.
 * Pause: vmsnap's `pauseMs` and QEMU's STOP→RESUME event timestamps (a second, listen-only QMP
 * monitor). The target for the Debian guest is the main job's: median pause ≤ 10 ms.
 * `--quiesce` takes through the guest agent (freeze/thaw; the Debian guest's qemu-ga answers, the
 * plain fixture guest has none and is taken crash-consistent with a warning).
 */
import { loadavg } from 'node:os';
import * as path from 'node:path';
import type { TakeResult } from '../../src/vm/runtime.js';
import { QmpClient } from '../../src/hypervisor/qmp.js';
import { argNum, benchRoot, fmt, freshDir, median, table } from '../common/measure.js';
import { vmCli } from '../common/vmsnap-cli.js';
import { guestArtifacts } from '../../fixtures/guest/index.js';
import { DEBIAN_READY, ensureDebianImage } from '../../fixtures/debian/index.js';
import { EventLog, eventMonitorArgs } from './qmp-events.js';
import { freePort } from '../../test/helpers/redis.js';
import { promises as fsp } from 'node:fs';

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

async function main(): Promise<void> {
  const takes = argNum('--takes', 5);
  const gapS = argNum('--gap-s', 4);
  const memoryMiB = argNum('--memory-mib', 512);
  const quiesce = process.argv.includes('--quiesce');
  const img = await ensureDebianImage();
  if (!img.image) throw new Error(img.skip);
  const root = await freshDir(benchRoot(), 'take-desktop');
  const { cli, dataDir } = await vmCli(root, 'desktop');
  const runDir = (vm: string) => path.join(dataDir, 'vms', vm, 'run');
  const g = guestArtifacts();
  const common = ['--memory', `${memoryMiB}M`, '--cpus', '1', '--accel', 'tcg', '--display', 'vnc'];
  const vms = {
    fixture: [...common, '--kernel', g.kernel, '--initrd', g.initrd, '--append', 'console=ttyS0 quiet vmsnap.mem=16 vmsnap.rate=500', '--disk', '64M'],
    debian: [...common, '--disk-from', img.image],
  } as const;
  const events: Record<string, EventLog> = {};
  const clients: QmpClient[] = [];
  const started: string[] = [];
  const rows: string[][] = [];
  const pauses: Record<string, { tool: number[]; qmp: number[] }> = { fixture: { tool: [], qmp: [] }, debian: { tool: [], qmp: [] } };
  try {
    for (const [name, args] of Object.entries(vms)) {
      const sock = path.join(root, `${name}-events.sock`);
      await cli(['vm', 'create', name, ...args, '--forward', `tcp:${await freePort()}:80`, ...eventMonitorArgs(sock)]);
      const t0 = Date.now();
      await cli(['vm', 'start', name]);
      started.push(name);
      const ready = name === 'debian' ? DEBIAN_READY : /VMSNAP-STATUS/;
      for (;;) {
        const serial = await fsp.readFile(path.join(runDir(name), 'serial.log'), 'utf8').catch(() => '');
        if (ready.test(serial)) break;
        if (Date.now() - t0 > 300_000) throw new Error(`${name}: not up after 300 s; console tail:\n${serial.slice(-1000)}`);
        await sleep(500);
      }
      console.error(`${name}: up in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
      const q = await QmpClient.connect(sock, { timeoutMs: 30_000 });
      clients.push(q);
      events[name] = new EventLog(q);
    }
    await sleep(gapS * 1000);
    for (let i = 1; i <= takes; i++) {
      for (const name of Object.keys(vms)) {
        const mark = events[name]!.mark();
        const r = JSON.parse(await cli(['--json', 'take', name, ...(quiesce ? ['--quiesce'] : [])])) as TakeResult;
        await sleep(300);
        const qmpMs = events[name]!.pauseSince(mark)?.pauseMs ?? NaN;
        pauses[name]!.tool.push(r.pauseMs);
        pauses[name]!.qmp.push(qmpMs);
        const q = r.quiesce ? (r.quiesce.warning ? 'no agent' : `frozen ${r.quiesce.frozen}`) : '–';
        rows.push([String(i), name, fmt(r.pauseMs, 2), fmt(qmpMs, 2), fmt(r.durationMs / 1000, 1), fmt(r.storedBytes / (1 << 20), 1), q, fmt(loadavg()[0]!, 1)]);
        console.error(rows[rows.length - 1]!.join('  '));
        await sleep(gapS * 1000);
      }
    }
  } finally {
    for (const q of clients) q.close();
    for (const name of started) await cli(['vm', 'stop', name]).catch((e: unknown) => console.error(`vm stop ${name}: ${String(e)}`));
  }
  console.log(`vmsnap take, TCG, 1 vCPU, ${memoryMiB} MiB, --display vnc, user network + a forwarded port${quiesce ? ', --quiesce' : ''}; takes alternate between the two guests`);
  console.log(table(['take', 'guest', 'pause ms (vmsnap)', 'STOP→RESUME ms (QMP)', 'take s', 'stored MiB', 'quiesce', 'load'], rows));
  const m = (name: string) => ({ tool: median(pauses[name]!.tool), qmp: median(pauses[name]!.qmp) });
  const f = m('fixture');
  const d = m('debian');
  console.log(`median pause: Debian ${fmt(d.tool, 2)} ms (QMP ${fmt(d.qmp, 2)}), fixture ${fmt(f.tool, 2)} ms (QMP ${fmt(f.qmp, 2)}); Debian/fixture ${fmt(d.tool / f.tool, 2)}x; target ≤ 10 ms for the Debian guest: ${d.tool <= 10 ? 'met' : 'not met'}`);
}

main().catch((e: unknown) => {
  console.error(e);
  process.exit(1);
});
