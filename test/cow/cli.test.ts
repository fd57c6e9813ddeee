import { mkdir, mkdtemp, readdir, readFile, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { Command } from 'commander';
import { afterEach, beforeEach, expect, it } from 'vitest';
import { MemoryChunkStore } from '../../src/cow/chunk-store.js';
import { registerVolumeCommands, parseSize } from '../../cli/volume-commands.js';
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

it('ls reads volumes without opening them: one in use shows its committed state and owner, and nothing on disk changes', async () => {
  const lines: string[] = [];
  const program = new Command().exitOverride();
  registerVolumeCommands(program, { dataDir: dir, print: (l) => lines.push(l) });
  const cli = (...a: string[]): Promise<Command> => program.parseAsync(['volume', ...a], { from: 'user' });
  await cli('create', 'busy', '--size', '1M', '--block-size', '4096');
  const vdir = path.join(dir, 'volumes', 'busy');
  const v = await Volume.open(vdir);
  try {
    await v.write(0, Buffer.alloc(3 * 4096, 1));
    v.freeze();
    await v.write(8 * 4096, Buffer.alloc(4096, 2));
    await v.flush();
    const before = await snapshotFiles(vdir);
    await cli('ls', '--json');
    const rows = JSON.parse(lines[lines.length - 1]!) as { name: string; generation: number; dirtyBlocks: number; overlayBlocks: number; openBy: number | null }[];
    const info = v.info();
    expect(rows).toEqual([{ name: 'busy', size: 1 << 20, generation: info.generation, dirtyBlocks: 1, overlayBlocks: info.overlayBlocks, base: false, openBy: process.pid }]);
    expect(info.overlayBlocks).toBe(4);
    await cli('ls');
    expect(lines[lines.length - 1]).toBe(`busy\t${1 << 20}\tgen 2\tdirty 1\toverlay 4\tin use by process ${process.pid}`);
    expect(await snapshotFiles(vdir)).toEqual(before);
  } finally {
    await v.close();
  }
  // A folder that is not (yet) a volume is listed as such; the others still are.
  await mkdir(path.join(dir, 'volumes', 'half'));
  await cli('ls');
  expect(lines.slice(-2)).toEqual([`busy\t${1 << 20}\tgen 2\tdirty 1\toverlay 4`, expect.stringMatching(/^half\t\(unreadable: no volume in .*half/)]);
  const inspected = await Volume.inspect(vdir);
  const reopened = await Volume.open(vdir);
  expect(inspected).toEqual({ ...reopened.info(), openBy: null });
  await reopened.close();
});

async function snapshotFiles(d: string): Promise<Record<string, string>> {
  const out: Record<string, string> = {};
  for (const f of (await readdir(d)).sort()) {
    const st = await stat(path.join(d, f));
    out[f] = `${st.size} ${st.mtimeMs} ${(await readFile(path.join(d, f))).toString('base64').length}`;
  }
  return out;
}
