import { mkdir, mkdtemp, rm, utimes, writeFile } from 'node:fs/promises';
import type { ObjectKind } from '../../src/store/backend/contract.js';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { expect } from 'vitest';
import { FaultyBackend } from '../../src/store/backend/faulty.js';
import { RetryBackend } from '../../src/store/backend/retry.js';
import { StatsBackend } from '../../src/store/backend/stats.js';
import { LocalBackend } from '../../src/store/backend/local.js';
import { MemoryBackend } from '../../src/store/backend/memory.js';
import { runBackendConformance } from './backend-conformance.js';

runBackendConformance('LocalBackend', async () => {
  const dir = await mkdtemp(path.join(tmpdir(), 'vmsnap-local-'));
  const root = path.join(dir, 'repo');
  return {
    backend: new LocalBackend(root),
    reopen: async () => new LocalBackend(root),
    interruptedPut: (kind, name, ageMs) => interruptedLocalPut(root, kind, name, ageMs),
    cleanup: () => rm(dir, { recursive: true, force: true }),
  };
});

runBackendConformance('MemoryBackend', async () => ({ backend: new MemoryBackend() }));

// Wrappers: a second wrapper around the same inner backend is the second instance.
runBackendConformance('FaultyBackend(Memory) without faults', async () => {
  const inner = new MemoryBackend();
  const f = new FaultyBackend(inner);
  return { backend: f, reopen: async () => new FaultyBackend(inner), cleanup: async () => expect(f.fired).toEqual([]) };
});

runBackendConformance('RetryBackend(Memory)', async () => {
  const inner = new MemoryBackend();
  return { backend: new RetryBackend(inner), reopen: async () => new RetryBackend(inner) };
});

runBackendConformance('StatsBackend(Memory)', async () => {
  const inner = new MemoryBackend();
  return { backend: new StatsBackend(inner), reopen: async () => new StatsBackend(inner) };
});

/** What atomicWriteFile leaves when killed before its rename: a `.tmp-` file beside the target. */
async function interruptedLocalPut(root: string, kind: ObjectKind, name: string, ageMs: number): Promise<void> {
  const where = kind === 'packs' ? path.join(root, kind, name.slice(0, 2)) : path.join(root, kind);
  await mkdir(where, { recursive: true });
  const file = path.join(where, `.tmp-${name}-${process.pid}`);
  await writeFile(file, Buffer.alloc(4096, 7));
  const t = new Date(Date.now() - ageMs);
  await utimes(file, t, t);
}

// Every third call fails before it happens and every fifth loses its reply after it took effect;
// retries must hide both completely.
runBackendConformance('RetryBackend(FaultyBackend(Local)) with retryable faults', async () => {
  const dir = await mkdtemp(path.join(tmpdir(), 'vmsnap-retry-'));
  const every = (n: number) => {
    let calls = 0;
    return () => ++calls % n === 0;
  };
  const faulty = new FaultyBackend(new LocalBackend(dir), [
    { id: 'before', method: ['put', 'create', 'get', 'stat', 'list', 'delete'], name: every(3), times: Infinity, fault: { type: 'error', retryable: true } },
    { id: 'after', method: ['put', 'create', 'get', 'stat', 'list', 'delete'], name: every(5), times: Infinity, fault: { type: 'errorAfter', retryable: true } },
  ]);
  const retry = new RetryBackend(faulty, { maxAttempts: 20, sleep: async () => undefined });
  return {
    backend: retry,
    reopen: async () => new RetryBackend(new LocalBackend(dir)),
    interruptedPut: (kind, name, ageMs) => interruptedLocalPut(dir, kind, name, ageMs),
    cleanup: async () => {
      await rm(dir, { recursive: true, force: true });
    },
  };
});
