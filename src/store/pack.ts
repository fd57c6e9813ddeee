/**
 * Pack files: many stored chunks in one object, so object stores see few large objects, with a
 * description at the end that lists them, so the index can be rebuilt from packs alone.
 *
 *   offset          size  field
 *   0               8     "VMSPACK1"             magic; last byte = pack format version ('1')
 *   8               ...   blobs, back to back    each the codec output of one chunk, sealed with
 *                                                AAD "chunk"||id when the repository is encrypted
 *   end-8-D         D     description            sealed with AAD "pack-description" when encrypted
 *   end-8           4     be32 D                 stored length of the description
 *   end-4           4     "VMSE"                 end magic: a truncated pack fails here first
 *
 *   description plaintext:  "VMSD"  be32 count  then count entries of 45 bytes:
 *     id[32]  codec u8  offset be32  storedLength be32  rawLength be32
 *
 * A pack's object name is the hex BLAKE3 of its whole content, so `check --read-data` can verify a
 * pack without any key, and a pack is never rewritten in place.
 * Every length read from a pack is bounded before anything is allocated (hostile input).
 */
import { FormatError, IntegrityError } from './errors.js';
import { open, seal } from './crypto.js';
import { contentHash, ID_SIZE } from './hash.js';
import { codecName } from './codec.js';

export const PACK_MAGIC = Buffer.from('VMSPACK1');
const END_MAGIC = Buffer.from('VMSE');
const DESC_MAGIC = Buffer.from('VMSD');
export const PACK_TRAILER = 8;
export const PACK_ENTRY_SIZE = 45;
/** Upper bounds that hostile input must not exceed. */
export const MAX_CHUNK_SIZE = 16 << 20;
export const MAX_PACK_SIZE = 1 << 30;
const MAX_DESCRIPTION = 64 << 20;

export interface PackEntry {
  id: Buffer;
  codec: number;
  offset: number;
  storedLength: number;
  rawLength: number;
}

export const PACK_DESCRIPTION_AAD = Buffer.from('pack-description');
const CHUNK_AAD_PREFIX = Buffer.from('chunk');
export function chunkAad(id: Uint8Array): Buffer {
  return Buffer.concat([CHUNK_AAD_PREFIX, id]);
}

/**
 * Accumulates blobs in one growing buffer (the repository seals and compresses before `add`), so
 * a finished pack is that buffer's prefix: no second copy of 32 MiB while it uploads.
 */
export class PackWriter {
  private buf: Buffer;
  private entries: PackEntry[] = [];
  private size = PACK_MAGIC.length;

  constructor(capacityHint = 1 << 20) {
    this.buf = Buffer.allocUnsafeSlow(Math.max(capacityHint, 64 << 10));
    PACK_MAGIC.copy(this.buf, 0);
  }

  private reserve(n: number): void {
    if (this.size + n <= this.buf.length) return;
    const grown = Buffer.allocUnsafeSlow(Math.max(this.size + n, Math.ceil(this.buf.length * 1.5)));
    this.buf.copy(grown, 0, 0, this.size);
    this.buf = grown;
  }

  get byteLength(): number {
    return this.size;
  }
  get count(): number {
    return this.entries.length;
  }

  add(id: Buffer, codec: number, stored: Buffer, rawLength: number): PackEntry {
    const entry: PackEntry = { id, codec, offset: this.size, storedLength: stored.length, rawLength };
    this.reserve(stored.length);
    stored.copy(this.buf, this.size);
    this.entries.push(entry);
    this.size += stored.length;
    return entry;
  }

  finish(aeadKey: Buffer | null): { name: string; bytes: Buffer; entries: PackEntry[] } {
    const desc = Buffer.allocUnsafe(8 + this.entries.length * PACK_ENTRY_SIZE);
    DESC_MAGIC.copy(desc, 0);
    desc.writeUInt32BE(this.entries.length, 4);
    let p = 8;
    for (const e of this.entries) {
      e.id.copy(desc, p);
      desc.writeUInt8(e.codec, p + 32);
      desc.writeUInt32BE(e.offset, p + 33);
      desc.writeUInt32BE(e.storedLength, p + 37);
      desc.writeUInt32BE(e.rawLength, p + 41);
      p += PACK_ENTRY_SIZE;
    }
    const storedDesc = aeadKey ? seal(aeadKey, desc, PACK_DESCRIPTION_AAD) : desc;
    const trailer = Buffer.allocUnsafe(PACK_TRAILER);
    trailer.writeUInt32BE(storedDesc.length, 0);
    END_MAGIC.copy(trailer, 4);
    this.reserve(storedDesc.length + trailer.length);
    storedDesc.copy(this.buf, this.size);
    trailer.copy(this.buf, this.size + storedDesc.length);
    const bytes = this.buf.subarray(0, this.size + storedDesc.length + trailer.length);
    return { name: contentHash(bytes).toString('hex'), bytes, entries: this.entries };
  }
}

