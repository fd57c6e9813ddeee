/**
 * Issue 12 item 6's siblings outside export: the RAM spill file of a snapshot (in a shared /tmp by
 * default) is created with createTempFile, so a symlink planted at the name it used to be given
 * (`ram-spill-<pid>-<Date.now()>`, both guessable) is never opened, truncated or written through.
 */
import { randomBytes } from 'node:crypto';
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { afterAll, describe, expect, it, vi } from 'vitest';
import { RamStreamWriter } from '../../src/vm/ram-store.js';
import type { PageRecord, StreamPrefix } from '../../src/migstream/index.js';
import { MemoryBackend } from '../../src/store/backend/memory.js';
import { Repository } from '../../src/store/repository.js';

const dir = mkdtempSync(path.join(tmpdir(), 'vmsnap-tempfiles-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const PAGE = 4096;
const prefix: StreamPrefix = { bytes: Buffer.from('prefix'), machine: 'pc-i440fx-10.0', pageSize: PAGE, ramSectionId: 2, blocks: [{ name: 'pc.ram', usedLength: 16 * 16 * PAGE }] };

describe('RAM spill file', () => {
  it('a symlink planted at the old predictable name is left alone; the spill file is private and gone after', async () => {
    const spillDir = path.join(dir, 'shared-tmp');
    mkdirSync(spillDir);
    const victim = path.join(dir, 'victim');
    writeFileSync(victim, 'system file');
    const now = 1_800_000_000_000;
    symlinkSync(victim, path.join(spillDir, `ram-spill-${process.pid}-${now}`));
    const clock = vi.spyOn(Date, 'now').mockReturnValue(now);
    try {
      const repo = await Repository.init(new MemoryBackend(), {});
      const w = new RamStreamWriter(repo, { maxPartialInMemory: 1, spillDir });
      w.onPrefix(prefix);
      // Every 16th page first: all chunks stay partial, so they spill.
      const pages: PageRecord[] = [];
      for (let k = 0; k < 16; k++) for (let i = k; i < 256; i += 16) pages.push({ block: 0, offset: i * PAGE, kind: 'page', data: randomBytes(PAGE) });
      await repo.write('take', async () => {
        for (let i = 0; i < pages.length; i += 8) await w.onPages(pages.slice(i, i + 8));
        await w.close();
      });
      expect(w.streams()[0]!.size).toBe(256 * PAGE);
      await repo.close();
    } finally {
      clock.mockRestore();
    }
    expect(readFileSync(victim, 'utf8')).toBe('system file');
    expect(readdirSync(spillDir)).toEqual([`ram-spill-${process.pid}-${now}`]);
  });
});
