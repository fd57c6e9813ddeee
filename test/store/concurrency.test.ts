/**
 * Repository writers and maintainers run together (docs/locks.md), on a local directory and on S3
 * (s3rver): every pair of take (a stopped VM's, through takeStopped), import, copy into, sync into,
 * forget, prune, check and rebuild-index, each on its own Repository instance and backend client,
 * started at random offsets. Afterwards `check --read-data` finds no error and every operation
 * that reported success has its snapshot; an operation may fail only with LockedError.
 *
 * Also: the take/prune race of issue 12 item 1, made deterministic (the manifest write is delayed
 * until a prune has run), and a long-lived Repository that must notice another process's prune
 * (item 3) before it deduplicates against its cached index.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { Readable } from 'node:stream';
import type { Backend } from '../../src/store/backend/contract.js';
import { LocalBackend } from '../../src/store/backend/local.js';
import { MemoryBackend } from '../../src/store/backend/memory.js';
import { FaultyBackend } from '../../src/store/backend/faulty.js';
import { openBackend } from '../../src/store/backend/open.js';
import { Repository } from '../../src/store/repository.js';
import { ingestStream } from '../../src/store/streams.js';
import { copySnapshots, syncRepositories } from '../../src/store/copy.js';
import { check, prune, rebuildIndex } from '../../src/store/maintenance.js';
import { LockedError, NotFoundError } from '../../src/store/errors.js';
import { Volume } from '../../src/cow/volume.js';
import { diskDir, newDefinition, saveDefinition, vmPaths } from '../../src/vm/config.js';
import { takeStopped } from '../../src/vm/runtime.js';
import { startS3rver, type S3rverHandle } from '../helpers/s3rver.js';

const CHUNK = 65536;
/** Runs of each pair per store in every test run (VMSNAP_CONCURRENCY_ITERATIONS for a longer soak). */
const ITERATIONS = Number(process.env.VMSNAP_CONCURRENCY_ITERATIONS ?? 2);
const DISK = 16 * CHUNK;

let root: string;
let s3: S3rverHandle;
beforeAll(async () => {
  root = await mkdtemp(path.join(tmpdir(), 'vmsnap-concurrency-'));
  s3 = await startS3rver();
});
afterAll(async () => {
  await s3?.stop();
  await rm(root, { recursive: true, force: true });
});

interface Place {
  name: string;
  /** A new client of the same repository (a process of its own would have one). */
  client(): Backend;
}

function localPlace(dir: string): Place {
  return { name: 'local', client: () => new LocalBackend(dir) };
}
function s3Place(prefix: string): Place {
  const url = `${s3.url}/${prefix}`;
  return { name: 's3', client: () => openBackend(url, { s3: { credentials: { accessKeyId: s3.accessKeyId, secretAccessKey: s3.secretAccessKey } } }) };
}

const open = (b: Backend): Promise<Repository> => Repository.open(b, { workers: 1 });

/** Some new data and some shared with what is there already (dedup paths). */
function data(size: number, shared: Buffer): Buffer {
  const b = randomBytes(size);
  shared.copy(b, 0, 0, Math.min(shared.length, size / 2));
  return b;
}

async function importSnapshot(repo: Repository, vm: string, bytes: Buffer): Promise<string> {
  return repo.write('import', async () => {
    const res = await ingestStream(repo, Readable.from([bytes]), { name: 'disk0', kind: 'disk' });
    return (await repo.saveSnapshot({ vm, tags: [], parent: null, meta: {}, streams: [res.stream] })).id;
  });
}

async function makeVm(dataDir: string, name: string): Promise<void> {
  const paths = vmPaths(dataDir, name);
  await mkdir(paths.dir, { recursive: true });
  const v = await Volume.create(diskDir(paths, 'disk0'), { size: DISK, blockSize: CHUNK });
  await v.write(0, randomBytes(DISK));
  await v.close();
  await saveDefinition(dataDir, newDefinition({ name, disks: [{ name: 'disk0', size: DISK }] }));
}

