/**
 * Cost targets of a repository on S3 (s3rver): at most 64 write requests per GiB ingested (packs are
 * cut at 32 MiB), and `check` without --read-data / `prune` download nothing they need not — no pack
 * bytes at all, only index files, manifests, the config and locks. Also `--stats` of the CLI.
 */
import { Readable } from 'node:stream';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openBackendDetailed } from '../../src/store/backend/open.js';
import type { Backend, ByteRange, ObjectInfo, ObjectKind } from '../../src/store/backend/contract.js';
import { Repository } from '../../src/store/repository.js';
import { ingestStream } from '../../src/store/streams.js';
import { check, prune } from '../../src/store/maintenance.js';
import { ensureBuilt, randomData, vmsnapOk } from '../helpers/cli.js';
import { startS3rver, type S3rverHandle } from '../helpers/s3rver.js';

let s3: S3rverHandle;
beforeAll(async () => {
  s3 = await startS3rver();
}, 60_000);
afterAll(async () => {
  await s3?.stop();
});

/** Records the kind and size of every GET (StatsBackend counts per method only). */
class KindCounter implements Backend {
  gets = new Map<ObjectKind, { requests: number; bytes: number }>();
  constructor(readonly inner: Backend) {}
  get location() {
    return this.inner.location;
  }
  get capabilities() {
    return this.inner.capabilities;
  }
  put(k: ObjectKind, n: string, d: Uint8Array) {
    return this.inner.put(k, n, d);
  }
  create(k: ObjectKind, n: string, d: Uint8Array) {
    return this.inner.create(k, n, d);
  }
  async get(k: ObjectKind, n: string, r?: ByteRange, into?: Uint8Array): Promise<Buffer> {
    const b = await this.inner.get(k, n, r, into);
    const c = this.gets.get(k) ?? { requests: 0, bytes: 0 };
    c.requests++;
    c.bytes += b.length;
    this.gets.set(k, c);
    return b;
  }
  stat(k: ObjectKind, n: string): Promise<ObjectInfo> {
    return this.inner.stat(k, n);
  }
  list(k: ObjectKind) {
    return this.inner.list(k);
  }
  delete(k: ObjectKind, n: string) {
    return this.inner.delete(k, n);
  }
  leftovers() {
    return this.inner.leftovers();
  }
  removeLeftovers(age: number) {
    return this.inner.removeLeftovers(age);
  }
  close() {
    return this.inner.close();
  }
  reset() {
    this.gets.clear();
  }
}

async function sizes(b: Backend, kind: ObjectKind): Promise<number> {
  let n = 0;
  for await (const o of b.list(kind)) n += o.size;
  return n;
}

const creds = () => ({ credentials: { accessKeyId: s3.accessKeyId, secretAccessKey: s3.secretAccessKey } });

function* pieces(total: number, seed: number): Generator<Buffer> {
  for (let off = 0, i = 0; off < total; off += 8 << 20, i++) yield randomData(Math.min(8 << 20, total - off), seed + i);
}

describe('S3 repository cost', () => {
  it('ingesting 256 MiB of random data takes at most 64 write requests per GiB; check and prune read no pack', async () => {
    const opened = openBackendDetailed(`${s3.url}/cost`, { stats: true, s3: creds() });
    const counter = new KindCounter(opened.backend);
    const stats = opened.stats!;
    await (await Repository.init(counter, { password: 'pw' })).close();
    const repo = await Repository.open(counter, { password: 'pw' });
    stats.reset();
    const total = 256 << 20;
    const w = await repo.beginWrite('import');
    const res = await ingestStream(repo, Readable.from(pieces(total, 1)), { name: 'disk0', kind: 'disk' });
    const snap = await repo.saveSnapshot({ vm: 'cost', tags: [], parent: null, meta: {}, streams: [res.stream] });
    const st = stats.snapshot();
    const writes = st.put.requests + st.create.requests;
    const perGiB = (writes * 2 ** 30) / total;
    expect(perGiB).toBeLessThanOrEqual(64);
    expect(res.newChunks).toBe(total / repo.chunkSize);

    // A second, small snapshot in packs of its own, then forgotten: prune deletes its pack unread.
    const small = await ingestStream(repo, Readable.from(pieces(1 << 20, 1000)), { name: 'disk0', kind: 'disk' });
    const gone = await repo.saveSnapshot({ vm: 'tmp', tags: [], parent: null, meta: {}, streams: [small.stream] });
    await w.end();
    await repo.close();

    const meta = (await sizes(counter, 'index')) + (await sizes(counter, 'snapshots'));
    const reopened = await Repository.open(counter, { password: 'pw' });
    counter.reset();
    const report = await check(reopened);
    expect(report.problems.filter((p) => p.severity === 'error')).toEqual([]);
    expect(counter.gets.get('packs')).toBeUndefined();
    // check holds a shared lock (docs/locks.md): reading the lock objects is a few hundred bytes.
    const got = [...counter.gets].filter(([k]) => k !== 'locks').reduce((a, [, c]) => a + c.bytes, 0);
    expect(counter.gets.get('locks')?.bytes ?? 0).toBeLessThan(4096);
    expect(got).toBeLessThanOrEqual(meta);

    await reopened.write('forget', () => reopened.deleteSnapshot(gone.id));
    counter.reset();
    const p = await prune(reopened);
    expect(p.packsDeleted).toBeGreaterThanOrEqual(1);
    expect(p.packsRepacked).toBe(0);
    expect(counter.gets.get('packs')).toBeUndefined();
    await reopened.close();
    expect(snap.id).toMatch(/^[0-9a-f]{64}$/);
    await counter.close();
  }, 90_000);

  it('--stats reports requests and bytes per operation; check downloads only index files and manifests', async () => {
    ensureBuilt();
    const env = { AWS_ACCESS_KEY_ID: s3.accessKeyId, AWS_SECRET_ACCESS_KEY: s3.secretAccessKey, AWS_REGION: 'us-east-1', NODE_NO_WARNINGS: '1' };
    const url = `${s3.url}/cli-stats`;
    await vmsnapOk(url, ['init'], { env });
    await vmsnapOk(url, ['import', '-', '--vm', 'x', '-q'], { env, input: randomData(3 << 20, 5) });
    const human = await vmsnapOk(url, ['--stats', 'check'], { env });
    expect(human.stderr).toMatch(/backend requests for s3:http:\/\/127\.0\.0\.1:\d+\/vmsnap-test\/cli-stats:\n(.|\n)*get +\d+ requests, \d+ bytes received/);
    const r = await vmsnapOk(url, ['--stats', '--json', 'check'], { env });
    JSON.parse(r.stdout); // stdout stays the command's own JSON
    const line = r.stderr.split('\n').find((l) => l.startsWith('{"backendStats"'));
    expect(line).toBeDefined();
    const bs = (JSON.parse(line!) as { backendStats: { location: string; stats: { get: { requests: number; bytes: number }; put: { requests: number } } }[] }).backendStats;
    expect(bs).toHaveLength(1);
    const opened = openBackendDetailed(url, { s3: creds() });
    const allowed = (await sizes(opened.backend, 'index')) + 2 * (await sizes(opened.backend, 'snapshots')) + (await sizes(opened.backend, 'config')) + 4096;
    const packs = await sizes(opened.backend, 'packs');
    await opened.backend.close();
    expect(bs[0]!.stats.get.bytes).toBeGreaterThan(0);
    expect(bs[0]!.stats.get.bytes).toBeLessThanOrEqual(allowed);
    expect(bs[0]!.stats.get.bytes).toBeLessThan(packs);
  }, 60_000);
});
