/**
 * Acceptance (issue 12 item 10, verify before discard): restoring a snapshot whose RAM lies in a
 * damaged pack fails before the running guest is touched — same QEMU, still running, its memory
 * workload going on from where it was (not from the snapshot) — and the error names the damaged
 * chunk and the snapshot instead of blaming QEMU.
 */
import { readFileSync, writeFileSync } from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { LocalBackend } from '../../src/store/backend/local.js';
import { Repository } from '../../src/store/repository.js';
import { ID_SIZE, idHex, isZeroId } from '../../src/store/hash.js';
import { repoFiles } from '../helpers/cli.js';
import { VmLab, last } from '../helpers/vm.js';

/** Flips one byte in the middle of the first non-zero chunk of `stream`; returns that chunk's id. */
async function damageChunk(repoDir: string, snapId: string, stream: string): Promise<string> {
  const repo = await Repository.open(new LocalBackend(repoDir));
  try {
    const snap = await repo.readSnapshot(snapId);
    const s = snap.streams.find((x) => x.name === stream)!;
    for (let i = 0; i * ID_SIZE < s.chunks.length; i++) {
      const id = s.chunks.subarray(i * ID_SIZE, (i + 1) * ID_SIZE);
      if (isZeroId(id)) continue;
      const loc = repo.locate(id);
      const file = repoFiles(repoDir, 'packs').find((f) => path.basename(f) === loc.pack)!;
      const bytes = readFileSync(file);
      bytes[loc.offset + (loc.storedLength >> 1)]! ^= 0xff;
      writeFileSync(file, bytes);
      return idHex(id);
    }
    throw new Error(`stream ${stream} has only zero chunks`);
  } finally {
    await repo.close();
  }
}

describe('restore from a damaged pack', () => {
  let lab: VmLab;

  beforeAll(async () => {
    lab = await VmLab.create('rdmg');
    await lab.createBmVm('r1', { accel: 'tcg', memMiB: 8, rate: 2000 });
    await lab.start('r1');
  }, 180_000);

  afterAll(async () => {
    await lab?.cleanup();
  });

  it('refuses before touching the running guest and names the damaged chunk and snapshot', async () => {
    await lab.waitLines('r1', 2, 150_000);
    const w = await lab.takeWindow('r1');
    const snap = w.take.snapshot;
    const chunk = await damageChunk(lab.repo, snap, 'ram.0');
    const before = await lab.show('r1');
    expect(before.status.state).toBe('running');
    const linesBefore = await lab.waitLines('r1', (await lab.statuses('r1')).length + 2);

    const r = await lab.run(['restore', 'r1', snap.slice(0, 12)]);
    expect(r.code).not.toBe(0);
    expect(r.stderr).toContain(`snapshot ${snap.slice(0, 12)}`);
    expect(r.stderr).toContain(`chunk ${chunk}`);
    expect(r.stderr).toContain('ram.0');
    expect(r.stderr).not.toMatch(/QEMU rejected|inmigrate/);

    // The same guest runs on: same QEMU, running, its generation going on past the restore attempt.
    const after = await lab.show('r1');
    expect(after.status.state).toBe('running');
    expect(after.status.pid).toBe(before.status.pid);
    const post = await lab.waitLines('r1', linesBefore.length + 3);
    expect(last(post).gen).toBeGreaterThan(last(linesBefore).gen);
    expect(last(post).errors).toBe(0);
    const resume = await lab.ok(['vm', 'resume', 'r1']);
    expect(resume.stdout).toMatch(/resume done/);
  }, 240_000);
});