async function touchVm(dataDir: string, name: string): Promise<void> {
  const v = await Volume.open(diskDir(vmPaths(dataDir, name), 'disk0'));
  await v.write(CHUNK * Math.floor(Math.random() * 16), randomBytes(CHUNK));
  await v.close();
}

type Op = 'take' | 'import' | 'copy' | 'sync' | 'forget' | 'prune' | 'check' | 'rebuild-index';
const OPS: Op[] = ['take', 'import', 'copy', 'sync', 'forget', 'prune', 'check', 'rebuild-index'];

interface World {
  place: Place;
  dataDir: string;
  side: MemoryBackend;
  sideIds: string[];
  shared: Buffer;
  vmCount: number;
}

/** Runs one operation; resolves with the snapshot ids it reports as saved. */
async function run(op: Op, w: World, vm: string): Promise<string[]> {
  const repo = await open(w.place.client());
  try {
    switch (op) {
      case 'take':
        return [(await takeStopped(w.dataDir, vm, repo)).snapshot];
      case 'import':
        return [await importSnapshot(repo, 'imp', data(6 * CHUNK, w.shared))];
      case 'copy':
      case 'sync': {
        const side = await open(w.side);
        try {
          const r = op === 'copy' ? await copySnapshots(side, repo, [await side.readSnapshot(w.sideIds[Math.floor(Math.random() * w.sideIds.length)]!)]) : await syncRepositories(side, repo);
          return r.snapshots.map((s) => s.target);
        } finally {
          await side.close();
        }
      }
      case 'forget':
        // Only snapshots made to be forgotten: the others must all survive.
        await repo.write('forget', async () => {
          for (const s of await repo.listSnapshotSummaries()) if (s.vm === 'doomed') await repo.deleteSnapshot(s.id);
        });
        return [];
      case 'prune':
        await prune(repo);
        return [];
      case 'check': {
        const r = await check(repo);
        expect(r.problems.filter((p) => p.severity === 'error'), 'a concurrent check').toEqual([]);
        return [];
      }
      case 'rebuild-index':
        await rebuildIndex(repo);
        return [];
    }
  } finally {
    await repo.close();
  }
}

async function setUp(place: Place, tag: string): Promise<World> {
  const dataDir = path.join(root, `data-${tag}`);
  await (await Repository.init(place.client(), { chunkSize: CHUNK })).close();
  const side = new MemoryBackend();
  const sideRepo = await Repository.init(side, { chunkSize: CHUNK });
  const shared = randomBytes(4 * CHUNK);
  const sideIds: string[] = [];
  for (let i = 0; i < 3; i++) sideIds.push(await importSnapshot(sideRepo, `side${i}`, data(4 * CHUNK, shared)));
  await sideRepo.close();
  const repo = await open(place.client());
  await importSnapshot(repo, 'base', data(8 * CHUNK, shared));
  await repo.close();
  return { place, dataDir, side, sideIds, shared, vmCount: 0 };
}

