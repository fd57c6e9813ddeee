/**
 * `vmsnap export` to every kind of target (issue 12 items 5 and 6): a device is written in place
 * and stays a device, a FIFO streams, an existing file needs --force, a directory is refused, and
 * a symlink planted at a temp name (the old predictable `.vmsnap-partial` or a guessed `.tmp-*`)
 * or at the target itself is never written through.
 */
import { execFileSync, spawn } from 'node:child_process';
import { once } from 'node:events';
import { existsSync, lstatSync, mkdirSync, readdirSync, readFileSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { cliEntry, ensureBuiltAsync, mixedImage, removeDir, sha256, tempDir, vmsnap, vmsnapOk } from '../helpers/cli.js';

let dir: string;
let repo: string;
// Zero runs (holes in a file target, written zeros on a device) and an odd tail.
const img = Buffer.concat([mixedImage(1 << 20, 7), Buffer.alloc(256 << 10), Buffer.from('tail of odd length')]);

beforeAll(async () => {
  await ensureBuiltAsync();
  dir = tempDir('vmsnap-export-targets-');
  repo = path.join(dir, 'repo');
  await vmsnapOk(repo, ['init', '--chunk-size', '4096']);
  writeFileSync(path.join(dir, 'src.img'), img);
  await vmsnapOk(repo, ['import', path.join(dir, 'src.img'), '--vm', 'v']);
}, 120_000);
afterAll(() => removeDir(dir));

/** Temp files left in a directory (a failed or finished export must leave none). */
const leftovers = (d: string) => readdirSync(d).filter((n) => n.startsWith('.tmp-') || n.endsWith('.vmsnap-partial'));

describe('device and FIFO targets', () => {
  it('/dev/null is written as the character device it is, not replaced by a file', async () => {
    const before = statSync('/dev/null');
    await vmsnapOk(repo, ['export', 'latest', '/dev/null', '-q']);
    const after = lstatSync('/dev/null');
    expect(after.isCharacterDevice()).toBe(true);
    expect(after.rdev).toBe(before.rdev);
    expect(leftovers('/dev')).toEqual([]);
  });

  it('a FIFO gets the stream in order', async () => {
    const fifo = path.join(dir, 'pipe');
    execFileSync('mkfifo', [fifo]);
    const reader = spawn('cat', [fifo], { stdio: ['ignore', 'pipe', 'inherit'] });
    const got: Buffer[] = [];
    reader.stdout.on('data', (b: Buffer) => got.push(b));
    const closed = once(reader, 'close'); // before the export: cat may close before it returns
    const r = await vmsnap(repo, ['export', 'latest', fifo, '-q']);
    await closed;
    expect(r.code, r.stderr).toBe(0);
    expect(sha256(Buffer.concat(got))).toBe(sha256(img));
    expect(lstatSync(fifo).isFIFO()).toBe(true);
  });

  it('a block device is written in place, zeros included; a smaller one is refused before any byte', async (ctx) => {
    const back = path.join(dir, 'loop-back.img');
    writeFileSync(back, Buffer.alloc(2 << 20, 0xee)); // old data where the image has zeros
    let dev: string;
    try {
      dev = execFileSync('losetup', ['-f', '--show', back], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] }).trim();
    } catch (err) {
      console.warn(`SKIPPED block-device export: cannot create a loop device here (${(err as Error).message.split('\n')[0]})`);
      ctx.skip();
      return;
    }
    const smallBack = path.join(dir, 'loop-small.img');
    writeFileSync(smallBack, Buffer.alloc(512 << 10, 0xdd));
    let small: string | undefined;
    try {
      await vmsnapOk(repo, ['export', 'latest', dev, '-q']);
      expect(lstatSync(dev).isBlockDevice()).toBe(true);
      const onDevice = readFileSync(dev);
      expect(onDevice.length).toBe(2 << 20);
      expect(sha256(onDevice.subarray(0, img.length))).toBe(sha256(img));
      // Past the stream's end the device keeps what it had: nothing is truncated or zeroed.
      expect(onDevice.subarray(img.length).every((b) => b === 0xee)).toBe(true);

      small = execFileSync('losetup', ['-f', '--show', smallBack], { encoding: 'utf8' }).trim();
      const r = await vmsnap(repo, ['export', 'latest', small]);
      expect(r.code).toBe(2);
      expect(r.stderr).toMatch(new RegExp(`^vmsnap: ${small} holds 524288 bytes, too small for ${img.length} bytes; nothing was written\\n$`));
      expect(readFileSync(small).every((b) => b === 0xdd)).toBe(true);
    } finally {
      execFileSync('losetup', ['-d', dev]);
      if (small) execFileSync('losetup', ['-d', small]);
    }
  });
});

describe('file targets', () => {
  it('an existing file is replaced only with --force; a new file is created private', async () => {
    const out = path.join(dir, 'exists.img');
    writeFileSync(out, 'keep me');
    const r = await vmsnap(repo, ['export', 'latest', out]);
    expect(r.code).toBe(2);
    expect(r.stderr).toBe(`vmsnap: ${out} already exists; add --force to replace it\n`);
    expect(readFileSync(out, 'utf8')).toBe('keep me');
    await vmsnapOk(repo, ['export', '--force', 'latest', out, '-q']);
    expect(sha256(readFileSync(out))).toBe(sha256(img));
    const fresh = path.join(dir, 'fresh.img');
    await vmsnapOk(repo, ['export', 'latest', fresh, '-q']);
    expect(sha256(readFileSync(fresh))).toBe(sha256(img));
    expect(statSync(fresh).mode & 0o777).toBe(0o600);
    expect(leftovers(dir)).toEqual([]);
  });

  it('a directory or a socket is refused with a clear error', async () => {
    const r = await vmsnap(repo, ['export', 'latest', dir]);
    expect(r.code).toBe(2);
    expect(r.stderr).toBe(`vmsnap: cannot write ${dir}: it is a directory (give the path of the file to write)\n`);
  });

  it('a symlink planted at the old temp name, at guessed temp names or at the target is never written through', async () => {
    const shared = path.join(dir, 'shared');
    mkdirSync(shared, { mode: 0o1777 });
    const victim = path.join(dir, 'victim');
    writeFileSync(victim, 'system file');
    const target = path.join(shared, 'a.img');
    symlinkSync(victim, `${target}.vmsnap-partial`);
    for (let i = 0; i < 50; i++) symlinkSync(victim, path.join(shared, `.tmp-a.img-${i.toString(16).padStart(16, '0')}`));
    await vmsnapOk(repo, ['export', 'latest', target, '-q']);
    expect(readFileSync(victim, 'utf8')).toBe('system file');
    expect(sha256(readFileSync(target))).toBe(sha256(img));
    expect(lstatSync(target).isFile()).toBe(true);

    // A symlink at the target itself: the file it points at exists, so --force is needed, and then
    // the link is replaced by the new file, never followed.
    const linked = path.join(shared, 'b.img');
    symlinkSync(victim, linked);
    const r = await vmsnap(repo, ['export', 'latest', linked]);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/already exists; add --force/);
    await vmsnapOk(repo, ['export', '--force', 'latest', linked, '-q']);
    expect(readFileSync(victim, 'utf8')).toBe('system file');
    expect(lstatSync(linked).isFile()).toBe(true);
    expect(sha256(readFileSync(linked))).toBe(sha256(img));
  });

  it('stdout still streams (-)', async () => {
    const r = await vmsnapOk(repo, ['export', 'latest', '-']);
    expect(sha256(r.stdoutBytes)).toBe(sha256(img));
    expect(existsSync(cliEntry())).toBe(true);
  });
});
