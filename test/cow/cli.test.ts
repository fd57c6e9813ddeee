import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { Command } from 'commander';
import { afterEach, beforeEach, expect, it } from 'vitest';
import { MemoryChunkStore } from '../../src/cow/chunk-store.js';
import { registerVolumeCommands, parseSize } from '../../src/cow/cli.js';
import { Volume } from '../../src/cow/volume.js';
import { snapshotVolume } from '../../src/cow/snapshot.js';

let dir: string;
beforeEach(async () => {
  dir = await mkdtemp(path.join(tmpdir(), 'cow-cli-'));
});
afterEach(async () => {
  await rm(dir, { recursive: true, force: true });
});

it('creates, lists, freezes, clones and removes volumes', async () => {
  const store = new MemoryChunkStore(65536);
  const lines: string[] = [];
  const snaps = new Map<string, Awaited<ReturnType<typeof snapshotVolume>>['stream']>();
  const program = new Command().exitOverride();
  registerVolumeCommands(program, {
    dataDir: dir,
    openStore: async () => store,
    resolveDisk: async (ref) => {
      const s = snaps.get(ref);
      if (!s) throw new Error(`no snapshot ${ref}`);
      return s;
    },
    print: (l) => lines.push(l),
  });
  const cli = (...a: string[]): Promise<Command> => program.parseAsync(['volume', ...a], { from: 'user' });
  expect(parseSize('4G')).toBe(4 * 2 ** 30);
  await cli('create', 'disk0', '--size', '8M');
  const v = await Volume.open(path.join(dir, 'volumes', 'disk0'));
  await v.write(0, Buffer.alloc(65536, 7));
  const { stream } = await snapshotVolume(v, store);
  snaps.set('s1:disk0', stream);
  await v.close();
  await cli('freeze', 'disk0');
  await cli('clone', 's1:disk0', 'copy');
  await cli('ls', '--json');
  const rows = JSON.parse(lines[lines.length - 1]!) as { name: string; base: boolean; size: number }[];
  expect(rows.map((r) => [r.name, r.base, r.size])).toEqual([
    ['copy', true, 8 << 20],
    ['disk0', false, 8 << 20],
  ]);
  const c = await Volume.open(path.join(dir, 'volumes', 'copy'), { store });
  const b = Buffer.alloc(65536);
  await c.read(0, b.length, b);
  expect(b.every((x) => x === 7)).toBe(true);
  await c.close();
  await cli('rm', 'copy');
  await expect(cli('create', '../evil', '--size', '1M')).rejects.toThrow(/invalid volume name/);
  await cli('ls');
  expect(lines[lines.length - 1]).toMatch(/^disk0\t/);
});