async function pairs(place: Place, tag: string): Promise<{ runs: number; locked: number }> {
  const w = await setUp(place, tag);
  const saved: string[] = [];
  let runs = 0;
  let locked = 0;
  for (let i = 0; i < OPS.length; i++)
    for (let j = i; j < OPS.length; j++) {
      const pair = [OPS[i]!, OPS[j]!];
      // Twice per pair and store in every run, at random offsets (this machine's budget: ~2 min per
      // store); the deterministic race test below covers the window that matters most every time.
      for (let it = 0; it < ITERATIONS; it++) {
        const seed = await open(place.client());
        await importSnapshot(seed, 'doomed', data(2 * CHUNK, w.shared));
        await seed.close();
        const vms: string[] = [];
        for (const op of pair) {
          const vm = `vm${w.vmCount++}`;
          vms.push(vm);
          if (op === 'take') {
            await makeVm(w.dataDir, vm);
            await touchVm(w.dataDir, vm);
          }
        }
        const results = await Promise.allSettled(
          pair.map(async (op, k) => {
            await new Promise((r) => setTimeout(r, Math.random() * 40));
            return run(op, w, vms[k]!);
          }),
        );
        results.forEach((r, k) => {
          runs++;
          if (r.status === 'fulfilled') saved.push(...r.value);
          else {
            // Failing is allowed only for the lock, with a message naming the holder.
            expect(r.reason, `${pair.join('+')}: ${pair[k]} failed: ${(r.reason as Error).stack}`).toBeInstanceOf(LockedError);
            expect((r.reason as Error).message).toMatch(/locked by \S+ \(pid \d+ on /);
            locked++;
          }
        });
      }
    }
  const repo = await open(place.client());
  const report = await check(repo, { readData: true });
  expect(report.problems.filter((p) => p.severity === 'error')).toEqual([]);
  const ids = new Set(await repo.snapshotIds());
  expect(saved.filter((id) => !ids.has(id)), 'snapshots reported saved but missing').toEqual([]);
  // The repository is still usable: a take after all that works and checks clean.
  await makeVm(w.dataDir, 'after');
  await takeStopped(w.dataDir, 'after', repo);
  expect((await check(repo, { readData: true })).problems.filter((p) => p.severity === 'error')).toEqual([]);
  await repo.close();
  return { runs, locked };
}

describe('writers and maintainers together', () => {
  it('local: every pair of take, import, copy, sync, forget, prune, check, rebuild-index', async () => {
    const dir = path.join(root, 'local-pairs');
    const r = await pairs(localPlace(dir), 'local');
    expect(r.runs).toBe(OPS.length * (OPS.length + 1) * ITERATIONS);
  }, 480_000);

  it('S3: every pair of take, import, copy, sync, forget, prune, check, rebuild-index', async () => {
    const r = await pairs(s3Place('pairs'), 's3');
    expect(r.runs).toBe(OPS.length * (OPS.length + 1) * ITERATIONS);
  }, 480_000);
});

describe('take vs prune (issue 12 item 1)', () => {
  for (const kind of ['local', 's3'] as const) {
    it(`${kind}: a prune while a take is between its index and its manifest fails with LockedError, and the take's snapshot is whole`, async () => {
      const place = kind === 'local' ? localPlace(path.join(root, 'race-local')) : s3Place('race');
      const dataDir = path.join(root, `race-data-${kind}`);
      await (await Repository.init(place.client(), { chunkSize: CHUNK })).close();
      await makeVm(dataDir, 'vm1');
      // The take's manifest write waits: the window in which prune used to see its chunks as garbage.
      const slow = new FaultyBackend(place.client(), [{ method: 'put', kind: 'snapshots', fault: { type: 'delay', ms: 1500 } }]);
      const taker = await open(slow);
      const take = takeStopped(dataDir, 'vm1', taker);
      const probe = place.client();
      for (let i = 0; i < 200; i++) {
        let n = 0;
        for await (const _ of probe.list('index')) n++;
        if (n > 0) break;
        await new Promise((r) => setTimeout(r, 20));
      }
      const pruner = await open(place.client());
      const err = await prune(pruner).then(() => null, (e: unknown) => e);
      expect(err).toBeInstanceOf(LockedError);
      expect((err as Error).message).toMatch(/locked by take \(pid \d+/);
      const snap = (await take).snapshot;
      await taker.close();
      expect((await check(pruner, { readData: true })).problems.filter((p) => p.severity === 'error')).toEqual([]);
      expect(await pruner.snapshotIds()).toContain(snap);
      await prune(pruner); // free again once the take is done
      expect((await check(pruner, { readData: true })).problems).toEqual([]);
      await pruner.close();
    }, 60_000);
  }
});

describe('a long-lived Repository and another process (issue 12 item 3)', () => {
  for (const kind of ['local', 's3'] as const) {
    it(`${kind}: after someone else's forget and prune, a write session reloads the index and drops forgotten manifests`, async () => {
      const place = kind === 'local' ? localPlace(path.join(root, 'cache-local')) : s3Place('cache');
      await (await Repository.init(place.client(), { chunkSize: CHUNK })).close();
      const supervisor = await open(place.client()); // lives through everything below
      const bytes = randomBytes(8 * CHUNK);
      const first = await importSnapshot(supervisor, 'vmA', bytes);
      expect((await supervisor.readSnapshot(first)).id).toBe(first); // cached now

      const other = await open(place.client());
      await other.write('forget', () => other.deleteSnapshot(first));
      const pruned = await prune(other);
      expect(pruned.packsDeleted).toBeGreaterThan(0);
      await other.close();

      // The same bytes again: deduplicating against the stale index would reference deleted chunks.
      const second = await importSnapshot(supervisor, 'vmB', bytes);
      await expect(supervisor.readSnapshot(first)).rejects.toBeInstanceOf(NotFoundError);
      const fresh = await open(place.client());
      expect((await check(fresh, { readData: true })).problems).toEqual([]);
      expect(await fresh.snapshotIds()).toEqual([second]);
      await fresh.close();
      await supervisor.close();
    }, 60_000);
  }
});

describe('a long-lived reader and another process\'s repack (issue 12 item 3, readers)', () => {
  for (const kind of ['local', 's3'] as const) {
    it(`${kind}: a chunk whose pack a prune repacked and deleted is read where it lives now`, async () => {
      const place = kind === 'local' ? localPlace(path.join(root, 'reader-local')) : s3Place('reader');
      await (await Repository.init(place.client(), { chunkSize: CHUNK })).close();
      // The dropped snapshot holds the kept bytes and more in one stream, so its packs hold both;
      // the kept snapshot dedups onto those chunks. Forgetting the first leaves packs half dead.
      const writer = await open(place.client());
      const keep = randomBytes(8 * CHUNK);
      const dropped = await importSnapshot(writer, 'drop', Buffer.concat([keep, randomBytes(8 * CHUNK)]));
      const kept = await importSnapshot(writer, 'keep', keep);
      await writer.close();
      // A VM's base reads the kept snapshot's chunks through a Repository opened before the prune.
      const reader = await open(place.client());
      const stream = (await reader.readSnapshot(kept)).streams[0]!;
      const chunkAt = (i: number) => stream.chunks.subarray(i * 32, i * 32 + 32);
      expect((await reader.getChunk(chunkAt(0))).equals(keep.subarray(0, CHUNK))).toBe(true);

      const other = await open(place.client());
      await other.write('forget', () => other.deleteSnapshot(dropped));
      const pruned = await prune(other, { repackBelow: 1 });
      expect(pruned.packsRepacked).toBeGreaterThan(0); // the kept chunks moved to new packs
      await other.close();

      for (let i = 0; i < 8; i++) expect((await reader.getChunk(chunkAt(i))).equals(keep.subarray(i * CHUNK, (i + 1) * CHUNK)), `chunk ${i}`).toBe(true);
      await reader.close();
    }, 60_000);
  }
});

describe('write sessions are enforced', () => {
  it('puts and deletes of packs, index files and manifests outside a write session are refused; locks and reads are not', async () => {
    const repo = await Repository.init(new MemoryBackend(), { chunkSize: CHUNK });
    await expect(repo.putChunk(randomBytes(CHUNK))).rejects.toThrow(/^internal: putChunk outside a write session/);
    for (const kind of ['packs', 'index', 'snapshots'] as const) {
      await expect(repo.backend.put(kind, 'x', Buffer.from('x'))).rejects.toThrow(/outside a write session/);
      await expect(repo.backend.delete(kind, 'x')).rejects.toThrow(/outside a write session/);
    }
    await expect(repo.saveSnapshot({ vm: 'v', tags: [], parent: null, meta: {}, streams: [] })).rejects.toThrow(/outside a write session/);
    await expect(repo.write('import', () => repo.backend.removeLeftovers(0))).rejects.toThrow(/outside an exclusive write session/);
    const id = await importSnapshot(repo, 'v', randomBytes(2 * CHUNK)); // inside one: fine
    expect(await repo.snapshotIds()).toEqual([id]);
    let n = 0;
    for await (const _ of repo.backend.list('locks')) n++;
    expect(n).toBe(0); // the session's lock is gone with it
    await repo.close();
  });
});
