/**
 * S3Backend behind an HTTP fault proxy in front of a real s3rver: retryable faults are survived
 * through RetryBackend (the default layering from openBackend), permanent ones are reported at once,
 * a torn upload never becomes visible, and the secret key never shows up anywhere.
 */
import { randomBytes } from 'node:crypto';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { inspect } from 'node:util';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { BackendError, ObjectNotFoundError, type Backend } from '../../src/store/backend/contract.js';
import { openBackend, openBackendDetailed } from '../../src/store/backend/open.js';
import { RetryBackend, RetryExhaustedError } from '../../src/store/backend/retry.js';
import { S3Backend } from '../../src/store/backend/s3.js';
import { startFaultProxy, type FaultProxy, type HttpFaultRule } from '../helpers/http-fault-proxy.js';
import { startS3rver, type S3rverHandle } from '../helpers/s3rver.js';
import { listAll } from './backend-conformance.js';

let s3: S3rverHandle;
let proxy: FaultProxy | undefined;
let backend: Backend | undefined;

beforeAll(async () => {
  s3 = await startS3rver();
});
afterAll(async () => {
  await s3?.stop();
});
afterEach(async () => {
  await backend?.close();
  backend = undefined;
  await proxy?.stop();
  proxy = undefined;
});

async function throughProxy(rules: HttpFaultRule[], opts: { retry?: false; requestTimeoutMs?: number } = {}): Promise<{ b: Backend; prefix: string }> {
  proxy = await startFaultProxy(s3.endpoint, rules);
  const prefix = `f-${randomBytes(6).toString('hex')}`;
  backend = openBackend(`s3:${proxy.endpoint}/${s3.bucket}/${prefix}`, {
    s3: {
      credentials: { accessKeyId: s3.accessKeyId, secretAccessKey: s3.secretAccessKey },
      requestTimeoutMs: opts.requestTimeoutMs ?? 2000,
      connectionTimeoutMs: 2000,
    },
    retry: opts.retry === false ? false : { baseDelayMs: 5, maxDelayMs: 20, maxAttempts: 5 },
  });
  return { b: backend, prefix };
}

const obj = (kind: string, name: string) => new RegExp(`/${kind}/${name}($|\\?)`);

