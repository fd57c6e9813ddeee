/**
 * The chunk index: chunk id -> (pack, offset, stored length, raw length, codec).
 *
 * On the backend it is a set of immutable index files (`index/<hex BLAKE3 of the stored file>`),
 * each written after the packs it describes are durable. Loading the index reads all of them; an
 * entry seen twice (a chunk in two packs after an interrupted prune) keeps the first. Index files
 * may be lost or damaged: `rebuild-index` recreates them from pack descriptions.
 *
 *   index file plaintext (sealed with AAD "index" when encrypted):
 *     "VMSI"  u8 version (1)  be32 packCount  packCount × packName[32]
 *     be32 entryCount  entryCount × ( id[32] packIdx be32 offset be32 storedLength be32
 *                                     rawLength be32 codec u8 )            (53 bytes each)
 *     be32 supersededCount  supersededCount × indexName[32]
 *
 * "superseded" names index files that this one replaces (prune writes one full index and then deletes
 * the old ones; a crash between the two leaves duplicates, which loading tolerates).
 *
 * In memory the index is an open-addressing hash table over parallel typed arrays; it costs
 * 32 (id) + 4 (pack) + 4 (offset) + 4 (stored) + 4 (raw) + 1 (codec) = 49 bytes per chunk plus
 * 8-16 bytes of table slots (load factor 0.5 → 0.25), i.e. about 60 bytes per chunk: a 1 TiB
 * repository of 64 KiB chunks (16 Mi chunks) needs about 1 GiB; a desktop's 200 GiB about 200 MiB.
 */
import { FormatError, IntegrityError } from './errors.js';
import { open, seal } from './crypto.js';
import { ID_SIZE } from './hash.js';
import type { PackEntry } from './pack.js';

const INDEX_MAGIC = Buffer.from('VMSI');
const INDEX_VERSION = 1;
const ENTRY = 53;
export const INDEX_AAD = Buffer.from('index');
const MAX_INDEX_ENTRIES = 1 << 27;

export interface ChunkLocation {
  pack: string;
  offset: number;
  storedLength: number;
  rawLength: number;
  codec: number;
}

export class ChunkIndex {
  private ids: Buffer;
  private packOf: Uint32Array;
  private offsets: Uint32Array;
  private stored: Uint32Array;
  private raw: Uint32Array;
  private codecs: Uint8Array;
  private table: Int32Array; // slot -> entry index + 1 (0 = empty)
  private n = 0;
  private packNames: string[] = [];
  private packIds = new Map<string, number>();

  constructor(capacity = 1024) {
    capacity = Math.max(16, capacity);
    this.ids = Buffer.alloc(capacity * ID_SIZE);
    this.packOf = new Uint32Array(capacity);
    this.offsets = new Uint32Array(capacity);
    this.stored = new Uint32Array(capacity);
    this.raw = new Uint32Array(capacity);
    this.codecs = new Uint8Array(capacity);
    this.table = new Int32Array(nextPow2(capacity * 2));
  }

  get size(): number {
    return this.n;
  }

  /** Bytes of memory the index holds (for the bytes-per-chunk figure). */
  get memoryBytes(): number {
    return this.ids.length + this.packOf.byteLength * 4 + this.codecs.byteLength + this.table.byteLength;
  }

  packs(): string[] {
    return this.packNames.slice();
  }

  has(id: Uint8Array): boolean {
    return this.find(id) >= 0;
  }

  /** The entry's position (0..size-1, the order of `entries()`), or -1: lets callers keep one bit or byte per chunk. */
  ordinal(id: Uint8Array): number {
    return this.find(id);
  }

  get(id: Uint8Array): ChunkLocation | undefined {
    const i = this.find(id);
    if (i < 0) return undefined;
    return {
      pack: this.packNames[this.packOf[i]!]!,
      offset: this.offsets[i]!,
      storedLength: this.stored[i]!,
      rawLength: this.raw[i]!,
      codec: this.codecs[i]!,
    };
  }

  /** Adds an entry unless the id is already present (first location wins). Returns true if added. */
  add(id: Uint8Array, pack: string, e: Omit<PackEntry, 'id'>): boolean {
    if (this.find(id) >= 0) return false;
    if (this.n === this.packOf.length) this.grow();
    const p = this.packNumber(pack);
    const i = this.n++;
    this.ids.set(id.subarray(0, ID_SIZE), i * ID_SIZE);
    this.packOf[i] = p;
    this.offsets[i] = e.offset;
    this.stored[i] = e.storedLength;
    this.raw[i] = e.rawLength;
    this.codecs[i] = e.codec;
    this.insertSlot(i);
    return true;
  }

