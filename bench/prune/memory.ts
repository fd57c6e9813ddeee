/**
 * Peak memory of `vmsnap prune` and `vmsnap check` on a repository with millions of chunks: this
 * checkout against an older revision, built side by side and run on the same repository in the
 * same run.
 *
 *   npx tsx bench/prune/memory.ts [--chunks 2000000] [--share 1] [--compare 14ef8f3~1] [--rounds 2]
 *
 * `--share N`: every live chunk is referenced by N of the 10 snapshots (a chain of daily snapshots
 * of a disk that changes little shares nearly everything).
 *
 * The repository is synthetic, written through the store's own encoders: index files naming
 * `--chunks` random chunk ids in packs of 2,048 entries, stand-in pack objects (prune only lists
 * packs it keeps, it reads a pack only to repack it; check without --read-data compares the index
 * with pack sizes: the stand-ins are sparse files of the right size), and 10 snapshots referencing 90% of the
 * chunks, every pack 90% live, so nothing is repacked or deleted. Each prune then marks the live
 * chunks, decides per pack, and writes one new index superseding the old ones; that work is what
 * scales with the chunk count, and what is measured. Each round starts from a fresh copy of the
 * repository (a prune replaces the index files). No peer: restic's repository of 2 million blobs
 * would be a ~2 TB backup.
 */
import { randomBytes } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { encodeIndexFile } from '../../src/store/chunk-index.js';
import { LocalBackend } from '../../src/store/backend/local.js';
import { Repository } from '../../src/store/repository.js';
import { contentHash } from '../../src/store/hash.js';
import { benchRoot, check, fmt, freshDir, measure, table } from '../common/measure.js';
import { buildCli, REPO_ROOT } from '../common/vmsnap-cli.js';

const args = process.argv.slice(2);
const opt = (name: string, dflt: string): string => {
  const i = args.indexOf(`--${name}`);
  return i >= 0 && args[i + 1] ? args[i + 1]! : dflt;
};
const CHUNKS = Number(opt('chunks', '2000000'));
const COMPARE = opt('compare', '14ef8f3~1');
const ROUNDS = Number(opt('rounds', '2'));
const SHARE = Math.min(10, Math.max(1, Number(opt('share', '1'))));
const PER_PACK = 2048;
const CHUNK = 65536;
const SNAPSHOTS = 10;

async function buildRevision(root: string, rev: string): Promise<string> {
  const src = await freshDir(root, 'prune-src-old');
  const tar = path.join(root, 'prune-src-old.tar');
  await check('git', ['-C', REPO_ROOT, 'archive', '-o', tar, rev, 'src', 'cli', 'tsconfig.json', 'tsconfig.build.json']);
  await check('tar', ['-x', '-f', tar, '-C', src]);
  await fsp.symlink(path.join(REPO_ROOT, 'node_modules'), path.join(src, 'node_modules'));
  await fsp.writeFile(path.join(src, 'package.json'), '{ "type": "module" }\n'); // ESM, as the package
  const out = await freshDir(root, 'prune-build-old');
  await check(path.join(REPO_ROOT, 'node_modules/.bin/tsc'), ['-p', path.join(src, 'tsconfig.build.json'), '--outDir', out], { cwd: src });
  await fsp.writeFile(path.join(out, 'package.json'), '{ "type": "module" }\n');
  await fsp.symlink(path.join(REPO_ROOT, 'node_modules'), path.join(out, 'node_modules'));
  await fsp.symlink(path.join(REPO_ROOT, '.cache'), path.join(out, '.cache'));
  return path.join(out, 'cli/main.js');
}

