/**
 * The format version rule (src/store/format.ts): a vmsnap opens repositories whose config version is
 * in MIN_READABLE_VERSION..FORMAT_VERSION, refuses newer ones telling the user to upgrade, refuses
 * older ones naming the versions it reads — in the library and through the CLI.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { readFileSync, writeFileSync } from 'node:fs';
import * as path from 'node:path';
import { checkFormatVersion, FORMAT_NAME, FORMAT_VERSION, INITIAL_FORMAT_VERSION, MIN_READABLE_VERSION, parseConfig } from '../../src/store/format.js';
import { FormatError } from '../../src/store/errors.js';
import { MemoryBackend } from '../../src/store/backend/memory.js';
import { Repository } from '../../src/store/repository.js';
import { ensureBuiltAsync, removeDir, tempDir, vmsnap, vmsnapOk } from '../helpers/cli.js';

const config = (over: Record<string, unknown> = {}) =>
  Buffer.from(JSON.stringify({ format: FORMAT_NAME, version: FORMAT_VERSION, id: 'a'.repeat(32), chunkSize: 65536, codec: 'zstd', created: new Date().toISOString(), encryption: null, ...over }));

describe('checkFormatVersion', () => {
  it('accepts every version from MIN_READABLE_VERSION to FORMAT_VERSION', () => {
    expect(MIN_READABLE_VERSION).toBeLessThanOrEqual(FORMAT_VERSION);
    for (let v = MIN_READABLE_VERSION; v <= FORMAT_VERSION; v++) expect(checkFormatVersion(v)).toBe(v);
  });
  it('refuses newer versions with a message saying to upgrade', () => {
    for (const v of [FORMAT_VERSION + 1, FORMAT_VERSION + 100, 2 ** 31]) {
      expect(() => checkFormatVersion(v)).toThrow(FormatError);
      expect(() => checkFormatVersion(v)).toThrow(/newer than this vmsnap supports.*upgrade vmsnap/);
    }
  });
  it('refuses older versions naming the versions it reads', () => {
    for (const v of [MIN_READABLE_VERSION - 1, 0, -1]) {
      expect(() => checkFormatVersion(v)).toThrow(FormatError);
      expect(() => checkFormatVersion(v)).toThrow(new RegExp(`too old.*reads ${MIN_READABLE_VERSION}-${FORMAT_VERSION}`));
    }
  });
  it('refuses versions that are not whole numbers', () => {
    for (const v of ['1', 1.5, null, undefined, NaN, {}, [1]]) expect(() => checkFormatVersion(v)).toThrow(/no valid format version/);
  });
});

describe('parseConfig', () => {
  it('reads a current config and applies the version rule to it', () => {
    expect(parseConfig(config()).version).toBe(FORMAT_VERSION);
    expect(() => parseConfig(config({ version: FORMAT_VERSION + 1 }))).toThrow(/upgrade vmsnap/);
    expect(() => parseConfig(config({ version: MIN_READABLE_VERSION - 1 }))).toThrow(/too old/);
  });
  it('refuses what is not a vmsnap config', () => {
    expect(() => parseConfig(Buffer.from('{'))).toThrow(/not valid JSON/);
    expect(() => parseConfig(config({ format: 'restic' }))).toThrow(/not a vmsnap repository/);
    expect(() => parseConfig(config({ chunkSize: 1000 }))).toThrow(/invalid chunk size/);
    expect(() => parseConfig(config({ chunkSize: 1 << 30 }))).toThrow(/invalid chunk size/);
    expect(() => parseConfig(config({ codec: 'brotli' }))).toThrow();
    expect(() => parseConfig(config({ id: '../../etc' }))).toThrow(/invalid id/);
    expect(() => parseConfig(config({ encryption: { aead: 'rot13' } }))).toThrow(/unsupported encryption/);
  });
  it('ignores unknown optional fields (additions do not bump the version)', () => {
    expect(parseConfig(config({ futureField: { x: 1 } })).chunkSize).toBe(65536);
  });
  it('Repository.open refuses a repository with a newer version before reading anything else', async () => {
    const b = new MemoryBackend();
    await b.put('config', 'config', config({ version: FORMAT_VERSION + 1 }));
    await expect(Repository.open(b)).rejects.toThrow(/upgrade vmsnap/);
  });
});

describe('CLI and the version rule', () => {
  let dir: string;
  beforeAll(async () => {
    await ensureBuiltAsync();
    dir = tempDir('vmsnap-format-');
  }, 120_000);
  afterAll(() => removeDir(dir));

  it('refuses a repository whose config says FORMAT_VERSION + 1, for every verb, without writing', async () => {
    const repo = path.join(dir, 'repo');
    await vmsnapOk(repo, ['init']);
    const file = path.join(repo, 'config', 'config');
    const c = JSON.parse(readFileSync(file, 'utf8')) as Record<string, unknown>;
    expect(c.version).toBe(INITIAL_FORMAT_VERSION);
    writeFileSync(file, JSON.stringify({ ...c, version: FORMAT_VERSION + 1 }));
    const img = path.join(dir, 'img');
    writeFileSync(img, Buffer.alloc(100_000, 7));
    for (const args of [['ls'], ['check'], ['import', img, '--vm', 'a'], ['prune']]) {
      const r = await vmsnap(repo, args);
      expect(r.code, args.join(' ')).toBe(1);
      expect(r.stderr).toMatch(new RegExp(`^vmsnap: repository format version ${FORMAT_VERSION + 1} is newer than this vmsnap supports \\(${FORMAT_VERSION}\\): upgrade vmsnap\\n$`));
    }
    writeFileSync(file, JSON.stringify({ ...c, version: 0 }));
    const old = await vmsnap(repo, ['ls']);
    expect(old.code).toBe(1);
    expect(old.stderr).toMatch(/^vmsnap: repository format version 0 is too old/);
    // Nothing was written by the refused commands.
    writeFileSync(file, JSON.stringify(c));
    const ls = await vmsnapOk(repo, ['--json', 'ls']);
    expect(JSON.parse(ls.stdout)).toEqual([]);
  });
});
