/**
 * bench/take/disk-change: the 1%-change take (issue #13, goal 3) against restic's second backup of
 * the same image, side by side in one run.
 *
 *   npx tsx bench/take/disk-change.ts [--rounds 5] [--writes 328]
 *
 * The disk: bench/ingest/make-image.sh (2 GiB ext4 holding ~1.2 GiB of /usr). vmsnap: a stopped VM
 * created with `vm create --disk-from` of that image, one full `take --disk-only`, then per round
 * `--writes` random 4 KiB writes through NBD (qemu-io against the VM's volume, served by vmsnap's
 * own NBD server) and a timed `take --disk-only`. restic: the same image file, a first `restic
 * backup`, then per round the same writes at the same offsets into the file and a timed `restic
 * backup` (its "second backup"). Both warm (the page cache holds the image, as it would right after
 * the writes), both timed as a user runs them: a fresh process, start-up included.
 *
 * Also timed once: `vm create --disk-from` of the image against reading it once (`cat`) and copying
 * it sparse (`cp --sparse=always`), the "as fast as reading the image once".
 */
import { randomBytes } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { benchRoot, check, fmt, freshDir, measure, median, argNum, table, type Measured } from '../common/measure.js';
import { REPO_ROOT, vmCli } from '../common/vmsnap-cli.js';

const ROUNDS = argNum('--rounds', 5);
const WRITES = argNum('--writes', 328);
const PASSWORD = 'bench-password';
const VM = 'dc';

interface Write {
  offset: number;
  data: Buffer;
}

function randomWrites(size: number, seed: number): Write[] {
  // Deterministic offsets per round (a tiny LCG); contents random.
  let s = seed >>> 0;
  const next = () => (s = (Math.imul(s, 1664525) + 1013904223) >>> 0);
  const blocks = size / 4096;
  return Array.from({ length: WRITES }, () => ({ offset: (next() % blocks) * 4096, data: randomBytes(4096) }));
}

