/** `vmsnap peer`: pairing two hosts by their key fingerprints, through the compiled CLI. */
import { statSync } from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ensureBuiltAsync, removeDir, tempDir, vmsnap } from '../helpers/cli.js';

let dir: string;
beforeAll(async () => {
  await ensureBuiltAsync();
  dir = tempDir('vmsnap-peer-');
}, 120_000);
afterAll(() => removeDir(dir));

const host = (name: string) => ({ env: { VMSNAP_DATA_DIR: path.join(dir, name) } });

describe('vmsnap peer', () => {
  it('two hosts pair by exchanging fingerprints; the identity is stable and private', async () => {
    const laptopId = (await vmsnap(null, ['peer', 'id'], host('laptop'))).stdout.trim();
    const desktopId = JSON.parse((await vmsnap(null, ['--json', 'peer', 'id'], host('desktop'))).stdout) as { fingerprint: string };
    expect(laptopId).toMatch(/^SHA256:[A-Za-z0-9+/]{43}$/);
    expect((await vmsnap(null, ['peer', 'id'], host('laptop'))).stdout.trim()).toBe(laptopId);
    expect(statSync(path.join(dir, 'laptop', 'host-key')).mode & 0o777).toBe(0o600);

    const add = await vmsnap(null, ['peer', 'add', 'desktop', '--fingerprint', desktopId.fingerprint, '--address', '192.0.2.10:7450'], host('laptop'));
    expect(add.code, add.stderr).toBe(0);
    expect(add.stdout).toContain(`paired with desktop (${desktopId.fingerprint})`);
    const ls = JSON.parse((await vmsnap(null, ['--json', 'peer', 'ls'], host('laptop'))).stdout) as { name: string; fingerprint: string; address: string }[];
    expect(ls).toMatchObject([{ name: 'desktop', fingerprint: desktopId.fingerprint, address: '192.0.2.10:7450' }]);
    expect((await vmsnap(null, ['peer', 'rm', 'desktop'], host('laptop'))).code).toBe(0);
    expect(JSON.parse((await vmsnap(null, ['--json', 'peer', 'ls'], host('laptop'))).stdout)).toEqual([]);
  });

  it('bad input is a usage error naming what is wrong', async () => {
    const badFp = await vmsnap(null, ['peer', 'add', 'x', '--fingerprint', 'MD5:aa:bb'], host('laptop'));
    expect(badFp.code).toBe(2);
    expect(badFp.stderr).toMatch(/"MD5:aa:bb" is not a fingerprint/);
    const badName = await vmsnap(null, ['peer', 'add', '../etc', '--fingerprint', 'SHA256:' + 'A'.repeat(43)], host('laptop'));
    expect(badName.code).toBe(2);
    expect(badName.stderr).toMatch(/peer name "\.\.\/etc"/);
    const gone = await vmsnap(null, ['peer', 'rm', 'nosuch'], host('laptop'));
    expect(gone.code).toBe(2);
    expect(gone.stderr).toMatch(/no paired host named "nosuch"/);
  });
});
