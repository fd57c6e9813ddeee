/**
 * bench/ingest: vmsnap's repository against restic, side by side, in one run.
 *
 *   npx tsx bench/ingest/run.ts [--rounds N] [--tools vmsnap,vmsnap-enc,vmsnap-lz4,restic] [--no-drop]
 *
 * For each tool, on the same 2 GiB ext4 image (make-image.sh) at the same path:
 *   1. first backup (vmsnap import / restic backup) into an empty repository;
 *   2. restore (vmsnap export / restic restore) to a file, verified bit-identical by SHA-256;
 *      vmsnap also once more with `export --no-fsync` (restic never fsyncs what it restores);
 *   3. second backup after 1% of the image's 64 KiB blocks changed (mutate.ts);
 *   4. third backup after 1% of its 4 KiB blocks changed (from the base image), the honest case:
 *      each 4 KiB change dirties a whole 64 KiB chunk.
 * Each step is a separate process, as a user runs it: vmsnap is its real CLI, compiled by tsc into
 * the bench directory (cli/main.js, what bin/vmsnap.js runs); restic is the Debian binary. Wall
 * time is measured here, peak RSS and CPU by GNU time. The page cache is dropped before each timed
 * step (root only). Repository growth is the apparent size of all files under the repository
 * directory, after minus before.
 */
