/**
 * Encryption at rest.
 *
 * A repository created with `--encrypt` has a random 64-byte master key:
 *   bytes  0..31  AES-256-GCM key for every encrypted object (chunks, pack descriptions, index files,
 *                 snapshot manifests);
 *   bytes 32..63  keyed-BLAKE3 key for chunk ids (see hash.ts).
 * The master key is stored only wrapped, in `keys/<id>` objects, one per passphrase:
 *
 *   { "version": 1, "kdf": "scrypt", "N": 32768, "r": 8, "p": 1, "salt": b64(16),
 *     "wrapped": b64(sealed(master)), "created": ISO-8601, "host": "..." }
 *
 * where the wrapping key is scrypt(passphrase, salt). A sealed box is
 *
 *   nonce (12 random bytes) | ciphertext | GCM tag (16)
 *
 * with additional authenticated data naming what the box is ("chunk" + id, "pack-description",
 * "index", "snapshot", "master-key"), so a box moved to another role or another id fails to open.
 * Random 96-bit nonces: a key seals far fewer than 2^32 boxes in a desktop repository's life.
 *
 * Chunks go through `sealInto`/`openInto`, which use the native addon src/store/native/aead.addon.c
 * when setup built it: node:crypto makes a new cipher context (key schedule, GHASH tables) and a
 * new output buffer per call, 2.3-2.9x the time of the cipher itself on 27-64 KiB chunks
 * (docs/benchmarks.md). Both produce and accept exactly the same boxes (tested both ways).
 */
import { createCipheriv, createDecipheriv, createHash, randomBytes, randomFillSync, scrypt as scryptCb, type ScryptOptions } from 'node:crypto';
import { createRequire } from 'node:module';
import { FormatError, IntegrityError, WrongPasswordError } from './errors.js';
import { nativeHelper } from '../util/project.js';

const NONCE = 12;
const TAG = 16;
export const SEAL_OVERHEAD = NONCE + TAG;

export interface KeyFile {
  version: 1;
  kdf: 'scrypt';
  N: number;
  r: number;
  p: number;
  salt: string;
  wrapped: string;
  created: string;
  host: string;
  /**
   * SHA-256 (hex) of keyChecksumInput: tells a damaged key file from a wrong password (both only
   * fail the GCM tag otherwise). Optional: key files written before it have none.
   */
  sum?: string;
}

/** What a key file's `sum` covers: every field the unwrapping depends on. */
function keyChecksum(k: Pick<KeyFile, 'N' | 'r' | 'p' | 'salt' | 'wrapped'>): string {
  return createHash('sha256').update(`vmsnap-key-v1:${k.N}:${k.r}:${k.p}:${k.salt}:${k.wrapped}`).digest('hex');
}

const BASE64 = /^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/;
/** A wrapped master key: the 64-byte key sealed (nonce + ciphertext + tag). */
const WRAPPED_BYTES = 64 + 12 + 16;

export class MasterKey {
  readonly aeadKey: Buffer;
  readonly idKey: Buffer;
  constructor(readonly raw: Buffer) {
    if (raw.length !== 64) throw new FormatError('master key must be 64 bytes');
    this.aeadKey = raw.subarray(0, 32);
    this.idKey = raw.subarray(32, 64);
  }
  static generate(): MasterKey {
    return new MasterKey(randomBytes(64));
  }
}

interface NativeAead {
  openInto(key: Uint8Array, box: Uint8Array, aad: Uint8Array, dst: Uint8Array): number;
  sealInto(key: Uint8Array, nonce: Uint8Array, plaintext: Uint8Array, aad: Uint8Array, dst: Uint8Array): number;
}

/**
 * The addon, if it was built, loads, and agrees with node:crypto on a box sealed by each (a
 * broken build must not write boxes nobody can open). VMSNAP_NATIVE_AEAD=0 turns it off.
 */
