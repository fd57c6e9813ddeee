import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { BackendError } from '../../src/store/backend/contract.js';
import { LocalBackend } from '../../src/store/backend/local.js';
import { MemoryBackend } from '../../src/store/backend/memory.js';
import { openBackend, openBackendDetailed } from '../../src/store/backend/open.js';
import { RetryBackend } from '../../src/store/backend/retry.js';
import { S3Backend } from '../../src/store/backend/s3.js';
import { StatsBackend } from '../../src/store/backend/stats.js';

const dirs: string[] = [];
afterAll(async () => {
  for (const d of dirs) await rm(d, { recursive: true, force: true });
});

describe('openBackend', () => {
  it('opens plain paths and local:PATH as LocalBackend without retries', async () => {
    const dir = await mkdtemp(path.join(tmpdir(), 'vmsnap-open-'));
    dirs.push(dir);
    const a = openBackend(dir);
    const b = openBackend(`local:${dir}`);
    expect(a).toBeInstanceOf(LocalBackend);
    expect(b).toBeInstanceOf(LocalBackend);
    expect(a.location).toBe(path.resolve(dir));
    await a.put('config', 'config', Buffer.from('x'));
    expect((await b.get('config', 'config')).toString()).toBe('x');
    expect(openBackend('relative/repo').location).toBe(path.resolve('relative/repo'));
  });

  it('opens memory: fresh and memory:NAME shared within the process', async () => {
    expect(openBackend('memory:')).toBeInstanceOf(MemoryBackend);
    const a = openBackend('memory:shared-test');
    const b = openBackend('memory:shared-test');
    await a.put('index', 'i', Buffer.from('y'));
    await a.close();
    expect((await b.get('index', 'i')).toString()).toBe('y');
    expect(await openBackend('memory:').stat('index', 'i').catch((e: unknown) => e)).toBeInstanceOf(BackendError);
  });

  it('wraps S3 in RetryBackend by default, with stats counting inside the retry layer', () => {
    const r = openBackendDetailed('s3:http://127.0.0.1:1/bucket/prefix', { stats: true });
    expect(r.kind).toBe('s3');
    expect(r.backend).toBeInstanceOf(RetryBackend);
    const inner = (r.backend as RetryBackend).inner;
    expect(inner).toBeInstanceOf(StatsBackend);
    expect((inner as StatsBackend).inner).toBeInstanceOf(S3Backend);
    expect(r.stats).toBe(inner);
    expect(r.backend.location).toBe('s3:http://127.0.0.1:1/bucket/prefix');
    expect(r.backend.capabilities.requestCost).toBe(true);
    expect(openBackend('s3://bucket/p', { retry: false, s3: { region: 'eu-west-1' } })).toBeInstanceOf(S3Backend);
    expect(openBackend('s3://bucket/p', { s3: { region: 'eu-west-1' } }).capabilities.atomicCreate).toBe(true);
  });

  it('rejects unknown schemes and empty paths without echoing the URL', () => {
    let msg = '';
    try {
      openBackend('sftp://user:hunter2@host/repo');
    } catch (err) {
      expect(err).toBeInstanceOf(BackendError);
      msg = (err as Error).message;
    }
    expect(msg).toMatch(/unsupported repository URL scheme "sftp"/);
    expect(msg).not.toContain('hunter2');
    expect(() => openBackend('local:')).toThrow(/empty repository path/);
    expect(() => openBackend('s3:http://k:s3cr3t@127.0.0.1:1/b/p')).toThrow(/credentials are not allowed/);
  });
});
