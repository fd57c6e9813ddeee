/**
 * bench/restore: how long until a restored guest runs again — `vmsnap restore` from a local
 * repository against QEMU's own ways back: a migration stream in a file loaded by a fresh QEMU
 * (`migrate file:` / `-incoming defer` + `migrate-incoming file:`) and `loadvm` of a qcow2
 * internal snapshot. Same fixture guest, memory, workload and machine for all three, one after
 * the other in the same run.
 *
 *   npx tsx bench/restore/run.ts [--memory-mib 1024] [--area-mib 384] [--rate 2000] [--rounds 3] [--out FILE]
 *
 * Measured per restore:
 *   wall     the command's wall time: `vmsnap restore` (process start included); QEMU start +
 *            migrate-incoming until QEMU reports the guest running; the HMP `loadvm`.
 *   running  command start → the first status line the restored guest prints (its console, polled
 *            every 2 ms): when the guest is seen running again.
 *   vmsnap's own `loadMs` (QEMU killed → guest running) is printed alongside.
 * The self-checking guest must report zero memory and disk errors after every restore. The file
 * peer restores RAM and device state only: its disk is copied back from a copy made at save time,
 * before the clock starts (not timed; vmsnap and loadvm restore the disk inside their figure).
 */
import { promises as fsp, readFileSync, existsSync, statSync } from 'node:fs';
import { loadavg } from 'node:os';
import * as path from 'node:path';
import { benchRoot, check, freshDir, fmt, median, table, argNum, arg, MiB } from '../common/measure.js';
import { REPO_ROOT, vmCli } from '../common/vmsnap-cli.js';
import { guestArtifacts, parseStatusLines, type GuestStatus } from '../../fixtures/guest/index.js';
import { launchQemu, type QemuProcess } from '../../src/hypervisor/qemu.js';

const memoryMiB = argNum('--memory-mib', 1024);
const areaMiB = argNum('--area-mib', Math.floor((memoryMiB * 3) / 8));
const rate = argNum('--rate', 2000);
const rounds = argNum('--rounds', 3);
const outFile = arg('--out', '');
const append = `console=ttyS0 quiet vmsnap.mem=${areaMiB} vmsnap.rate=${rate} vmsnap.disk=/dev/vda vmsnap.status_ms=50`;
const log = (s: string): void => console.error(`[${new Date().toISOString().slice(11, 19)}] ${s}`);
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

interface Row {
  tool: string;
  i: number;
  wallMs: number;
  runningMs: number;
  loadMs?: number;
  errors: number;
}

function statuses(serialLog: string): GuestStatus[] {
  return existsSync(serialLog) ? parseStatusLines(readFileSync(serialLog, 'latin1')) : [];
}

/** Waits until the console has `n` status lines after the first `from` (the guest runs). */
async function waitLines(serialLog: string, from: number, n: number, timeoutMs = 300_000): Promise<GuestStatus[]> {
  const t0 = performance.now();
  for (;;) {
    const s = statuses(serialLog);
    if (s.length >= from + n) return s;
    if (performance.now() - t0 > timeoutMs) throw new Error(`no guest status lines in ${serialLog} after ${timeoutMs} ms`);
    await sleep(50);
  }
}

/**
 * Runs `op` and resolves with the host time (performance.now) at which the first status line of a
 * restored guest appeared: the restoring QEMU truncates the console log (vmsnap) or writes a new one
 * (migrate-incoming), or the same console goes on (loadvm: new lines whose uptime went back).
 */
async function firstLineAfter(serialLog: string, op: () => Promise<unknown>, mode: 'truncates' | 'continues'): Promise<{ at: number; opMs: number; result: unknown }> {
  const before = statuses(serialLog);
  const lastUptime = before.at(-1)?.uptimeMs ?? Infinity;
  const size = (): number => (existsSync(serialLog) ? statSync(serialLog).size : 0);
  // A restored guest resumes at the same point every time, so its lines cannot tell one restore
  // from the last: the console file shrinking (truncated by the new QEMU) does.
  let prevSize = size();
  let truncated = before.length === 0;
  let at = NaN;
  let stop = false;
  const poll = (async () => {
    while (!stop || Number.isNaN(at)) {
      const now = size();
      if (now < prevSize) truncated = true;
      prevSize = now;
      const s = statuses(serialLog);
      const fresh = mode === 'continues' ? s.slice(before.length).some((x) => x.uptimeMs < lastUptime) : truncated && s.length > 0;
      if (fresh && Number.isNaN(at)) at = performance.now();
      if (stop && !Number.isNaN(at)) return;
      await sleep(2);
    }
  })();
  const t0 = performance.now();
  const result = await op();
  const opMs = performance.now() - t0;
  stop = true;
  await Promise.race([poll, sleep(120_000)]);
  return { at: at - t0, opMs, result };
}