function loadNativeAead(): NativeAead | null {
  if (process.env.VMSNAP_NATIVE_AEAD === '0') return null;
  const file = nativeHelper('aead.node');
  if (!file) return null;
  try {
    const m = createRequire(import.meta.url)(file) as NativeAead;
    const key = randomBytes(32);
    const aad = Buffer.from('self-test');
    const plain = randomBytes(100);
    const box = Buffer.alloc(plain.length + SEAL_OVERHEAD);
    if (m.sealInto(key, randomBytes(NONCE), plain, aad, box) !== box.length) return null;
    if (!open(key, box, aad, 'self-test').equals(plain)) return null;
    const back = Buffer.alloc(plain.length);
    const good = seal(key, plain, aad);
    if (m.openInto(key, good, aad, back) !== plain.length || !back.equals(plain)) return null;
    // It must also refuse what is forged: a build that ignored the tag would pass the rest.
    const forged = Buffer.from(good);
    forged[forged.length - 1]! ^= 1;
    if (m.openInto(key, forged, aad, back) !== -1) return null;
    if (m.openInto(randomBytes(32), good, aad, back) !== -1) return null;
    if (m.openInto(key, good, aad, back) !== plain.length || !back.equals(plain)) return null;
    return m;
  } catch {
    return null;
  }
}

let nativeAead: NativeAead | null | undefined;
function native(): NativeAead | null {
  if (nativeAead === undefined) nativeAead = loadNativeAead();
  return nativeAead;
}

/** Which AES-GCM implementation chunks go through ('native' or 'node:crypto'). */
export function aeadImplementation(): 'native' | 'node:crypto' {
  return native() ? 'native' : 'node:crypto';
}

/** Seals a box through node:crypto (small objects: index files, manifests, keys; and the self-test). */
export function seal(key: Buffer, plaintext: Uint8Array, aad: Uint8Array): Buffer {
  const nonce = randomBytes(NONCE);
  const cipher = createCipheriv('aes-256-gcm', key, nonce);
  cipher.setAAD(aad);
  const out = Buffer.allocUnsafe(NONCE + plaintext.length + TAG);
  nonce.copy(out, 0);
  const n = cipher.update(plaintext).copy(out, NONCE);
  cipher.final();
  cipher.getAuthTag().copy(out, NONCE + n);
  return out;
}

/**
 * Like `seal`, into `dst` (at least `plaintext.length + SEAL_OVERHEAD` bytes, not overlapping
 * `plaintext`); returns the box's length. No allocation with the native addon; with node:crypto the ciphertext still comes back in
 * a new buffer first.
 */
export function sealInto(key: Buffer, plaintext: Uint8Array, aad: Uint8Array, dst: Buffer): number {
  const length = NONCE + plaintext.length + TAG;
  if (dst.length < length) throw new Error(`internal: sealInto needs ${length} bytes, has ${dst.length}`);
  const fast = native();
  if (fast) {
    randomFillSync(dst, 0, NONCE);
    const sealed = fast.sealInto(key, dst.subarray(0, NONCE), plaintext, aad, dst);
    if (sealed !== length) throw new Error(`internal: native sealInto returned ${String(sealed)}, expected ${length}`);
    return sealed;
  }
  const nonce = randomBytes(NONCE);
  nonce.copy(dst, 0);
  const cipher = createCipheriv('aes-256-gcm', key, nonce);
  cipher.setAAD(aad);
  const n = cipher.update(plaintext).copy(dst, NONCE);
  cipher.final();
  cipher.getAuthTag().copy(dst, NONCE + n);
  return length;
}

/**
 * Like `open`, into `dst` (at least `box.length - SEAL_OVERHEAD` bytes, not overlapping `box`);
 * returns the plaintext's length. Throws IntegrityError as `open` does.
 */
export function openInto(key: Buffer, box: Uint8Array, aad: Uint8Array, dst: Buffer, what: string): number {
  if (box.length < SEAL_OVERHEAD) throw new IntegrityError(`${what}: encrypted object is too short (${box.length} bytes)`);
  if (dst.length < box.length - SEAL_OVERHEAD) throw new Error(`internal: openInto needs ${box.length - SEAL_OVERHEAD} bytes, has ${dst.length}`);
  const fast = native();
  if (!fast) return open(key, box, aad, what).copy(dst);
  const length = fast.openInto(key, box, aad, dst);
  if (length === -1) throw new IntegrityError(`${what}: authentication failed (the data was modified or belongs elsewhere)`);
  if (length !== box.length - SEAL_OVERHEAD) throw new Error(`internal: native openInto returned ${String(length)} for a ${box.length}-byte box`);
  return length;
}

