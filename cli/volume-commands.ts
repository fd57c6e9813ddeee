/**
 * `vmsnap volume create|ls|serve|freeze|clone|rm` — the lead wires registerVolumeCommands into the
 * main CLI. Volumes live in <dataDir>/volumes/<name>/. Snapshots are named by whatever reference
 * the repository understands; ctx.resolveDisk turns one into a disk stream.
 */
import { promises as fsp } from 'node:fs';
import * as path from 'node:path';
import type { Command } from 'commander';
import { containedPath } from '../src/util/fs.js';
import { parseSize } from '../src/util/size.js';
import type { ChunkStore, DiskStream } from '../src/cow/chunk-store.js';
import { NbdServer } from '../src/cow/nbd-server.js';
import { cloneVolume } from '../src/cow/snapshot.js';
import { readBasePin, releaseBasePin, type SnapshotPinner } from '../src/cow/base-pin.js';
import { Volume } from '../src/cow/volume.js';
import { UserFacingError } from '../src/util/errors.js';

export interface VolumeCliContext {
  /** vmsnap's data directory. */
  dataDir: string;
  /** Opens the repository's chunk store (needed for volumes with a base). */
  openStore?: () => Promise<ChunkStore>;
  /** Resolves a snapshot reference (e.g. "<snapshot>:<disk>") to its disk stream and snapshot id. */
  resolveDisk?: (ref: string) => Promise<DiskStream & { snapshot?: string }>;
  /** Pins snapshots that volumes are based on (without it, volumes hold no pin). */
  openPinner?: () => Promise<SnapshotPinner>;
  /** Output sink (default: stdout). */
  print?: (line: string) => void;
}

export class VolumeCliError extends UserFacingError {
  override readonly name = 'VolumeCliError';
}

const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;

export { parseSize };

export function volumeDir(dataDir: string, name: string): string {
  if (!NAME_RE.test(name)) throw new VolumeCliError(`invalid volume name ${JSON.stringify(name)}: use letters, digits, '.', '_' and '-'`);
  return containedPath(dataDir, 'volumes', name);
}

