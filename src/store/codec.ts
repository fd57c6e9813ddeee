/**
 * Per-chunk compression. Every stored chunk records its codec, so repositories can mix them and a
 * codec change never rewrites old data. A chunk is stored raw ("none") when compression would not
 * save at least 1/32 of it: decompressing buys nothing then.
 *
 * Codec ids are part of the on-disk format (pack descriptions, index files): never renumber.
 */
import * as lz4 from 'lz4';
import { compress as zstdCompress, decompress as zstdDecompress } from 'zstd-napi';
import zstdBinding from 'zstd-napi/binding.js';
import { FormatError, IntegrityError } from './errors.js';

export const CODECS = { none: 0, zstd: 1, lz4: 2 } as const;
export type CodecName = keyof typeof CODECS;
export type CodecId = (typeof CODECS)[CodecName];

export function codecId(name: string): CodecId {
  if (!Object.hasOwn(CODECS, name)) {
    throw new FormatError(`unknown codec ${JSON.stringify(name)} (expected one of: ${Object.keys(CODECS).join(', ')})`);
  }
  return CODECS[name as CodecName];
}

export function codecName(id: number): CodecName {
  for (const [name, v] of Object.entries(CODECS)) if (v === id) return name as CodecName;
  throw new FormatError(`unknown codec id ${id}`);
}

export interface Encoded {
  codec: CodecId;
  data: Buffer;
}

export function encode(preferred: CodecId, raw: Uint8Array, zstdLevel = 3): Encoded {
  const limit = raw.length - (raw.length >> 5);
  if (preferred === CODECS.zstd) {
    const out = zstdCompress(raw, { compressionLevel: zstdLevel });
    if (out.length < limit) return { codec: CODECS.zstd, data: out };
  } else if (preferred === CODECS.lz4) {
    const out = Buffer.allocUnsafe(lz4.encodeBound(raw.length));
    const n = lz4.encodeBlock(raw, out);
    if (n > 0 && n < limit) return { codec: CODECS.lz4, data: out.subarray(0, n) };
  }
  return { codec: CODECS.none, data: Buffer.from(raw.buffer, raw.byteOffset, raw.byteLength) };
}

/** Room `encodeInto` may need for `rawLength` bytes. */
export function encodeBound(rawLength: number): number {
  return Math.max(zstdBinding.compressBound(rawLength), lz4.encodeBound(rawLength), rawLength);
}

// One compression context per thread (module state is per worker): the convenience API keeps a
// context too, but returns a fresh Buffer per chunk, and in a worker that garbage is external
// memory V8 collects only after tens of MiB have piled up (peak RSS of ingest).
let cctx: InstanceType<typeof zstdBinding.CCtx> | null = null;

/**
 * Like `encode`, but writes into `dst` (at least `encodeBound(raw.length)` bytes) and allocates
 * nothing. Returns the codec used and the number of bytes written.
 */
export function encodeInto(preferred: CodecId, raw: Uint8Array, dst: Buffer, zstdLevel = 3): { codec: CodecId; length: number } {
  const limit = raw.length - (raw.length >> 5);
  if (preferred === CODECS.zstd) {
    cctx ??= new zstdBinding.CCtx();
    const n = cctx.compress(dst, raw, zstdLevel);
    if (n < limit) return { codec: CODECS.zstd, length: n };
  } else if (preferred === CODECS.lz4) {
    const n = lz4.encodeBlock(raw, dst);
    if (n > 0 && n < limit) return { codec: CODECS.lz4, length: n };
  }
  dst.set(raw, 0);
  return { codec: CODECS.none, length: raw.length };
}

let dctx: InstanceType<typeof zstdBinding.DCtx> | null = null;

/**
 * Decodes a stored chunk into `dst`, which must be exactly its plaintext length: one-shot
 * decompression with a reused context, straight into the caller's buffer (export's hot path).
 */
export function decodeInto(codec: number, stored: Uint8Array, dst: Buffer): void {
  switch (codec) {
    case CODECS.none:
      if (stored.length !== dst.length) throw new IntegrityError(`raw chunk is ${stored.length} bytes, expected ${dst.length}`);
      dst.set(stored, 0);
      return;
    case CODECS.zstd: {
      dctx ??= new zstdBinding.DCtx();
      let n: number;
      try {
        n = dctx.decompress(dst, stored);
      } catch (err) {
        throw new IntegrityError(`zstd chunk does not decompress: ${(err as Error).message}`);
      }
      if (n !== dst.length) throw new IntegrityError(`zstd chunk decompressed to ${n} bytes, expected ${dst.length}`);
      return;
    }
    case CODECS.lz4: {
      const n = lz4.decodeBlock(stored, dst);
      if (n !== dst.length) throw new IntegrityError(`lz4 chunk decompressed to ${n} bytes, expected ${dst.length}`);
      return;
    }
    default:
      throw new FormatError(`unknown codec id ${codec}`);
  }
}

/** Decodes a stored chunk whose plaintext must be exactly `rawLength` bytes. */
export function decode(codec: number, stored: Uint8Array, rawLength: number): Buffer {
  switch (codec) {
    case CODECS.none:
      if (stored.length !== rawLength) throw new IntegrityError(`raw chunk is ${stored.length} bytes, expected ${rawLength}`);
      return Buffer.from(stored.buffer, stored.byteOffset, stored.byteLength);
    case CODECS.zstd: {
      let out: Buffer;
      try {
        out = zstdDecompress(stored);
      } catch (err) {
        throw new IntegrityError(`zstd chunk does not decompress: ${(err as Error).message}`);
      }
      if (out.length !== rawLength) throw new IntegrityError(`zstd chunk decompressed to ${out.length} bytes, expected ${rawLength}`);
      return out;
    }
    case CODECS.lz4: {
      const out = Buffer.allocUnsafe(rawLength);
      const n = lz4.decodeBlock(stored, out);
      if (n !== rawLength) throw new IntegrityError(`lz4 chunk decompressed to ${n} bytes, expected ${rawLength}`);
      return out;
    }
    default:
      throw new FormatError(`unknown codec id ${codec}`);
  }
}
