import { describe, expect, it } from 'vitest';
import { randomBytes } from 'node:crypto';
import { Readable, PassThrough } from 'node:stream';
import { MemoryBackend } from '../../src/store/backend/memory.js';
import { FaultyBackend } from '../../src/store/backend/faulty.js';
import { Repository, SnapshotCache } from '../../src/store/repository.js';
import { copySnapshots } from '../../src/store/copy.js';
import { ingestStream, exportStream } from '../../src/store/streams.js';
import { check, markLiveChunks, prune } from '../../src/store/maintenance.js';
import type { Snapshot, StreamRecord } from '../../src/store/manifest.js';
import { WrongPasswordError, IntegrityError } from '../../src/store/errors.js';
import { ID_SIZE } from '../../src/store/hash.js';
import type { ByteRange, ObjectKind } from '../../src/store/backend/contract.js';
import { mkdtemp, open, readdir, readFile, rm, utimes, writeFile } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { LocalBackend } from '../../src/store/backend/local.js';
import { tmpdir } from 'node:os';
import * as path from 'node:path';

function mixedImage(size: number, seed = 1): Buffer {
  const buf = Buffer.alloc(size);
  const cs = 65536;
  const rnd = randomBytes(cs * 4);
  for (let off = 0, i = seed; off < size; off += cs, i++) {
    const kind = i % 5;
    const n = Math.min(cs, size - off);
    if (kind === 0) continue; // zeros
    if (kind === 1) buf.write('the quick brown fox jumps over the lazy dog '.repeat(2000).slice(0, n), off);
    if (kind === 2) randomBytes(n).copy(buf, off);
    if (kind === 3) rnd.copy(buf, off, 0, n); // repeated block
    if (kind === 4) rnd.copy(buf, off, cs, cs + n);
  }
  return buf;
}

async function roundTrip(repo: Repository, data: Buffer) {
  const { res, snap } = await repo.write('test', async () => {
    const res = await ingestStream(repo, Readable.from([data.subarray(0, 100_000), data.subarray(100_000)]), { name: 'disk0', kind: 'disk' });
    return { res, snap: await repo.saveSnapshot({ vm: 'vm1', tags: [], parent: null, meta: {}, streams: [res.stream] }) };
  });
  const out = new PassThrough();
  const parts: Buffer[] = [];
  out.on('data', (b: Buffer) => parts.push(b));
  const loaded = await repo.resolveSnapshot(snap.id.slice(0, 8));
  await exportStream(repo, loaded.streams[0]!, { writable: out });
  return { res, snap, out: Buffer.concat(parts) };
}