export function registerVolumeCommands(program: Command, ctx: VolumeCliContext): Command {
  const print = ctx.print ?? ((l: string) => process.stdout.write(l + '\n'));
  const store = async (): Promise<ChunkStore | undefined> => (ctx.openStore ? ctx.openStore() : undefined);
  /** A clone of `ref` into volume `name`, its snapshot pinned while the volume depends on it. */
  const clone = async (ref: string, name: string): Promise<void> => {
    if (!ctx.resolveDisk) throw new VolumeCliError('no repository is configured to resolve snapshots');
    const disk = await ctx.resolveDisk(ref);
    const pin = disk.snapshot && ctx.openPinner ? { pinner: await ctx.openPinner(), snapshot: disk.snapshot, holder: `volume ${name}` } : undefined;
    await (await cloneVolume(volumeDir(ctx.dataDir, name), disk, { store: await store(), ...(pin ? { pin } : {}) })).close();
  };
  const vol = program.command('volume').description('copy-on-write volumes served to QEMU over NBD');

  vol
    .command('create <name>')
    .description('create an empty volume, or one based on a snapshot disk with --from')
    .option('--size <size>', 'virtual size, e.g. 20G')
    .option('--block-size <bytes>', 'block size (default: the repository chunk size or 65536)')
    .option('--from <snapshotDisk>', 'base the volume on this snapshot disk (same as clone)')
    .action(async (name: string, o: { size?: string; blockSize?: string; from?: string }) => {
      const dir = volumeDir(ctx.dataDir, name);
      if (o.from) await clone(o.from, name);
      else {
        if (!o.size) throw new VolumeCliError('volume create needs --size or --from');
        const s = await store();
        const v = await Volume.create(dir, { size: parseSize(o.size), blockSize: o.blockSize ? parseSize(o.blockSize) : (s?.chunkSize ?? 65536) });
        await v.close();
      }
      print(`created volume ${name}`);
    });

  vol
    .command('ls')
    .description('list volumes')
    .option('--json', 'machine-readable output')
    .action(async (o: { json?: boolean }, cmd: Command) => {
      // `vmsnap volume ls --json`: the main program's global --json takes the flag first.
      const json = o.json === true || cmd.optsWithGlobals<{ json?: boolean }>().json === true;
      const root = path.join(ctx.dataDir, 'volumes');
      const names = (await fsp.readdir(root).catch(() => [] as string[])).filter((n) => NAME_RE.test(n)).sort();
      // Read-only: listing never locks, recovers or trims a volume, and shows the ones in use.
      // A folder that is no volume (yet: `volume create` writes its state last) gets a row saying so.
      type Row = { name: string; size: number; generation: number; dirtyBlocks: number; overlayBlocks: number; base: boolean; openBy: number | null };
      const rows: (Row | { name: string; error: string })[] = [];
      for (const name of names) {
        try {
          const i = await Volume.inspect(volumeDir(ctx.dataDir, name));
          rows.push({ name, size: i.size, generation: i.generation, dirtyBlocks: i.dirtyBlocks, overlayBlocks: i.overlayBlocks, base: i.hasBase, openBy: i.openBy });
        } catch (err) {
          rows.push({ name, error: (err as Error).message });
        }
      }
      if (json) return print(JSON.stringify(rows));
      for (const r of rows) {
        if ('error' in r) {
          print(`${r.name}\t(unreadable: ${r.error})`);
          continue;
        }
        print(`${r.name}\t${r.size}\tgen ${r.generation}\tdirty ${r.dirtyBlocks}\toverlay ${r.overlayBlocks}${r.base ? '\tbased' : ''}${r.openBy ? `\tin use by process ${r.openBy}` : ''}`);
      }
    });

  vol
    .command('serve <names...>')
    .description('serve volumes over NBD (export name = volume name) until interrupted')
    .option('--socket <path>', 'unix socket path (default <dataDir>/nbd.sock)')
    .option('--tcp <port>', 'listen on 127.0.0.1:<port> instead of a unix socket')
    .action(async (names: string[], o: { socket?: string; tcp?: string }) => {
      const s = await store();
      const server = new NbdServer();
      const vols: Volume[] = [];
      for (const n of names) {
        const v = await Volume.open(volumeDir(ctx.dataDir, n), { store: s });
        vols.push(v);
        server.addExport(n, v);
      }
      const addr = o.tcp
        ? await server.listen({ host: '127.0.0.1', port: Number(o.tcp) })
        : await server.listen({ socketPath: o.socket ?? path.join(ctx.dataDir, 'nbd.sock') });
      print(addr.socketPath ? `serving ${names.join(', ')} on ${addr.socketPath}` : `serving ${names.join(', ')} on nbd://${addr.host}:${addr.port}`);
      await new Promise<void>((resolve) => {
        process.once('SIGINT', resolve);
        process.once('SIGTERM', resolve);
      });
      await server.close();
      for (const v of vols) await v.close();
    });

  vol
    .command('freeze <name>')
    .description('close the current generation of a volume that is not being served')
    .action(async (name: string) => {
      const v = await Volume.open(volumeDir(ctx.dataDir, name));
      const r = v.freeze();
      await v.close();
      print(`froze generation ${r.generation} of ${name}: ${r.dirtyBlocks} dirty blocks${r.full ? ' (tracking was lost: full compare)' : ''}`);
    });

  vol
    .command('clone <snapshotDisk> <name>')
    .description('create a volume whose base is a snapshot disk, without copying data')
    .action(async (ref: string, name: string) => {
      await clone(ref, name);
      print(`cloned ${ref} into volume ${name}`);
    });

  vol
    .command('rm <name>')
    .description('remove a volume and its overlay')
    .action(async (name: string) => {
      const dir = volumeDir(ctx.dataDir, name);
      const v = await Volume.open(dir); // fails if the volume is in use
      await v.close();
      if (await readBasePin(dir)) {
        if (!ctx.openPinner) throw new VolumeCliError(`volume ${name} pins its base snapshot and no repository is configured to unpin it`);
        await releaseBasePin(dir, await ctx.openPinner());
      }
      await fsp.rm(dir, { recursive: true, force: true });
      print(`removed volume ${name}`);
    });
  return vol;
}
