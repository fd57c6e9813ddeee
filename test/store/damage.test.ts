/**
 * Damage: with three snapshots sharing data, each kind of damage — a flipped bit in a pack, a
 * truncated pack, a deleted pack, a corrupted manifest, a corrupted or deleted index file — is
 * named by `check` (or `check --read-data`) together with the affected snapshots and streams (exit
 * 3); exporting an affected stream fails with one clear line and writes no wrong bytes (the target
 * is not created, or left unchanged); unaffected snapshots still export; rebuild-index recovers a
 * lost index. Encrypted repositories: wrong password refused, tampering detected, keyed chunk ids.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { cpSync, existsSync, readFileSync, rmSync, statSync, truncateSync, writeFileSync } from 'node:fs';
import * as path from 'node:path';
import { LocalBackend } from '../../src/store/backend/local.js';
import { Repository } from '../../src/store/repository.js';
import { ensureBuiltAsync, mixedImage, randomData, removeDir, repoFiles, sha256, tempDir, vmsnap, vmsnapOk, tempLeftovers } from '../helpers/cli.js';

let dir: string;
let base: string;
const img: Record<'s1' | 's2' | 's3', Buffer> = { s1: Buffer.alloc(0), s2: Buffer.alloc(0), s3: Buffer.alloc(0) };
const ids: Record<'s1' | 's2' | 's3', string> = { s1: '', s2: '', s3: '' };
/** pack/index file of each import, in import order */
let packOf: Record<'s1' | 's2' | 's3', string>;
let indexOf: Record<'s1' | 's2' | 's3', string>;

interface CheckJson {
  problems: { severity: string; message: string; affected: { snapshot: string; vm: string; stream: string }[] }[];
}

function fresh(name: string): string {
  const repo = path.join(dir, name);
  cpSync(base, repo, { recursive: true });
  return repo;
}

async function checkJson(repo: string, readData: boolean) {
  const r = await vmsnap(repo, ['--json', 'check', ...(readData ? ['--read-data'] : [])]);
  const report = JSON.parse(r.stdout) as CheckJson;
  const errors = report.problems.filter((p) => p.severity === 'error');
  const affected = new Set(errors.flatMap((p) => p.affected.map((a) => `${a.snapshot}:${a.stream}`)));
  return { code: r.code, errors, affected: [...affected].sort(), text: errors.map((e) => e.message).join('\n') };
}

/** Exports to a file that already exists with known content: on failure it must stay as it was. */
async function exportFails(repo: string, snap: string, re: RegExp): Promise<void> {
  const target = path.join(repo, '..', `out-${path.basename(repo)}-${snap.slice(0, 8)}.img`);
  writeFileSync(target, 'previous content');
  const r = await vmsnap(repo, ['export', '--force', snap, target]);
  expect(r.code, r.stderr).toBe(1);
  expect(r.stderr).toMatch(/^vmsnap: [^\n]+\n$/);
  expect(r.stderr).toMatch(re);
  expect(readFileSync(target, 'utf8')).toBe('previous content');
  expect(tempLeftovers(target)).toEqual([]);
  // And to a new file: nothing is created.
  const fresh = `${target}.new`;
  const r2 = await vmsnap(repo, ['export', snap, fresh]);
  expect(r2.code).toBe(1);
  expect(existsSync(fresh)).toBe(false);
  expect(tempLeftovers(fresh)).toEqual([]);
  rmSync(target);
}

async function exportOk(repo: string, which: 's1' | 's2' | 's3'): Promise<void> {
  const target = path.join(repo, '..', `ok-${path.basename(repo)}-${which}.img`);
  await vmsnapOk(repo, ['export', ids[which], target]);
  expect(sha256(readFileSync(target)), which).toBe(sha256(img[which]));
  rmSync(target);
}

const aff = (...w: ('s1' | 's2' | 's3')[]) => w.map((x) => `${ids[x]}:disk0`).sort();

