import { promises as fsp } from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { Readable } from 'node:stream';
import { describe, expect, it } from 'vitest';
import {
  buildStream,
  MigrationBuildError,
  MigrationStreamError,
  MigStreamParser,
  migrationStreamEvents,
  parseMigrationStream,
  parsePrefix,
  type PageRecord,
  type RebuildPage,
} from '../../src/migstream/index.js';
import { PS, be32, be64, chunked, guestPage, guestStream, makePrefix, makeSuffix, pageData, str8 } from '../helpers/migstream-synth.js';

const BLOCKS: Array<[string, number]> = [
  ['pc.ram', 64 * PS],
  ['pc.bios', 4 * PS],
];

function samplePages(): RebuildPage[] {
  const pages: RebuildPage[] = [];
  for (let i = 0; i < 64; i++) {
    pages.push(i % 3 === 0 ? { block: 0, offset: i * PS, kind: 'zero' } : { block: 0, offset: i * PS, kind: 'page', data: pageData(i) });
  }
  for (let i = 0; i < 4; i++) pages.push({ block: 'pc.bios', offset: i * PS, kind: 'page', data: pageData(1000 + i) });
  return pages;
}

async function collect(r: Readable): Promise<Buffer> {
  const parts: Buffer[] = [];
  for await (const c of r) parts.push(c as Buffer);
  return Buffer.concat(parts);
}

interface Parsed {
  records: Array<{ block: number; offset: number; kind: string; data?: string }>;
  prefix: Buffer;
  suffix: Buffer;
  commands: Buffer[];
}

function parseSync(buf: Buffer, sizes: number[] = [buf.length]): Parsed {
  const p = new MigStreamParser();
  const records: Parsed['records'] = [];
  for (const c of chunked(buf, sizes)) {
    p.push(c);
    for (const r of p.takeBatch()) {
      records.push({ block: r.block, offset: r.offset, kind: r.kind, data: r.data?.toString('hex') });
    }
  }
  const tail = p.finish();
  return { records, prefix: p.streamPrefix?.bytes ?? Buffer.alloc(0), suffix: tail.suffix, commands: tail.commands };
}

function parseError(buf: Buffer): MigrationStreamError {
  try {
    parseSync(buf, [4096 + 17]);
  } catch (e) {
    if (e instanceof MigrationStreamError) return e;
    throw e;
  }
  throw new Error('expected MigrationStreamError, stream was accepted');
}

