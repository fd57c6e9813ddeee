/**
 * bench/take/collapse-cost: what re-collapsing QEMU's transparent huge pages after a take costs
 * the host — the CPU time of src/hypervisor/native/thp-collapse.c (the helper the VM supervisor
 * runs after each take, see VmRuntime.recollapseHugePages) on a guest whose huge pages a
 * background snapshot has just split.
 *
 *   npx tsx bench/take/collapse-cost.ts [--memory-mib 1024] [--rounds 3]
 *
 * The fixture guest on plain QEMU (bench/take/plain-guest.ts: TCG, rewriting 3/8 of its RAM at
 * 12,800 pages/s). Each round: a background snapshot (stream discarded), then the helper under GNU
 * time (user + system CPU, wall), then the helper again at once as the in-run baseline (the same
 * scan and syscall over RAM that is already in huge pages). AnonHugePages of the QEMU process
 * before the snapshot, after it, and after the collapse show how much was split and rebuilt. The
 * helper runs at this process's priority (the supervisor adds `nice -n 10`, which changes when
 * it runs, not how much CPU it needs). Needs root (CAP_SYS_NICE) and Linux >= 6.1.
 */
import { loadavg } from 'node:os';
import * as path from 'node:path';
import { argNum, benchRoot, fmt, freshDir, measure, median, table } from '../common/measure.js';
import { nativeHelper } from '../../src/util/project.js';
import { anonHugeMiB, backgroundSnapshot, bootPlainGuest, sleep } from './plain-guest.js';

/** GNU time reports CPU seconds to 10 ms: 0.00 means under 10 ms, not none. */
const cpuMs = (s: number): string => (s > 0 ? fmt(s * 1000, 0) : '< 10');

async function main(): Promise<void> {
  const memoryMiB = argNum('--memory-mib', 1024);
  const rounds = argNum('--rounds', 3);
  const helper = nativeHelper('thp-collapse');
  if (!helper) throw new Error('.cache/native/thp-collapse is missing: run scripts/setup.sh');
  const dir = await freshDir(benchRoot(), 'take-collapse');
  const { q, areaMiB } = await bootPlainGuest(dir, memoryMiB);
  const rows: string[][] = [];
  const cpu: { after: number[]; idle: number[] } = { after: [], idle: [] };
  try {
    for (let r = 1; r <= rounds; r++) {
      const before = anonHugeMiB(q.pid);
      const { info } = await backgroundSnapshot(q, path.join(dir, `mig-${r}.sock`));
      if (info.status !== 'completed') throw new Error(`snapshot ${r}: migration ${info.status ?? 'unknown'}`);
      const split = anonHugeMiB(q.pid);
      const c = await measure(helper, [String(q.pid)]);
      const rebuilt = anonHugeMiB(q.pid);
      const again = await measure(helper, [String(q.pid)]);
      if (!/ ok$/.test(c.stdout.trim())) throw new Error(`thp-collapse: ${c.stdout.trim()}`);
      cpu.after.push(c.cpuSeconds * 1000);
      cpu.idle.push(again.cpuSeconds * 1000);
      rows.push([
        String(r), fmt(before, 0), fmt(split, 0), fmt(rebuilt, 0),
        cpuMs(c.cpuSeconds), fmt(c.seconds * 1000, 0), cpuMs(again.cpuSeconds), fmt(again.seconds * 1000, 0),
        fmt(loadavg()[0]!, 1),
      ]);
      console.error(rows[rows.length - 1]!.join('  '));
      await sleep(2000);
    }
  } finally {
    await q.quit(10_000);
  }
  console.log(`plain QEMU ${memoryMiB} MiB guest under TCG (area ${areaMiB} MiB rewritten at 12800 pages/s), helper ${path.relative(process.cwd(), helper)}`);
  console.log(
    table(
      ['round', 'AnonHugePages MiB before take', 'after take', 'after collapse', 'collapse CPU ms', 'collapse wall ms', 'baseline: again CPU ms', 'again wall ms', 'load'],
      rows,
    ),
  );
  console.log(`median CPU: collapse after a take ${fmt(median(cpu.after), 0)} ms, the same call on intact huge pages ${cpuMs(median(cpu.idle) / 1000)} ms (GNU time's resolution is 10 ms)`);
}

main().catch((e: unknown) => {
  console.error(e);
  process.exit(1);
});