beforeAll(async () => {
  await ensureBuiltAsync();
  dir = tempDir('vmsnap-damage-');
  base = path.join(dir, 'base');
  // s1 = X + Y; s2 = X + Z (shares X with s1); s3 = W (vm2, shares nothing).
  const x = mixedImage(256 << 10, 31);
  img.s1 = Buffer.concat([x, mixedImage(256 << 10, 32)]);
  img.s2 = Buffer.concat([x, mixedImage(192 << 10, 33)]);
  img.s3 = Buffer.concat([Buffer.alloc(16 << 10), randomData(176 << 10, 35)]); // no text blocks: shares nothing
  await vmsnapOk(base, ['init', '--chunk-size', '4096']);
  const packs: string[] = [];
  const indexes: string[] = [];
  for (const [k, vm] of [['s1', 'vm1'], ['s2', 'vm1'], ['s3', 'vm2']] as const) {
    const file = path.join(dir, `${k}.img`);
    writeFileSync(file, img[k]);
    ids[k] = (JSON.parse((await vmsnapOk(base, ['--json', 'import', file, '--vm', vm])).stdout) as { snapshot: string }).snapshot;
    packs.push(repoFiles(base, 'packs').find((p) => !packs.includes(p))!);
    indexes.push(repoFiles(base, 'index').find((p) => !indexes.includes(p))!);
  }
  packOf = { s1: packs[0]!, s2: packs[1]!, s3: packs[2]! };
  indexOf = { s1: indexes[0]!, s2: indexes[1]!, s3: indexes[2]! };
  const c = await checkJson(base, true);
  expect(c.errors).toEqual([]);
}, 120_000);

afterAll(() => removeDir(dir));

const rel = (repo: string, file: string) => path.join(repo, path.relative(base, file));
const short = (file: string) => path.basename(file).slice(0, 12);

