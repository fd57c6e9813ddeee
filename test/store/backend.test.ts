import { mkdtemp, rm } from 'node:fs/promises';
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
    cleanup: () => rm(dir, { recursive: true, force: true }),
  };
});

runBackendConformance('MemoryBackend', async () => ({ backend: new MemoryBackend() }));

runBackendConformance('FaultyBackend(Memory) without faults', async () => {
  const f = new FaultyBackend(new MemoryBackend());
  return { backend: f, cleanup: async () => expect(f.fired).toEqual([]) };
});

runBackendConformance('RetryBackend(Memory)', async () => ({ backend: new RetryBackend(new MemoryBackend()) }));

runBackendConformance('StatsBackend(Memory)', async () => ({ backend: new StatsBackend(new MemoryBackend()) }));

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
    cleanup: async () => {
      await rm(dir, { recursive: true, force: true });
    },
  };
});