describe('repository', () => {
  it('round-trips a mixed stream and deduplicates a re-import', async () => {
    const backend = new MemoryBackend();
    const repo = await Repository.init(backend, {});
    const data = mixedImage(6 * 1024 * 1024 + 12345);
    const { res, out } = await roundTrip(repo, data);
    expect(out.equals(data)).toBe(true);
    expect(res.zeroChunks).toBeGreaterThan(0);
    expect(res.dedupChunks).toBeGreaterThan(0);
    const again = await repo.write('test', () => ingestStream(repo, Readable.from([data]), { name: 'disk0', kind: 'disk' }));
    expect(again.newChunks).toBe(0);
    await repo.close();
    // A fresh open sees everything through the index.
    const reopened = await Repository.open(backend);
    const snaps = await reopened.listSnapshots();
    expect(snaps).toHaveLength(1);
    const parts: Buffer[] = [];
    const pt = new PassThrough();
    pt.on('data', (b: Buffer) => parts.push(b));
    await exportStream(reopened, snaps[0]!.streams[0]!, { writable: pt });
    expect(Buffer.concat(parts).equals(data)).toBe(true);
    await reopened.close();
  });

  it('encrypts: wrong password refused, ids keyed, round trip works', async () => {
    const backend = new MemoryBackend();
    const repo = await Repository.init(backend, { password: 'correct horse' });
    const data = mixedImage(1024 * 1024);
    const { out, snap } = await roundTrip(repo, data);
    expect(out.equals(data)).toBe(true);
    await repo.close();
    await expect(Repository.open(backend, { password: 'wrong' })).rejects.toBeInstanceOf(WrongPasswordError);
    await expect(Repository.open(backend)).rejects.toThrow(/encrypted/);
    const plain = await Repository.init(new MemoryBackend(), {});
    const plainRes = await plain.write('test', () => ingestStream(plain, Readable.from([data]), { name: 'disk0', kind: 'disk' }));
    const encIds = new Set<string>();
    for (let o = 0; o < snap.streams[0]!.chunks.length; o += ID_SIZE) encIds.add(snap.streams[0]!.chunks.subarray(o, o + ID_SIZE).toString('hex'));
    for (let o = 0; o < plainRes.stream.chunks.length; o += ID_SIZE) {
      const id = plainRes.stream.chunks.subarray(o, o + ID_SIZE);
      if (id.some((b) => b !== 0)) expect(encIds.has(id.toString('hex'))).toBe(false);
    }
    await plain.close();
  });

  it('detects a flipped bit instead of exporting wrong bytes', async () => {
    const backend = new MemoryBackend();
    const repo = await Repository.init(backend, { codec: 'none' });
    const data = randomBytes(512 * 1024);
    const res = await repo.write('test', async () => {
      const r = await ingestStream(repo, Readable.from([data]), { name: 'f', kind: 'file' });
      await repo.flush();
      return r;
    });
    const [pack] = repo.index.packs();
    const bytes = await backend.get('packs', pack!);
    bytes[100] = bytes[100]! ^ 1;
    await backend.put('packs', pack!, bytes);
    const sink = new PassThrough();
    sink.resume();
    await expect(exportStream(repo, res.stream, { writable: sink })).rejects.toBeInstanceOf(IntegrityError);
    // A failed export still gives every shared buffer back, and keeps none.
    expect(repo.workers().sharedStats()).toEqual({ leased: 0, free: 0 });
    await repo.close();
  });

  it('exports to a file through the workers, also from a backend that ignores destination buffers', async () => {
    // The contract lets a backend ignore `into`; export must then copy, not assume.
    class OwnBuffers extends MemoryBackend {
      override get(kind: ObjectKind, name: string, range?: ByteRange): Promise<Buffer> {
        return super.get(kind, name, range);
      }
    }
    for (const backend of [new MemoryBackend(), new OwnBuffers()]) {
      const repo = await Repository.init(backend, {});
      const data = mixedImage(20 * 65536 + 999, 3);
      const res = await repo.write('test', async () => {
        const r = await ingestStream(repo, Readable.from([data]), { name: 'disk0', kind: 'disk' });
        await repo.flush();
        return r;
      });
      const dir = await mkdtemp(path.join(tmpdir(), 'vmsnap-export-'));
      try {
        expect(repo.workers().sharedStats(), 'after ingest').toEqual({ leased: 0, free: 0 });
        const fh = await open(path.join(dir, 'out.img'), 'w');
        await exportStream(repo, res.stream, { file: fh });
        await fh.close();
        expect(repo.workers().sharedStats(), 'after export').toEqual({ leased: 0, free: 0 });
        expect((await readFile(path.join(dir, 'out.img'))).equals(data), backend.constructor.name).toBe(true);
      } finally {
        await rm(dir, { recursive: true, force: true });
        await repo.close();
      }
    }
  });

  it('reports a failed write of the output (ENOSPC) with its errno code', async () => {
    const repo = await Repository.init(new MemoryBackend(), {});
    const res = await repo.write('test', async () => {
      const r = await ingestStream(repo, Readable.from([randomBytes(300_000)]), { name: 'f', kind: 'file' });
      await repo.flush();
      return r;
    });
    // /dev/full answers every write with ENOSPC, as a full disk does.
    const fh = await open('/dev/full', 'w');
    try {
      const err = await exportStream(repo, res.stream, { file: fh }).then(() => null, (e: unknown) => e as NodeJS.ErrnoException);
      expect(err?.code).toBe('ENOSPC');
      expect(err?.message).toMatch(/no space left on device/);
    } finally {
      await fh.close();
      await repo.close();
    }
  });

  it('exports chunks larger than a read group (16 MiB chunks)', async () => {
    const repo = await Repository.init(new MemoryBackend(), { chunkSize: 16 << 20 });
    const data = randomBytes(40 << 20); // incompressible: stored chunks are larger than their 16 MiB
    const res = await repo.write('test', async () => {
      const r = await ingestStream(repo, Readable.from([data]), { name: 'disk0', kind: 'disk' });
      await repo.flush();
      return r;
    });
    const dir = await mkdtemp(path.join(tmpdir(), 'vmsnap-bigchunk-'));
    try {
      const fh = await open(path.join(dir, 'out.img'), 'w');
      await exportStream(repo, res.stream, { file: fh });
      await fh.close();
      expect((await readFile(path.join(dir, 'out.img'))).equals(data)).toBe(true);
    } finally {
      await rm(dir, { recursive: true, force: true });
      await repo.close();
    }
  }, 60_000);

  it('rejects (does not crash the process) when a pack upload fails while it waits for input', async () => {
    const backend = new FaultyBackend(new MemoryBackend(), [{ method: 'put', kind: 'packs', fault: { type: 'enospc' } }]);
    const repo = await Repository.init(backend, {});
    async function* slowInput() {
      for (let i = 0; i < 16; i++) {
        yield randomBytes(4 << 20); // the first pack (32 MiB) fills after 8 pieces and its upload fails
        await new Promise((r) => setTimeout(r, 30));
      }
    }
    await expect(repo.write('test', () => ingestStream(repo, slowInput(), { name: 'disk0', kind: 'disk' }))).rejects.toThrow(/no space left on device/);
    expect(repo.workers().sharedStats()).toEqual({ leased: 0, free: 0 });
    await repo.close();
  }, 60_000);

  it('prune keeps what a writer committed after prune opened the repository, before it took the lock', async () => {
    const backend = new MemoryBackend();
    await (await Repository.init(backend, {})).close();
    const pruner = await Repository.open(backend); // opened first: its index predates the import below
    const writer = await Repository.open(backend);
    const data = randomBytes(3 << 20);
    await writer.write('import', async () => {
      const res = await ingestStream(writer, Readable.from([data]), { name: 'disk0', kind: 'disk' });
      await writer.saveSnapshot({ vm: 'vm1', tags: [], parent: null, meta: {}, streams: [res.stream] });
    });
    await writer.close();
    await prune(pruner);
    await pruner.close();
    const after = await Repository.open(backend);
    const [snap] = await after.listSnapshots();
    const sink = new PassThrough();
    const parts: Buffer[] = [];
    sink.on('data', (b: Buffer) => parts.push(b));
    await exportStream(after, snap!.streams[0]!, { writable: sink });
    expect(Buffer.concat(parts).equals(data)).toBe(true);
    expect((await check(after, { readData: true })).problems).toEqual([]);
    await after.close();
  });

  it('prune removes what crashed puts left in a local repository, once old enough, and nothing else', async () => {
    const dir = await mkdtemp(path.join(tmpdir(), 'vmsnap-leftovers-'));
    try {
      const backend = new LocalBackend(dir);
      const repo = await Repository.init(backend, {});
      await repo.write('import', async () => {
        const res = await ingestStream(repo, Readable.from([randomBytes(1 << 20)]), { name: 'disk0', kind: 'disk' });
        await repo.saveSnapshot({ vm: 'vm1', tags: [], parent: null, meta: {}, streams: [res.stream] });
      });
      const [fan] = await readdir(path.join(dir, 'packs'));
      const old = path.join(dir, 'packs', fan!, '.tmp-dead-put-1');
      const young = path.join(dir, 'snapshots', '.tmp-live-put-2');
      await writeFile(old, Buffer.alloc(4096, 1));
      await writeFile(young, 'being written');
      await utimes(old, new Date(Date.now() - 7200_000), new Date(Date.now() - 7200_000));
      const st = await prune(repo);
      expect(st.leftoversRemoved).toBe(1);
      expect(existsSync(old)).toBe(false);
      expect(existsSync(young)).toBe(true); // younger than an hour: maybe another process's put in flight
      // check reports the young one (a warning, not an error) and nothing else.
      const problems = (await check(repo, { readData: true })).problems;
      expect(problems).toHaveLength(1);
      expect(problems[0]).toMatchObject({ severity: 'warning' });
      expect(problems[0]!.message).toMatch(/^1 leftover temp file\(s\) .*snapshots\/\.tmp-live-put-2/);
      await repo.close();
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  it('a failure removing leftovers is reported, after a prune that did its work', async () => {
    class NoCleanup extends MemoryBackend {
      override async removeLeftovers(): Promise<number> {
        throw new Error('EACCES: permission denied, scandir packs/ab');
      }
    }
    const backend = new NoCleanup();
    const repo = await Repository.init(backend, {});
    const res = await repo.write('test', async () => {
      const r = await ingestStream(repo, Readable.from([randomBytes(1 << 20)]), { name: 'disk0', kind: 'disk' });
      await repo.flush(); // a pack no snapshot references: garbage
      return r;
    });
    const st = await prune(repo);
    expect(st.packsDeleted).toBeGreaterThan(0);
    expect(st.leftoversError).toMatch(/EACCES/);
    const left: string[] = [];
    for await (const o of backend.list('packs')) left.push(o.name);
    expect(left).toEqual([]);
    expect(res.stream.size).toBe(1 << 20);
    await repo.close();
  });

  it('marks live chunks one byte per index entry: shared chunks once, zero chunks never, unindexed ones reported', async () => {
    const repo = await Repository.init(new MemoryBackend(), {});
    const a = Buffer.concat([randomBytes(3 * 65536), Buffer.alloc(65536)]);
    const b = Buffer.concat([a.subarray(0, 2 * 65536), randomBytes(65536)]);
    const w = await repo.beginWrite('test');
    const sa = await ingestStream(repo, Readable.from([a]), { name: 'disk0', kind: 'disk' });
    const sb = await ingestStream(repo, Readable.from([b]), { name: 'disk0', kind: 'disk' });
    await repo.flush();
    const snaps = [
      await repo.saveSnapshot({ vm: 'v', tags: [], parent: null, meta: {}, streams: [sa.stream] }),
      await repo.saveSnapshot({ vm: 'v', tags: [], parent: null, meta: {}, streams: [sb.stream] }),
    ];
    await w.end();
    const m = await markLiveChunks(repo.index, snaps);
    expect(m.snapshots).toBe(2);
    expect(m.count).toBe(4); // 3 of a, 1 new in b; the zero chunk is no chunk
    expect(m.live.length).toBe(repo.index.size);
    expect(m.missing.size).toBe(0);
    const ghost = randomBytes(32);
    const withGhost = { ...snaps[0]!, streams: [{ ...sa.stream, chunks: Buffer.concat([sa.stream.chunks, ghost]) }] };
    expect([...(await markLiveChunks(repo.index, [withGhost])).missing]).toEqual([ghost.toString('hex')]);
    // The same over the repository's own snapshots, read one at a time.
    expect((await markLiveChunks(repo.index, repo.eachSnapshot())).count).toBe(4);
    await repo.close();
  });

  it('check names, per problem, exactly the snapshot streams using its chunks, shared or not', async () => {
    const backend = new MemoryBackend();
    const repo = await Repository.init(backend, {});
    const shared = randomBytes(65536);
    const own = [randomBytes(65536), randomBytes(65536)];
    const w = await repo.beginWrite('test');
    // Pack 1: the shared chunk; pack 2: the first snapshot's own chunk; pack 3: the second's.
    const packOf = async (data: Buffer): Promise<StreamRecord> => {
      const r = await ingestStream(repo, Readable.from([data]), { name: 'disk0', kind: 'disk' });
      await repo.flush();
      return r.stream;
    };
    const sShared = await packOf(shared);
    const s0 = await packOf(own[0]!);
    const s1 = await packOf(own[1]!);
    const join = (a: StreamRecord, b: StreamRecord, name: string): StreamRecord => ({ ...a, name, size: a.size + b.size, chunks: Buffer.concat([a.chunks, b.chunks]) });
    const snapA = await repo.saveSnapshot({ vm: 'a', tags: [], parent: null, meta: {}, streams: [join(sShared, s0, 'disk0')] });
    const snapB = await repo.saveSnapshot({ vm: 'b', tags: [], parent: null, meta: {}, streams: [join(sShared, s1, 'disk1'), { ...s1, name: 'disk2' }] });
    await w.end();
    const packWith = (id: Buffer): string => repo.locate(id).pack;
    expect(new Set([packWith(sShared.chunks), packWith(s0.chunks), packWith(s1.chunks)]).size).toBe(3);
    await backend.delete('packs', packWith(sShared.chunks));
    await backend.delete('packs', packWith(s1.chunks));
    const report = await check(repo);
    const missing = report.problems.filter((p) => /is missing/.test(p.message));
    const names = (p: { affected: { snapshot: string; stream: string }[] }): string[] => p.affected.map((a) => `${a.snapshot === snapA.id ? 'A' : a.snapshot === snapB.id ? 'B' : '?'}:${a.stream}`).sort();
    const byPack = new Map(missing.map((p) => [p.message.slice(5, 17), names(p)]));
    expect(byPack.get(packWith(sShared.chunks).slice(0, 12))).toEqual(['A:disk0', 'B:disk1']);
    expect(byPack.get(packWith(s1.chunks).slice(0, 12))).toEqual(['B:disk1', 'B:disk2']);
    expect(missing).toHaveLength(2);
    await repo.close();
  });

  it('keeps recently read manifests within a byte budget: least recently used out first, the newest always', () => {
    const snap = (id: string, kib: number): Snapshot =>
      ({ id, vm: 'v', tags: [], parent: null, meta: {}, time: '', host: '', streams: [{ name: 'd', kind: 'disk', size: 0, chunkSize: 65536, chunks: Buffer.alloc(kib * 1024) }] }) as Snapshot;
    const cache = new SnapshotCache(10 * 1024 + 3 * 1024); // room for three 3 KiB lists (+1 KiB overhead each)
    for (const id of ['a', 'b', 'c']) cache.set(id, snap(id, 3));
    expect(cache.get('a')?.id).toBe('a'); // a is now the most recent
    cache.set('d', snap('d', 3)); // evicts b, the least recently used
    expect(cache.get('b')).toBeUndefined();
    expect(['a', 'c', 'd'].map((id) => cache.get(id)?.id)).toEqual(['a', 'c', 'd']);
    cache.delete('a');
    expect(cache.bytes).toBe(2 * 4 * 1024);
    // One over the budget on its own stays, alone: the newest is the one most likely needed next.
    cache.set('huge', snap('huge', 64));
    expect(cache.get('huge')?.id).toBe('huge');
    expect(['c', 'd'].map((id) => cache.get(id))).toEqual([undefined, undefined]);
    expect(cache.bytes).toBe(65 * 1024);
  });

  it('lists summaries without chunk lists, and `latest` still resolves to the full snapshot', async () => {
    const repo = await Repository.init(new MemoryBackend(), {});
    for (const vm of ['a', 'b', 'a']) {
      await repo.write('import', async () => {
        const r = await ingestStream(repo, Readable.from([randomBytes(200_000)]), { name: 'disk0', kind: 'disk' });
        await repo.saveSnapshot({ vm, tags: [], parent: null, meta: {}, streams: [r.stream] });
      });
      await new Promise((res) => setTimeout(res, 5)); // distinct times
    }
    const full = await repo.listSnapshots();
    const sums = await repo.listSnapshotSummaries();
    expect(sums.map((s) => s.id)).toEqual(full.map((s) => s.id));
    for (const s of sums) {
      expect(s.streams[0]).toEqual({ name: 'disk0', kind: 'disk', size: 200_000, chunkSize: 65536, chunkCount: 4 });
      expect('chunks' in s.streams[0]!).toBe(false);
    }
    const latestA = await repo.resolveSnapshot('a:latest');
    expect(latestA.id).toBe(full[2]!.id);
    expect(latestA.streams[0]!.chunks.length).toBe(4 * 32);
    await repo.close();
  });

  it('check names a manifest it could read once but not when naming affected streams', async () => {
    const faulty = new FaultyBackend(new MemoryBackend());
    const repo = await Repository.init(faulty, {});
    const { r, snap } = await repo.write('import', async () => {
      const r = await ingestStream(repo, Readable.from([randomBytes(100_000)]), { name: 'disk0', kind: 'disk' });
      return { r, snap: await repo.saveSnapshot({ vm: 'v', tags: [], parent: null, meta: {}, streams: [r.stream] }) };
    });
    await faulty.delete('packs', repo.locate(r.stream.chunks.subarray(0, 32)).pack);
    const reader = await Repository.open(faulty); // no cached manifests
    // The first read of the manifest (check's first pass) works; the second (naming) fails.
    faulty.addRule({ method: 'get', kind: 'snapshots', skip: 1, fault: { type: 'error', retryable: false, message: 'connection reset' } });
    const report = await check(reader);
    const missing = report.problems.find((p) => /is missing/.test(p.message));
    expect(missing?.affected).toEqual([{ snapshot: snap.id, vm: '?', stream: '*' }]);
    await reader.close();
    await repo.close();
  });

  it('a sync skips, and reports, a listed snapshot that was forgotten before its turn', async () => {
    const src = await Repository.init(new MemoryBackend(), {});
    const dst = await Repository.init(new MemoryBackend(), {});
    const ids: string[] = [];
    const w = await src.beginWrite('test');
    for (let i = 0; i < 3; i++) {
      const r = await ingestStream(src, Readable.from([randomBytes(70_000)]), { name: 'disk0', kind: 'disk' });
      ids.push((await src.saveSnapshot({ vm: 'v', tags: [], parent: null, meta: {}, streams: [r.stream] })).id);
      await new Promise((res) => setTimeout(res, 5));
    }
    const listed = await src.listSnapshotSummaries();
    await src.deleteSnapshot(ids[1]!); // `forget` in another process, after the listing
    await w.end();
    const report = await copySnapshots(src, dst, listed);
    expect(report.vanished).toEqual([ids[1]]);
    expect(report.snapshots.map((s) => s.source).sort()).toEqual([ids[0], ids[2]].sort());
    expect((await dst.listSnapshotSummaries()).map((s) => s.id).sort()).toEqual([ids[0], ids[2]].sort());
    await src.close();
    await dst.close();
  });
});

