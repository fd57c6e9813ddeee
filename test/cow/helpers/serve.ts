/**
 * Test/bench helper: serves one volume over NBD in its own process (so tests can kill -9 it).
 *   tsx serve.ts <volumeDir> <socketPath> [--create <size>] [--block-size N] [--store <dir>]
 *                [--repo <dir> [--snapshot-every <ms>]] [--name <export>]
 * Prints "ready" on stdout once listening. --store opens a DirChunkStore for base reads; --repo
 * opens a real Repository on a LocalBackend (base reads and snapshots). With --snapshot-every the
 * server takes a snapshot of the volume (snapshotVolume + saveSnapshot) every <ms> while it
 * serves, printing "snapshot <id>" after each commit and "snapshot-error <message>" on failure.
 */
import { Volume } from '../../../src/cow/volume.js';
import { NbdServer } from '../../../src/cow/nbd-server.js';
import { snapshotVolume } from '../../../src/cow/snapshot.js';
import type { ChunkStore } from '../../../src/cow/chunk-store.js';
import { Repository } from '../../../src/store/repository.js';
import { LocalBackend } from '../../../src/store/backend/local.js';
import { DirChunkStore } from './dir-store.js';

const [dir, sock, ...rest] = process.argv.slice(2);
if (!dir || !sock) throw new Error('usage: serve.ts <volumeDir> <socketPath> [--create size]');
const opt = (k: string): string | undefined => {
  const i = rest.indexOf(k);
  return i >= 0 ? rest[i + 1] : undefined;
};
const storeDir = opt('--store');
const repoDir = opt('--repo');
const repo = repoDir ? await Repository.open(new LocalBackend(repoDir)) : undefined;
const store: ChunkStore | undefined = repo ?? (storeDir ? new DirChunkStore(storeDir) : undefined);
const create = opt('--create');
const volume = create
  ? await Volume.create(dir, { size: Number(create), blockSize: Number(opt('--block-size') ?? 65536), store })
  : await Volume.open(dir, { store });
const server = new NbdServer();
server.addExport(opt('--name') ?? 'vol', volume);
await server.listen({ socketPath: sock });
process.stdout.write('ready\n');

let stopping = false;
const every = Number(opt('--snapshot-every') ?? 0);
const snapshots = (async (): Promise<void> => {
  if (!repo || !(every > 0)) return;
  let parent: string | null = null;
  while (!stopping) {
    await new Promise((r) => setTimeout(r, every));
    if (stopping) break;
    try {
      const snap = await repo.write('take', async () => {
        const { stream, stats } = await snapshotVolume(volume, repo);
        return repo.saveSnapshot({
          vm: 'serve',
          tags: [],
          parent,
          meta: { generations: stats.generations.join(',') },
          streams: [{ name: 'disk0', kind: 'disk', size: stream.size, chunkSize: stream.chunkSize, chunks: stream.chunks }],
        });
      });
      parent = snap.id;
      process.stdout.write(`snapshot ${snap.id}\n`);
    } catch (err) {
      if (!stopping) process.stdout.write(`snapshot-error ${(err as Error).message.replace(/\n/g, ' ')}\n`);
    }
  }
})();

const stop = async (): Promise<void> => {
  stopping = true;
  await snapshots;
  await server.close();
  await volume.close();
  await repo?.close();
  process.exit(0);
};
process.on('SIGTERM', () => void stop());
process.on('SIGINT', () => void stop());