describe('migration stream parser + rebuilder (synthetic streams)', () => {
  const prefix = makePrefix(BLOCKS);
  const suffix = makeSuffix();

  it('round-trips prefix, pages and suffix at every chunking', async () => {
    const stream = await collect(buildStream(prefix, samplePages(), suffix, { pagesPerSection: 10 }));
    const whole = parseSync(stream);
    expect(whole.prefix.equals(prefix)).toBe(true);
    expect(whole.suffix.equals(suffix)).toBe(true);
    expect(whole.records).toHaveLength(68);
    expect(whole.records.filter((r) => r.kind === 'zero')).toHaveLength(22);
    expect(whole.records[1]).toEqual({ block: 0, offset: PS, kind: 'page', data: pageData(1).toString('hex') });
    expect(whole.records[67]).toEqual({ block: 1, offset: 3 * PS, kind: 'page', data: pageData(1003).toString('hex') });
    for (const sizes of [[1], [7], [4095, 4097], [5, 8, 9, 4104, 3], [65536]]) {
      expect(parseSync(stream, sizes)).toEqual(whole);
    }
  });

  it('handles offsets past 4 GiB (be64 split into 32-bit halves)', async () => {
    const big = makePrefix([['pc.ram', 8n << 30n], ['pc.bios', 4 * PS]]);
    const off = 5 * 2 ** 30 + 3 * PS;
    const last = 8 * 2 ** 30 - PS;
    const pages: RebuildPage[] = [
      { block: 0, offset: off, kind: 'page', data: pageData(5) },
      { block: 0, offset: last, kind: 'zero' },
      { block: 1, offset: 0, kind: 'zero' },
    ];
    const r = parseSync(await collect(buildStream(big, pages, suffix)), [100]);
    expect(r.records.map((x) => [x.block, x.offset, x.kind])).toEqual([
      [0, off, 'page'],
      [0, last, 'zero'],
      [1, 0, 'zero'],
    ]);
    expect(r.records[0]?.data).toBe(pageData(5).toString('hex'));
    await expect(collect(buildStream(big, [{ block: 0, offset: 8 * 2 ** 30, kind: 'zero' }], suffix))).rejects.toThrow(
      MigrationBuildError,
    );
  });

  it('parsePrefix recovers the block list; a truncated prefix is refused', () => {
    const p = parsePrefix(prefix);
    expect(p.blocks).toEqual([
      { name: 'pc.ram', usedLength: 64 * PS },
      { name: 'pc.bios', usedLength: 4 * PS },
    ]);
    expect(p.ramSectionId).toBe(1);
    expect(p.machine).toBe('pc-i440fx-10.0');
    expect(() => parsePrefix(prefix.subarray(0, prefix.length - 1))).toThrow(MigrationStreamError);
  });

  it('delivers resent pages in stream order (the last one wins), with CONTINUE across sections', async () => {
    // Hand-written like QEMU's live migration: PART, PART (first record CONTINUE), COMMAND, END.
    const rec = (off: number, flags: number, name?: string, data?: Buffer): Buffer =>
      Buffer.concat([be64(off + flags), name ? str8(name) : Buffer.alloc(0), data ?? Buffer.from([0])]);
    const eos = Buffer.concat([be64(0x10), Buffer.from([0x7e]), be32(1)]);
    const stream = Buffer.concat([
      prefix,
      Buffer.from([2]), be32(1), rec(0, 0x08, 'pc.ram', pageData(1)), rec(PS, 0x02 | 0x20), eos,
      Buffer.from([2]), be32(1), rec(0, 0x08 | 0x20, undefined, pageData(2)), eos,
      Buffer.from([8, 0, 11, 0, 0]),
      Buffer.from([3]), be32(1), rec(0, 0x08 | 0x20, undefined, pageData(3)), rec(0, 0x02, 'pc.bios'), eos,
      suffix,
    ]);
    const r = parseSync(stream, [13]);
    expect(r.records.map((x) => [x.block, x.offset, x.kind])).toEqual([
      [0, 0, 'page'],
      [0, PS, 'zero'],
      [0, 0, 'page'],
      [0, 0, 'page'],
      [1, 0, 'zero'],
    ]);
    const final = new Map<string, string | undefined>();
    for (const x of r.records) final.set(`${x.block}:${x.offset}`, x.data);
    expect(final.get('0:0')).toBe(pageData(3).toString('hex'));
    expect(r.commands).toEqual([Buffer.from([8, 0, 11, 0, 0])]);
    expect(r.suffix.equals(suffix)).toBe(true);
  });

  it('async driver applies backpressure and the iterator form yields the same records', async () => {
    const stream = await collect(buildStream(prefix, samplePages(), suffix));
    let inFlight = 0;
    let maxInFlight = 0;
    let n = 0;
    const res = await parseMigrationStream(Readable.from(chunked(stream, [3000])), {
      async onPages(batch: readonly PageRecord[]) {
        maxInFlight = Math.max(maxInFlight, ++inFlight);
        n += batch.length;
        await new Promise((r) => setImmediate(r));
        inFlight--;
      },
    });
    expect(maxInFlight).toBe(1);
    expect(n).toBe(68);
    expect(res.stats.pageRecords + res.stats.zeroRecords).toBe(68);
    let m = 0;
    let sawPrefix = false;
    for await (const ev of migrationStreamEvents(Readable.from(chunked(stream, [777])))) {
      if (ev.type === 'prefix') sawPrefix = true;
      if (ev.type === 'pages') m += ev.pages.length;
      if (ev.type === 'end') expect(ev.tail.trailer).toBe('vmdesc');
    }
    expect(sawPrefix).toBe(true);
    expect(m).toBe(68);
  });

  describe('hostile streams are refused with MigrationStreamError', () => {
    const rec0 = prefix.length + 5; // first record of the first PART section
    let stream: Buffer;
    it('setup', async () => {
      stream = await collect(buildStream(prefix, samplePages().slice(0, 3), suffix));
      expect(parseSync(stream).records).toHaveLength(3);
    });
    const mutate = (f: (b: Buffer) => Buffer | void): Buffer => {
      const b = Buffer.from(stream);
      return f(b) ?? b;
    };

    it('truncated anywhere', () => {
      for (let cut = 0; cut < stream.length; cut += cut < 400 ? 1 : 97) {
        const e = parseError(stream.subarray(0, cut));
        expect(e.message).toMatch(/truncated|not valid JSON/);
      }
    });
    it('bad magic / bad version', () => {
      expect(parseError(mutate((b) => void b.write('QEVX', 0))).message).toMatch(/bad magic/);
      expect(parseError(mutate((b) => void b.writeUInt32BE(2, 4))).message).toMatch(/version 2/);
    });
    it('unsupported RAM flags: XBZRLE, COMPRESS, MULTIFD_FLUSH, HOOK, unknown', () => {
      for (const [flag, name] of [[0x40, 'XBZRLE'], [0x100, 'COMPRESS'], [0x200, 'MULTIFD_FLUSH'], [0x80, 'HOOK'], [0x800, 'unknown']] as const) {
        const e = parseError(mutate((b) => void b.writeUInt32BE((b.readUInt32BE(rec0 + 4) | flag) >>> 0, rec0 + 4)));
        expect(e.message).toContain(name);
        expect(e.offset).toBe(rec0);
      }
      // neither ZERO nor PAGE
      expect(parseError(mutate((b) => void b.writeUInt32BE(0x20, rec0 + 4))).message).toMatch(/neither ZERO nor PAGE/);
    });
    it('unknown block, CONTINUE without a block, offset past the block, offset >= 2^53', () => {
      expect(parseError(mutate((b) => void b.write('pc.rax', rec0 + 9))).message).toMatch(/unknown RAM block "pc.rax"/);
      expect(parseError(mutate((b) => void b.writeUInt32BE((b.readUInt32BE(rec0 + 4) | 0x20) >>> 0, rec0 + 4))).message).toMatch(
        /CONTINUE record without a previous block|unsupported|unknown/,
      );
      const past = parseError(mutate((b) => void b.writeUInt32BE(64 * PS + 0x02, rec0 + 4)));
      expect(past.message).toMatch(/beyond block "pc.ram"/);
      expect(parseError(mutate((b) => void b.writeUInt32BE(0x200000, rec0))).message).toMatch(/2\^53/);
    });
    it('huge or bad lengths in the header', () => {
      expect(parseError(mutate((b) => void b.writeUInt32BE(0x7fffffff, 9))).message).toMatch(/machine type name length/);
      const bigBlock = makePrefix([['pc.ram', 2n ** 60n]]);
      expect(() => parsePrefix(bigBlock)).toThrow(/2\^53/);
      const odd = makePrefix([['pc.ram', 5000], ['pc.bios', 3192]]);
      expect(() => parsePrefix(odd)).toThrow(/multiple of 4096/);
    });
    it('unknown section types, bad footers, non-zero ZERO fill, unsupported COMMANDs, capabilities', () => {
      expect(parseError(mutate((b) => void (b[prefix.length] = 0x09))).message).toMatch(/unknown section type 0x9/);
      const eosAt = stream.indexOf(Buffer.concat([be64(0x10), Buffer.from([0x7e]), be32(1)]), prefix.length);
      expect(parseError(mutate((b) => void (b[eosAt + 8] = 0x7d))).message).toMatch(/missing section footer/);
      expect(parseError(mutate((b) => void b.writeUInt32BE(7, eosAt + 9))).message).toMatch(/footer for id 7/);
      // first sample page is a ZERO record: its fill byte follows the 9+6 byte header
      expect(parseError(mutate((b) => void (b[rec0 + 15] = 1))).message).toMatch(/fill byte 1/);
      const withCmd = Buffer.concat([stream.subarray(0, eosAt + 13), Buffer.from([8, 0, 5, 0, 0]), stream.subarray(eosAt + 13)]);
      expect(parseError(withCmd).message).toMatch(/unsupported COMMAND 5/);
      const caps = Buffer.concat([
        prefix.subarray(0, 8 + 5 + 14),
        Buffer.from([5]), str8('configuration/capabilities'), be32(1), be32(1), str8('x-ignore-shared'),
        prefix.subarray(8 + 5 + 14),
      ]);
      expect(parseError(caps).message).toMatch(/x-ignore-shared/);
      const devFirst = Buffer.concat([prefix.subarray(0, 8 + 5 + 14), Buffer.from([4])]);
      expect(parseError(devFirst).message).toMatch(/before RAM START/);
    });
    it('device state without a vmdesc trailer is refused unless allowed', () => {
      const bare = Buffer.concat([stream.subarray(0, stream.length - suffix.length), suffix.subarray(0, suffix.indexOf(Buffer.from([0, 6])) + 1)]);
      expect(parseError(bare).message).toMatch(/no EOF \+ vmdesc trailer/);
      const p = new MigStreamParser({ allowMissingVmdesc: true });
      p.push(bare);
      expect(p.finish().trailer).toBe('eof');
    });
    it('builder refuses pages that do not fit the prefix', async () => {
      await expect(collect(buildStream(prefix, [{ block: 'nope', offset: 0, kind: 'zero' }], suffix))).rejects.toThrow(MigrationBuildError);
      await expect(collect(buildStream(prefix, [{ block: 1, offset: 4 * PS, kind: 'zero' }], suffix))).rejects.toThrow(/used_length/);
      await expect(collect(buildStream(prefix, [{ block: 0, offset: 5, kind: 'zero' }], suffix))).rejects.toThrow(MigrationBuildError);
      await expect(collect(buildStream(prefix, [{ block: 0, offset: 0, kind: 'page', data: Buffer.alloc(10) }], suffix))).rejects.toThrow(
        /4096 bytes/,
      );
    });
  });

  // Throughput is measured by bench/migstream/run.ts (figures in bench/migstream/RESULTS.md); this
  // test only checks that a guest-sized stream comes through whole, both in memory and from a socket.
  it('parses a 256 MiB guest stream whole: every page once, in order, with its own bytes', async () => {
    const pagesN = 65536;
    const stream = await guestStream(pagesN);
    const expectPage = (r: PageRecord, i: number): void => {
      const want = guestPage(i);
      const badBytes = want.data !== undefined && !r.data?.equals(want.data);
      if (r.block !== 0 || r.offset !== want.offset || r.kind !== want.kind || badBytes) {
        expect.fail(`record ${i}: got ${r.kind} at block ${r.block} offset ${r.offset}, want ${want.kind} at ${want.offset}${badBytes ? ' (its bytes differ)' : ''}`);
      }
    };

    const p = new MigStreamParser();
    let n = 0;
    for (const c of chunked(stream, [65536])) {
      p.push(c);
      for (const r of p.takeBatch()) expectPage(r, n++);
    }
    expect(p.finish().trailer).toBe('vmdesc');
    expect(n).toBe(pagesN);

    // As in a capture: unix socket → parseMigrationStream → a sink that copies each page.
    const dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'vmsnap-migbig-'));
    const sockPath = path.join(dir, 's');
    const server = net.createServer((c) => {
      c.on('error', () => undefined);
      c.end(stream);
    });
    try {
      await new Promise<void>((r) => server.listen(sockPath, r));
      let m = 0;
      let copied = 0;
      const res = await parseMigrationStream(net.createConnection({ path: sockPath }), {
        onPages(batch) {
          for (const r of batch) {
            expectPage(r, m++);
            if (r.data) copied += Buffer.from(r.data).length;
          }
        },
      });
      expect(m).toBe(pagesN);
      expect(res.stats.bytes).toBe(stream.length);
      expect(res.stats.pageRecords).toBe((pagesN * 3) / 4);
      expect(res.stats.zeroRecords).toBe(pagesN / 4);
      expect(copied).toBe((pagesN * 3 * PS) / 4);
      expect(res.tail.trailer).toBe('vmdesc');
    } finally {
      await new Promise((r) => server.close(r));
      await fsp.rm(dir, { recursive: true, force: true });
    }
  });
});