  *entries(): IterableIterator<{ id: Buffer } & ChunkLocation> {
    for (let i = 0; i < this.n; i++) yield this.entryAt(i);
  }

  /** Entry `i` (0..size-1); its id is a view into the index. */
  entryAt(i: number): { id: Buffer } & ChunkLocation {
    if (!(i >= 0 && i < this.n)) throw new RangeError(`index entry ${i} out of range (size ${this.n})`);
    return {
      id: this.ids.subarray(i * ID_SIZE, (i + 1) * ID_SIZE),
      pack: this.packNames[this.packOf[i]!]!,
      offset: this.offsets[i]!,
      storedLength: this.stored[i]!,
      rawLength: this.raw[i]!,
      codec: this.codecs[i]!,
    };
  }

  private find(id: Uint8Array, at = 0): number {
    const mask = this.table.length - 1;
    const ids = this.ids;
    const key = (id[at]! | (id[at + 1]! << 8) | (id[at + 2]! << 16) | (id[at + 3]! << 24)) >>> 0;
    for (let s = key & mask; ; s = (s + 1) & mask) {
      const v = this.table[s]!;
      if (v === 0) return -1;
      // A byte loop in JS: Buffer.compare is a native call per probe, which cost more than the
      // comparison itself (most probes differ in the first byte).
      const base = (v - 1) * ID_SIZE;
      let k = 0;
      while (k < ID_SIZE && ids[base + k] === id[at + k]) k++;
      if (k === ID_SIZE) return v - 1;
    }
  }

  /** Room for `more` entries without growing on the way (a grow rehashes everything). */
  reserve(more: number): void {
    if (this.n + more > this.packOf.length) this.grow(Math.max(this.packOf.length * 2, this.n + more));
  }

  /**
   * The entries of a validated index file, added in place from its bytes: loading the index is on
   * every command's path, and an object and a subarray per entry were most of its cost.
   * Each row's pack is its number in `packs` (checked by the caller). Returns how many were new.
   */
  addRows(buf: Buffer, at: number, count: number, entrySize: number, packs: readonly string[]): number {
    this.reserve(count);
    // A pack joins the list on its first new entry, as add() does.
    const packAt = new Int32Array(packs.length).fill(-1);
    let added = 0;
    for (let r = 0, p = at; r < count; r++, p += entrySize) {
      if (this.find(buf, p) >= 0) continue;
      const i = this.n++;
      buf.copy(this.ids, i * ID_SIZE, p, p + ID_SIZE);
      const k = buf.readUInt32BE(p + 32);
      if (packAt[k]! < 0) packAt[k] = this.packNumber(packs[k]!);
      this.packOf[i] = packAt[k]!;
      this.offsets[i] = buf.readUInt32BE(p + 36);
      this.stored[i] = buf.readUInt32BE(p + 40);
      this.raw[i] = buf.readUInt32BE(p + 44);
      this.codecs[i] = buf[p + 48]!;
      this.insertSlot(i);
      added++;
    }
    return added;
  }

  private packNumber(pack: string): number {
    let p = this.packIds.get(pack);
    if (p === undefined) {
      p = this.packNames.length;
      this.packNames.push(pack);
      this.packIds.set(pack, p);
    }
    return p;
  }

  private insertSlot(i: number): void {
    const mask = this.table.length - 1;
    const ids = this.ids;
    const b = i * ID_SIZE;
    let s = ((ids[b]! | (ids[b + 1]! << 8) | (ids[b + 2]! << 16) | (ids[b + 3]! << 24)) >>> 0) & mask;
    while (this.table[s] !== 0) s = (s + 1) & mask;
    this.table[s] = i + 1;
  }

  private grow(cap = this.packOf.length * 2): void {
    const ids = Buffer.alloc(cap * ID_SIZE);
    this.ids.copy(ids);
    this.ids = ids;
    const growU32 = (a: Uint32Array) => {
      const b = new Uint32Array(cap);
      b.set(a);
      return b;
    };
    this.packOf = growU32(this.packOf);
    this.offsets = growU32(this.offsets);
    this.stored = growU32(this.stored);
    this.raw = growU32(this.raw);
    const c = new Uint8Array(cap);
    c.set(this.codecs);
    this.codecs = c;
    this.table = new Int32Array(nextPow2(cap * 2));
    for (let i = 0; i < this.n; i++) this.insertSlot(i);
  }
}

function nextPow2(n: number): number {
  let p = 16;
  while (p < n) p *= 2;
  return p;
}

export interface IndexFileContent {
  packs: { pack: string; entries: PackEntry[] }[];
  superseded: string[];
}