async function main(): Promise<void> {
  const root = benchRoot();
  const work = await freshDir(root, 'disk-change');
  await check('bash', [path.join(REPO_ROOT, 'bench/ingest/make-image.sh')], { env: { ...process.env, BENCH_DIR: root } });
  const image = path.join(root, 'images', 'base.img');
  const size = (await fsp.stat(image)).size;
  const resticVersion = (await check('restic', ['version'])).trim().split('\n')[0];
  const out = (l: string) => console.log(l);
  out(`# bench/take/disk-change: ${WRITES} random 4 KiB writes per round, ${ROUNDS} rounds; image ${fmt(size / 2 ** 30, 2)} GiB; ${resticVersion}; node ${process.version}`);
  out(`# load average at start: ${(await fsp.readFile('/proc/loadavg', 'utf8')).split(' ').slice(0, 3).join(' ')}`);

  const { cli, dataDir } = await vmCli(work, 'vmsnap');
  const bin = path.join(work, 'build-vmsnap', 'bin', 'vmsnap.js');
  const env = { ...process.env, VMSNAP_DATA_DIR: dataDir, VMSNAP_REPO: path.join(work, 'vmsnap-repo') };
  const vmsnap = (args: string[]): Promise<Measured> => measure(process.execPath, [bin, ...args], { env });
  const kernel = path.join(REPO_ROOT, 'fixtures/guest/build/vmlinuz');

  // vm create --disk-from against reading and copying the image once (all warm: read it first).
  await check('cat', [image], {}).catch(() => undefined);
  const cat = await measure('bash', ['-c', `cat ${JSON.stringify(image)} > /dev/null`]);
  const cp = await measure('cp', ['--sparse=always', image, path.join(work, 'copy.img')]);
  await fsp.rm(path.join(work, 'copy.img'));
  const create = await vmsnap(['vm', 'create', VM, '--disk-from', image, '--kernel', kernel, '--net', 'none']);
  const first = await vmsnap(['take', VM, '--disk-only']);

  // restic: its own copy of the image and a first backup.
  const resticRepo = path.join(work, 'restic-repo');
  const resticEnv = { ...process.env, RESTIC_PASSWORD: PASSWORD, RESTIC_CACHE_DIR: path.join(work, 'restic-cache') };
  const resticFile = path.join(work, 'disk.img');
  await check('cp', ['--sparse=always', image, resticFile]);
  await check('restic', ['-r', resticRepo, 'init'], { env: resticEnv });
  const resticFirst = await measure('restic', ['-r', resticRepo, '--quiet', 'backup', resticFile], { env: resticEnv });

  // The VM's volume, served over NBD by vmsnap's own server (from the same build) for qemu-io.
  const build = path.join(work, 'build-vmsnap');
  const { Volume } = (await import(path.join(build, 'src/cow/volume.js'))) as typeof import('../../src/cow/volume.js');
  const { NbdServer } = (await import(path.join(build, 'src/cow/nbd-server.js'))) as typeof import('../../src/cow/nbd-server.js');
  const volumeDir = path.join(dataDir, 'vms', VM, 'disks', 'disk0');
  const sock = path.join(work, 'nbd.sock');

  const rows: { take: Measured; restic: Measured }[] = [];
  for (let r = 0; r < ROUNDS; r++) {
    const writes = randomWrites(size, 1000 + r);
    const v = await Volume.open(volumeDir);
    const server = new NbdServer();
    server.addExport('disk0', v);
    await server.listen({ socketPath: sock });
    const script = path.join(work, `writes-${r}`);
    const cmds: string[] = [];
    for (const [i, w] of writes.entries()) {
      const f = `${script}.${i}`;
      await fsp.writeFile(f, w.data);
      cmds.push(`write -s ${f} ${w.offset} 4096`);
    }
    await fsp.writeFile(`${script}.cmds`, cmds.join('\n') + '\n');
    await check('bash', ['-c', `qemu-io -f raw 'nbd+unix:///disk0?socket=${sock}' < ${script}.cmds > /dev/null`]);
    await server.close();
    await v.close();
    const fh = await fsp.open(resticFile, 'r+');
    for (const w of writes) await fh.write(w.data, 0, 4096, w.offset);
    await fh.close();
    for (let i = 0; i < writes.length; i++) await fsp.rm(`${script}.${i}`);

    const take = await vmsnap(['take', VM, '--disk-only']);
    const restic = await measure('restic', ['-r', resticRepo, '--quiet', 'backup', resticFile], { env: resticEnv });
    rows.push({ take, restic });
    out(`round ${r + 1}: vmsnap take --disk-only ${fmt(take.seconds, 3)} s (cpu ${fmt(take.cpuSeconds, 2)} s, ${fmt(take.peakRssMiB, 0)} MiB); restic backup ${fmt(restic.seconds, 2)} s (cpu ${fmt(restic.cpuSeconds, 2)} s, ${fmt(restic.peakRssMiB, 0)} MiB)`);
  }

  const med = (f: (x: { take: Measured; restic: Measured }) => number) => median(rows.map(f));
  const takeS = med((x) => x.take.seconds);
  const resticS = med((x) => x.restic.seconds);
  out('');
  out(
    table(
      ['step', 'vmsnap s', 'peer', 'peer s', 'x peer (higher: vmsnap faster)'],
      [
        ['1%-change take (median, wall incl. start)', fmt(takeS, 3), 'restic second backup', fmt(resticS, 2), fmt(resticS / takeS, 1)],
        ['  same, CPU seconds', fmt(med((x) => x.take.cpuSeconds), 3), 'restic', fmt(med((x) => x.restic.cpuSeconds), 2), fmt(med((x) => x.restic.cpuSeconds) / med((x) => x.take.cpuSeconds), 1)],
        ['first take / first backup', fmt(first.seconds, 2), 'restic first backup', fmt(resticFirst.seconds, 2), fmt(resticFirst.seconds / first.seconds, 1)],
        ['vm create --disk-from (warm)', fmt(create.seconds, 2), 'cp --sparse=always', fmt(cp.seconds, 2), fmt(cp.seconds / create.seconds, 2)],
        ['', '', 'cat (read once)', fmt(cat.seconds, 2), fmt(cat.seconds / create.seconds, 2)],
      ],
    ),
  );
  out(`goal (issue #13): 1%-change take <= 0.3 s wall including start-up, >= 30x restic; vm create --disk-from as fast as reading the image once`);
  await cli(['vm', 'rm', VM]).catch(() => undefined);
  await fsp.rm(work, { recursive: true, force: true });
}

await main();
