/**
 * Test/bench helper: serves one volume over NBD in its own process (so tests can kill -9 it).
 *   tsx serve.ts <volumeDir> <socketPath> [--create <size>] [--block-size N] [--store <dir>]
 * Prints "ready" on stdout once listening. --store opens a DirChunkStore for base reads.
 */
import { Volume } from '../../../src/cow/volume.js';
import { NbdServer } from '../../../src/cow/nbd-server.js';
import { DirChunkStore } from './dir-store.js';

const [dir, sock, ...rest] = process.argv.slice(2);
if (!dir || !sock) throw new Error('usage: serve.ts <volumeDir> <socketPath> [--create size]');
const opt = (k: string): string | undefined => {
  const i = rest.indexOf(k);
  return i >= 0 ? rest[i + 1] : undefined;
};
const storeDir = opt('--store');
const store = storeDir ? new DirChunkStore(storeDir) : undefined;
const create = opt('--create');
const volume = create
  ? await Volume.create(dir, { size: Number(create), blockSize: Number(opt('--block-size') ?? 65536), store })
  : await Volume.open(dir, { store });
const server = new NbdServer();
server.addExport(opt('--name') ?? 'vol', volume);
await server.listen({ socketPath: sock });
process.stdout.write('ready\n');
const stop = async (): Promise<void> => {
  await server.close();
  await volume.close();
  process.exit(0);
};
process.on('SIGTERM', () => void stop());
process.on('SIGINT', () => void stop());