describe('damage', () => {
  it('a flipped bit in a pack: check --read-data names the pack and the snapshots using it', async () => {
    const repo = fresh('flip');
    const pack = rel(repo, packOf.s2);
    const b = readFileSync(pack);
    b[8 + 20]! ^= 0x10; // inside the first chunk s2 stored
    writeFileSync(pack, b);
    const c = await checkJson(repo, true);
    expect(c.code).toBe(3);
    expect(c.text).toContain(`pack ${short(pack)}: content does not match its name; 1 chunk(s) fail verification`);
    expect(c.affected).toEqual(aff('s2'));
    await exportFails(repo, ids.s2, /stream disk0: chunks \d+-\d+ \(pack [0-9a-f]{12}\): .*(corrupted|does not match|decompress|codec)/);
    await exportOk(repo, 's1');
    await exportOk(repo, 's3');
  });

  it('a truncated pack: check names it and both snapshots sharing its chunks', async () => {
    const repo = fresh('trunc');
    const pack = rel(repo, packOf.s1);
    truncateSync(pack, Math.floor(statSync(pack).size / 2));
    const c = await checkJson(repo, false);
    expect(c.code).toBe(3);
    expect(c.text).toMatch(new RegExp(`pack ${short(pack)} is truncated: \\d+ chunk\\(s\\) lie past its end`));
    expect(c.affected).toEqual(aff('s1', 's2'));
    const rd = await checkJson(repo, true);
    expect(rd.text).toContain(`pack ${short(pack)}:`);
    expect(rd.affected).toEqual(aff('s1', 's2'));
    await exportFails(repo, ids.s1, /vmsnap: .*(past|range|beyond|end|short)/i);
    await exportOk(repo, 's3');
  });

  it('a deleted pack: check names it and the snapshots that lose data', async () => {
    const repo = fresh('delpack');
    const pack = rel(repo, packOf.s1);
    rmSync(pack);
    const c = await checkJson(repo, false);
    expect(c.code).toBe(3);
    expect(c.text).toMatch(new RegExp(`pack ${short(pack)} is missing \\(\\d+ chunks\\)`));
    expect(c.affected).toEqual(aff('s1', 's2'));
    await exportFails(repo, ids.s2, /vmsnap: .*(not found|missing|does not exist)/i);
    await exportOk(repo, 's3');
    // prune refuses to run on a repository with missing live data (it would make things worse).
    const p = await vmsnap(repo, ['prune']);
    expect(p.code).toBe(1);
    expect(p.stderr).toMatch(/holds live chunks but is missing; run `vmsnap check`, nothing deleted/);
  });

  it('a corrupted manifest: check names the snapshot; the others still export', async () => {
    const repo = fresh('manifest');
    const file = path.join(repo, 'snapshots', ids.s3);
    const b = readFileSync(file);
    b[10]! ^= 0x01;
    writeFileSync(file, b);
    const c = await checkJson(repo, false);
    expect(c.code).toBe(3);
    expect(c.text).toContain(`snapshot ${ids.s3.slice(0, 12)}: manifest unreadable: snapshot ${ids.s3}: manifest content does not match its id (corrupted)`);
    expect(c.affected).toEqual([`${ids.s3}:*`]);
    await exportFails(repo, ids.s3, /manifest content does not match its id/);
    await exportOk(repo, 's1');
    await exportOk(repo, 's2');
    // prune must not delete anything while a manifest is unreadable (its chunks are unknown).
    const p = await vmsnap(repo, ['prune']);
    expect(p.code).toBe(1);
    expect(p.stderr).toMatch(/manifest\(s\) unreadable, nothing deleted/);
    // An unrelated damaged manifest must not stop new backups.
    const file2 = path.join(dir, 's2.img');
    const imp = await vmsnap(repo, ['--json', 'import', file2, '--vm', 'vm1']);
    expect(imp.code, imp.stderr).toBe(0);
    const newId = (JSON.parse(imp.stdout) as { snapshot: string }).snapshot;
    const out = await vmsnapOk(repo, ['export', newId, '-']);
    expect(sha256(out.stdoutBytes)).toBe(sha256(img.s2));
  });

  for (const how of ['corrupted', 'deleted'] as const) {
    it(`a ${how} index file: check names it and the snapshots; rebuild-index recovers`, async () => {
      const repo = fresh(`index-${how}`);
      const file = rel(repo, indexOf.s1);
      if (how === 'deleted') rmSync(file);
      else {
        const b = readFileSync(file);
        b[b.length - 40]! ^= 0xff;
        writeFileSync(file, b);
      }
      const c = await checkJson(repo, false);
      expect(c.code).toBe(3);
      if (how === 'corrupted') expect(c.text).toContain(`index file ${short(file)} is damaged: index ${path.basename(file)}: content does not match its name (run \`vmsnap rebuild-index\`)`);
      expect(c.text).toMatch(/\d+ referenced chunk\(s\) are not in the index/);
      // s1's chunks were indexed only by the first import's index file; s2 shares X with s1.
      expect(c.affected).toEqual(aff('s1', 's2'));
      await exportFails(repo, ids.s1, /chunk [0-9a-f]{64} is not in the index \(missing data\)/);
      await exportOk(repo, 's3');
      const r = await vmsnapOk(repo, ['--json', 'rebuild-index']);
      expect(JSON.parse(r.stdout)).toMatchObject({ packs: 3, unreadable: [] });
      const after = await checkJson(repo, true);
      expect(after.errors).toEqual([]);
      expect(after.code).toBe(0);
      for (const k of ['s1', 's2', 's3'] as const) await exportOk(repo, k);
      expect(repoFiles(repo, 'index')).toHaveLength(1);
    });
  }
});

