import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { BackendError, ObjectNotFoundError } from '../../src/store/backend/contract.js';
import { FaultyBackend, type FaultRule } from '../../src/store/backend/faulty.js';
import { LocalBackend, localError } from '../../src/store/backend/local.js';
import { MemoryBackend } from '../../src/store/backend/memory.js';
import { RetryBackend, RetryExhaustedError } from '../../src/store/backend/retry.js';
import { StatsBackend } from '../../src/store/backend/stats.js';
import { listAll } from './backend-conformance.js';

const noSleep = async (): Promise<void> => undefined;

function setup(plan: FaultRule[], maxAttempts = 5) {
  const mem = new MemoryBackend();
  const faulty = new FaultyBackend(mem, plan);
  const delays: number[] = [];
  const retry = new RetryBackend(faulty, {
    maxAttempts,
    sleep: async (ms) => {
      delays.push(ms);
    },
    random: () => 0.5,
  });
  return { mem, faulty, retry, delays };
}

describe('FaultyBackend + RetryBackend scenarios', () => {
  it('retries a put that fails once (retryable) and succeeds', async () => {
    const { faulty, retry, mem, delays } = setup([{ id: 'once', method: 'put', fault: { type: 'error', retryable: true } }]);
    await retry.put('packs', 'p1', Buffer.from('data'));
    expect((await mem.get('packs', 'p1')).toString()).toBe('data');
    expect(retry.retries).toBe(1);
    expect(delays).toEqual([100]);
    faulty.assertAllFired();
  });

  it('uses exponential backoff with jitter bounded by maxDelayMs', async () => {
    const delays: number[] = [];
    const faulty = new FaultyBackend(new MemoryBackend(), [
      { id: 'x4', method: 'get', times: 4, fault: { type: 'error', retryable: true } },
    ]);
    await faulty.inner.put('index', 'i', Buffer.from('x'));
    const retry = new RetryBackend(faulty, {
      baseDelayMs: 100,
      maxDelayMs: 500,
      random: () => 0.999,
      sleep: async (ms) => {
        delays.push(ms);
      },
    });
    expect((await retry.get('index', 'i')).toString()).toBe('x');
    expect(delays).toEqual([99, 199, 399, 499]);
    faulty.assertAllFired();
  });

  it('gives up after maxAttempts on a persistent retryable fault', async () => {
    const { faulty, retry } = setup([{ id: 'always', method: 'stat', times: 3, fault: { type: 'error', retryable: true } }], 3);
    const err = await retry.stat('index', 'x').catch((e: unknown) => e);
    expect(err).toBeInstanceOf(RetryExhaustedError);
    expect((err as RetryExhaustedError).attempts).toBe(3);
    expect((err as Error).message).toMatch(/stat index\/x failed after 3 attempts/);
    expect(faulty.fired.map((f) => f.rule)).toEqual(['always', 'always', 'always']);
    faulty.assertAllFired();
  });

  it('does not retry permanent errors', async () => {
    const { faulty, retry } = setup([{ id: 'perm', method: 'put', fault: { type: 'error', retryable: false } }]);
    const err = await retry.put('packs', 'p', Buffer.from('x')).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(BackendError);
    expect((err as BackendError).retryable).toBe(false);
    expect(retry.retries).toBe(0);
    await expect(retry.get('packs', 'p')).rejects.toBeInstanceOf(ObjectNotFoundError);
    faulty.assertAllFired();
  });

  it('reports ENOSPC on put as permanent and stores nothing', async () => {
    const { faulty, retry } = setup([{ id: 'full', method: 'put', kind: 'packs', fault: { type: 'enospc' } }]);
    const err = await retry.put('packs', 'big', Buffer.alloc(100)).catch((e: unknown) => e);
    expect((err as BackendError).retryable).toBe(false);
    expect((err as Error).message).toMatch(/no space left on device/);
    expect(await listAll(retry, 'packs')).toEqual([]);
    faulty.assertAllFired();
  });

  it('flips a bit in stored data (silent corruption visible on read)', async () => {
    const { faulty, retry } = setup([{ id: 'flip', method: 'put', fault: { type: 'bitflip', where: 'stored', bit: 9 } }]);
    const data = Buffer.from([0, 0, 0, 0]);
    await retry.put('packs', 'p', data);
    expect([...(await retry.get('packs', 'p'))]).toEqual([0, 2, 0, 0]);
    expect([...data]).toEqual([0, 0, 0, 0]);
    faulty.assertAllFired();
  });

  it('flips a bit in returned data only for the faulted read', async () => {
    const { faulty, retry } = setup([{ id: 'flip', method: 'get', fault: { type: 'bitflip', where: 'returned', bit: 0 } }]);
    await retry.put('packs', 'p', Buffer.from([8, 8]));
    expect([...(await retry.get('packs', 'p'))]).toEqual([9, 8]);
    expect([...(await retry.get('packs', 'p'))]).toEqual([8, 8]);
    faulty.assertAllFired();
  });

  it('truncates stored and returned data', async () => {
    const { faulty, retry } = setup([
      { id: 'ts', method: 'put', name: 'a', fault: { type: 'truncate', where: 'stored', length: 3 } },
      { id: 'tr', method: 'get', name: 'b', fault: { type: 'truncate', where: 'returned' } },
    ]);
    await retry.put('packs', 'a', Buffer.from('abcdef'));
    await retry.put('packs', 'b', Buffer.from('abcdef'));
    expect((await retry.get('packs', 'a')).toString()).toBe('abc');
    expect((await retry.get('packs', 'b')).toString()).toBe('abc');
    expect((await retry.get('packs', 'b')).toString()).toBe('abcdef');
    faulty.assertAllFired();
  });

  it('delays a call and still completes it', async () => {
    const { faulty, retry } = setup([{ id: 'slow', method: 'put', fault: { type: 'delay', ms: 5 } }]);
    await retry.put('index', 'i', Buffer.from('x'));
    expect((await retry.get('index', 'i')).toString()).toBe('x');
    faulty.assertAllFired();
  });

  it('crash (reject): the put never happens', async () => {
    const faulty = new FaultyBackend(new MemoryBackend(), [{ id: 'crash', method: 'put', fault: { type: 'crash', mode: 'reject' } }]);
    await expect(faulty.put('snapshots', 's', Buffer.from('x'))).rejects.toThrow(/crashed/);
    await expect(faulty.get('snapshots', 's')).rejects.toBeInstanceOf(ObjectNotFoundError);
    faulty.assertAllFired();
  });

  it('crash (hang): the put never happens and the call never settles until released', async () => {
    const faulty = new FaultyBackend(new MemoryBackend(), [{ id: 'hang', method: 'put', fault: { type: 'crash', mode: 'hang' } }]);
    let settled = false;
    const p = faulty.put('snapshots', 's', Buffer.from('x')).finally(() => {
      settled = true;
    });
    // Let every pending microtask and a macrotask run; the hung call must still be pending.
    await new Promise((r) => setImmediate(r));
    expect(settled).toBe(false);
    expect(faulty.hungCount).toBe(1);
    await expect(faulty.get('snapshots', 's')).rejects.toBeInstanceOf(ObjectNotFoundError);
    faulty.releaseHung();
    await expect(p).rejects.toThrow(/released/);
    expect(faulty.hungCount).toBe(0);
    faulty.assertAllFired();
  });

  it('lost reply on create: the retry recognises its own object', async () => {
    const { faulty, retry, mem } = setup([{ id: 'lost', method: 'create', fault: { type: 'errorAfter', retryable: true } }]);
    expect(await retry.create('locks', 'l', Buffer.from('lock-by-me-123'))).toBe(true);
    expect((await mem.get('locks', 'l')).toString()).toBe('lock-by-me-123');
    // Someone else's lock with different bytes is still "not created".
    expect(await retry.create('locks', 'l', Buffer.from('lock-by-other'))).toBe(false);
    faulty.assertAllFired();
  });

  it('lost reply on create does not claim another writer\'s object', async () => {
    const mem = new MemoryBackend();
    await mem.put('locks', 'l', Buffer.from('theirs'));
    const faulty = new FaultyBackend(mem, [{ id: 'fail-first', method: 'create', fault: { type: 'error', retryable: true } }]);
    const retry = new RetryBackend(faulty, { sleep: noSleep });
    expect(await retry.create('locks', 'l', Buffer.from('mine'))).toBe(false);
    faulty.assertAllFired();
  });

  it('a list that fails after yielding is retried without duplicates', async () => {
    const { faulty, retry } = setup([{ id: 'list-lost', method: 'list', kind: 'packs', fault: { type: 'errorAfter', retryable: true } }]);
    for (let i = 0; i < 10; i++) await faulty.inner.put('packs', `p${i}`, Buffer.alloc(i));
    const listed = await listAll(retry, 'packs');
    expect(listed.length).toBe(10);
    expect(new Set(listed.map((o) => o.name)).size).toBe(10);
    faulty.assertAllFired();
  });

  it('matches rules by kind, name and skip count', async () => {
    const faulty = new FaultyBackend(new MemoryBackend(), [
      { id: 'locks-only', method: 'put', kind: 'locks', fault: { type: 'error', retryable: false } },
      { id: 'third-get', method: 'get', name: /^idx/, skip: 2, fault: { type: 'error', retryable: false } },
    ]);
    await faulty.put('packs', 'p', Buffer.from('x'));
    await faulty.put('index', 'idx1', Buffer.from('x'));
    await expect(faulty.put('locks', 'p', Buffer.from('x'))).rejects.toThrow(/injected/);
    await faulty.get('index', 'idx1');
    await faulty.get('packs', 'p');
    await faulty.get('index', 'idx1');
    await expect(faulty.get('index', 'idx1')).rejects.toThrow(/injected/);
    await faulty.get('index', 'idx1');
    expect(faulty.fired).toEqual([
      { rule: 'locks-only', method: 'put', kind: 'locks', name: 'p', fault: 'error' },
      { rule: 'third-get', method: 'get', kind: 'index', name: 'idx1', fault: 'error' },
    ]);
    faulty.assertAllFired();
  });

  it('assertAllFired names rules that never fired', () => {
    const faulty = new FaultyBackend(new MemoryBackend(), [{ id: 'never', method: 'delete', times: 2, fault: { type: 'error', retryable: true } }]);
    expect(() => faulty.assertAllFired()).toThrow(/never \(0\/2\)/);
  });

  it('refuses faults that cannot apply to a method', () => {
    expect(() => new FaultyBackend(new MemoryBackend(), [{ method: 'get', fault: { type: 'enospc' } }])).toThrow(/cannot apply/);
    expect(() => new FaultyBackend(new MemoryBackend(), [{ method: 'put', fault: { type: 'bitflip', where: 'returned' } }])).toThrow(
      /only to get/,
    );
  });
});

