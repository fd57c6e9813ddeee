/**
 * The operations of src/ops as library calls, their events collected: what the CLI renders and a
 * job stores comes through the one ProgressSink (phases, byte progress to the input's size, warnings
 * as messages), and results are data, not output.
 */
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { Repository } from '../../src/store/repository.js';
import { openNonS3 } from '../../src/store/backend/open-local.js';
import { importSnapshot } from '../../src/ops/import.js';
import { exportSnapshot } from '../../src/ops/export.js';
import { forgetSnapshots, repositoryStats, checkRepository } from '../../src/ops/maintenance.js';
import { ProgressCollector, fanOut, noProgress } from '../../src/ops/progress.js';
import { UsageError } from '../../src/store/errors.js';

const dir = mkdtempSync(path.join(tmpdir(), 'vmsnap-ops-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe('operations as library calls', () => {
  it('import, export, forget+prune, check and stats report through one sink', async () => {
    const repo = await Repository.init(openNonS3('memory:').backend, { codec: 'lz4' });
    try {
      const file = path.join(dir, 'disk.img');
      const data = Buffer.alloc(3 << 20);
      for (let i = 0; i < data.length; i += 4096) data.writeUInt32LE(i, i);
      writeFileSync(file, data);
      const ev = new ProgressCollector();
      const a = await importSnapshot(repo, { source: file, vm: 'v', tags: ['t1'] }, ev);
      expect(ev.events.filter((e) => e.type === 'phase').map((e) => (e as { phase: string }).phase)).toEqual(['reading', 'saving']);
      expect(ev.latest).toMatchObject({ phase: 'reading', done: data.length, total: data.length, unit: 'bytes' });
      const b = await importSnapshot(repo, { source: file, vm: 'v' }, noProgress);
      expect(b.dedupChunks).toBeGreaterThan(0);
      await expect(importSnapshot(repo, { source: dir, vm: 'v' })).rejects.toThrow(UsageError);

      const out = path.join(dir, 'out.img');
      const both = [new ProgressCollector(), new ProgressCollector()];
      const ex = await exportSnapshot(repo, { ref: a.snapshot, target: out }, fanOut(...both));
      expect(ex).toMatchObject({ snapshot: a.snapshot, stream: 'disk0', bytes: data.length, kind: 'new-file' });
      expect(readFileSync(out).equals(data)).toBe(true);
      expect(both[1]!.latest).toMatchObject({ done: data.length, total: data.length });

      const fe = new ProgressCollector();
      const f = await forgetSnapshots(repo, { policy: { last: 1 }, vm: 'v', prune: true }, fe);
      expect(f.decisions[0]!.remove.map((s) => s.id)).toEqual([a.snapshot]);
      expect(f.pruned).not.toBeNull();
      expect(fe.events.some((e) => e.type === 'phase' && e.phase === 'pruning')).toBe(true);

      const ce = new ProgressCollector();
      const report = await checkRepository(repo, { readData: true }, ce);
      expect(report.problems.filter((p) => p.severity === 'error')).toEqual([]);
      expect(ce.latest?.unit).toBe('items');
      const st = await repositoryStats(repo);
      expect(st).toMatchObject({ snapshots: 1, logicalBytes: data.length });
    } finally {
      await repo.close();
    }
  }, 120_000);
});
