/**
 * Issue 12 item 8 (input formats): `vm create --disk-from` reads a qcow2 as the disk it holds (not
 * its container bytes), pads an odd size with a notice stating both sizes, refuses a corrupt
 * image, one with a backing file and a format it cannot read, naming each; `import` refuses a
 * container image as a disk stream. Real qemu-img makes and inspects every image.
 */
import { execFileSync } from 'node:child_process';
import { existsSync, writeFileSync, readFileSync } from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Volume } from '../../src/cow/volume.js';
import { ensureBuiltAsync, mixedImage, removeDir, tempDir, vmsnap, vmsnapOk } from '../helpers/cli.js';

let dir: string;
let env: Record<string, string>;
const BLOCK = 64 << 10;
// Odd size, with a zero run in the middle (a hole in the qcow2).
const raw = Buffer.concat([mixedImage(70_000, 11), Buffer.alloc(200_000), mixedImage(30_001, 12)]);

beforeAll(async () => {
  await ensureBuiltAsync();
  dir = tempDir('vmsnap-imgfmt-');
  env = { VMSNAP_DATA_DIR: path.join(dir, 'data'), VMSNAP_REPO: path.join(dir, 'repo') };
  writeFileSync(path.join(dir, 'disk.raw'), raw);
  execFileSync('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', path.join(dir, 'disk.raw'), path.join(dir, 'disk.qcow2')]);
}, 120_000);
afterAll(() => removeDir(dir));

/** The whole guest-visible content of a VM's disk0. */
async function diskOf(vm: string): Promise<Buffer> {
  const v = await Volume.open(path.join(dir, 'data', 'vms', vm, 'disks', 'disk0'));
  try {
    const buf = Buffer.alloc(v.nBlocks * BLOCK);
    await v.read(0, buf.length, buf);
    return buf;
  } finally {
    await v.close();
  }
}

const padded = (b: Buffer, size: number) => Buffer.concat([b, Buffer.alloc(size - b.length)]);

describe('vm create --disk-from', () => {
  it('reads a qcow2 as the disk it holds, padded with a notice', async () => {
    const r = await vmsnapOk(null, ['vm', 'create', 'q', '--disk-from', path.join(dir, 'disk.qcow2')], { env });
    const virtual = Math.ceil(raw.length / 512) * 512; // qemu-img rounds a raw image up to sectors
    const size = Math.ceil(virtual / BLOCK) * BLOCK;
    expect(r.stderr).toContain(`note: ${path.join(dir, 'disk.qcow2')} is ${virtual} bytes, not a multiple of the ${BLOCK}-byte block size; the disk is ${size} bytes, padded with zeros`);
    const disk = await diskOf('q');
    expect(disk.length).toBe(size);
    expect(disk.equals(padded(raw, size))).toBe(true);
    expect(disk.subarray(0, 4).toString('latin1')).not.toBe('QFI\xfb'); // not the container's header
  });

  it('reads an odd-sized raw image as it is, padded with a notice stating both sizes', async () => {
    const r = await vmsnapOk(null, ['vm', 'create', 'r', '--disk-from', path.join(dir, 'disk.raw')], { env });
    const size = Math.ceil(raw.length / BLOCK) * BLOCK;
    expect(r.stderr).toContain(`is ${raw.length} bytes, not a multiple of the ${BLOCK}-byte block size; the disk is ${size} bytes, padded with zeros`);
    expect((await diskOf('r')).equals(padded(raw, size))).toBe(true);
  });

  it('refuses a corrupt qcow2, one with a backing file and an unsupported format, naming each; no VM is left', async () => {
    const trunc = path.join(dir, 'trunc.qcow2');
    writeFileSync(trunc, readFileSync(path.join(dir, 'disk.qcow2')).subarray(0, 1000));
    const backed = path.join(dir, 'backed.qcow2');
    execFileSync('qemu-img', ['create', '-f', 'qcow2', '-b', path.join(dir, 'disk.raw'), '-F', 'raw', backed], { stdio: 'ignore' });
    const parallels = path.join(dir, 'p.img');
    execFileSync('qemu-img', ['create', '-f', 'parallels', parallels, '1M'], { stdio: 'ignore' });
    for (const [file, re] of [
      [trunc, /is a corrupt qcow2 image/],
      [backed, /is a qcow2 image with a backing file \(.*disk\.raw\)/],
      [parallels, /is a parallels image, which vmsnap cannot read/],
    ] as const) {
      const name = `bad-${path.basename(file).replace(/\W/g, '')}`;
      const r = await vmsnap(null, ['vm', 'create', name, '--disk-from', file], { env });
      expect(r.code, r.stderr).toBe(1);
      expect(r.stderr).toMatch(new RegExp(`^vmsnap: ${file.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')} `));
      expect(r.stderr).toMatch(re);
      expect(existsSync(path.join(dir, 'data', 'vms', name))).toBe(false);
    }
  });
});

describe('import', () => {
  it('refuses a qcow2 as a disk stream, stores it as a file with --kind file', async () => {
    await vmsnapOk(null, ['init'], { env });
    const q = path.join(dir, 'disk.qcow2');
    const r = await vmsnap(null, ['import', q, '--vm', 'v'], { env });
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/is a qcow2 image: import stores a disk's raw bytes/);
    await vmsnapOk(null, ['import', q, '--vm', 'v', '--kind', 'file', '--stream', 'image'], { env });
    await vmsnapOk(null, ['import', path.join(dir, 'disk.raw'), '--vm', 'v'], { env });
  });
});