describe('S3Backend + RetryBackend through an HTTP fault proxy', () => {
  it('survives 500 and 503 answers on PUT, GET and HEAD', async () => {
    const { b } = await throughProxy([
      { id: 'put500', method: 'PUT', path: obj('packs', 'p1'), fault: { type: 'status', status: 500 } },
      { id: 'get503x2', method: 'GET', path: obj('packs', 'p1'), times: 2, fault: { type: 'status', status: 503, code: 'SlowDown' } },
      { id: 'head500', method: 'HEAD', path: obj('packs', 'p1'), fault: { type: 'status', status: 500 } },
    ]);
    const data = randomBytes(300_000);
    await b.put('packs', 'p1', data);
    expect(Buffer.compare(await b.get('packs', 'p1'), data)).toBe(0);
    expect(await b.stat('packs', 'p1')).toEqual({ name: 'p1', size: data.length });
    proxy?.assertAllFired();
  });

  it('survives connection resets before the request and after it took effect', async () => {
    const { b } = await throughProxy([
      { id: 'reset-before-put', method: 'PUT', path: obj('index', 'i1'), fault: { type: 'reset', when: 'before' } },
      { id: 'reset-after-put', method: 'PUT', path: obj('index', 'i2'), fault: { type: 'reset', when: 'after' } },
      { id: 'reset-list', method: 'GET', path: /\?.*prefix=/, fault: { type: 'reset', when: 'before' } },
      { id: 'reset-delete', method: 'DELETE', fault: { type: 'reset', when: 'after' } },
    ]);
    await b.put('index', 'i1', Buffer.from('one'));
    await b.put('index', 'i2', Buffer.from('two'));
    expect((await listAll(b, 'index')).sort((x, y) => x.name.localeCompare(y.name))).toEqual([
      { name: 'i1', size: 3 },
      { name: 'i2', size: 3 },
    ]);
    await b.delete('index', 'i1');
    await expect(b.get('index', 'i1')).rejects.toBeInstanceOf(ObjectNotFoundError);
    proxy?.assertAllFired();
  });

  it('detects truncated downloads (full and ranged) and retries them', async () => {
    const { b } = await throughProxy([
      { id: 'trunc-full', method: 'GET', path: obj('packs', 'big'), fault: { type: 'truncateResponse', bytes: 100_000 } },
      { id: 'trunc-range', method: 'GET', path: obj('packs', 'big'), fault: { type: 'truncateResponse', bytes: 10 } },
    ]);
    const data = randomBytes(1_000_000);
    await b.put('packs', 'big', data);
    expect(Buffer.compare(await b.get('packs', 'big'), data)).toBe(0);
    const r = await b.get('packs', 'big', { offset: 500_000, length: 4096 });
    expect(Buffer.compare(r, data.subarray(500_000, 504_096))).toBe(0);
    proxy?.assertAllFired();
  });

  it('times out a stalled request and retries it', async () => {
    const { b } = await throughProxy([{ id: 'stall-get', method: 'GET', path: obj('snapshots', 's1'), fault: { type: 'stall' } }], {
      requestTimeoutMs: 1000,
    });
    await b.put('snapshots', 's1', Buffer.from('manifest'));
    expect((await b.get('snapshots', 's1')).toString()).toBe('manifest');
    proxy?.assertAllFired();
  });

  it('times out a body that stops arriving and retries it', async () => {
    const { b } = await throughProxy(
      [{ id: 'stall-body', method: 'GET', path: obj('packs', 'slow'), fault: { type: 'truncateResponse', bytes: 50_000, stall: true } }],
      { requestTimeoutMs: 1000 },
    );
    const data = randomBytes(200_000);
    await b.put('packs', 'slow', data);
    expect(Buffer.compare(await b.get('packs', 'slow'), data)).toBe(0);
    proxy?.assertAllFired();
  });

  it('never shows a torn upload; the retry publishes the whole object', async () => {
    const { b } = await throughProxy([
      { id: 'torn', method: 'PUT', path: obj('packs', 'torn'), fault: { type: 'truncateRequest', bytes: 64 * 1024 } },
    ]);
    const data = randomBytes(1024 * 1024);
    await b.put('packs', 'torn', data);
    expect(Buffer.compare(await b.get('packs', 'torn'), data)).toBe(0);
    proxy?.assertAllFired();
  });

  it('without retries, a torn upload fails and leaves no object', async () => {
    const { b } = await throughProxy(
      [{ id: 'torn', method: 'PUT', path: obj('packs', 'torn2'), fault: { type: 'truncateRequest', bytes: 64 * 1024 } }],
      { retry: false },
    );
    const err = await b.put('packs', 'torn2', randomBytes(1024 * 1024)).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(BackendError);
    expect((err as BackendError).retryable).toBe(true);
    await expect(b.stat('packs', 'torn2')).rejects.toBeInstanceOf(ObjectNotFoundError);
    expect(await listAll(b, 'packs')).toEqual([]);
    proxy?.assertAllFired();
  });

  it('reports a lost PUT reply (500 after the write) as success after a retry', async () => {
    const { b } = await throughProxy([{ id: 'lost', method: 'PUT', path: obj('config', 'config'), fault: { type: 'statusAfter', status: 500 } }]);
    await b.put('config', 'config', Buffer.from('cfg'));
    expect((await b.get('config', 'config')).toString()).toBe('cfg');
    proxy?.assertAllFired();
  });

  it('reports permanent errors (403) at once without retrying', async () => {
    const { b } = await throughProxy([
      { id: 'denied', method: 'PUT', path: obj('keys', 'k1'), times: 5, fault: { type: 'status', status: 403, code: 'AccessDenied' } },
    ]);
    const err = await b.put('keys', 'k1', Buffer.from('key')).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(BackendError);
    expect((err as BackendError).retryable).toBe(false);
    expect((err as Error).message).toMatch(/put keys\/k1 failed: HTTP 403 AccessDenied: access denied/);
    expect(proxy?.fired.length).toBe(1);
    expect(proxy?.unfired()).toEqual([{ id: 'denied', fired: 1, expected: 5 }]);
  });

  it('gives up after bounded attempts on a persistent 503', async () => {
    const { b } = await throughProxy([
      { id: 'down', method: 'GET', path: obj('index', 'gone'), times: 5, fault: { type: 'status', status: 503 } },
    ]);
    const err = await b.get('index', 'gone').catch((e: unknown) => e);
    expect(err).toBeInstanceOf(RetryExhaustedError);
    expect((err as RetryExhaustedError).attempts).toBe(5);
    proxy?.assertAllFired();
  });
});

