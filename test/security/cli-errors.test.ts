/**
 * The CLI's error surface (issue 12, "smaller" list): bad usage exits 2 (unknown commands too,
 * even with --help), errors under --json are one JSON object on stderr with the same exit codes,
 * a config file with a wrongly typed key names the file and the key, and a damaged key file is
 * reported as corrupt, not as a wrong password.
 */
import { mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ensureBuiltAsync, removeDir, tempDir, vmsnap, vmsnapOk } from '../helpers/cli.js';

let dir: string;
beforeAll(async () => {
  await ensureBuiltAsync();
  dir = tempDir('vmsnap-cli-errors-');
}, 120_000);
afterAll(() => removeDir(dir));

describe('usage errors exit 2', () => {
  it.each([
    [['nosuch']],
    [['nosuch', '--help']],
    [['vm', 'nosuch', '--help']],
    [['--repo', '/nonexistent', 'nosuch']],
    [['ls', '--bogus']],
    [['import', 'x']],
    [['vm', 'create', 'x', '--disk', '9X']],
  ])('vmsnap %j', async (args) => {
    const r = await vmsnap(null, args, { env: { VMSNAP_DATA_DIR: path.join(dir, 'data') } });
    expect(r.code, r.stderr).toBe(2);
    expect(r.stdout).toBe('');
  });

  it('help itself still exits 0', async () => {
    for (const args of [['--help'], ['vm', '--help'], ['help'], ['export', '--help']]) expect((await vmsnap(null, args)).code).toBe(0);
  });
});

describe('--json errors', () => {
  it('are one JSON object on stderr, with the same exit codes, for usage and runtime errors', async () => {
    const usage = await vmsnap(null, ['--json', 'nosuch']);
    expect(usage.code).toBe(2);
    expect(JSON.parse(usage.stderr)).toEqual({ error: { message: 'unknown command "nosuch" (see vmsnap --help)', name: 'UsageError', exitCode: 2, retryable: false } });
    const opt = await vmsnap(null, ['--json', 'ls', '--bogus']);
    expect(opt.code).toBe(2);
    expect(JSON.parse(opt.stderr)).toMatchObject({ error: { message: "unknown option '--bogus'", exitCode: 2 } });
    const missing = await vmsnap(path.join(dir, 'no-repo'), ['--json', 'ls']);
    expect(missing.code).toBe(1);
    expect(missing.stdout).toBe('');
    const e = JSON.parse(missing.stderr) as { error: { message: string; name: string; exitCode: number } };
    expect(e.error.exitCode).toBe(1);
    expect(typeof e.error.name).toBe('string');
    expect(e.error.message.length).toBeGreaterThan(0);
    expect(missing.stderr.trim().split('\n')).toHaveLength(1);
  });
});

describe('config file', () => {
  it.each([
    ['{"repo":5}', /"repo" must be a non-empty string .*got 5/],
    ['{"codec":"gzip"}', /"codec" must be "zstd", "lz4" or "none", got "gzip"/],
    ['{"encrypt":"yes"}', /"encrypt" must be true or false, got "yes"/],
    ['{"rpeo":"/x"}', /unknown key "rpeo"/],
    ['[1]', /not a JSON object/],
  ])('%s is a usage error naming the file and the key', async (text, re) => {
    const cfg = path.join(dir, `cfg-${Math.random().toString(16).slice(2)}`);
    mkdirSync(path.join(cfg, 'vmsnap'), { recursive: true });
    writeFileSync(path.join(cfg, 'vmsnap', 'config.json'), text);
    const r = await vmsnap(null, ['ls'], { env: { XDG_CONFIG_HOME: cfg } });
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(new RegExp(`^vmsnap: config file ${path.join(cfg, 'vmsnap', 'config.json')}`));
    expect(r.stderr).toMatch(re);
    expect(r.stderr).not.toMatch(/internal error|at /);
  });
});

describe('a damaged key file', () => {
  it('is reported as corrupt, a wrong password as a wrong password', async () => {
    const repo = path.join(dir, 'enc');
    const env = { VMSNAP_PASSWORD: 'right' };
    await vmsnapOk(repo, ['init', '--encrypt'], { env });
    const wrong = await vmsnap(repo, ['ls'], { env: { VMSNAP_PASSWORD: 'wrong' } });
    expect(wrong.code).toBe(1);
    expect(wrong.stderr).toMatch(/wrong password/);
    const keyFile = path.join(repo, 'keys', readdirSync(path.join(repo, 'keys'))[0]!);
    const key = JSON.parse(readFileSync(keyFile, 'utf8')) as { wrapped: string; salt: string };
    // One character of the wrapped key changed: still valid base64 of the right length.
    const w = key.wrapped;
    writeFileSync(keyFile, JSON.stringify({ ...key, wrapped: (w[5] === 'A' ? 'B' : 'A').padStart(6, w.slice(0, 5)) + w.slice(6) }));
    const r = await vmsnap(repo, ['ls'], { env });
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/^vmsnap: key [0-9a-f]+ is corrupt \(its checksum does not match its contents\)/);
    expect(r.stderr).not.toMatch(/wrong password/);
    writeFileSync(keyFile, JSON.stringify({ ...key, wrapped: w.slice(0, 40) }));
    expect((await vmsnap(repo, ['ls'], { env })).stderr).toMatch(/is corrupt \(its wrapped key is not 92 bytes of base64\)/);
  });
});