/** Opens a box through node:crypto; see openInto for the chunk path. */
export function open(key: Buffer, box: Uint8Array, aad: Uint8Array, what: string): Buffer {
  if (box.length < SEAL_OVERHEAD) throw new IntegrityError(`${what}: encrypted object is too short (${box.length} bytes)`);
  const b = Buffer.from(box.buffer, box.byteOffset, box.byteLength);
  const decipher = createDecipheriv('aes-256-gcm', key, b.subarray(0, NONCE));
  decipher.setAAD(aad);
  decipher.setAuthTag(b.subarray(b.length - TAG));
  try {
    const head = decipher.update(b.subarray(NONCE, b.length - TAG));
    const tail = decipher.final();
    return tail.length ? Buffer.concat([head, tail]) : head;
  } catch {
    throw new IntegrityError(`${what}: authentication failed (the data was modified or belongs elsewhere)`);
  }
}

const DEFAULT_KDF = { N: 1 << 15, r: 8, p: 1 };
const MAX_KDF_N = 1 << 20;

function scrypt(pass: string, salt: Buffer, params: { N: number; r: number; p: number }): Promise<Buffer> {
  const opts: ScryptOptions = { ...params, maxmem: 256 * params.N * params.r + (1 << 20) };
  return new Promise((resolve, reject) =>
    scryptCb(pass, salt, 32, opts, (err, key) => (err ? reject(err) : resolve(key))),
  );
}

export async function wrapMasterKey(master: MasterKey, passphrase: string, host: string, kdf = DEFAULT_KDF): Promise<KeyFile> {
  const salt = randomBytes(16);
  const wrapping = await scrypt(passphrase, salt, kdf);
  const fields = { ...kdf, salt: salt.toString('base64'), wrapped: seal(wrapping, master.raw, Buffer.from('master-key')).toString('base64') };
  return { version: 1, kdf: 'scrypt', ...fields, created: new Date().toISOString(), host, sum: keyChecksum(fields) };
}

export function parseKeyFile(bytes: Buffer, name: string): KeyFile {
  let k: Partial<KeyFile>;
  try {
    k = JSON.parse(bytes.toString('utf8')) as Partial<KeyFile>;
  } catch {
    throw new FormatError(`key ${name} is not valid JSON`);
  }
  if (k.version !== 1 || k.kdf !== 'scrypt') throw new FormatError(`key ${name}: unsupported version or kdf`);
  const pow2 = (n: unknown): n is number => typeof n === 'number' && Number.isInteger(n) && n >= 2 && (n & (n - 1)) === 0;
  if (!pow2(k.N) || k.N > MAX_KDF_N || !Number.isInteger(k.r) || !Number.isInteger(k.p) || k.r! < 1 || k.r! > 32 || k.p! < 1 || k.p! > 16) {
    throw new FormatError(`key ${name}: scrypt parameters out of range`);
  }
  if (typeof k.salt !== 'string' || typeof k.wrapped !== 'string') throw new FormatError(`key ${name}: missing salt or wrapped key`);
  // A damaged key file must not pass for a wrong password: check its shape and its checksum
  // before the password is tried (a wrong password is all that is left when they hold).
  const corrupt = (why: string) => new FormatError(`key ${name} is corrupt (${why}); the password was not tried against it. Restore keys/${name} from a copy of the repository, or open it with another key's password`);
  if (!BASE64.test(k.wrapped) || Buffer.from(k.wrapped, 'base64').length !== WRAPPED_BYTES) throw corrupt('its wrapped key is not 92 bytes of base64');
  if (!BASE64.test(k.salt) || Buffer.from(k.salt, 'base64').length < 16) throw corrupt('its salt is not base64 of at least 16 bytes');
  if (k.sum !== undefined && k.sum !== keyChecksum(k as KeyFile)) throw corrupt('its checksum does not match its contents');
  return k as KeyFile;
}

export async function unwrapMasterKey(key: KeyFile, passphrase: string): Promise<MasterKey> {
  const wrapping = await scrypt(passphrase, Buffer.from(key.salt, 'base64'), key);
  try {
    return new MasterKey(open(wrapping, Buffer.from(key.wrapped, 'base64'), Buffer.from('master-key'), 'key'));
  } catch (err) {
    if (err instanceof IntegrityError) throw new WrongPasswordError('wrong password: it does not open any key of this repository');
    throw err;
  }
}