describe('S3Backend request shape', () => {
  it('sends one PUT per object (no multipart) and bounds requests in flight', async () => {
    proxy = await startFaultProxy(s3.endpoint);
    const prefix = `shape-${randomBytes(4).toString('hex')}`;
    backend = openBackend(`s3:${proxy.endpoint}/${s3.bucket}/${prefix}`, {
      s3: { credentials: { accessKeyId: s3.accessKeyId, secretAccessKey: s3.secretAccessKey }, concurrency: 2, listPageSize: 5 },
    });
    const s3b = (backend as RetryBackend).inner as S3Backend;
    const big = randomBytes(16 * 1024 * 1024);
    await Promise.all([backend.put('packs', 'big1', big), backend.put('packs', 'big2', big)]);
    const puts = proxy.requests.filter((r) => r.method === 'PUT' || r.method === 'POST');
    expect(puts.length).toBe(2);
    const small = Array.from({ length: 12 }, (_, i) => `s${i}`);
    await Promise.all(small.map((n) => backend?.put('index', n, Buffer.from(n))));
    await Promise.all(small.map((n) => backend?.get('index', n)));
    expect(proxy.maxInFlight).toBeLessThanOrEqual(2);
    expect(proxy.requests.length).toBe(2 + 24);
    expect((await listAll(backend, 'index')).length).toBe(12);
    expect(s3b.requestCounts).toEqual({ put: 14, get: 12, head: 0, list: 3, delete: 0 });
  });
});