import { parseArgs } from 'node:util';
import { promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { loadavg } from 'node:os';
import { fileURLToPath } from 'node:url';
import { benchRoot, check, dirBytes, dropCaches, fmt, freshDir, MB, measure, median, mib, sha256File, table, type Measured } from '../common/measure.js';
import { buildCli } from '../common/vmsnap-cli.js';
import { mutateImage, type Mutation } from './mutate.js';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const PASSWORD = 'bench-password-not-secret';

type StepName = 'backup' | 'restore' | 'restore --no-fsync' | 'backup+1%64K' | 'backup+1%4K';

interface StepResult extends Measured {
  step: StepName;
  /** Repository growth in bytes (backups only). */
  growth: number;
  /** 1-minute load average just before the step: how busy the shared machine was. */
  load: number;
}

interface ToolRun {
  tool: string;
  round: number;
  steps: StepResult[];
  repoBytes: number;
}

interface Tool {
  name: string;
  /** Codec whose compressed size of the changed blocks is the reference for growth. */
  codec: 'zstd' | 'lz4';
  init(repo: string): Promise<void>;
  backup(repo: string, file: string): Promise<Measured>;
  /** Restores the latest snapshot; returns the restored file's path with the measurement. */
  restore(repo: string, outDir: string, source: string): Promise<Measured & { file: string }>;
  /**
   * vmsnap only: the same restore without the final fsync, as restic restores (restic never
   * fsyncs): the like-for-like comparison, printed beside the default one.
   */
  restoreNoFsync?(repo: string, outDir: string): Promise<Measured & { file: string }>;
}

function vmsnapTool(name: string, cliMain: string, root: string, opts: { encrypt: boolean; codec: 'zstd' | 'lz4' }): Tool {
  const env = {
    ...process.env,
    VMSNAP_PASSWORD: PASSWORD,
    XDG_CONFIG_HOME: path.join(root, 'xdg-config'),
    XDG_DATA_HOME: path.join(root, 'xdg-data'),
  };
  const cli = (repo: string, ...args: string[]) => [cliMain, '--repo', repo, '--quiet', ...args];
  return {
    name,
    codec: opts.codec,
    async init(repo) {
      await check(process.execPath, cli(repo, 'init', '--codec', opts.codec, ...(opts.encrypt ? ['--encrypt'] : [])), { env });
    },
    backup: (repo, file) => measure(process.execPath, cli(repo, '--json', 'import', file, '--vm', 'bench'), { env }),
    async restore(repo, outDir) {
      const file = path.join(outDir, 'restored.img');
      const m = await measure(process.execPath, cli(repo, 'export', 'latest', file), { env });
      return { ...m, file };
    },
    async restoreNoFsync(repo, outDir) {
      const file = path.join(outDir, 'restored.img');
      const m = await measure(process.execPath, cli(repo, 'export', '--no-fsync', 'latest', file), { env });
      return { ...m, file };
    },
  };
}

function resticTool(root: string): Tool {
  const env = { ...process.env, RESTIC_PASSWORD: PASSWORD, RESTIC_CACHE_DIR: path.join(root, 'restic-cache') };
  return {
    name: 'restic',
    codec: 'zstd',
    async init(repo) {
      await fsp.rm(env.RESTIC_CACHE_DIR, { recursive: true, force: true });
      await check('restic', ['-r', repo, 'init'], { env });
    },
    backup: (repo, file) => measure('restic', ['-r', repo, '--quiet', 'backup', file], { env }),
    async restore(repo, outDir, source) {
      const m = await measure('restic', ['-r', repo, '--quiet', 'restore', 'latest', '--target', outDir], { env });
      return { ...m, file: path.join(outDir, source) };
    },
  };
}

async function runTool(tool: Tool, round: number, root: string, images: { base: string; m64: Mutation; m4: Mutation }, drop: boolean, sourceHash: string): Promise<ToolRun> {
  const work = await freshDir(root, `work-${tool.name}`);
  const repo = path.join(work, 'repo');
  const disk = path.join(work, 'disk.img'); // one path for every version, like a VM's disk file
  const restoreDir = path.join(work, 'restore');
  await tool.init(repo);
  const steps: StepResult[] = [];
  const backup = async (step: StepName, image: string) => {
    await fsp.rm(disk, { force: true });
    await fsp.link(image, disk);
    const before = await dirBytes(repo);
    if (drop) await dropCaches();
    const load = loadavg()[0]!;
    const m = await tool.backup(repo, disk);
    steps.push({ step, ...m, growth: (await dirBytes(repo)) - before, load });
    log(`${tool.name} r${round} ${step}: ${fmt(m.seconds, 2)} s, ${fmt(m.peakRssMiB, 0)} MiB RSS`);
  };
  await backup('backup', images.base);
  const restores: [StepName, (repo: string, outDir: string, source: string) => Promise<Measured & { file: string }>][] = [['restore', (r, o, src) => tool.restore(r, o, src)]];
  if (tool.restoreNoFsync) restores.push(['restore --no-fsync', (r, o) => tool.restoreNoFsync!(r, o)]);
  for (const [step, restore] of restores) {
    await fsp.mkdir(restoreDir, { recursive: true });
    if (drop) await dropCaches();
    const load = loadavg()[0]!;
    const m = await restore(repo, restoreDir, disk);
    const hash = await sha256File(m.file);
    if (hash !== sourceHash) throw new Error(`${tool.name}: restored image differs from the source (sha256 ${hash} != ${sourceHash})`);
    steps.push({ step, ...m, growth: 0, load });
    log(`${tool.name} r${round} ${step}: ${fmt(m.seconds, 2)} s, ${fmt(m.peakRssMiB, 0)} MiB RSS, sha256 ok`);
    await fsp.rm(restoreDir, { recursive: true, force: true });
  }
  await backup('backup+1%64K', images.m64.out);
  await backup('backup+1%4K', images.m4.out);
  const repoBytes = await dirBytes(repo);
  await fsp.rm(work, { recursive: true, force: true });
  return { tool: tool.name, round, steps, repoBytes };
}

function log(s: string): void {
  process.stderr.write(`${s}\n`);
}


async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      rounds: { type: 'string', default: '1' },
      tools: { type: 'string', default: 'vmsnap,vmsnap-enc,restic,vmsnap-lz4' },
      'no-drop': { type: 'boolean', default: false },
    },
  });
  const rounds = Number(values.rounds);
  const drop = !values['no-drop'];
  const root = benchRoot();
  await fsp.mkdir(root, { recursive: true });

  const base = path.join(root, 'images/base.img');
  await check('bash', [path.join(HERE, 'make-image.sh'), base], { env: { ...process.env, BENCH_DIR: root } });
  const m64 = await mutateImage(base, path.join(root, 'images/mut-64k.img'), 64 << 10);
  const m4 = await mutateImage(base, path.join(root, 'images/mut-4k.img'), 4 << 10);
  const imageSize = (await fsp.stat(base)).size;
  const sourceHash = await sha256File(base);
  const cliMain = await buildCli(root, 'build-ingest');
  const resticVersion = (await check('restic', ['version'])).trim();

  const all: Record<string, Tool> = {
    vmsnap: vmsnapTool('vmsnap', cliMain, root, { encrypt: false, codec: 'zstd' }),
    'vmsnap-enc': vmsnapTool('vmsnap-enc', cliMain, root, { encrypt: true, codec: 'zstd' }),
    'vmsnap-lz4': vmsnapTool('vmsnap-lz4', cliMain, root, { encrypt: false, codec: 'lz4' }),
    restic: resticTool(root),
  };
  const tools = values.tools.split(',').map((n) => {
    const t = all[n];
    if (!t) throw new Error(`unknown tool ${n} (known: ${Object.keys(all).join(', ')})`);
    return t;
  });

  const runs: ToolRun[] = [];
  for (let r = 1; r <= rounds; r++) {
    // Alternate the order between rounds, so neither tool always runs first on a quiet machine.
    const order = r % 2 ? tools : [...tools].reverse();
    for (const t of order) runs.push(await runTool(t, r, root, { base, m64, m4 }, drop, sourceHash));
  }

  // ---- report: medians over rounds ----
  const med = (tool: string, step: StepName, f: (s: StepResult) => number) =>
    median(runs.filter((x) => x.tool === tool).map((x) => f(x.steps.find((s) => s.step === step)!)));
  const has = (tool: string, step: StepName) => runs.some((x) => x.tool === tool && x.steps.some((s) => s.step === step));
  const steps: StepName[] = ['backup', 'restore', 'restore --no-fsync', 'backup+1%64K', 'backup+1%4K'];
  // The peer's restore for both restore rows: restic has one way (it never fsyncs).
  const peerStep = (step: StepName): StepName => (step === 'restore --no-fsync' ? 'restore' : step);
  const isRestore = (step: StepName) => step.startsWith('restore');
  const hasRestic = tools.some((t) => t.name === 'restic');
  const lines: string[] = [];
  const out = (s = '') => lines.push(s);
  out(`image: ${base} (${mib(imageSize, 0)} MiB, ext4 with ~1.2 GiB of /usr), ${restic(resticVersion)}, node ${process.version}`);
  out(`rounds: ${rounds} (figures are medians), page cache ${drop ? 'dropped before each step' : 'NOT dropped'}`);
  out(`MB/s = image size (${fmt(imageSize / MB, 0)} MB) / wall seconds; "x restic" = restic seconds / tool seconds (higher is faster);`);
  out('"CPU x restic" = restic CPU seconds (user+sys) / tool CPU seconds: less sensitive to other load on a shared machine');
  out();
  const rows: string[][] = [];
  for (const t of tools) {
    for (const step of steps.filter((st) => has(t.name, st))) {
      const secs = med(t.name, step, (s) => s.seconds);
      const rSecs = hasRestic ? med('restic', peerStep(step), (s) => s.seconds) : NaN;
      const rss = med(t.name, step, (s) => s.peakRssMiB);
      rows.push([
        t.name,
        step,
        fmt(secs, 2),
        fmt(imageSize / MB / secs, 0),
        t.name === 'restic' || !hasRestic ? '–' : `${fmt(rSecs / secs, 2)}x`,
        fmt(med(t.name, step, (s) => s.cpuSeconds), 1),
        t.name === 'restic' || !hasRestic ? '–' : `${fmt(med('restic', peerStep(step), (s) => s.cpuSeconds) / med(t.name, step, (s) => s.cpuSeconds), 2)}x`,
        fmt(rss, 0),
        isRestore(step) ? '–' : mib(med(t.name, step, (s) => s.growth), 1),
        isRestore(step) || !hasRestic || t.name === 'restic' ? '–' : `${fmt(med(t.name, step, (s) => s.growth) / med('restic', step, (s) => s.growth), 2)}x`,
      ]);
    }
  }
  out(table(['tool', 'step', 'seconds', 'MB/s', 'x restic', 'CPU s', 'CPU x restic', 'peak RSS MiB', 'repo growth MiB', 'growth / restic'], rows));
  out();
  out(`changed blocks: 64K variant ${m64.blocks.length} × 64 KiB blocks (${mib(m64.changedBytes)} MiB); 4K variant ${m4.blocks.length} × 4 KiB blocks (${mib(m4.changedBytes)} MiB) dirtying ${m4.dirtiedChunks} chunks of 64 KiB (${mib(m4.dirtiedChunks * 65536)} MiB)`);
  out('compressed size of the changed blocks = sum of each changed block compressed on its own (zstd -3, or lz4 for the lz4 repository), measured on the new contents');
  out();
  const grow: string[][] = [];
  for (const t of tools) {
    const c64 = t.codec === 'lz4' ? m64.lz4Bytes : m64.zstdBytes;
    const c4 = t.codec === 'lz4' ? m4.lz4Bytes : m4.zstdBytes;
    const c4chunks = t.codec === 'lz4' ? m4.chunkLz4Bytes : m4.chunkZstdBytes;
    const g64 = med(t.name, 'backup+1%64K', (s) => s.growth);
    const g4 = med(t.name, 'backup+1%4K', (s) => s.growth);
    grow.push([
      t.name,
      `${mib(g64, 2)} / ${mib(c64, 2)}`,
      `${fmt(g64 / c64, 2)}x`,
      `${mib(g4, 2)} / ${mib(c4, 2)}`,
      `${fmt(g4 / c4, 2)}x`,
      `${fmt(g4 / c4chunks, 2)}x`,
      mib(median(runs.filter((x) => x.tool === t.name).map((x) => x.repoBytes)), 0),
    ]);
  }
  out(
    table(
      ['tool', '1%64K: growth / compressed MiB', 'ratio (target ≤ 1.5)', '1%4K: growth / compressed 4K blocks MiB', 'ratio', 'ratio vs dirtied 64K chunks', 'repo after 3 backups MiB'],
      grow,
    ),
  );
  if (hasRestic) {
    out();
    out('targets (vmsnap plain and encrypted against restic, which always encrypts):');
    for (const t of tools.filter((x) => x.name !== 'restic')) {
      const ing = med('restic', 'backup', (s) => s.seconds) / med(t.name, 'backup', (s) => s.seconds);
      const exp = med('restic', 'restore', (s) => s.seconds) / med(t.name, 'restore', (s) => s.seconds);
      const like = has(t.name, 'restore --no-fsync') ? med('restic', 'restore', (s) => s.seconds) / med(t.name, 'restore --no-fsync', (s) => s.seconds) : NaN;
      const rss = Math.max(...steps.filter((st) => has(t.name, st)).map((st) => med(t.name, st, (s) => s.peakRssMiB)));
      const g = med(t.name, 'backup+1%64K', (s) => s.growth) / (t.codec === 'lz4' ? m64.lz4Bytes : m64.zstdBytes);
      out(
        `  ${t.name}: ingest ${fmt(ing, 2)}x restic (≥ 1.5 ${ing >= 1.5 ? 'met' : 'NOT met'}), export ${fmt(exp, 2)}x restic restore (≥ 1.5 ${exp >= 1.5 ? 'met' : 'NOT met'}; ` +
          `without its fsync, like restic: ${fmt(like, 2)}x), ` +
          `peak RSS ${fmt(rss, 0)} MiB (≤ 300 ${rss <= 300 ? 'met' : 'NOT met'}), growth ${fmt(g, 2)}x compressed changed blocks (≤ 1.5 ${g <= 1.5 ? 'met' : 'NOT met'})`,
      );
    }
  }
  if (rounds > 1) {
    out();
    out('per round (seconds: backup / restore / [restore --no-fsync /] +1%64K / +1%4K; [1-minute load average before each step])');
    for (const x of runs) {
      out(`  r${x.round} ${x.tool}: ${x.steps.map((s) => fmt(s.seconds, 2)).join(' / ')}  [${x.steps.map((s) => fmt(s.load, 1)).join(' ')}]`);
    }
  }
  const report = lines.join('\n');
  console.log(report);
  const stamp = new Date().toISOString().replace(/[:.]/g, '-');
  await fsp.writeFile(path.join(root, `results-${stamp}.json`), JSON.stringify({ imageSize, m64: { ...m64, blocks: undefined }, m4: { ...m4, blocks: undefined }, runs }, null, 1));
  await fsp.writeFile(path.join(root, `results-${stamp}.txt`), `${report}\n`);
  log(`results: ${path.join(root, `results-${stamp}.{txt,json}`)}`);
}

function restic(version: string): string {
  return version.split(' ').slice(0, 2).join(' ');
}

await main();