async function vmsnapRounds(root: string): Promise<Row[]> {
  const g = guestArtifacts();
  const { cli, dataDir } = await vmCli(root, 'restore');
  await cli(['vm', 'create', 'bench', '--memory', `${memoryMiB}M`, '--disk', '256M', '--accel', 'tcg', '--kernel', g.kernel, '--initrd', g.initrd, '--append', append]);
  const serial = path.join(dataDir, 'vms', 'bench', 'run', 'serial.log');
  const rows: Row[] = [];
  await cli(['vm', 'start', 'bench']);
  try {
    await waitLines(serial, 0, 40);
    const snap = (JSON.parse(await cli(['--json', 'take', 'bench'])) as { snapshot: string }).snapshot;
    log(`vmsnap: snapshot ${snap.slice(0, 12)} taken`);
    for (let i = 1; i <= rounds; i++) {
      await sleep(3000);
      const r = await firstLineAfter(serial, () => cli(['--json', 'restore', 'bench', snap]), 'truncates');
      const res = JSON.parse(r.result as string) as { loadMs: number; runState: string; timeline?: { at: number; what: string }[] };
      const tl0 = res.timeline?.[0]?.at ?? 0;
      if (res.timeline) log(`  steps: ${res.timeline.map((e) => `${e.what} +${(e.at - tl0).toFixed(0)}`).join(', ')}`);
      const s = await waitLines(serial, 0, 20);
      const last = s.at(-1)!;
      rows.push({ tool: 'vmsnap restore', i, wallMs: r.opMs, runningMs: r.at, loadMs: res.loadMs, errors: last.errors + last.diskErrors });
      log(`vmsnap restore ${i}: wall ${fmt(r.opMs, 0)} ms, running after ${fmt(r.at, 0)} ms, loadMs ${fmt(res.loadMs, 0)}, ${res.runState}, errors ${last.errors}/${last.diskErrors}`);
    }
  } finally {
    await cli(['vm', 'stop', 'bench']).catch(() => undefined);
  }
  return rows;
}

