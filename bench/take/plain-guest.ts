/**
 * The fixture Linux guest on plain QEMU (no vmsnap code in the loop), set up for background
 * snapshots, as bench/take/attribution.ts and bench/take/collapse-cost.ts use it: TCG, one vCPU,
 * a 256 MiB qcow2 disk, the guest rewriting 3/8 of its RAM at 12,800 pages/s (the workload of
 * bench/take/run.ts), and a snapshot that streams to a unix socket this process reads and discards.
 */
import { readFileSync, promises as fsp } from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { check } from '../common/measure.js';
import { guestArtifacts } from '../../fixtures/guest/index.js';
import { launchQemu, type QemuProcess } from '../../src/hypervisor/qemu.js';

export interface MigInfo {
  status?: string;
  downtime?: number;
  'setup-time'?: number;
  'total-time'?: number;
}

export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** AnonHugePages of `pid` in MiB: how much of QEMU's guest RAM is in transparent huge pages. */
export function anonHugeMiB(pid: number): number {
  const m = /AnonHugePages:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/smaps_rollup`, 'utf8'));
  return m ? Number(m[1]) / 1024 : NaN;
}

/**
 * Boots the guest in `dir` with background-snapshot enabled and unthrottled, and returns once its
 * workload has been running for a few seconds. The caller quits it.
 */
export async function bootPlainGuest(dir: string, memoryMiB: number): Promise<{ q: QemuProcess; areaMiB: number }> {
  const areaMiB = Math.floor((memoryMiB * 3) / 8);
  const g = guestArtifacts();
  const qcow = path.join(dir, 'disk.qcow2');
  await check('qemu-img', ['create', '-q', '-f', 'qcow2', qcow, '256M']);
  const q = await launchQemu({
    runDir: path.join(dir, 'run'), accel: 'tcg', memoryMiB, cpus: 1, kernel: g.kernel, initrd: g.initrd,
    append: `console=ttyS0 quiet vmsnap.mem=${areaMiB} vmsnap.rate=12800 vmsnap.disk=/dev/vda vmsnap.sweep_ms=60000 vmsnap.status_ms=50`,
    extraArgs: ['-drive', `file=${qcow},format=qcow2,if=virtio,cache=none`],
  });
  try {
    await q.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'background-snapshot', state: true }, { capability: 'events', state: true }] });
    await q.qmp.execute('migrate-set-parameters', { 'max-bandwidth': 64 * 1024 ** 3 });
    // Boot, stamp the area, run a little.
    for (let i = 0; i < 600; i++) {
      if ((await fsp.readFile(q.paths.serialLog, 'utf8').catch(() => '')).includes('VMSNAP-STATUS')) break;
      await sleep(100);
    }
    await sleep(4000);
  } catch (err) {
    await q.quit(10_000);
    throw err;
  }
  return { q, areaMiB };
}

export interface SnapshotHooks {
  /** Called once the first RAM bytes arrived (QEMU has armed write protection by then). */
  onRamFlowing?(): void;
  /** Called right before `migrate` is sent. */
  beforeMigrate?(): Promise<void>;
}

/**
 * Takes one background snapshot of `q` into a unix socket at `sock`, discards the stream, and
 * returns QEMU's migration info once it completed or failed, with the bytes read.
 */
export async function backgroundSnapshot(q: QemuProcess, sock: string, hooks: SnapshotHooks = {}): Promise<{ info: MigInfo; bytes: number }> {
  const server = net.createServer();
  await new Promise<void>((res) => server.listen(sock, () => res()));
  let bytes = 0;
  let flowing = false;
  const done = new Promise<void>((res) => {
    server.once('connection', (c) => {
      c.on('data', (b: Buffer) => {
        bytes += b.length;
        // Past the ~200-byte prefix: RAM records flow, so write protection is armed.
        if (!flowing && bytes > 8192) {
          flowing = true;
          hooks.onRamFlowing?.();
        }
      });
      c.on('close', () => res());
    });
  });
  try {
    if (hooks.beforeMigrate) await hooks.beforeMigrate();
    await q.qmp.execute('migrate', { uri: `unix:${sock}` });
    await done;
    let info: MigInfo = {};
    for (let i = 0; i < 200; i++) {
      info = await q.qmp.execute<MigInfo>('query-migrate');
      if (info.status === 'completed' || info.status === 'failed') break;
      await sleep(50);
    }
    return { info, bytes };
  } finally {
    server.close();
  }
}
