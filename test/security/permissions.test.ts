/**
 * Issue 12 item 7 (permissions) and item 6's containment half, through the compiled CLI:
 *  - under umask 000 every file and folder vmsnap creates (repository, keys, packs, VM folder,
 *    volume files, an exported file) is private: no group or other bits;
 *  - an existing repository or data folder that others can enter is named in one warning with
 *    the chmod that fixes it;
 *  - a symlink planted inside a repository that leads out of it is refused, not written through.
 */
import { chmodSync, lstatSync, mkdirSync, readdirSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ensureBuiltAsync, mixedImage, removeDir, tempDir, vmsnap, vmsnapOk } from '../helpers/cli.js';

let dir: string;
beforeAll(async () => {
  await ensureBuiltAsync();
  dir = tempDir('vmsnap-perm-');
}, 120_000);
afterAll(() => removeDir(dir));

/** The CLI run with umask 000 (the most permissive a user can have), inherited from this process. */
async function underUmask000(args: string[], env: Record<string, string>): Promise<void> {
  const old = process.umask(0);
  try {
    await vmsnapOk(null, args, { env });
  } finally {
    process.umask(old);
  }
}

/** Every path under `root` (itself included) whose mode gives group or others any access. */
function shared(root: string): string[] {
  const out: string[] = [];
  const visit = (p: string) => {
    const st = lstatSync(p);
    if (st.isSymbolicLink()) return;
    if ((st.mode & 0o077) !== 0) out.push(`${(st.mode & 0o777).toString(8)} ${path.relative(dir, p)}`);
    if (st.isDirectory()) for (const n of readdirSync(p)) visit(path.join(p, n));
  };
  visit(root);
  return out;
}

describe('created private whatever the umask', () => {
  it('repository, keys, packs, VM folder, volume files and an exported file: no group or other access', async () => {
    const repo = path.join(dir, 'u0', 'repo');
    const data = path.join(dir, 'u0', 'data');
    const env = { VMSNAP_REPO: repo, VMSNAP_DATA_DIR: data, VMSNAP_PASSWORD: 'perm test' };
    const img = path.join(dir, 'src.img');
    writeFileSync(img, mixedImage(256 << 10, 3));
    chmodSync(img, 0o644);
    await underUmask000(['init', '--encrypt', '--chunk-size', '4096'], env);
    await underUmask000(['import', img, '--vm', 'v', '-q'], env);
    await underUmask000(['vm', 'create', 'v1', '--disk', '1M', '--disk-from', 'latest'], env);
    const out = path.join(dir, 'u0', 'exported.img');
    await underUmask000(['export', 'latest', out, '-q'], env);
    expect(readdirSync(path.join(repo, 'keys')).length).toBeGreaterThan(0);
    expect(readdirSync(path.join(repo, 'packs')).length).toBeGreaterThan(0);
    expect(readdirSync(data).length).toBeGreaterThan(0);
    expect([...shared(repo), ...shared(data), ...shared(out)]).toEqual([]);
  });
});

describe('an existing repository others can read', () => {
  it('is named in one warning with the fix, and the command still runs', async () => {
    const repo = path.join(dir, 'open-repo');
    await vmsnapOk(repo, ['init']);
    chmodSync(repo, 0o755);
    const r = await vmsnapOk(repo, ['ls'], { env: { VMSNAP_DATA_DIR: path.join(dir, 'private-data') } });
    const warnings = r.stderr.split('\n').filter((l) => l.includes('warning'));
    expect(warnings).toEqual([
      `vmsnap: warning: repository ${repo} is accessible to other users (mode 0755); it may hold keys, guest memory and disks. Make it private: chmod -R go-rwx ${repo}`,
    ]);
    chmodSync(repo, 0o700);
    expect((await vmsnapOk(repo, ['ls'], { env: { VMSNAP_DATA_DIR: path.join(dir, 'private-data') } })).stderr).toBe('');
  });
});

describe('a symlink planted inside a repository', () => {
  it('that leads out of it is refused with an error naming it; the place it points at stays empty', async () => {
    const repo = path.join(dir, 'hostile-repo');
    await vmsnapOk(repo, ['init']);
    const outside = path.join(dir, 'outside');
    mkdirSync(outside);
    rmSync(path.join(repo, 'snapshots'), { recursive: true, force: true });
    symlinkSync(outside, path.join(repo, 'snapshots'));
    const img = path.join(dir, 'small.img');
    writeFileSync(img, mixedImage(64 << 10, 5));
    const r = await vmsnap(repo, ['import', img, '--vm', 'v']);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(new RegExp(`^vmsnap: .*${path.join(repo, 'snapshots')} leads out of ${repo} .*through a symbolic link; refusing to write there\\n$`));
    expect(readdirSync(outside)).toEqual([]);
  });
});

describe('a symlink planted inside the VM data folder', () => {
  it('that leads out of it is refused; no disk is written where it points', async () => {
    const data = path.join(dir, 'hostile-data');
    const outside = path.join(dir, 'outside-vm');
    mkdirSync(path.join(data, 'vms'), { recursive: true });
    mkdirSync(outside);
    symlinkSync(outside, path.join(data, 'vms', 'v9'));
    const r = await vmsnap(null, ['vm', 'create', 'v9', '--disk', '1M'], { env: { VMSNAP_DATA_DIR: data, VMSNAP_REPO: path.join(dir, 'unused-repo') } });
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/leads out of .* through a symbolic link; refusing to write there/);
    expect(readdirSync(outside)).toEqual([]);
  });
});