describe('StatsBackend', () => {
  it('counts requests, errors and bytes per method', async () => {
    const faulty = new FaultyBackend(new MemoryBackend(), [{ id: 'e', method: 'get', name: 'b', fault: { type: 'error', retryable: true } }]);
    const stats = new StatsBackend(faulty);
    await stats.put('packs', 'a', Buffer.alloc(1000));
    await stats.put('packs', 'b', Buffer.alloc(24));
    expect(await stats.create('locks', 'l', Buffer.alloc(10))).toBe(true);
    expect(await stats.create('locks', 'l', Buffer.alloc(10))).toBe(false);
    await stats.get('packs', 'a', { offset: 10, length: 90 });
    await expect(stats.get('packs', 'b')).rejects.toThrow();
    await stats.stat('packs', 'a');
    await listAll(stats, 'packs');
    await stats.delete('packs', 'a');
    const s = stats.snapshot();
    expect(s.put).toEqual({ requests: 2, errors: 0, bytes: 1024 });
    expect(s.create).toEqual({ requests: 2, errors: 0, bytes: 10 });
    expect(s.get).toEqual({ requests: 2, errors: 1, bytes: 90 });
    expect(s.stat.requests).toBe(1);
    expect(s.list.requests).toBe(1);
    expect(s.listed).toBe(2);
    expect(s.delete.requests).toBe(1);
    expect(stats.writesPerGiB()).toBeCloseTo((4 * 2 ** 30) / 1034);
    stats.reset();
    expect(stats.snapshot().put.requests).toBe(0);
    faulty.assertAllFired();
  });

  it('counts every retry as a request when placed inside RetryBackend', async () => {
    const faulty = new FaultyBackend(new MemoryBackend(), [{ id: 'e2', method: 'put', times: 2, fault: { type: 'error', retryable: true } }]);
    const stats = new StatsBackend(faulty);
    const retry = new RetryBackend(stats, { sleep: noSleep });
    await retry.put('packs', 'p', Buffer.alloc(64));
    expect(stats.snapshot().put).toEqual({ requests: 3, errors: 2, bytes: 64 });
    faulty.assertAllFired();
  });
});

