import { describe, expect, it } from 'vitest';
import { randomBytes } from 'node:crypto';
import { CODECS, encode } from '../../src/store/codec.js';
import { decode } from '../../src/store/codec.js';
import { assembleRamMix, PAGE_HASH_BYTES, ramMixHead, readRamMix } from '../../src/migration/protocol.js';
import { MIX_VERSION, negotiateVersion, PROTOCOL_VERSION_MAX } from '../../src/migration/version.js';

const PAGE = 4096;

describe('RAM_MIX: raw stream bytes and page references in one record', () => {
  it('round-trips: the stream is the raw bytes with each held page put back where it was cut', () => {
    // A stream like QEMU's: an 8-byte header before every page; pages 1 and 2 (adjacent) and 4 are held.
    const pages = Array.from({ length: 5 }, () => randomBytes(PAGE));
    const headers = Array.from({ length: 5 }, () => randomBytes(8));
    const stream = Buffer.concat(pages.flatMap((p, i) => [headers[i]!, p]));
    const held = new Set([1, 2, 4]);
    const raw: Buffer[] = [];
    const at: number[] = [];
    const hashes: Buffer[] = [];
    let rawLen = 0;
    pages.forEach((p, i) => {
      raw.push(headers[i]!);
      rawLen += 8;
      if (held.has(i)) {
        at.push(rawLen);
        hashes.push(randomBytes(PAGE_HASH_BYTES));
      } else {
        raw.push(p);
        rawLen += PAGE;
      }
    });
    const bytes = Buffer.concat(raw);
    for (const codec of [CODECS.none, CODECS.zstd, CODECS.lz4]) {
      const enc = encode(codec, bytes, 1);
      const body = Buffer.concat([ramMixHead(at, hashes, enc.codec, bytes.length), enc.data]);
      const m = readRamMix(body);
      expect([...m.at]).toEqual(at);
      expect(m.hashes.equals(Buffer.concat(hashes))).toBe(true);
      const heldPages = Buffer.concat([...held].map((i) => pages[i]!));
      expect(assembleRamMix(m.at, decode(m.codec, m.payload, m.length), heldPages, PAGE).equals(stream)).toBe(true);
    }
  });

  it('a record of raw bytes only, and one of references only', () => {
    const bytes = randomBytes(100);
    const m = readRamMix(Buffer.concat([ramMixHead([], [], CODECS.none, bytes.length), bytes]));
    expect(m.at.length).toBe(0);
    expect(assembleRamMix(m.at, decode(m.codec, m.payload, m.length), Buffer.alloc(0), PAGE).equals(bytes)).toBe(true);
    const p = randomBytes(2 * PAGE);
    const r = readRamMix(ramMixHead([0, 0], [randomBytes(16), randomBytes(16)], CODECS.none, 0));
    expect(assembleRamMix(r.at, decode(r.codec, r.payload, r.length), p, PAGE).equals(p)).toBe(true);
  });

  it('refuses offsets out of order or beyond the bytes, and a count the record cannot hold', () => {
    const h = [randomBytes(16), randomBytes(16)];
    expect(() => readRamMix(Buffer.concat([ramMixHead([8, 4], h, CODECS.none, 16), Buffer.alloc(16)]))).toThrow(/out of order or beyond/);
    expect(() => readRamMix(Buffer.concat([ramMixHead([4, 17], h, CODECS.none, 16), Buffer.alloc(16)]))).toThrow(/out of order or beyond/);
    const lying = ramMixHead([0], [h[0]!], CODECS.none, 0);
    lying.writeUInt32BE(1_000_000, 0);
    expect(() => readRamMix(lying)).toThrow(/malformed RAM_MIX/);
    expect(() => readRamMix(Buffer.alloc(3))).toThrow(/malformed RAM_MIX/);
  });

  it('is spoken from version 3; a version-2 peer still agrees on 2 (RAM_RAW and RAM_REF)', () => {
    expect(MIX_VERSION).toBe(3);
    expect(PROTOCOL_VERSION_MAX).toBeGreaterThanOrEqual(MIX_VERSION);
    expect(negotiateVersion({ min: 1, max: 2 }, { min: 1, max: PROTOCOL_VERSION_MAX })).toBe(2);
  });
});
