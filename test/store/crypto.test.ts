/**
 * AES-256-GCM boxes: the native addon (src/store/native/aead.addon.c) and node:crypto seal and open
 * exactly the same format, and both refuse tampered boxes.
 */
import { spawnSync } from 'node:child_process';
import { createCipheriv, randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { aeadImplementation, open, openInto, seal, SEAL_OVERHEAD, sealInto } from '../../src/store/crypto.js';
import { IntegrityError } from '../../src/store/errors.js';
import { projectRoot } from '../../src/util/project.js';

const LENGTHS = [0, 1, 15, 16, 17, 4095, 4096, 27_000, 65_536, 65_536 + 28];
/**
 * The "both ways" cases compare the native addon with node:crypto. Without the addon (not built:
 * scripts/setup.sh needs node's headers, see there) sealInto/openInto ARE node:crypto and the cases
 * would compare it with itself: they are skipped, and say so in their names and on the console.
 */
const native = aeadImplementation() === 'native';
const SKIP_NOTE = native ? '' : ' [SKIPPED: native AES-GCM addon not built (.cache/native/aead.node); run scripts/setup.sh]';
if (!native) console.warn(`crypto.test.ts:${SKIP_NOTE}`);
const key = randomBytes(32);
const aad = Buffer.from('chunk 0123');

describe('AES-256-GCM boxes', () => {
  it('uses the native addon where setup built it', () => {
    const built = existsSync(path.join(projectRoot(), '.cache', 'native', 'aead.node'));
    expect(aeadImplementation()).toBe(built ? 'native' : 'node:crypto');
  });

  it.skipIf(!native)(`sealInto boxes open with node:crypto, node:crypto boxes open with openInto, byte for byte${SKIP_NOTE}`, () => {
    for (const n of LENGTHS) {
      const plain = randomBytes(n);
      const box = Buffer.alloc(n + SEAL_OVERHEAD + 7);
      const len = sealInto(key, plain, aad, box);
      expect(len).toBe(n + SEAL_OVERHEAD);
      expect(open(key, box.subarray(0, len), aad, 'x').equals(plain)).toBe(true);
      // The format, independently of both: nonce | AES-GCM ciphertext | tag.
      const c = createCipheriv('aes-256-gcm', key, box.subarray(0, 12));
      c.setAAD(aad);
      expect(Buffer.concat([box.subarray(0, 12), c.update(plain), c.final(), c.getAuthTag()]).equals(box.subarray(0, len))).toBe(true);
      const other = seal(key, plain, aad);
      const dst = Buffer.alloc(n + 3);
      expect(openInto(key, other, aad, dst, 'x')).toBe(n);
      expect(dst.subarray(0, n).equals(plain)).toBe(true);
    }
  });

  it('openInto refuses a flipped bit anywhere, another role, another key and a short box, and recovers after', () => {
    const plain = randomBytes(1000);
    const box = seal(key, plain, aad);
    const dst = Buffer.alloc(1000);
    for (const at of [0, 11, 12, 500, box.length - 17, box.length - 1]) {
      box[at]! ^= 0x10;
      expect(() => openInto(key, box, aad, dst, 'chunk 7')).toThrow(IntegrityError);
      box[at]! ^= 0x10;
    }
    expect(() => openInto(key, box, Buffer.from('chunk 0124'), dst, 'chunk 7')).toThrow(/chunk 7: authentication failed/);
    expect(() => openInto(randomBytes(32), box, aad, dst, 'chunk 7')).toThrow(IntegrityError);
    expect(() => openInto(key, box.subarray(0, 27), aad, dst, 'chunk 7')).toThrow(/too short/);
    expect(openInto(key, box, aad, dst, 'x')).toBe(1000);
    expect(dst.equals(plain)).toBe(true);
  });

  it.skipIf(!native)(`without the addon (VMSNAP_NATIVE_AEAD=0) the same boxes open both ways${SKIP_NOTE}`, () => {
    const plain = randomBytes(5000);
    const box = Buffer.alloc(plain.length + SEAL_OVERHEAD);
    sealInto(key, plain, aad, box);
    const code = `
      const c = await import(${JSON.stringify(path.join(projectRoot(), 'src/store/crypto.ts'))});
      const [k, a, b, p] = process.argv.slice(1).map((h) => Buffer.from(h, 'hex'));
      const dst = Buffer.alloc(p.length);
      c.openInto(k, b, a, dst, 'x');
      const mine = Buffer.alloc(p.length + c.SEAL_OVERHEAD);
      c.sealInto(k, p, a, mine);
      console.log(JSON.stringify({ impl: c.aeadImplementation(), same: dst.equals(p), box: mine.toString('hex') }));`;
    const r = spawnSync(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', code, key.toString('hex'), aad.toString('hex'), box.toString('hex'), plain.toString('hex')], {
      env: { ...process.env, VMSNAP_NATIVE_AEAD: '0' },
      encoding: 'utf8',
    });
    expect(r.stderr).toBe('');
    const out = JSON.parse(r.stdout) as { impl: string; same: boolean; box: string };
    expect(out).toMatchObject({ impl: 'node:crypto', same: true });
    expect(open(key, Buffer.from(out.box, 'hex'), aad, 'x').equals(plain)).toBe(true);
  });

  const addon = path.join(projectRoot(), '.cache', 'native', 'aead.node');
  it.skipIf(!existsSync(addon))('the addon refuses overlapping buffers and missing arguments, and wipes what failed to authenticate', () => {
    const m = createRequire(import.meta.url)(addon) as {
      openInto(...a: unknown[]): number;
      sealInto(...a: unknown[]): number;
    };
    const big = Buffer.alloc(300);
    expect(() => m.sealInto(key, randomBytes(12), big.subarray(0, 100), aad, big.subarray(50))).toThrow(/overlaps/);
    const box = seal(key, randomBytes(100), aad);
    const shared = Buffer.concat([box, Buffer.alloc(100)]);
    expect(() => m.openInto(key, shared.subarray(0, box.length), aad, shared.subarray(20))).toThrow(/overlaps/);
    expect(() => m.openInto(key, box, aad)).toThrow(/needs key, box, aad, dst/);
    expect(() => m.sealInto(key, randomBytes(12), box)).toThrow(/needs key, nonce/);
    const dst = Buffer.alloc(100, 0xee);
    box[20]! ^= 1;
    expect(m.openInto(key, box, aad, dst)).toBe(-1);
    expect(dst.every((b) => b === 0)).toBe(true); // no unverified plaintext left behind
  });
});