describe('LocalBackend errors', () => {
  it('maps errno codes to permanent or retryable BackendErrors', () => {
    const mk = (code: string) => Object.assign(new Error(`${code}: boom`), { code });
    expect(localError('put', 'packs/x', mk('ENOSPC'))).toMatchObject({ retryable: false, message: expect.stringMatching(/put packs\/x failed: no space left on device/) });
    expect(localError('put', 'packs/x', mk('EACCES')).retryable).toBe(false);
    expect(localError('put', 'packs/x', mk('EROFS')).retryable).toBe(false);
    expect(localError('get', 'packs/x', mk('EIO')).retryable).toBe(false);
    expect(localError('get', 'packs/x', mk('EMFILE')).retryable).toBe(true);
    expect(localError('get', 'packs/x', mk('EAGAIN')).retryable).toBe(true);
    expect(localError('get', 'packs/x', new Error('no code')).retryable).toBe(false);
  });

  it('reports a root that is a file as a permanent error', async () => {
    const dir = await mkdtemp(path.join(tmpdir(), 'vmsnap-localerr-'));
    try {
      await new LocalBackend(dir).put('config', 'config', Buffer.from('x'));
      const b = new LocalBackend(path.join(dir, 'config', 'config'));
      const err = await b.put('index', 'i', Buffer.from('x')).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(BackendError);
      expect((err as BackendError).retryable).toBe(false);
      expect((err as Error).message).toMatch(/put index\/i failed: (ENOTDIR|EEXIST)/);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  it('recreates a kind folder removed behind its back', async () => {
    const dir = await mkdtemp(path.join(tmpdir(), 'vmsnap-vanish-'));
    try {
      const b = new LocalBackend(dir);
      await b.put('locks', 'l1', Buffer.from('x'));
      await rm(path.join(dir, 'locks'), { recursive: true });
      await b.put('locks', 'l2', Buffer.from('y'));
      expect(await b.create('locks', 'l3', Buffer.from('z'))).toBe(true);
      expect((await listAll(b, 'locks')).map((o) => o.name).sort()).toEqual(['l2', 'l3']);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  it('fans packs out into two-character folders and ignores temp files in listings', async () => {
    const dir = await mkdtemp(path.join(tmpdir(), 'vmsnap-fanout-'));
    try {
      const b = new LocalBackend(dir);
      await b.put('packs', 'abcdef', Buffer.from('x'));
      await b.put('index', 'abcdef', Buffer.from('y'));
      const { readdir, writeFile, utimes } = await import('node:fs/promises');
      expect(await readdir(path.join(dir, 'packs', 'ab'))).toEqual(['abcdef']);
      expect(await readdir(path.join(dir, 'index'))).toEqual(['abcdef']);
      const stale = path.join(dir, 'packs', 'ab', '.tmp-abzzzz-123456');
      await writeFile(stale, 'partial');
      await writeFile(path.join(dir, 'index', 'not.valid'), 'foreign');
      expect(await listAll(b, 'packs')).toEqual([{ name: 'abcdef', size: 1 }]);
      expect(await listAll(b, 'index')).toEqual([{ name: 'abcdef', size: 1 }]);
      expect(await b.removeLeftovers(60_000)).toBe(0);
      await utimes(stale, new Date(0), new Date(0));
      expect(await b.removeLeftovers(60_000)).toBe(1);
      expect(await readdir(path.join(dir, 'packs', 'ab'))).toEqual(['abcdef']);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
