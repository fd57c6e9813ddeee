import { describe, expect, it } from 'vitest';
import { randomBytes } from 'node:crypto';
import { MAX_RECORD_PLAINTEXT } from '../../src/migration/channel.js';
import { BLOCK_HASH_BYTES, HAVE_DISK_HASHES_PER_MESSAGE, haveDiskMessages, readHaveDisk } from '../../src/migration/protocol.js';

describe('HAVE_DISK: what the destination holds of a disk, in records', () => {
  // A 4 GiB disk at 64 KiB blocks: 65,536 hashes (2 MiB), more than one record holds. The return
  // trip of the 4 GiB bench disk failed with "malformed HAVE_DISK" when the split was fractional.
  it('splits a large disk into whole hashes that fit a record, and reads them back in place', () => {
    const blocks = 65_536 + 17;
    const all = randomBytes(blocks * BLOCK_HASH_BYTES);
    const back = Buffer.alloc(all.length);
    let messages = 0;
    for (const [head, hashes] of haveDiskMessages(3, all)) {
      messages++;
      const body = Buffer.concat([head, hashes]);
      expect(body.length).toBeLessThanOrEqual(MAX_RECORD_PLAINTEXT - 1);
      const m = readHaveDisk(body, (d) => (d === 3 ? blocks : undefined));
      expect(m.disk).toBe(3);
      m.hashes.copy(back, m.firstBlock * BLOCK_HASH_BYTES);
    }
    expect(messages).toBe(Math.ceil(blocks / HAVE_DISK_HASHES_PER_MESSAGE));
    expect(back.equals(all)).toBe(true);
  });

  it('refuses a torn hash, an unknown disk, and hashes beyond the disk, naming which', () => {
    const head = (disk: number, first: number): Buffer => {
      const h = Buffer.alloc(6);
      h.writeUInt16BE(disk, 0);
      h.writeUInt32BE(first, 2);
      return h;
    };
    const blocksOf = (d: number): number | undefined => (d === 0 ? 10 : undefined);
    expect(() => readHaveDisk(Buffer.concat([head(0, 0), Buffer.alloc(BLOCK_HASH_BYTES + 1)]), blocksOf)).toThrow(/malformed HAVE_DISK/);
    expect(() => readHaveDisk(Buffer.alloc(5), blocksOf)).toThrow(/malformed HAVE_DISK/);
    expect(() => readHaveDisk(Buffer.concat([head(1, 0), Buffer.alloc(BLOCK_HASH_BYTES)]), blocksOf)).toThrow(/unknown disk #1/);
    expect(() => readHaveDisk(Buffer.concat([head(0, 9), Buffer.alloc(2 * BLOCK_HASH_BYTES)]), blocksOf)).toThrow(/beyond the disk/);
    expect(readHaveDisk(Buffer.concat([head(0, 8), Buffer.alloc(2 * BLOCK_HASH_BYTES)]), blocksOf).count).toBe(2);
  });
});
