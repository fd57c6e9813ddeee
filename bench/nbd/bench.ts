/**
 * NBD data-path benchmark: the vmsnap server (its own process) against qemu-nbd serving a raw
 * file, same clients, same run. Sequential 1 MiB writes and reads with nbdcopy; 4 KiB random
 * writes at queue depth 16 with the same minimal client for both servers (fio is not installed).
 *
 *   npx tsx bench/nbd/bench.ts [--size-mib 1024] [--iops-ops 20000] [--rounds 2]
 */
import { spawn, execFile, type ChildProcess } from 'node:child_process';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { randomBytes } from 'node:crypto';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { promisify } from 'node:util';
import { fileURLToPath } from 'node:url';
import { TestNbdClient } from '../../test/cow/helpers/nbd-client.js';

const run = promisify(execFile);
const here = path.dirname(fileURLToPath(import.meta.url));
const arg = (k: string, d: number): number => {
  const i = process.argv.indexOf(k);
  return i >= 0 ? Number(process.argv[i + 1]) : d;
};
const SIZE = arg('--size-mib', 1024) * 2 ** 20;
const OPS = arg('--iops-ops', 20000);
const ROUNDS = arg('--rounds', 2);

async function waitFor(child: ChildProcess, sock: string): Promise<void> {
  for (let k = 0; k < 200; k++) {
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

async function startVmsnap(dir: string, sock: string): Promise<ChildProcess> {
  const c = spawn(process.execPath, ['--import', 'tsx', path.join(here, '../../test/cow/helpers/serve.ts'), path.join(dir, 'vol'), sock, '--create', String(SIZE)], { stdio: 'ignore' });
  await waitFor(c, sock);
  return c;
}

async function startQemuNbd(dir: string, sock: string): Promise<ChildProcess> {
  const img = path.join(dir, 'qemu.raw');
  await run('qemu-img', ['create', '-f', 'raw', img, String(SIZE)]);
  // Same durability contract as the vmsnap server: host page cache, fsync on FLUSH.
  const c = spawn('qemu-nbd', ['-t', '-f', 'raw', '-x', 'vol', '-k', sock, '--cache=writeback', '--aio=threads', '-e', '16', img], { stdio: 'ignore' });
  await waitFor(c, sock);
  return c;
}

async function timed(fn: () => Promise<unknown>): Promise<number> {
  const t = performance.now();
  await fn();
  return (performance.now() - t) / 1000;
}

async function randomWrites(sock: string): Promise<number> {
  const c = await TestNbdClient.connect(sock, 'vol');
  const buf = randomBytes(4096);
  const sectors = SIZE / 4096;
  let seed = 12345;
  let issued = 0;
  const t = performance.now();
  const worker = async (): Promise<void> => {
    while (issued < OPS) {
      issued++;
      seed = (seed * 1103515245 + 12345) >>> 0;
      await c.write((seed % sectors) * 4096, buf);
    }
  };
  await Promise.all(Array.from({ length: 16 }, worker));
  await c.flush();
  const s = (performance.now() - t) / 1000;
  c.close();
  return OPS / s;
}

async function measure(name: string, start: (dir: string, sock: string) => Promise<ChildProcess>, src: string): Promise<{ write: number; read: number; iops: number }> {
  const dir = await mkdtemp(path.join(tmpdir(), `nbdbench-${name}-`));
  const sock = path.join(dir, 'sock');
  const server = await start(dir, sock);
  try {
    const uri = `nbd+unix:///vol?socket=${sock}`;
    const mib = SIZE / 2 ** 20;
    const w = await timed(() => run('nbdcopy', ['--request-size=1048576', '--flush', src, uri]));
    const r = await timed(() => run('nbdcopy', ['--request-size=1048576', uri, 'null:']));
    const iops = await randomWrites(sock);
    return { write: mib / w, read: mib / r, iops };
  } finally {
    server.kill('SIGTERM');
    if (server.exitCode === null && server.signalCode === null) await new Promise((r) => server.once('exit', r));
    await rm(dir, { recursive: true, force: true });
  }
}

const srcDir = await mkdtemp(path.join('/dev/shm', 'nbdbench-src-'));
const src = path.join(srcDir, 'src.raw');
const block = randomBytes(2 ** 20);
const whole = Buffer.allocUnsafe(SIZE);
for (let o = 0; o < SIZE; o += block.length) {
  block.copy(whole, o);
  whole.writeUInt32LE(o / block.length, o); // no two MiB identical
}
await writeFile(src, whole);
const results: Record<string, { write: number; read: number; iops: number }[]> = { vmsnap: [], 'qemu-nbd': [] };
for (let k = 0; k < ROUNDS; k++) {
  results['qemu-nbd']!.push(await measure('qemu', startQemuNbd, src));
  results.vmsnap!.push(await measure('vmsnap', startVmsnap, src));
}
await rm(srcDir, { recursive: true, force: true });
const best = (l: { write: number; read: number; iops: number }[], k: 'write' | 'read' | 'iops'): number => Math.max(...l.map((x) => x[k]));
console.log(`size ${SIZE / 2 ** 20} MiB, ${OPS} random 4 KiB writes at QD16, best of ${ROUNDS} rounds (runs alternate)`);
console.log('server      seq write MiB/s   seq read MiB/s   4k randwrite IOPS');
for (const n of ['qemu-nbd', 'vmsnap'] as const) {
  console.log(`${n.padEnd(10)}  ${best(results[n]!, 'write').toFixed(0).padStart(15)}  ${best(results[n]!, 'read').toFixed(0).padStart(15)}  ${best(results[n]!, 'iops').toFixed(0).padStart(18)}`);
}
const ratio = (k: 'write' | 'read' | 'iops'): string => ((100 * best(results.vmsnap!, k)) / best(results['qemu-nbd']!, k)).toFixed(0) + '%';
console.log(`vmsnap/qemu-nbd: seq write ${ratio('write')}, seq read ${ratio('read')}, random write IOPS ${ratio('iops')}`);
console.log('all rounds:', JSON.stringify(results));