async function qemuRounds(root: string): Promise<Row[]> {
  const g = guestArtifacts();
  const dir = await freshDir(root, 'restore-qemu');
  const qcow = path.join(dir, 'disk.qcow2');
  const saved = path.join(dir, 'disk-saved.qcow2');
  const stream = path.join(dir, 'state.mig');
  await check('qemu-img', ['create', '-q', '-f', 'qcow2', qcow, '256M']);
  const launch = (name: string, incoming: boolean): Promise<QemuProcess> =>
    launchQemu({ runDir: path.join(dir, name), accel: 'tcg', memoryMiB, cpus: 1, kernel: g.kernel, initrd: g.initrd, append, incomingDefer: incoming, extraArgs: ['-drive', `file=${qcow},format=qcow2,if=virtio,cache=none`] });
  const rows: Row[] = [];
  let q = await launch('src', false);
  try {
    await waitLines(q.paths.serialLog, 0, 40);
    // The file peer: RAM and device state of the stopped guest, as QEMU writes them.
    await q.qmp.execute('migrate-set-parameters', { 'max-bandwidth': 64 * 1024 * MiB });
    await q.qmp.execute('stop');
    await q.qmp.execute('migrate', { uri: `file:${stream}` });
    for (;;) {
      const st = await q.qmp.execute<{ status: string }>('query-migrate');
      if (st.status === 'completed') break;
      if (st.status === 'failed') throw new Error('migrate to file failed');
      await sleep(20);
    }
    await fsp.copyFile(qcow, saved);
    await q.qmp.execute('cont');
    // The loadvm peer's snapshot (savevm of the same running guest).
    await sleep(3000);
    const sv = await q.qmp.execute<string>('human-monitor-command', { 'command-line': 'savevm bench' }, { timeoutMs: 900_000 });
    if (sv.trim()) throw new Error(`savevm: ${sv.trim()}`);
    for (let i = 1; i <= rounds; i++) {
      await sleep(3000);
      const r = await firstLineAfter(q.paths.serialLog, async () => {
        const out = await q.qmp.execute<string>('human-monitor-command', { 'command-line': 'loadvm bench' }, { timeoutMs: 900_000 });
        if (out.trim()) throw new Error(`loadvm: ${out.trim()}`);
      }, 'continues');
      await sleep(2000);
      const last = statuses(q.paths.serialLog).at(-1)!;
      rows.push({ tool: 'QEMU loadvm (qcow2)', i, wallMs: r.opMs, runningMs: r.at, errors: last.errors + last.diskErrors });
      log(`loadvm ${i}: wall ${fmt(r.opMs, 0)} ms, running after ${fmt(r.at, 0)} ms, errors ${last.errors}/${last.diskErrors}`);
    }
    await q.qmp.execute('human-monitor-command', { 'command-line': 'delvm bench' });
    for (let i = 1; i <= rounds; i++) {
      await q.quit(10_000);
      await fsp.copyFile(saved, qcow);
      const serial = path.join(dir, `in${i}`, 'serial.log');
      const r = await firstLineAfter(serial, async () => {
        q = await launch(`in${i}`, true);
        await q.qmp.execute('migrate-incoming', { uri: `file:${stream}` });
        for (;;) {
          const st = await q.qmp.execute<{ status: string }>('query-status');
          if (st.status === 'paused') await q.qmp.execute('cont'); // saved from a stopped guest
          else if (st.status === 'running') break;
          await sleep(5);
        }
      }, 'truncates');
      const s = await waitLines(serial, 0, 20);
      const last = s.at(-1)!;
      rows.push({ tool: 'QEMU migrate-incoming file:', i, wallMs: r.opMs, runningMs: r.at, errors: last.errors + last.diskErrors });
      log(`migrate-incoming ${i}: wall ${fmt(r.opMs, 0)} ms, running after ${fmt(r.at, 0)} ms, errors ${last.errors}/${last.diskErrors}`);
    }
  } finally {
    await q.quit(10_000).catch(() => q.kill('SIGKILL'));
  }
  return rows;
}

async function main(): Promise<void> {
  const root = benchRoot();
  await fsp.mkdir(root, { recursive: true });
  const qemuVersion = (await check('qemu-system-x86_64', ['--version'])).split('\n')[0] ?? '';
  log(`${qemuVersion}; guest ${memoryMiB} MiB, area ${areaMiB} MiB at ${rate} pages/s, ${rounds} rounds`);
  const load0 = loadavg()[0]!;
  const rows = [...(await vmsnapRounds(root)), ...(await qemuRounds(root))];
  const load1 = loadavg()[0]!;
  const out: string[] = [];
  out.push(`QEMU: ${qemuVersion}; TCG; 1 vCPU; guest ${memoryMiB} MiB (Linux fixture, area ${areaMiB} MiB at ${rate} pages/s + disk workload); host load average ${fmt(load0)} → ${fmt(load1)} (2 cores)`);
  out.push('');
  out.push(table(['restore', 'wall ms', 'guest running after ms', 'vmsnap loadMs', 'guest errors after'], rows.map((r) => [`${r.tool} ${r.i}`, fmt(r.wallMs, 0), fmt(r.runningMs, 0), r.loadMs === undefined ? '–' : fmt(r.loadMs, 0), String(r.errors)])));
  out.push('');
  const tools = [...new Set(rows.map((r) => r.tool))];
  out.push(table(['tool', 'median wall ms', 'median running after ms'], tools.map((t) => {
    const x = rows.filter((r) => r.tool === t);
    return [t, fmt(median(x.map((r) => r.wallMs)), 0), fmt(median(x.map((r) => r.runningMs)), 0)];
  })));
  const text = out.join('\n');
  console.log(text);
  if (outFile) await fsp.writeFile(path.resolve(REPO_ROOT, outFile), text + '\n');
}

main().catch((e: unknown) => {
  console.error(e);
  process.exit(1);
});
