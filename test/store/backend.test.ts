import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
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
