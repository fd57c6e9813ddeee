/**
 * Rebuilds a loadable migration stream from a stored snapshot:
 *
 *   prefix (verbatim)                                   magic … RAM START footer
 *   { 02 id  record*  be64(EOS)  7e id }*               PART sections, ≤ pagesPerSection records each
 *   commands (verbatim, e.g. switchover-start)
 *   suffix (verbatim)                                   device FULL sections, EOF, vmdesc
 *
 *   record := be64(offset | flags) [u8 len, block name] (u8 0 | 4096 bytes)
 *
 * CONTINUE (0x20) is set only for a record whose predecessor in the same section named the same
 * block — QEMU tracks the last block across sections, but restarting per section is also valid
 * and keeps every section self-describing. Zero pages are always written as ZERO records: leaving
 * them out only works on a destination whose RAM is already zero (see shared/README). Pages may
 * come in any order; each page should be given once (a repeat simply overwrites on load).
 */
import { Readable } from 'node:stream';
import {
  MigrationBuildError,
  PAGE_SIZE,
  RAM_CONTINUE,
  RAM_EOS,
  RAM_PAGE,
  RAM_ZERO,
  SEC_FOOTER,
  SEC_PART,
} from './format.js';
import { parsePrefix } from './parser.js';

export interface RebuildPage {
  /** Block index in the prefix's block list, or the block name. */
  block: number | string;
  offset: number;
  kind: 'page' | 'zero';
  /** 4096 bytes when kind is 'page'. */
  data?: Uint8Array;
}

export interface BuildOptions {
  /** COMMAND sections to replay after the RAM data (StreamTail.commands). */
  commands?: readonly Buffer[];
  /** Records per PART section. */
  pagesPerSection?: number;
  /** Size of the output chunks. */
  chunkBytes?: number;
}

const MAX_RECORD = 8 + 1 + 255 + PAGE_SIZE;
const SECTION_TRAILER = 8 + 5;
const TWO32 = 4294967296;

/** Returns a Readable of the rebuilt stream; errors (bad page, bad prefix) surface as stream errors. */
export function buildStream(
  prefix: Buffer,
  pages: AsyncIterable<RebuildPage> | Iterable<RebuildPage>,
  suffix: Buffer,
  opts: BuildOptions = {},
): Readable {
  return Readable.from(generate(prefix, pages, suffix, opts), { objectMode: false, highWaterMark: 4 << 20 });
}

async function* generate(
  prefixBytes: Buffer,
  pages: AsyncIterable<RebuildPage> | Iterable<RebuildPage>,
  suffix: Buffer,
  opts: BuildOptions,
): AsyncGenerator<Buffer, void, undefined> {
  const prefix = parsePrefix(prefixBytes);
  const blocks = prefix.blocks;
  const names = blocks.map((b) => Buffer.from(b.name, 'latin1'));
  const byName = new Map(blocks.map((b, i) => [b.name, i] as const));
  const sid = prefix.ramSectionId;
  const perSection = Math.max(1, opts.pagesPerSection ?? 4096);
  const chunkBytes = Math.max(opts.chunkBytes ?? 1 << 20, MAX_RECORD + 2 * SECTION_TRAILER + 5);

  yield prefixBytes;
  let out = Buffer.allocUnsafe(chunkBytes);
  let o = 0;
  let inSection = 0; // records in the open section, 0 = no section open
  let sections = 0;
  let last = -1;

  const openSection = (): void => {
    out[o] = SEC_PART;
    out.writeUInt32BE(sid, o + 1);
    o += 5;
    last = -1;
  };
  const closeSection = (): void => {
    out.writeUInt32BE(0, o);
    out.writeUInt32BE(RAM_EOS, o + 4);
    out[o + 8] = SEC_FOOTER;
    out.writeUInt32BE(sid, o + 9);
    o += SECTION_TRAILER;
    inSection = 0;
    sections++;
  };

  for await (const pg of pages) {
    const bi = typeof pg.block === 'number' ? pg.block : (byName.get(pg.block) ?? -1);
    const blk = blocks[bi];
    if (!blk) throw new MigrationBuildError(`page for unknown RAM block ${JSON.stringify(pg.block)}`);
    const off = pg.offset;
    if (!Number.isSafeInteger(off) || off < 0 || off % PAGE_SIZE !== 0 || off + PAGE_SIZE > blk.usedLength) {
      throw new MigrationBuildError(
        `page offset ${off} is not a page-aligned offset inside block ${blk.name} (used_length ${blk.usedLength})`,
      );
    }
    let flags: number;
    if (pg.kind === 'zero') flags = RAM_ZERO;
    else if (pg.kind === 'page') {
      if (!pg.data || pg.data.length !== PAGE_SIZE) {
        throw new MigrationBuildError(`page ${blk.name}+${off}: data must be ${PAGE_SIZE} bytes`);
      }
      flags = RAM_PAGE;
    } else {
      throw new MigrationBuildError(`page ${blk.name}+${off}: unknown kind ${String(pg.kind)}`);
    }
    if (o + 5 + MAX_RECORD + SECTION_TRAILER > out.length) {
      yield out.subarray(0, o);
      out = Buffer.allocUnsafe(chunkBytes);
      o = 0;
    }
    if (inSection === 0) openSection();
    const cont = bi === last;
    out.writeUInt32BE(Math.floor(off / TWO32), o);
    out.writeUInt32BE(((off % TWO32) | flags | (cont ? RAM_CONTINUE : 0)) >>> 0, o + 4);
    o += 8;
    if (!cont) {
      const nm = names[bi] as Buffer;
      out[o] = nm.length;
      nm.copy(out, o + 1);
      o += 1 + nm.length;
    }
    if (flags === RAM_ZERO) {
      out[o++] = 0;
    } else {
      out.set(pg.data as Uint8Array, o);
      o += PAGE_SIZE;
    }
    last = bi;
    if (++inSection >= perSection) closeSection();
  }
  // A stream with no RAM data still gets one (empty) section so the layout stays the one QEMU writes.
  if (inSection > 0 || sections === 0) {
    if (inSection === 0) openSection();
    closeSection();
  }
  if (o > 0) yield out.subarray(0, o);
  for (const c of opts.commands ?? []) yield c;
  yield suffix;
}
