/**
 * NBD data-path benchmark: the vmsnap server (its own process, fresh 64 KiB-block volume) against
 * qemu-nbd serving a fresh sparse raw file, same client (fio's nbd engine, libnbd), same run.
 * Runs interleave (round k: qemu-nbd then vmsnap when k is even, vmsnap then qemu-nbd when odd) and
 * the report gives medians and the median of the per-round ratios.
 *
 * Per server and round, in this order on a fresh export:
 *   randwrite  4 KiB random writes, queue depth 16, --io-size of them, end_fsync (first touch of
 *              every block: copy-on-write territory for vmsnap)
 *   write      1 MiB sequential writes over the whole export, queue depth 8, end_fsync
 *   read       1 MiB sequential reads over the whole export, queue depth 8
 *   randwrite2 4 KiB random writes again, now into blocks written in the current generation
 *
 * The vmsnap server runs with UV_THREADPOOL_SIZE=--uv-threads (default 16): Node's default of 4
 * file I/O threads caps first-touch random writes, which block in the file system's allocator.
 *
 *   npx tsx bench/nbd/bench.ts [--size-mib 1024] [--iops-mib 80] [--rounds 3] [--dir /var/tmp]
 *                              [--uv-threads 16] [--cpu-prof]
 */
import { spawn, execFile, type ChildProcess } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import * as path from 'node:path';
import { promisify } from 'node:util';
import { fileURLToPath } from 'node:url';
import { median } from '../common/measure.js';

const run = promisify(execFile);
const here = path.dirname(fileURLToPath(import.meta.url));
const arg = (k: string, d: string): string => {
  const i = process.argv.indexOf(k);
  return i >= 0 ? process.argv[i + 1]! : d;
};
const SIZE_MIB = Number(arg('--size-mib', '1024'));
const SIZE = SIZE_MIB * 2 ** 20;
const IOPS_MIB = Number(arg('--iops-mib', '80'));
const ROUNDS = Number(arg('--rounds', '3'));
const DIR = arg('--dir', '/var/tmp');
/** libuv threads of the vmsnap server process (its file I/O pool; qemu-nbd --aio=threads uses up to 64). */
const UV_THREADS = arg('--uv-threads', '16');
const SERVER_ARGS = process.argv.includes('--cpu-prof') ? ['--cpu-prof', `--cpu-prof-dir=${path.join(DIR, 'nbd-prof')}`] : [];

type Server = 'qemu-nbd' | 'vmsnap';
const TESTS = ['randwrite', 'write', 'read', 'randwrite2'] as const;
type Test = (typeof TESTS)[number];
type Figures = Record<Test, number>;

async function waitFor(child: ChildProcess, sock: string): Promise<void> {
  for (let k = 0; k < 300; k++) {
    try {
      await run('nbdinfo', ['--size', `nbd+unix:///vol?socket=${sock}`]);
      return;
    } catch {
      if (child.exitCode !== null) throw new Error('server exited');
      await new Promise((r) => setTimeout(r, 100));
    }
  }
  throw new Error('server did not come up');
}

async function start(server: Server, dir: string, sock: string): Promise<ChildProcess> {
  let c: ChildProcess;
  if (server === 'vmsnap') {
    c = spawn(process.execPath, [...SERVER_ARGS, '--import', 'tsx', path.join(here, '../../test/cow/helpers/serve.ts'), path.join(dir, 'vol'), sock, '--create', String(SIZE)], {
      stdio: 'ignore',
      env: { ...process.env, UV_THREADPOOL_SIZE: UV_THREADS },
    });
  } else {
    const img = path.join(dir, 'qemu.raw');
    await run('qemu-img', ['create', '-f', 'raw', img, String(SIZE)]);
    // Same durability contract as the vmsnap server: host page cache, fsync on FLUSH.
    c = spawn('qemu-nbd', ['-t', '-f', 'raw', '-x', 'vol', '-k', sock, '--cache=writeback', '--aio=threads', '-e', '16', img], { stdio: 'ignore' });
  }
  await waitFor(c, sock);
  return c;
}

