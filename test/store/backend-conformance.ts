/**
 * The backend conformance suite: every Backend implementation and every wrapper runs it, so the
 * clauses of src/store/backend/contract.ts are checked in one place (restic's
 * internal/backend/test/suite.go is the model). Call `runBackendConformance` inside a test file;
 * each test gets a fresh, empty backend from `make`.
 */
import { randomBytes } from 'node:crypto';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import {
  BackendError,
  OBJECT_KINDS,
  ObjectNotFoundError,
  type Backend,
  type ObjectInfo,
  type ObjectKind,
} from '../../src/store/backend/contract.js';

export interface BackendUnderTest {
  backend: Backend;
  /** A second, independent instance on the same storage (checks read-after-write across instances). */
  reopen?: () => Promise<Backend>;
  /**
   * Leaves behind exactly what a put of `kind`/`name` killed before it became visible leaves,
   * `ageMs` old. Absent for backends whose puts leave nothing (S3 single PUTs, memory).
   */
  interruptedPut?: (kind: ObjectKind, name: string, ageMs: number) => Promise<void>;
  cleanup?: () => Promise<void>;
}

export interface ConformanceOptions {
  /** Size of the large-object test (default 20 MiB). */
  largeObjectBytes?: number;
  /** Number of objects in the listing test (default 300). */
  listCount?: number;
  /**
   * The server behind the backend may fail a listing that runs into a write in progress with a
   * retryable error (s3rver writes the object file in place and its checksum file after; a listing in
   * between answers HTTP 500). The in-flight test then lists again; what a listing returns must still
   * never be partial. Production wraps S3 in RetryBackend, which retries exactly these.
   */
  transientListErrors?: boolean;
}

export async function listAll(b: Backend, kind: ObjectKind): Promise<ObjectInfo[]> {
  const out: ObjectInfo[] = [];
  for await (const o of b.list(kind)) out.push(o);
  return out;
}

async function rejection(p: Promise<unknown>): Promise<unknown> {
  try {
    await p;
  } catch (err) {
    return err;
  }
  throw new Error('expected the promise to reject, but it resolved');
}

export const INVALID_NAMES = [
  '',
  '../x',
  '..',
  '.',
  'a/b',
  'a\\b',
  '/abs',
  '.hidden',
  '-dash-first',
  '_under-first',
  'a.b',
  'a b',
  'a\0b',
  'x'.repeat(129),
  'x'.repeat(200),
  'é',
];