async function makeRepository(dir: string): Promise<void> {
  const repo = await Repository.init(new LocalBackend(dir), {});
  const session = await repo.beginWrite('bench');
  const packs = Math.ceil(CHUNKS / PER_PACK);
  const ids = randomBytes(CHUNKS * 32);
  const live: Buffer[] = [];
  let batch: { pack: string; entries: { id: Buffer; offset: number; storedLength: number; rawLength: number; codec: number }[] }[] = [];
  const flushIndex = async (): Promise<void> => {
    if (!batch.length) return;
    const bytes = encodeIndexFile({ packs: batch, superseded: [] }, null);
    await repo.backend.put('index', contentHash(bytes).toString('hex'), bytes);
    batch = [];
  };
  for (let p = 0; p < packs; p++) {
    const name = randomBytes(32).toString('hex');
    await repo.backend.put('packs', name, Buffer.alloc(16));
    await fsp.truncate(path.join(dir, 'packs', name.slice(0, 2), name), 16 + PER_PACK * 100); // sparse
    const entries = [];
    for (let k = 0; k < PER_PACK && p * PER_PACK + k < CHUNKS; k++) {
      const id = ids.subarray((p * PER_PACK + k) * 32, (p * PER_PACK + k + 1) * 32);
      entries.push({ id, offset: 8 + k * 100, storedLength: 100, rawLength: CHUNK, codec: 1 });
      if (k % 10 !== 9) live.push(id); // 90% of every pack referenced
    }
    batch.push({ pack: name, entries });
    if (batch.length === 100) await flushIndex();
  }
  await flushIndex();
  await repo.refreshIndex(); // the index files were written behind the repository's back
  const per = Math.ceil(live.length / SNAPSHOTS);
  for (let s = 0; s < SNAPSHOTS; s++) {
    // Slices s..s+SHARE-1 (wrapping): each live chunk lands in SHARE snapshots.
    const parts: Buffer[] = [];
    for (let k = 0; k < SHARE; k++) {
      const slice = (s + k) % SNAPSHOTS;
      for (const id of live.slice(slice * per, (slice + 1) * per)) parts.push(id);
    }
    const chunks = Buffer.concat(parts);
    await repo.saveSnapshot({
      vm: 'synthetic',
      tags: [],
      parent: null,
      meta: {},
      streams: [{ name: 'disk0', kind: 'disk', size: (chunks.length / 32) * CHUNK, chunkSize: CHUNK, chunks }],
    });
  }
  await session.end();
  await repo.close();
}

const root = benchRoot();
console.log(`building this checkout and ${COMPARE}…`);
const current = await buildCli(root, 'prune-build-current');
const old = await buildRevision(root, COMPARE);
const template = await freshDir(root, 'prune-template');
console.log(`writing a synthetic repository: ${CHUNKS} chunks in ${Math.ceil(CHUNKS / PER_PACK)} packs, ${SNAPSHOTS} snapshots, each live chunk in ${SHARE}…`);
await makeRepository(template);
const rows: string[][] = [];
const results = new Map<string, { seconds: number[]; rss: number[] }>();
for (let r = 1; r <= ROUNDS; r++) {
  for (const [label, cli] of [
    ['current', current],
    [COMPARE, old],
  ] as const) {
    const dir = path.join(root, 'prune-run');
    await fsp.rm(dir, { recursive: true, force: true });
    await check('cp', ['-a', '--sparse=always', template, dir]);
    for (const op of ['check', 'prune'] as const) {
      const m = await measure(process.execPath, [cli, '--repo', dir, '--json', op]);
      let what: string;
      if (op === 'prune') {
        const st = JSON.parse(m.stdout) as { liveChunks: number; packsDeleted: number; packsRepacked: number };
        if (st.packsRepacked !== 0 || st.packsDeleted !== 0) throw new Error(`${label}: prune repacked or deleted packs: ${m.stdout}`);
        what = `${st.liveChunks} live chunks`;
      } else {
        const rep = JSON.parse(m.stdout) as { problems: unknown[]; chunks: number };
        if (rep.problems.length) throw new Error(`${label}: check found problems: ${m.stdout.slice(0, 2000)}`);
        what = `${rep.chunks} chunks, no problems`;
      }
      const key = `${op} ${label}`;
      const acc = results.get(key) ?? { seconds: [], rss: [] };
      results.set(key, acc);
      acc.seconds.push(m.seconds);
      acc.rss.push(m.peakRssMiB);
      rows.push([`r${r}`, op, label, fmt(m.seconds, 2), fmt(m.peakRssMiB, 0), what]);
    }
  }
}
console.log(table(['round', 'command', 'code', 'seconds', 'peak RSS MiB', 'result'], rows));
const min = (a: number[]): number => Math.min(...a);
for (const op of ['check', 'prune']) {
  const cur = results.get(`${op} current`)!;
  const was = results.get(`${op} ${COMPARE}`)!;
  console.log(
    `${op}, ${CHUNKS} chunks: peak RSS ${fmt(min(cur.rss), 0)} MiB (this checkout) vs ${fmt(min(was.rss), 0)} MiB (${COMPARE}); ` +
      `time ${fmt(min(cur.seconds), 2)} s vs ${fmt(min(was.seconds), 2)} s (best of ${ROUNDS})`,
  );
}