describe('credentials never leak', () => {
  it('keeps the secret key out of location, errors, logs and stats, with credentials from the environment and a profile', async () => {
    const captured: string[] = [];
    const origOut = process.stdout.write.bind(process.stdout);
    const origErr = process.stderr.write.bind(process.stderr);
    const origConsole = { log: console.log, warn: console.warn, error: console.error, info: console.info, debug: console.debug };
    const saveEnv = { ...process.env };
    const dir = await mkdtemp(path.join(tmpdir(), 'vmsnap-creds-'));
    const capture = (chunk: unknown): boolean => {
      captured.push(String(chunk));
      return true;
    };
    process.stdout.write = capture as typeof process.stdout.write;
    process.stderr.write = capture as typeof process.stderr.write;
    for (const k of Object.keys(origConsole) as Array<keyof typeof origConsole>) {
      console[k] = (...args: unknown[]) => captured.push(args.map((a) => inspect(a, { depth: 8 })).join(' '));
    }
    const seen: unknown[] = [];
    try {
      proxy = await startFaultProxy(s3.endpoint, [
        { id: 'err500', method: 'PUT', fault: { type: 'status', status: 500 } },
        { id: 'denied', method: 'GET', path: /\/snapshots\//, times: 1, fault: { type: 'status', status: 403 } },
        { id: 'reset', method: 'HEAD', fault: { type: 'reset', when: 'before' } },
      ]);
      // 1. The standard chain from environment variables.
      process.env.AWS_ACCESS_KEY_ID = s3.accessKeyId;
      process.env.AWS_SECRET_ACCESS_KEY = s3.secretAccessKey;
      const url = `s3:${proxy.endpoint}/${s3.bucket}/leak-${randomBytes(4).toString('hex')}`;
      const opened = openBackendDetailed(url, { stats: true, retry: { baseDelayMs: 1, maxAttempts: 3 } });
      backend = opened.backend;
      seen.push(backend.location);
      // The objects themselves, as a debugger or a careless log line would print them.
      seen.push(backend, S3Backend.fromUrl(url, { credentials: { accessKeyId: s3.accessKeyId, secretAccessKey: s3.secretAccessKey } }));
      await backend.put('snapshots', 's1', Buffer.from('x'));
      await backend.stat('snapshots', 's1');
      seen.push(await backend.get('snapshots', 's1').catch((e: unknown) => e));
      seen.push(await backend.get('snapshots', 'missing').catch((e: unknown) => e));
      seen.push(opened.stats?.snapshot());
      await backend.close();
      backend = undefined;

      // 2. A named profile from a shared credentials file; a wrong key id must fail, not leak.
      delete process.env.AWS_ACCESS_KEY_ID;
      delete process.env.AWS_SECRET_ACCESS_KEY;
      const credFile = path.join(dir, 'credentials');
      await writeFile(
        credFile,
        `[vmsnaptest]\naws_access_key_id = ${s3.accessKeyId}\naws_secret_access_key = ${s3.secretAccessKey}\n` +
          `[wrong]\naws_access_key_id = NOSUCHKEY\naws_secret_access_key = ${s3.secretAccessKey}\n`,
      );
      process.env.AWS_SHARED_CREDENTIALS_FILE = credFile;
      process.env.AWS_CONFIG_FILE = path.join(dir, 'config-none');
      const viaProfile = openBackend(url, { s3: { profile: 'vmsnaptest' }, retry: false });
      backend = viaProfile;
      seen.push(viaProfile.location);
      expect((await viaProfile.get('snapshots', 's1')).toString()).toBe('x');
      await viaProfile.close();
      const wrong = openBackend(url, { s3: { profile: 'wrong' }, retry: false });
      backend = wrong;
      const wrongErr = await wrong.get('snapshots', 's1').catch((e: unknown) => e);
      expect(wrongErr).toBeInstanceOf(BackendError);
      expect((wrongErr as BackendError).retryable).toBe(false);
      seen.push(wrongErr);
      const noProfile = openBackend(url, { s3: { profile: 'does-not-exist' }, retry: false });
      const noCredErr = await noProfile.get('snapshots', 's1').catch((e: unknown) => e);
      await noProfile.close();
      expect(noCredErr).toBeInstanceOf(BackendError);
      seen.push(noCredErr);
    } finally {
      process.stdout.write = origOut;
      process.stderr.write = origErr;
      Object.assign(console, origConsole);
      for (const k of Object.keys(process.env)) if (!(k in saveEnv)) delete process.env[k];
      Object.assign(process.env, saveEnv);
      await rm(dir, { recursive: true, force: true });
    }
    proxy.assertAllFired();
    const errors = seen.filter((s): s is Error => s instanceof Error);
    expect(errors.length).toBeGreaterThanOrEqual(3);
    const everything = [
      ...captured,
      ...seen.map((s) => (typeof s === 'string' ? s : inspect(s, { depth: 12, showHidden: true }))),
      ...errors.map((e) => `${e.message}\n${e.stack ?? ''}\n${JSON.stringify(e)}`),
    ].join('\n');
    expect(everything.length).toBeGreaterThan(0);
    expect(everything).not.toContain(s3.secretAccessKey);
  });
});