export function runBackendConformance(
  name: string,
  make: () => Promise<BackendUnderTest>,
  opts: ConformanceOptions = {},
): void {
  const largeBytes = opts.largeObjectBytes ?? 20 * 1024 * 1024;
  const listCount = opts.listCount ?? 300;

  describe(`backend conformance: ${name}`, () => {
    let ut: BackendUnderTest;
    let b: Backend;
    const extra: Backend[] = [];

    beforeEach(async () => {
      ut = await make();
      b = ut.backend;
    });
    afterEach(async () => {
      for (const e of extra.splice(0)) await e.close();
      await b.close();
      await ut.cleanup?.();
    });

    it('has a location and capabilities', () => {
      expect(typeof b.location).toBe('string');
      expect(b.location.length).toBeGreaterThan(0);
      expect(typeof b.capabilities.local).toBe('boolean');
      expect(typeof b.capabilities.requestCost).toBe('boolean');
      expect(typeof b.capabilities.atomicCreate).toBe('boolean');
    });

    it('starts empty for every kind', async () => {
      for (const kind of OBJECT_KINDS) expect(await listAll(b, kind)).toEqual([]);
    });

    it('puts and gets every kind (read-after-write: get, stat, list)', async () => {
      for (const kind of OBJECT_KINDS) {
        const data = randomBytes(1000 + kind.length);
        await b.put(kind, `obj-${kind}`, data);
        expect(Buffer.compare(await b.get(kind, `obj-${kind}`), data)).toBe(0);
        expect(await b.stat(kind, `obj-${kind}`)).toEqual({ name: `obj-${kind}`, size: data.length });
        expect(await listAll(b, kind)).toEqual([{ name: `obj-${kind}`, size: data.length }]);
      }
    });

    it('keeps kinds separate', async () => {
      await b.put('index', 'same', Buffer.from('index'));
      await b.put('snapshots', 'same', Buffer.from('snapshot!'));
      expect((await b.get('index', 'same')).toString()).toBe('index');
      expect((await b.get('snapshots', 'same')).toString()).toBe('snapshot!');
      await expect(b.get('packs', 'same')).rejects.toBeInstanceOf(ObjectNotFoundError);
      expect(await listAll(b, 'keys')).toEqual([]);
      await b.delete('index', 'same');
      expect((await b.get('snapshots', 'same')).toString()).toBe('snapshot!');
    });

    it('stores empty objects and all byte values', async () => {
      await b.put('locks', 'empty', new Uint8Array(0));
      expect((await b.get('locks', 'empty')).length).toBe(0);
      expect(await b.stat('locks', 'empty')).toEqual({ name: 'empty', size: 0 });
      expect(await listAll(b, 'locks')).toEqual([{ name: 'empty', size: 0 }]);
      const all = Buffer.alloc(512);
      for (let i = 0; i < all.length; i++) all[i] = i & 0xff;
      await b.put('keys', 'bytes', all);
      expect(Buffer.compare(await b.get('keys', 'bytes'), all)).toBe(0);
    });

    it('accepts the longest and shortest valid names', async () => {
      const long = 'A' + 'b'.repeat(126) + '9';
      expect(long.length).toBe(128);
      for (const n of [long, 'x', '0', 'a_b-C', 'ab']) {
        await b.put('packs', n, Buffer.from(n));
        expect((await b.get('packs', n)).toString()).toBe(n);
      }
      expect((await listAll(b, 'packs')).map((o) => o.name).sort()).toEqual(
        [long, 'x', '0', 'a_b-C', 'ab'].sort(),
      );
    });

    it('does not alias the caller buffer on put or the stored object on get', async () => {
      const data = Buffer.from('original');
      await b.put('config', 'config', data);
      data.fill(0);
      const got = await b.get('config', 'config');
      expect(got.toString()).toBe('original');
      got.fill(1);
      expect((await b.get('config', 'config')).toString()).toBe('original');
    });

    it('rejects invalid names with a permanent BackendError before any I/O', async () => {
      const data = Buffer.from('x');
      for (const bad of INVALID_NAMES) {
        const calls: Array<[string, () => Promise<unknown>]> = [
          ['put', () => b.put('index', bad, data)],
          ['create', () => b.create('index', bad, data)],
          ['get', () => b.get('index', bad)],
          ['get range', () => b.get('index', bad, { offset: 0, length: 1 })],
          ['stat', () => b.stat('index', bad)],
          ['delete', () => b.delete('index', bad)],
        ];
        for (const [op, call] of calls) {
          const err = await rejection(call());
          expect(err, `${op} ${JSON.stringify(bad)}`).toBeInstanceOf(BackendError);
          expect(err, `${op} ${JSON.stringify(bad)}`).not.toBeInstanceOf(ObjectNotFoundError);
          expect((err as BackendError).retryable).toBe(false);
        }
      }
      const badKind = 'nope' as ObjectKind;
      expect(await rejection(b.put(badKind, 'x', data))).toBeInstanceOf(BackendError);
      expect(await rejection(b.get('../index' as ObjectKind, 'x'))).toBeInstanceOf(BackendError);
      expect(await rejection(listAll(b, badKind))).toBeInstanceOf(BackendError);
      for (const kind of OBJECT_KINDS) expect(await listAll(b, kind)).toEqual([]);
    });

    it('overwrites an existing object atomically', async () => {
      await b.put('config', 'config', Buffer.from('first version'));
      await b.put('config', 'config', Buffer.from('v2'));
      expect((await b.get('config', 'config')).toString()).toBe('v2');
      expect(await b.stat('config', 'config')).toEqual({ name: 'config', size: 2 });
      expect(await listAll(b, 'config')).toEqual([{ name: 'config', size: 2 }]);
    });

    it('reports missing objects with ObjectNotFoundError and deletes idempotently', async () => {
      const err = await rejection(b.get('packs', 'missing'));
      expect(err).toBeInstanceOf(ObjectNotFoundError);
      expect((err as ObjectNotFoundError).kind).toBe('packs');
      expect((err as ObjectNotFoundError).object).toBe('missing');
      expect((err as BackendError).retryable).toBe(false);
      await expect(b.get('packs', 'missing', { offset: 0, length: 0 })).rejects.toBeInstanceOf(ObjectNotFoundError);
      await expect(b.stat('index', 'missing')).rejects.toBeInstanceOf(ObjectNotFoundError);
      await b.delete('locks', 'missing');
      await b.put('locks', 'l1', Buffer.from('lock'));
      await b.delete('locks', 'l1');
      await b.delete('locks', 'l1');
      await expect(b.get('locks', 'l1')).rejects.toBeInstanceOf(ObjectNotFoundError);
      await expect(b.stat('locks', 'l1')).rejects.toBeInstanceOf(ObjectNotFoundError);
      expect(await listAll(b, 'locks')).toEqual([]);
    });

    it('returns exact byte ranges, including at the edges, and rejects ranges past the end', async () => {
      const data = randomBytes(10_000);
      await b.put('packs', 'ranged', data);
      const cases: Array<[number, number]> = [
        [0, 0],
        [0, 1],
        [0, data.length],
        [1, data.length - 1],
        [4096, 4096],
        [data.length - 1, 1],
        [data.length, 0],
        [5000, 0],
        [1234, 777],
      ];
      for (const [offset, length] of cases) {
        const got = await b.get('packs', 'ranged', { offset, length });
        expect(got.length, `${offset}+${length}`).toBe(length);
        expect(Buffer.compare(got, data.subarray(offset, offset + length)), `${offset}+${length}`).toBe(0);
      }
      const bad: Array<[number, number]> = [
        [0, data.length + 1],
        [data.length - 1, 2],
        [data.length, 1],
        [data.length + 1, 0],
        [data.length + 100, 5],
        [-1, 2],
        [0, -1],
        [0.5, 1],
      ];
      for (const [offset, length] of bad) {
        const err = await rejection(b.get('packs', 'ranged', { offset, length }));
        expect(err, `${offset}+${length}`).toBeInstanceOf(BackendError);
        expect(err, `${offset}+${length}`).not.toBeInstanceOf(ObjectNotFoundError);
        expect((err as BackendError).retryable, `${offset}+${length}`).toBe(false);
      }
      await b.put('packs', 'empty', new Uint8Array(0));
      expect((await b.get('packs', 'empty', { offset: 0, length: 0 })).length).toBe(0);
      expect(await rejection(b.get('packs', 'empty', { offset: 0, length: 1 }))).toBeInstanceOf(BackendError);
    });

    it('reads into a caller buffer when asked, and refuses one that is too small', async () => {
      const data = randomBytes(10_000);
      await b.put('packs', 'into', data);
      const into = Buffer.alloc(8192, 0xee);
      const got = await b.get('packs', 'into', { offset: 1000, length: 5000 }, into.subarray(100));
      expect(Buffer.compare(got, data.subarray(1000, 6000))).toBe(0);
      // Reused buffers are the point: a well-behaved backend fills the one it was given.
      expect(got.buffer).toBe(into.buffer);
      expect(got.byteOffset).toBe(into.byteOffset + 100);
      expect(into[99]).toBe(0xee);
      expect(into[6100]).toBe(0xee);
      const whole = await b.get('packs', 'into', undefined, Buffer.alloc(data.length + 5));
      expect(Buffer.compare(whole, data)).toBe(0);
      const err = await rejection(b.get('packs', 'into', { offset: 0, length: 5000 }, Buffer.alloc(4999)));
      expect(err).toBeInstanceOf(BackendError);
      expect((err as BackendError).retryable).toBe(false);
      expect((err as Error).message).toMatch(/cannot hold 5000 bytes of packs\/into/);
    });

    it(`stores and reads a large object (${largeBytes} bytes)`, async () => {
      const data = randomBytes(largeBytes);
      await b.put('packs', 'large', data);
      expect(await b.stat('packs', 'large')).toEqual({ name: 'large', size: largeBytes });
      const got = await b.get('packs', 'large');
      expect(got.length).toBe(largeBytes);
      expect(Buffer.compare(got, data)).toBe(0);
      const tail = await b.get('packs', 'large', { offset: largeBytes - 70_000, length: 70_000 });
      expect(Buffer.compare(tail, data.subarray(largeBytes - 70_000))).toBe(0);
    });

    it(`lists ${listCount} objects exactly once with their sizes`, async () => {
      const expected = new Map<string, number>();
      const names = Array.from({ length: listCount }, (_, i) => randomBytes(16).toString('hex') + i);
      for (let i = 0; i < names.length; i += 16) {
        await Promise.all(
          names.slice(i, i + 16).map(async (n, j) => {
            const size = (i + j) % 37;
            expected.set(n, size);
            await b.put('packs', n, Buffer.alloc(size, 7));
          }),
        );
      }
      await b.put('index', 'not-a-pack', Buffer.from('x'));
      const listed = await listAll(b, 'packs');
      expect(listed.length).toBe(listCount);
      const seen = new Map(listed.map((o) => [o.name, o.size]));
      expect(seen.size).toBe(listCount);
      expect(seen).toEqual(expected);
    });

    it('resolves concurrent puts of one name to exactly one complete version', async () => {
      const versions = Array.from({ length: 8 }, (_, i) => randomBytes(100_000 + i * 1000));
      await Promise.all(versions.map((v) => b.put('locks', 'contended', v)));
      const got = await b.get('locks', 'contended');
      expect(versions.some((v) => Buffer.compare(v, got) === 0)).toBe(true);
      expect((await b.stat('locks', 'contended')).size).toBe(got.length);
      expect(await listAll(b, 'locks')).toEqual([{ name: 'contended', size: got.length }]);
    });

    it('never shows a partial object while puts are in flight', async () => {
      const contents = new Map<string, Buffer>();
      for (let i = 0; i < 4; i++) contents.set(`inflight${i}`, randomBytes(2 * 1024 * 1024));
      let done = false;
      const writes = Promise.all([...contents].map(([n, d]) => b.put('packs', n, d))).finally(() => {
        done = true;
      });
      const list = async (): Promise<ObjectInfo[]> => {
        for (let attempt = 1; ; attempt++) {
          try {
            return await listAll(b, 'packs');
          } catch (err) {
            if (!opts.transientListErrors || !(err instanceof BackendError) || !err.retryable || attempt >= 20) throw err;
          }
        }
      };
      do {
        for (const o of await list()) {
          const want = contents.get(o.name);
          expect(want, o.name).toBeDefined();
          expect(o.size).toBe(want?.length);
        }
      } while (!done);
      await writes;
      for (const [n, d] of contents) expect(Buffer.compare(await b.get('packs', n), d)).toBe(0);
    });

    it('creates only when absent', async () => {
      expect(await b.create('locks', 'excl', Buffer.from('first'))).toBe(true);
      expect(await b.create('locks', 'excl', Buffer.from('second'))).toBe(false);
      expect((await b.get('locks', 'excl')).toString()).toBe('first');
      await b.delete('locks', 'excl');
      expect(await b.create('locks', 'excl', Buffer.from('third'))).toBe(true);
      expect((await b.get('locks', 'excl')).toString()).toBe('third');
      expect(await listAll(b, 'locks')).toEqual([{ name: 'excl', size: 5 }]);
    });

    it('resolves concurrent creates of one name to one winner when atomicCreate', async () => {
      const contents = Array.from({ length: 6 }, (_, i) => Buffer.from(`creator-${i}-${randomBytes(8).toString('hex')}`));
      const results = await Promise.all(contents.map((c) => b.create('locks', 'race', c)));
      const got = await b.get('locks', 'race');
      const winners = results.flatMap((r, i) => (r ? [i] : []));
      if (b.capabilities.atomicCreate) {
        expect(winners.length).toBe(1);
        expect(Buffer.compare(got, contents[winners[0] ?? -1] ?? Buffer.alloc(0))).toBe(0);
      } else {
        // Best effort only: at least one caller believes it created the object, and it is complete.
        expect(winners.length).toBeGreaterThanOrEqual(1);
        expect(contents.some((c) => Buffer.compare(c, got) === 0)).toBe(true);
      }
    });

    it('shows puts and deletes to another instance on the same storage', async (ctx) => {
      if (!ut.reopen) return ctx.skip('no second instance on the same storage');
      const other = await ut.reopen();
      extra.push(other);
      await b.put('snapshots', 'shared', Buffer.from('hello'));
      expect((await other.get('snapshots', 'shared')).toString()).toBe('hello');
      expect(await listAll(other, 'snapshots')).toEqual([{ name: 'shared', size: 5 }]);
      expect(await other.create('snapshots', 'shared', Buffer.from('x'))).toBe(false);
      await other.delete('snapshots', 'shared');
      await expect(b.get('snapshots', 'shared')).rejects.toBeInstanceOf(ObjectNotFoundError);
    });

    it('is unusable after close, and closing twice is harmless', async () => {
      await b.put('config', 'config', Buffer.from('x'));
      await b.close();
      for (const call of [
        () => b.put('config', 'config', Buffer.from('y')),
        () => b.get('config', 'config'),
        () => b.stat('config', 'config'),
        () => b.create('locks', 'l', Buffer.from('y')),
        () => b.delete('config', 'config'),
        () => listAll(b, 'config'),
      ]) {
        const err = await rejection(call());
        expect(err).toBeInstanceOf(BackendError);
        expect((err as BackendError).retryable).toBe(false);
      }
      await b.close();
    });

    it('completed puts leave no leftovers', async () => {
      for (const kind of OBJECT_KINDS) await b.put(kind, 'kept', Buffer.from(kind));
      expect(await b.leftovers()).toEqual([]);
      expect(await b.removeLeftovers(0)).toBe(0);
      for (const kind of OBJECT_KINDS) expect((await b.get(kind, 'kept')).toString()).toBe(kind);
    });

    it('lists and removes leftovers of interrupted writes once old enough, never an object or a young one', async (ctx) => {
      if (!ut.interruptedPut) return ctx.skip('puts of this backend leave nothing behind');
      for (const kind of OBJECT_KINDS) await b.put(kind, 'kept', Buffer.from(kind));
      for (const kind of OBJECT_KINDS) await ut.interruptedPut(kind, `old${kind}`, 2 * 3600_000);
      await ut.interruptedPut('packs', 'young', 1000);
      const found = await b.leftovers();
      expect(found).toHaveLength(OBJECT_KINDS.length + 1);
      expect(found.filter((l) => l.ageMs > 3600_000)).toHaveLength(OBJECT_KINDS.length);
      for (const kind of OBJECT_KINDS) expect((await listAll(b, kind)).map((o) => o.name)).toEqual(['kept']); // never listed
      expect(await b.removeLeftovers(3600_000)).toBe(OBJECT_KINDS.length);
      const left = await b.leftovers();
      expect(left).toHaveLength(1); // the young one: another process may still be writing it
      expect(left[0]!.ageMs).toBeLessThan(3600_000);
      for (const kind of OBJECT_KINDS) expect((await b.get(kind, 'kept')).toString()).toBe(kind);
    });

    it('deletes objects from get, stat and list', async () => {
      for (let i = 0; i < 5; i++) await b.put('index', `i${i}`, Buffer.from(`index ${i}`));
      await b.delete('index', 'i2');
      await b.delete('index', 'i4');
      expect((await listAll(b, 'index')).map((o) => o.name).sort()).toEqual(['i0', 'i1', 'i3']);
      await expect(b.stat('index', 'i2')).rejects.toBeInstanceOf(ObjectNotFoundError);
      expect((await b.get('index', 'i3')).toString()).toBe('index 3');
    });
  });
}
