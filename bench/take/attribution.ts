/**
 * bench/take/attribution: where the guest pause of a background snapshot goes, on plain QEMU (no
 * vmsnap code in the loop), same fixture guest as bench/take/run.ts.
 *
 *   npx tsx bench/take/attribution.ts [--memory-mib 1024] [--rounds 3]
 *
 * Two orders, alternated on the same guest, the stream read and discarded by this process:
 *   stop-first   vmsnap's order: QMP stop, then `migrate` (background-snapshot), `cont` once RAM
 *                bytes arrive (QEMU has armed write protection by then).
 *   qemu-stops   QEMU's own order: `migrate` while the guest runs; QEMU pre-faults RAM and sets up
 *                with the guest running, stops it, saves devices, arms write protection, resumes it.
 * Reported: STOP→RESUME (QMP event timestamps), QEMU's downtime and setup-time, and the QEMU
 * process's AnonHugePages before each snapshot (userfaultfd write protection splits THPs).
 */
import { readFileSync, promises as fsp } from 'node:fs';
import { loadavg } from 'node:os';
import * as net from 'node:net';
import * as path from 'node:path';
import { benchRoot, check, freshDir, fmt, table } from '../common/measure.js';
import { guestArtifacts } from '../../fixtures/guest/index.js';
import { launchQemu } from '../../src/hypervisor/qemu.js';
import type { QmpEvent } from '../../src/hypervisor/qmp.js';

interface MigInfo {
  status?: string;
  downtime?: number;
  'setup-time'?: number;
  'total-time'?: number;
}

function argNum(name: string, dflt: number): number {
  const i = process.argv.indexOf(name);
  return i >= 0 ? Number(process.argv[i + 1]) : dflt;
}

function anonHugeMiB(pid: number): number {
  const m = /AnonHugePages:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/smaps_rollup`, 'utf8'));
  return m ? Number(m[1]) / 1024 : NaN;
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

async function main(): Promise<void> {
  const memoryMiB = argNum('--memory-mib', 1024);
  const rounds = argNum('--rounds', 3);
  // Experiment: re-collapse QEMU's RAM into huge pages after each snapshot (collapse-thp.py).
  const collapse = process.argv.includes('--collapse');
  const areaMiB = Math.floor((memoryMiB * 3) / 8);
  const g = guestArtifacts();
  const dir = await freshDir(benchRoot(), 'take-attribution');
  const qcow = path.join(dir, 'disk.qcow2');
  await check('qemu-img', ['create', '-q', '-f', 'qcow2', qcow, '256M']);
  const q = await launchQemu({
    runDir: path.join(dir, 'run'), accel: 'tcg', memoryMiB, cpus: 1, kernel: g.kernel, initrd: g.initrd,
    append: `console=ttyS0 quiet vmsnap.mem=${areaMiB} vmsnap.rate=12800 vmsnap.disk=/dev/vda vmsnap.sweep_ms=60000 vmsnap.status_ms=50`,
    extraArgs: ['-drive', `file=${qcow},format=qcow2,if=virtio,cache=none`],
  });
  const events: { name: string; ms: number }[] = [];
  q.qmp.events.on('event', (e: QmpEvent) => {
    if (e.event === 'STOP' || e.event === 'RESUME') events.push({ name: e.event, ms: e.timestamp.seconds * 1000 + e.timestamp.microseconds / 1000 });
  });
  await q.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'background-snapshot', state: true }, { capability: 'events', state: true }] });
  await q.qmp.execute('migrate-set-parameters', { 'max-bandwidth': 64 * 1024 ** 3 });
  // Boot, stamp the area, run a little.
  for (let i = 0; i < 600; i++) {
    if ((await fsp.readFile(q.paths.serialLog, 'utf8').catch(() => '')).includes('VMSNAP-STATUS')) break;
    await sleep(100);
  }
  await sleep(4000);

  const rows: string[][] = [];
  const result: Record<string, number[]> = { 'stop-first': [], 'qemu-stops': [] };
  try {
    for (let r = 1; r <= rounds; r++) {
      for (const mode of ['stop-first', 'qemu-stops'] as const) {
        const thp = anonHugeMiB(q.pid);
        const sock = path.join(dir, `mig-${r}-${mode}.sock`);
        const server = net.createServer();
        await new Promise<void>((res) => server.listen(sock, () => res()));
        let bytes = 0;
        let resumeSent = false;
        let contMs = NaN;
        const t0 = performance.now();
        const done = new Promise<void>((res) => {
          server.once('connection', (c) => {
            c.on('data', (b: Buffer) => {
              bytes += b.length;
              // Past the ~200-byte prefix: RAM records flow, so write protection is armed.
              if (mode === 'stop-first' && !resumeSent && bytes > 8192) {
                resumeSent = true;
                void q.qmp.execute('cont').then(() => (contMs = performance.now() - t0));
              }
            });
            c.on('close', () => res());
          });
        });
        const mark = events.length;
        if (mode === 'stop-first') await q.qmp.execute('stop');
        await q.qmp.execute('migrate', { uri: `unix:${sock}` });
        await done;
        let info: MigInfo = {};
        for (let i = 0; i < 200; i++) {
          info = await q.qmp.execute<MigInfo>('query-migrate');
          if (info.status === 'completed' || info.status === 'failed') break;
          await sleep(50);
        }
        server.close();
        const ev = events.slice(mark);
        const stop = ev.find((e) => e.name === 'STOP');
        const resume = [...ev].reverse().find((e) => e.name === 'RESUME');
        const pause = stop && resume ? resume.ms - stop.ms : NaN;
        result[mode]!.push(pause);
        rows.push([`${r}`, mode, fmt(pause, 1), mode === 'stop-first' ? fmt(contMs, 1) : '–', String(info.downtime ?? '?'), String(info['setup-time'] ?? '?'), fmt(info['total-time'] ?? NaN, 0), fmt(thp, 0), fmt(loadavg()[0]!, 1), info.status ?? '?']);
        console.error(rows[rows.length - 1]!.join('  '));
        if (collapse) {
          const c0 = performance.now();
          const res = (await check('python3', [path.join(path.dirname(new URL(import.meta.url).pathname), 'collapse-thp.py'), String(q.pid)])).trim();
          console.error(`  MADV_COLLAPSE ${res} in ${fmt(performance.now() - c0, 0)} ms; AnonHugePages now ${fmt(anonHugeMiB(q.pid), 0)} MiB`);
        }
        await sleep(3000);
      }
    }
  } finally {
    await q.quit(10_000);
  }
  const med = (xs: number[]): number => {
    const s = [...xs].sort((a, b) => a - b);
    return s.length % 2 ? s[s.length >> 1]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
  };
  console.log(`plain QEMU, guest ${memoryMiB} MiB (area ${areaMiB} MiB, 12800 pages/s), background-snapshot stream discarded`);
  console.log(table(['round', 'order', 'STOP→RESUME ms', 'stop→cont reply ms', 'QEMU downtime ms', 'setup-time ms', 'total ms', 'AnonHugePages MiB before', 'load', 'status'], rows));
  console.log(`median STOP→RESUME: stop-first ${fmt(med(result['stop-first']!), 1)} ms, qemu-stops ${fmt(med(result['qemu-stops']!), 1)} ms`);
}

main().catch((e: unknown) => {
  console.error(e);
  process.exit(1);
});
