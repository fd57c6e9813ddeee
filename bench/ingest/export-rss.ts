/**
 * Peak RSS of `vmsnap export` against how well the data compresses.
 *
 *   npx tsx bench/ingest/export-rss.ts [--mib 1024]
 *
 * Export reads runs of chunks that sit together in a pack as one group and decodes a group in one
 * worker job. Two streams of the same size: one of incompressible bytes, one whose 64 KiB chunks
 * are all different but compress ~1000:1 (a counter and text filler, like a log or a sparse file
 * filled with a pattern). Peak RSS should not depend on the compression ratio.
 */
import { parseArgs } from 'node:util';
import { promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { randomFillSync } from 'node:crypto';
import { benchRoot, check, dropCaches, fmt, freshDir, measure, sha256File, table } from '../common/measure.js';
import { buildCli } from '../common/vmsnap-cli.js';

const CHUNK = 64 << 10;

async function writeStream(file: string, mib: number, kind: 'random' | 'compressible'): Promise<void> {
  const fh = await fsp.open(file, 'w');
  const block = Buffer.alloc(CHUNK, 'INFO 2024-06-01 vmsnap benchmark filler line\n');
  const batch = Buffer.allocUnsafe(4 << 20);
  const perBatch = batch.length / CHUNK;
  for (let i = 0; i < (mib << 20) / CHUNK; i += perBatch) {
    if (kind === 'random') randomFillSync(batch);
    else for (let k = 0; k < perBatch; k++) {
      block.writeUInt32LE(i + k, 0);
      block.copy(batch, k * CHUNK);
    }
    await fh.write(batch);
  }
  await fh.close();
}

async function main(): Promise<void> {
  const { values } = parseArgs({ options: { mib: { type: 'string', default: '1024' } } });
  const mib = Number(values.mib);
  const root = benchRoot();
  const cliMain = await buildCli(root, 'build-export-rss');
  const work = await freshDir(root, 'export-rss');
  const env = { ...process.env, XDG_CONFIG_HOME: path.join(work, 'xdg') };
  const rows: string[][] = [];
  for (const kind of ['random', 'compressible'] as const) {
    const src = path.join(work, `${kind}.img`);
    const repo = path.join(work, `repo-${kind}`);
    const out = path.join(work, `${kind}.out`);
    await writeStream(src, mib, kind);
    await check(process.execPath, [cliMain, '--repo', repo, '--quiet', 'init'], { env });
    await dropCaches();
    const imp = await measure(process.execPath, [cliMain, '--repo', repo, '--quiet', 'import', src, '--vm', 'x'], { env });
    await dropCaches();
    const exp = await measure(process.execPath, [cliMain, '--repo', repo, '--quiet', 'export', 'latest', out], { env });
    if ((await sha256File(out)) !== (await sha256File(src))) throw new Error(`${kind}: export differs from the source`);
    rows.push([kind, `${mib}`, fmt(imp.seconds, 2), fmt(imp.peakRssMiB, 0), fmt(exp.seconds, 2), fmt(exp.peakRssMiB, 0)]);
    await fsp.rm(src);
    await fsp.rm(out);
  }
  await fsp.rm(work, { recursive: true, force: true });
  console.log(table(['stream', 'MiB', 'import s', 'import peak RSS MiB', 'export s', 'export peak RSS MiB'], rows));
}

await main();
