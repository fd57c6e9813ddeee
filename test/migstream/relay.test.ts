import { describe, expect, it } from 'vitest';
import { MigStreamRelay, MigrationStreamError, type RelayPiece } from '../../src/migstream/index.js';
import { chunked, guestStream, PS } from '../helpers/migstream-synth.js';

/** Feeds `stream` in chunks of `sizes`, cutting pages chosen by `cut`; returns the reassembled bytes. */
function relay(stream: Buffer, sizes: number[], cut: (offset: number) => boolean): { bytes: Buffer; cut: number; raw: number } {
  const r = new MigStreamRelay();
  const parts: Buffer[] = [];
  let nCut = 0;
  let raw = 0;
  const out = (p: RelayPiece): void => {
    if (p.kind === 'raw') {
      raw += p.bytes.length;
      parts.push(Buffer.from(p.bytes));
    } else {
      nCut++;
      expect(p.record.data.length).toBe(PS);
      expect(stream.subarray(p.record.at, p.record.at + PS).equals(p.record.data)).toBe(true);
      parts.push(Buffer.from(p.record.data));
    }
  };
  for (const c of chunked(stream, sizes)) r.push(c, (rec) => cut(rec.offset), out);
  r.finish();
  return { bytes: Buffer.concat(parts), cut: nCut, raw };
}

describe('MigStreamRelay: pieces reassemble to exactly the input', () => {
  it('at any chunking, cutting every page, some pages or none', async () => {
    const stream = await guestStream(300);
    for (const sizes of [[stream.length], [1], [7, 4096, 3], [4095, 4097], [65536]]) {
      const all = relay(stream, sizes, () => true);
      expect(all.bytes.equals(stream)).toBe(true);
      expect(all.cut).toBe(300 - 75); // one page in four is a ZERO record: never cut
      const some = relay(stream, sizes, (off) => (off / PS) % 3 === 1);
      expect(some.bytes.equals(stream)).toBe(true);
      const none = relay(stream, sizes, () => false);
      expect(none.bytes.equals(stream)).toBe(true);
      expect(none.cut).toBe(0);
    }
  });

  it('a page straddling two chunks is handed out only once it is complete', async () => {
    const stream = await guestStream(8);
    const r = new MigStreamRelay();
    const pieces: RelayPiece[] = [];
    // Cut in the middle of the second page's data.
    const mid = stream.indexOf(Buffer.from([0x08]), 300) + 2000;
    r.push(stream.subarray(0, mid), () => true, (p) => pieces.push(p));
    const before = pieces.reduce((a, p) => a + (p.kind === 'raw' ? p.bytes.length : PS), 0);
    expect(before).toBeLessThan(mid);
    r.push(stream.subarray(mid), () => true, (p) => pieces.push(p));
    r.finish();
  });

  it('a truncated stream is refused at finish, naming where it stopped', async () => {
    const stream = await guestStream(16);
    const r = new MigStreamRelay();
    r.push(stream.subarray(0, stream.length - 300), () => false, () => undefined);
    expect(() => r.finish()).toThrow(MigrationStreamError);
  });
});
