/**
 * Pins (src/store/pins.ts): snapshots held by copy-on-write volumes outside the manifests. forget
 * keeps them and says why, prune keeps their chunks and refuses when a pin names a vanished
 * manifest, check reports such pins and counts them, the first pin raises the format version.
 */
import { describe, expect, it } from 'vitest';
import { randomBytes } from 'node:crypto';
import { Readable } from 'node:stream';
import { MemoryBackend } from '../../src/store/backend/memory.js';
import type { Backend, ObjectKind } from '../../src/store/backend/contract.js';
import { Repository } from '../../src/store/repository.js';
import { ingestStream, exportStream } from '../../src/store/streams.js';
import { check, prune } from '../../src/store/maintenance.js';
import { createPin, forgetUnpinned, listPins, removePin } from '../../src/store/pins.js';
import { FORMAT_VERSION, INITIAL_FORMAT_VERSION, parseConfig } from '../../src/store/format.js';
import { NotFoundError } from '../../src/store/errors.js';
import { PassThrough } from 'node:stream';

const holder = { dataDir: '/data', holder: 'vm1/disk0' };

async function snapshotOf(repo: Repository, data: Buffer) {
  return repo.write('import', async () => {
    const res = await ingestStream(repo, Readable.from([data]), { name: 'disk0', kind: 'disk' });
    return repo.saveSnapshot({ vm: 'vm1', tags: [], parent: null, meta: {}, streams: [res.stream] });
  });
}

/** forget as the CLI runs it: inside a write session (docs/locks.md). */
function forget(repo: Repository, ids: string[]) {
  return repo.write('forget', () => forgetUnpinned(repo, ids));
}

async function exported(repo: Repository, id: string): Promise<Buffer> {
  const snap = await repo.readSnapshot(id);
  const out = new PassThrough();
  const parts: Buffer[] = [];
  out.on('data', (b: Buffer) => parts.push(b));
  await exportStream(repo, snap.streams[0]!, { writable: out });
  return Buffer.concat(parts);
}

async function countPacks(b: Backend): Promise<number> {
  let n = 0;
  for await (const _ of b.list('packs')) n++;
  return n;
}

async function setup(password?: string) {
  const backend = new MemoryBackend();
  const repo = await Repository.init(backend, password !== undefined ? { password } : {});
  const a = randomBytes(1 << 20);
  const b = randomBytes(1 << 20);
  const first = await snapshotOf(repo, a);
  const second = await snapshotOf(repo, b);
  return { backend, repo, a, b, first, second };
}

describe('pins', () => {
  for (const password of [undefined, 'pw']) {
    it(`forget keeps a pinned snapshot and prune keeps its data (${password ? 'encrypted' : 'plain'})`, async () => {
      const { backend, repo, a, first, second } = await setup(password);
      const pin = await createPin(repo, first.id, holder);
      const r = await forget(repo, [first.id, second.id]);
      expect(r.removed).toEqual([second.id]);
      expect([...r.pinned.keys()]).toEqual([first.id]);
      expect(r.pinned.get(first.id)![0]).toMatchObject({ id: pin, snapshot: first.id, holder: 'vm1/disk0', dataDir: '/data' });
      expect((await repo.snapshotIds()).sort()).toEqual([first.id]);
      const st = await prune(repo);
      expect(st.packsDeleted + st.packsRepacked).toBeGreaterThan(0); // the second's data went
      expect((await exported(repo, first.id)).equals(a)).toBe(true);
      const report = await check(repo, { readData: true });
      expect(report.problems).toEqual([]);
      expect(report.pins).toBe(1);
      // Unpinned, it can go.
      await removePin(repo, pin);
      expect((await forget(repo, [first.id])).removed).toEqual([first.id]);
      expect((await listPins(repo)).pins).toEqual([]);
      void backend;
    });
  }

  it('the first pin raises the format version so that older releases refuse the repository', async () => {
    const { backend, repo, first } = await setup();
    expect(parseConfig(await backend.get('config', 'config')).version).toBe(INITIAL_FORMAT_VERSION);
    await createPin(repo, first.id, holder);
    expect(INITIAL_FORMAT_VERSION).toBeLessThan(FORMAT_VERSION);
    expect(parseConfig(await backend.get('config', 'config')).version).toBe(FORMAT_VERSION);
    expect((await Repository.open(backend)).config.version).toBe(FORMAT_VERSION);
  });

  it('pinning a snapshot that does not exist fails and leaves no pin', async () => {
    const { repo } = await setup();
    await expect(createPin(repo, 'f'.repeat(64), holder)).rejects.toThrow(NotFoundError);
    expect(await listPins(repo)).toEqual({ pins: [], unreadable: [] });
  });

  it('a pin written while forget runs puts the forgotten manifest back', async () => {
    const { backend, repo, a, first } = await setup();
    // The pin lands between forget's first listing of pins and its delete of the manifest.
    let pinned = false;
    const racing = new Proxy(backend, {
      get(target, prop, recv) {
        if (prop === 'delete') {
          return async (kind: ObjectKind, name: string) => {
            if (kind === 'snapshots' && !pinned) {
              pinned = true;
              await createPin(repo, name, holder);
            }
            return target.delete(kind, name);
          };
        }
        return Reflect.get(target, prop, recv) as unknown;
      },
    }) as Backend;
    const view = await Repository.open(racing);
    const r = await forget(view, [first.id]);
    expect(r.removed).toEqual([]);
    expect([...r.pinned.keys()]).toEqual([first.id]);
    expect(await repo.snapshotIds()).toContain(first.id);
    await prune(repo);
    expect((await exported(repo, first.id)).equals(a)).toBe(true);
  });

  it('prune refuses, and check reports, a pin whose snapshot manifest is gone (an older vmsnap forgot it)', async () => {
    const { backend, repo, first } = await setup();
    const pin = await createPin(repo, first.id, holder);
    await backend.delete('snapshots', first.id); // what a release without pins would do
    const packsBefore = (await countPacks(backend));
    await expect(prune(repo)).rejects.toThrow(/pinned .*manifest is missing.*nothing deleted/);
    expect((await countPacks(backend))).toBe(packsBefore);
    const report = await check(repo);
    expect(report.pins).toBe(1);
    expect(report.problems.map((p) => p.message)).toEqual([expect.stringMatching(new RegExp(`pin ${pin.slice(0, 8)} held by vm1/disk0.*names snapshot ${first.id.slice(0, 12)}, which does not exist`))]);
  });

  it('an unreadable pin stops forget and prune and is reported by check', async () => {
    const { backend, repo, second } = await setup();
    await backend.put('pins', 'a'.repeat(32), Buffer.from('{not json'));
    await expect(forget(repo, [second.id])).rejects.toThrow(/unreadable.*nothing deleted/);
    expect(await repo.snapshotIds()).toContain(second.id);
    await expect(prune(repo)).rejects.toThrow(/pin\(s\) unreadable/);
    expect((await check(repo)).problems.map((p) => p.message)).toEqual([expect.stringMatching(/^pin aaaaaaaa is unreadable/)]);
  });
});