/** Reads the trailer (last 8 bytes of a pack) and returns the stored description's length. */
export function parseTrailer(trailer: Buffer, packSize: number, pack: string): number {
  if (trailer.length !== PACK_TRAILER || !trailer.subarray(4).equals(END_MAGIC)) {
    throw new IntegrityError(`pack ${pack}: missing end marker (truncated or not a pack)`);
  }
  const d = trailer.readUInt32BE(0);
  if (d > MAX_DESCRIPTION || d + PACK_TRAILER + PACK_MAGIC.length > packSize) {
    throw new IntegrityError(`pack ${pack}: description length ${d} does not fit in ${packSize} bytes`);
  }
  return d;
}

export function parseDescription(stored: Buffer, packSize: number, aeadKey: Buffer | null, pack: string): PackEntry[] {
  const desc = aeadKey ? open(aeadKey, stored, PACK_DESCRIPTION_AAD, `pack ${pack} description`) : stored;
  if (desc.length < 8 || !desc.subarray(0, 4).equals(DESC_MAGIC)) {
    throw new IntegrityError(`pack ${pack}: description has a bad magic`);
  }
  const count = desc.readUInt32BE(4);
  if (desc.length !== 8 + count * PACK_ENTRY_SIZE) {
    throw new IntegrityError(`pack ${pack}: description says ${count} entries but holds ${desc.length - 8} bytes`);
  }
  const blobsEnd = packSize - PACK_TRAILER - stored.length;
  const entries: PackEntry[] = new Array<PackEntry>(count);
  let p = 8;
  for (let i = 0; i < count; i++, p += PACK_ENTRY_SIZE) {
    const e: PackEntry = {
      id: Buffer.from(desc.subarray(p, p + ID_SIZE)),
      codec: desc.readUInt8(p + 32),
      offset: desc.readUInt32BE(p + 33),
      storedLength: desc.readUInt32BE(p + 37),
      rawLength: desc.readUInt32BE(p + 41),
    };
    if (e.offset < PACK_MAGIC.length || e.offset + e.storedLength > blobsEnd) {
      throw new IntegrityError(`pack ${pack}: entry ${i} (${e.offset}+${e.storedLength}) lies outside the pack's blobs`);
    }
    if (e.rawLength > MAX_CHUNK_SIZE || e.storedLength > MAX_CHUNK_SIZE + 1024) {
      throw new IntegrityError(`pack ${pack}: entry ${i} claims ${e.rawLength} bytes, over the ${MAX_CHUNK_SIZE}-byte limit`);
    }
    try {
      codecName(e.codec);
    } catch {
      throw new FormatError(`pack ${pack}: entry ${i} uses unknown codec ${e.codec}`);
    }
    entries[i] = e;
  }
  return entries;
}

/** How much of a pack's end is read first: the description of a full pack fits, usually in one read. */
const TAIL_READ = 64 << 10;

/**
 * A pack's entries from its end alone: one ranged read of the last 64 KiB (a second one only for a
 * longer description), never the blobs. `read` fetches a byte range of the pack.
 */
export async function readPackEntries(
  read: (offset: number, length: number) => Promise<Buffer>,
  size: number,
  aeadKey: Buffer | null,
  pack: string,
): Promise<PackEntry[]> {
  if (size < PACK_TRAILER) throw new IntegrityError(`pack ${pack} is too short (${size} bytes)`);
  const tailLen = Math.min(size, TAIL_READ);
  let tail = await read(size - tailLen, tailLen);
  const d = parseTrailer(tail.subarray(tail.length - PACK_TRAILER), size, pack);
  if (d + PACK_TRAILER > tail.length) tail = await read(size - PACK_TRAILER - d, d + PACK_TRAILER);
  return parseDescription(tail.subarray(tail.length - PACK_TRAILER - d, tail.length - PACK_TRAILER), size, aeadKey, pack);
}
