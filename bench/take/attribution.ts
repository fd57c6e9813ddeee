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
import { loadavg } from 'node:os';
import * as path from 'node:path';
import { argNum, benchRoot, check, freshDir, fmt, median, table } from '../common/measure.js';
import type { QmpEvent } from '../../src/hypervisor/qmp.js';
import { anonHugeMiB, backgroundSnapshot, bootPlainGuest, sleep } from './plain-guest.js';

async function main(): Promise<void> {
  const memoryMiB = argNum('--memory-mib', 1024);
  const rounds = argNum('--rounds', 3);
  // Experiment: re-collapse QEMU's RAM into huge pages after each snapshot (collapse-thp.py).
  const collapse = process.argv.includes('--collapse');
  const dir = await freshDir(benchRoot(), 'take-attribution');
  const { q, areaMiB } = await bootPlainGuest(dir, memoryMiB);
  const events: { name: string; ms: number }[] = [];
  q.qmp.events.on('event', (e: QmpEvent) => {
    if (e.event === 'STOP' || e.event === 'RESUME') events.push({ name: e.event, ms: e.timestamp.seconds * 1000 + e.timestamp.microseconds / 1000 });
  });

  const rows: string[][] = [];
  const result: Record<string, number[]> = { 'stop-first': [], 'qemu-stops': [] };
  try {
    for (let r = 1; r <= rounds; r++) {
      for (const mode of ['stop-first', 'qemu-stops'] as const) {
        const thp = anonHugeMiB(q.pid);
        const sock = path.join(dir, `mig-${r}-${mode}.sock`);
        let contMs = NaN;
        const t0 = performance.now();
        const mark = events.length;
        const { info } = await backgroundSnapshot(q, sock, {
          beforeMigrate: async () => {
            if (mode === 'stop-first') await q.qmp.execute('stop');
          },
          onRamFlowing: () => {
            if (mode === 'stop-first') void q.qmp.execute('cont').then(() => (contMs = performance.now() - t0));
          },
        });
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
  console.log(`plain QEMU, guest ${memoryMiB} MiB (area ${areaMiB} MiB, 12800 pages/s), background-snapshot stream discarded`);
  console.log(table(['round', 'order', 'STOP→RESUME ms', 'stop→cont reply ms', 'QEMU downtime ms', 'setup-time ms', 'total ms', 'AnonHugePages MiB before', 'load', 'status'], rows));
  console.log(`median STOP→RESUME: stop-first ${fmt(median(result['stop-first']!), 1)} ms, qemu-stops ${fmt(median(result['qemu-stops']!), 1)} ms`);
}

main().catch((e: unknown) => {
  console.error(e);
  process.exit(1);
});