export function encodeIndexFile(content: IndexFileContent, aeadKey: Buffer | null): Buffer {
  const total = content.packs.reduce((s, p) => s + p.entries.length, 0);
  function* rows(): Generator<IndexRow> {
    for (const p of content.packs) for (const e of p.entries) yield { pack: p.pack, ...e };
  }
  return encodeIndexRows(content.packs.map((p) => p.pack), total, rows(), content.superseded, aeadKey);
}

/** One index entry with its pack's name (what ChunkIndex.entries() yields). */
export interface IndexRow extends PackEntry {
  pack: string;
}

/**
 * An index file from `count` rows streamed in any order (each row's pack must be in `packs`), so a
 * caller holding millions of entries (prune) need not build an object per entry first.
 */
export function encodeIndexRows(packs: readonly string[], count: number, rows: Iterable<IndexRow>, superseded: readonly string[], aeadKey: Buffer | null): Buffer {
  const buf = Buffer.allocUnsafe(9 + packs.length * 32 + 4 + count * ENTRY + 4 + superseded.length * 32);
  INDEX_MAGIC.copy(buf, 0);
  buf.writeUInt8(INDEX_VERSION, 4);
  buf.writeUInt32BE(packs.length, 5);
  let p = 9;
  const ordinal = new Map<string, number>();
  packs.forEach((name, i) => {
    ordinal.set(name, i);
    p += Buffer.from(name, 'hex').copy(buf, p);
  });
  buf.writeUInt32BE(count, p);
  p += 4;
  let written = 0;
  for (const e of rows) {
    const pi = ordinal.get(e.pack);
    if (pi === undefined) throw new Error(`internal: index row names pack ${e.pack}, which is not in the pack list`);
    if (++written > count) throw new Error(`internal: more than the ${count} index rows announced`);
    buf.set(e.id.subarray(0, ID_SIZE), p);
    buf.writeUInt32BE(pi, p + 32);
    buf.writeUInt32BE(e.offset, p + 36);
    buf.writeUInt32BE(e.storedLength, p + 40);
    buf.writeUInt32BE(e.rawLength, p + 44);
    buf.writeUInt8(e.codec, p + 48);
    p += ENTRY;
  }
  if (written !== count) throw new Error(`internal: ${written} index rows, ${count} announced`);
  buf.writeUInt32BE(superseded.length, p);
  p += 4;
  for (const s of superseded) p += Buffer.from(s, 'hex').copy(buf, p);
  return aeadKey ? seal(aeadKey, buf, INDEX_AAD) : buf;
}

/** Parses an index file into `into`; returns the pack names it lists and the files it supersedes. */
export function decodeIndexFile(
  stored: Buffer,
  aeadKey: Buffer | null,
  name: string,
  into: ChunkIndex,
): { packs: string[]; superseded: string[]; entries: number } {
  const buf = aeadKey ? open(aeadKey, stored, INDEX_AAD, `index ${name}`) : stored;
  const need = (n: number, p: number) => {
    if (p + n > buf.length) throw new IntegrityError(`index ${name}: truncated at byte ${p}`);
  };
  need(9, 0);
  if (!buf.subarray(0, 4).equals(INDEX_MAGIC)) throw new IntegrityError(`index ${name}: bad magic`);
  const version = buf.readUInt8(4);
  if (version !== INDEX_VERSION) throw new FormatError(`index ${name}: unsupported index version ${version}`);
  const packCount = buf.readUInt32BE(5);
  let p = 9;
  need(packCount * 32 + 4, p);
  const packs: string[] = [];
  for (let i = 0; i < packCount; i++, p += 32) packs.push(buf.subarray(p, p + 32).toString('hex'));
  const entries = buf.readUInt32BE(p);
  p += 4;
  if (entries > MAX_INDEX_ENTRIES) throw new IntegrityError(`index ${name}: ${entries} entries is over the limit`);
  need(entries * ENTRY + 4, p);
  // Validate the whole file before adding anything: a rejected file must leave `into` untouched.
  const supAt = p + entries * ENTRY;
  const sup = buf.readUInt32BE(supAt);
  need(sup * 32, supAt + 4);
  if (supAt + 4 + sup * 32 !== buf.length) throw new IntegrityError(`index ${name}: trailing bytes`);
  for (let i = 0; i < entries; i++) {
    const pi = buf.readUInt32BE(p + i * ENTRY + 32);
    if (pi >= packCount) throw new IntegrityError(`index ${name}: entry ${i} names pack #${pi} of ${packCount}`);
  }
  into.addRows(buf, p, entries, ENTRY, packs);
  p += entries * ENTRY + 4;
  const superseded: string[] = [];
  for (let i = 0; i < sup; i++, p += 32) superseded.push(buf.subarray(p, p + 32).toString('hex'));
  return { packs, superseded, entries };
}