describe('encryption through the CLI', () => {
  let enc: string;
  let encId: string;
  const pw = { VMSNAP_PASSWORD: 'correct horse battery staple' };
  beforeAll(async () => {
    enc = path.join(dir, 'enc');
    await vmsnapOk(enc, ['init', '--encrypt', '--chunk-size', '4096'], { env: pw });
    const file = path.join(dir, 's1.img');
    encId = (JSON.parse((await vmsnapOk(enc, ['--json', 'import', file, '--vm', 'vm1'], { env: pw })).stdout) as { snapshot: string }).snapshot;
  }, 120_000);

  it('refuses a wrong password, and a missing one, with a clear message', async () => {
    const wrong = await vmsnap(enc, ['ls'], { env: { VMSNAP_PASSWORD: 'Tr0ub4dor&3' } });
    expect(wrong.code).toBe(1);
    expect(wrong.stderr).toBe('vmsnap: wrong password: it opens no key of this repository\n');
    const pwFile = path.join(dir, 'pw');
    writeFileSync(pwFile, 'nope\n');
    const wrongFile = await vmsnap(enc, ['--password-file', pwFile, 'check']);
    expect(wrongFile.code).toBe(1);
    expect(wrongFile.stderr).toMatch(/^vmsnap: wrong password/);
    const none = await vmsnap(enc, ['ls']);
    expect(none.code).not.toBe(0);
    expect(none.stderr).toMatch(/^vmsnap: .*password/);
    writeFileSync(pwFile, `${pw.VMSNAP_PASSWORD}\n`);
    await vmsnapOk(enc, ['--password-file', pwFile, 'ls']);
  });

  it('stores nothing in plaintext and names chunks with keyed ids', async () => {
    const plainRepo = await Repository.open(new LocalBackend(base));
    const encRepo = await Repository.open(new LocalBackend(enc), { password: pw.VMSNAP_PASSWORD });
    try {
      const a = (await plainRepo.readSnapshot(ids.s1)).streams[0]!;
      const b = (await encRepo.readSnapshot(encId)).streams[0]!;
      expect(encId).not.toBe(ids.s1);
      expect(b.size).toBe(a.size);
      // Same data, different ids for every non-zero chunk.
      let same = 0;
      let nonZero = 0;
      for (let o = 0; o < a.chunks.length; o += 32) {
        if (a.chunks.subarray(o, o + 32).equals(Buffer.alloc(32))) continue;
        nonZero++;
        if (a.chunks.subarray(o, o + 32).equals(b.chunks.subarray(o, o + 32))) same++;
      }
      expect(nonZero).toBeGreaterThan(50);
      expect(same).toBe(0);
      // The text in the image does not appear in any stored object, nor the VM name in a manifest.
      // (Only manifests are searched for the 3-byte name: megabytes of ciphertext contain any
      // given 3 bytes by chance about once per 16 MiB, which made this test fail now and then.)
      for (const f of [...repoFiles(enc, 'packs'), ...repoFiles(enc, 'snapshots'), ...repoFiles(enc, 'index')]) {
        expect(readFileSync(f).includes('quick brown fox'), f).toBe(false);
      }
      // The control: unencrypted packs do show it (zstd stores its first occurrence as a literal).
      expect(repoFiles(base, 'packs').some((f) => readFileSync(f).includes('quick brown fox'))).toBe(true);
      const manifests = repoFiles(enc, 'snapshots');
      expect(manifests.length).toBeGreaterThan(0);
      for (const f of manifests) expect(readFileSync(f).includes('vm1'), f).toBe(false);
      // The control: the plain repository's manifests do name it.
      expect(repoFiles(base, 'snapshots').some((f) => readFileSync(f).includes('vm1'))).toBe(true);
    } finally {
      await plainRepo.close();
      await encRepo.close();
    }
  });

  it('detects a tampered chunk: export fails, check --read-data names the snapshot', async () => {
    const repo = path.join(dir, 'enc-tamper');
    cpSync(enc, repo, { recursive: true });
    const [pack] = repoFiles(repo, 'packs');
    const b = readFileSync(pack!);
    b[8 + 30]! ^= 0x04; // inside the first sealed chunk
    writeFileSync(pack!, b);
    const target = path.join(dir, 'enc-out.img');
    const r = await vmsnap(repo, ['export', 'latest', target], { env: pw });
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/^vmsnap: stream disk0: chunks .*authentication failed \(the data was modified or belongs elsewhere\)\n$/);
    expect(existsSync(target)).toBe(false);
    const c = await vmsnap(repo, ['--json', 'check', '--read-data'], { env: pw });
    expect(c.code).toBe(3);
    const report = JSON.parse(c.stdout) as CheckJson;
    expect(report.problems.map((p) => p.message).join('\n')).toContain(`pack ${path.basename(pack!).slice(0, 12)}: content does not match its name; 1 chunk(s) fail verification`);
    expect(report.problems.flatMap((p) => p.affected.map((a) => a.snapshot))).toContain(encId);
  });
});