interface FioResult {
  jobs: { write: { iops: number; bw_bytes: number }; read: { iops: number; bw_bytes: number } }[];
}

async function fio(sock: string, test: Test): Promise<number> {
  const common = ['--name=t', '--ioengine=nbd', `--uri=nbd+unix:///vol?socket=${sock}`, `--size=${SIZE}`, '--output-format=json'];
  const spec: Record<Test, string[]> = {
    randwrite: ['--rw=randwrite', '--bs=4k', '--iodepth=16', `--io_size=${IOPS_MIB}m`, '--norandommap', '--randseed=42', '--end_fsync=1'],
    write: ['--rw=write', '--bs=1m', '--iodepth=8', '--end_fsync=1'],
    read: ['--rw=read', '--bs=1m', '--iodepth=8'],
    randwrite2: ['--rw=randwrite', '--bs=4k', '--iodepth=16', `--io_size=${IOPS_MIB}m`, '--norandommap', '--randseed=43', '--end_fsync=1'],
  };
  const { stdout } = await run('fio', [...common, ...spec[test]], { maxBuffer: 64 << 20 });
  const r = JSON.parse(stdout.slice(stdout.indexOf('{'))) as FioResult;
  const j = r.jobs[0]!;
  if (test === 'read') return j.read.bw_bytes / 2 ** 20;
  if (test === 'write') return j.write.bw_bytes / 2 ** 20;
  return j.write.iops;
}

async function measure(server: Server): Promise<Figures> {
  const dir = await mkdtemp(path.join(DIR, `nbdbench-${server}-`));
  const sock = path.join(dir, 'sock');
  const child = await start(server, dir, sock);
  try {
    const out = {} as Figures;
    for (const t of TESTS) out[t] = await fio(sock, t);
    return out;
  } finally {
    child.kill('SIGTERM');
    if (child.exitCode === null && child.signalCode === null) await new Promise((r) => child.once('exit', r));
    await rm(dir, { recursive: true, force: true });
  }
}

const results: Record<Server, Figures[]> = { 'qemu-nbd': [], vmsnap: [] };
for (let k = 0; k < ROUNDS; k++) {
  const order: Server[] = k % 2 === 0 ? ['qemu-nbd', 'vmsnap'] : ['vmsnap', 'qemu-nbd'];
  for (const s of order) {
    const f = await measure(s);
    results[s].push(f);
    console.log(`round ${k + 1} ${s.padEnd(8)} ${TESTS.map((t) => `${t} ${f[t].toFixed(0)}`).join(', ')}`);
  }
}
const unit: Record<Test, string> = { randwrite: 'IOPS', write: 'MiB/s', read: 'MiB/s', randwrite2: 'IOPS' };
console.log(`\nsize ${SIZE_MIB} MiB, ${IOPS_MIB} MiB of 4 KiB random writes, ${ROUNDS} interleaved rounds, fio nbd engine, vmsnap UV_THREADPOOL_SIZE=${UV_THREADS}`);
console.log('test         unit    qemu-nbd median   vmsnap median   ratio of medians   median per-round ratio');
for (const t of TESTS) {
  const q = results['qemu-nbd'].map((f) => f[t]);
  const v = results.vmsnap.map((f) => f[t]);
  const perRound = v.map((x, k) => x / q[k]!);
  console.log(
    `${t.padEnd(12)} ${unit[t].padEnd(6)} ${median(q).toFixed(0).padStart(16)} ${median(v).toFixed(0).padStart(15)} ${((100 * median(v)) / median(q)).toFixed(0).padStart(17)}% ${(100 * median(perRound)).toFixed(0).padStart(22)}%`,
  );
}
console.log('all rounds:', JSON.stringify(results));
