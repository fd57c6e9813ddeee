/**
 * Streaming parser of QEMU 10 migration streams (precopy, default capabilities; the same layout for
 * background snapshots, live migrations and stopped guests). It never buffers the stream: RAM pages
 * are handed out as they arrive; only the small prefix and the device-state suffix are kept.
 *
 * Stream layout (all integers big-endian; "id" = be32 section id):
 *
 *   ┌─ prefix (kept verbatim; 197 bytes for a pc-i440fx-10.0 guest) ──────────────────────────────┐
 *   │ "QEVM" be32(3)                                                                             │
 *   │ 07 be32(len) machine-type                     CONFIGURATION (no footer)                    │
 *   │    [05 u8 len name be32 ver body]*            optional subsections: target-page-bits,     │
 *   │                                               capabilities (refused), uuid                 │
 *   │ 01 id u8(3) "ram" be32(inst 0) be32(ver 4)    RAM START                                    │
 *   │    be64(total | MEM_SIZE 0x04)                                                             │
 *   │    { u8 len, name, be64 used_length }*        RAM blocks until Σ used_length == total      │
 *   │    be64(EOS 0x10)  7e id                      end of section + footer                      │
 *   └────────────────────────────────────────────────────────────────────────────────────────────┘
 *   ┌─ RAM data, any number of times, interleaved with COMMANDs ────────────────────────────────────┐
 *   │ 02 id  record* be64(EOS)  7e id               PART section (03 = END section, same body)    │
 *   │ 08 be16(cmd) be16(len) data                   COMMAND; only SWITCHOVER_START (11, len 0)    │
 *   │                                                                                             │
 *   │ record := be64(offset | flags)                flags = low 12 bits                           │
 *   │           [u8 len, block name]                absent when CONTINUE 0x20 (same block as the  │
 *   │                                               previous record, across sections too)         │
 *   │           u8(0)          if ZERO 0x02                                                       │
 *   │         | 4096 bytes     if PAGE 0x08                                                       │
 *   │ refused: XBZRLE 0x40, HOOK 0x80, COMPRESS 0x100, MULTIFD_FLUSH 0x200, unknown bits          │
 *   └─────────────────────────────────────────────────────────────────────────────────────────────┘
 *   ┌─ suffix (kept verbatim, not parsed: device sections carry no length) ─────────────────────────┐
 *   │ { 04 id u8 len name be32 inst be32 ver body 7e id }*    device FULL sections                │
 *   │ 00                                             EOF                                          │
 *   │ 06 be32(len) JSON                              vmdesc (absent with suppress-vmdesc=on)      │
 *   └─────────────────────────────────────────────────────────────────────────────────────────────┘
 *
 * A live migration may send the same page several times: records are delivered in stream order and
 * the last one for a page wins. Offsets are JavaScript numbers; values >= 2^53 are refused.
 *
 * Page data lifetime contract: `PageRecord.data` is a view into the parser's input chunk (or into a
 * small private buffer for a page that straddled two chunks). It is valid until the promise returned
 * by `onPages` settles / until the async iterator is advanced; a consumer that keeps the bytes
 * longer must copy them. (The parser never overwrites these buffers, but holding views pins whole
 * input chunks in memory.)
 *
 * Anything not understood is refused with MigrationStreamError naming the offset and the problem.
 */
import {
  DEFAULT_MAX_SUFFIX_BYTES,
  MAX_MACHINE_NAME,
  MAX_RAM_BLOCKS,
  MIG_CMD_SWITCHOVER_START,
  MigrationStreamError,
  PAGE_SIZE,
  QEVM_MAGIC,
  QEVM_VERSION,
  RAM_CONTINUE,
  RAM_EOS,
  RAM_MEM_SIZE,
  RAM_PAGE,
  RAM_SECTION_VERSION,
  RAM_ZERO,
  SEC_COMMAND,
  SEC_CONFIGURATION,
  SEC_END,
  SEC_EOF,
  SEC_FOOTER,
  SEC_FULL,
  SEC_PART,
  SEC_START,
  SEC_SUBSECTION,
  SEC_VMDESC,
  describeRamFlags,
  type PageRecord,
  type RamBlock,
  type StreamPrefix,
  type StreamStats,
  type StreamTail,
} from './format.js';

const enum St {
  Header,
  Section,
  Ram,
  Footer,
  Suffix,
}

const TWO32 = 4294967296;
/** hi word of a be64 must stay below this for the value to be < 2^53 */
const MAX_HI = 0x200000;
const EMPTY = Buffer.alloc(0);

/** Thrown inside item parsers when the item is not complete in the buffer; never escapes. */
class NeedMore {}
const NEED = new NeedMore();

export interface ParserOptions {
  maxSuffixBytes?: number;
  /**
   * Accept a suffix ending in a bare EOF (machine option suppress-vmdesc=on). Off by default:
   * QEMU writes vmdesc unless told not to, and requiring it turns a truncated device state into
   * an error instead of a snapshot that fails only at restore.
   */
  allowMissingVmdesc?: boolean;
}

/**
 * Push parser: feed chunks with `push`, take the prefix / page batch after each push, call
 * `finish` at end of input. Synchronous and allocation-light; see `parseMigrationStream` for the
 * async driver.
 */
export class MigStreamParser {
  private state: St = St.Header;
  private consumed = 0; // absolute offset of the first byte not yet consumed
  private carry: Buffer = EMPTY; // unconsumed bytes of an item that straddles chunks
  private need = 0; // total bytes the item at carry[0] needs (lower bound)
  private stalled = false;

  private sawConfig = false;
  private machine = '';
  private readonly prefixParts: Buffer[] = [];
  private prefix: StreamPrefix | undefined;
  private prefixPending: StreamPrefix | undefined;

  private ramId = -1;
  private blocks: RamBlock[] = [];
  private blockLens: number[] = [];
  private readonly blockIndex = new Map<string, number>();
  private curBlock = -1;
  private footerId = -1;

  private batch: PageRecord[] = [];
  private readonly commands: Buffer[] = [];
  private readonly suffixParts: Buffer[] = [];
  private suffixLen = 0;
  private readonly maxSuffix: number;
  private readonly allowMissingVmdesc: boolean;

  readonly stats: StreamStats = { bytes: 0, pageRecords: 0, zeroRecords: 0, ramSections: 0, endSections: 0 };

  constructor(opts: ParserOptions = {}) {
    this.maxSuffix = opts.maxSuffixBytes ?? DEFAULT_MAX_SUFFIX_BYTES;
    this.allowMissingVmdesc = opts.allowMissingVmdesc ?? false;
  }

  /** The prefix once RAM START has been parsed (undefined before). */
  get streamPrefix(): StreamPrefix | undefined {
    return this.prefix;
  }

  /**
   * Stream offset of the first byte not yet parsed: bytes before it are final (their records are in
   * the batches taken so far); bytes from it on belong to an item still incomplete.
   */
  get parsedOffset(): number {
    return this.consumed;
  }

  /** True once the device state (FULL sections / EOF) has begun: the rest carries no RAM records. */
  get inDeviceState(): boolean {
    return this.state === St.Suffix;
  }

  /** Returns the prefix once, right after the push that completed it. */
  takePrefix(): StreamPrefix | undefined {
    const p = this.prefixPending;
    this.prefixPending = undefined;
    return p;
  }

  /** Page records parsed by the last pushes, in stream order. */
  takeBatch(): PageRecord[] {
    const b = this.batch;
    if (b.length === 0) return b;
    this.batch = [];
    return b;
  }

  push(chunk: Uint8Array): void {
    const buf = Buffer.isBuffer(chunk) ? chunk : Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength);
    this.stats.bytes += buf.length;
    let off = 0;
    // Complete the straddling item by appending only the bytes it needs, so whole chunks are never copied.
    while (this.carry.length > 0 && off < buf.length) {
      const take = Math.min(Math.max(this.need - this.carry.length, 1), buf.length - off);
      this.carry = Buffer.concat([this.carry, buf.subarray(off, off + take)]);
      off += take;
      if (this.carry.length < this.need) continue;
      const stop = this.run(this.carry, 0, this.carry.length, this.consumed);
      this.consumed += stop;
      this.carry = this.carry.subarray(stop);
    }
    if (this.carry.length === 0 && off < buf.length) {
      const stop = this.run(buf, off, buf.length, this.consumed - off);
      this.consumed += stop - off;
      if (stop < buf.length) this.carry = Buffer.from(buf.subarray(stop));
    }
  }

  /** Call at end of input: checks the stream is complete and returns the suffix. */
  finish(): StreamTail {
    if (this.state !== St.Suffix) {
      const where =
        this.state === St.Header
          ? 'in the header'
          : this.state === St.Ram
            ? 'inside a RAM section'
            : this.state === St.Footer
              ? 'before a section footer'
              : this.prefix
                ? 'between sections (no device state / EOF)'
                : 'before the end of RAM START';
      throw new MigrationStreamError(`stream truncated ${where}`, this.consumed + this.carry.length);
    }
    const suffix = Buffer.concat(this.suffixParts, this.suffixLen);
    const trailer = checkTrailer(suffix, this.consumed - suffix.length, this.allowMissingVmdesc);
    return { commands: this.commands.slice(), suffix, trailer };
  }

  // ------------------------------------------------------------------------------------------------

  private err(what: string, at: number): never {
    throw new MigrationStreamError(what, at);
  }

  /** Ensures b[p .. p+n) is available for the item starting at `item`, else unwinds with NEED. */
  private req(p: number, n: number, end: number, item: number): void {
    if (p + n > end) {
      this.need = p + n - item;
      throw NEED;
    }
  }

  private run(b: Buffer, start: number, end: number, base: number): number {
    let p = start;
    while (p < end) {
      if (this.state === St.Ram) {
        p = this.parseRam(b, p, end, base);
        if (this.stalled) {
          this.stalled = false;
          return p;
        }
        continue;
      }
      if (this.state === St.Suffix) {
        this.suffixLen += end - p;
        if (this.suffixLen > this.maxSuffix) {
          this.err(`device state larger than ${this.maxSuffix} bytes (refusing to buffer it)`, base + p);
        }
        this.suffixParts.push(Buffer.from(b.subarray(p, end)));
        return end;
      }
      const item = p;
      try {
        if (this.state === St.Header) p = this.parseHeader(b, p, end, base);
        else if (this.state === St.Footer) p = this.parseFooter(b, p, end, base);
        else p = this.parseSection(b, p, end, base);
      } catch (e) {
        if (e === NEED) return item;
        throw e;
      }
    }
    return p;
  }

  private parseHeader(b: Buffer, p: number, end: number, base: number): number {
    this.req(p, 8, end, p);
    if (b.readUInt32BE(p) !== QEVM_MAGIC) {
      this.err(`bad magic 0x${b.readUInt32BE(p).toString(16)} (not a QEMU migration stream)`, base + p);
    }
    const v = b.readUInt32BE(p + 4);
    if (v !== QEVM_VERSION) this.err(`unsupported stream version ${v} (want ${QEVM_VERSION})`, base + p + 4);
    this.prefixParts.push(Buffer.from(b.subarray(p, p + 8)));
    this.state = St.Section;
    return p + 8;
  }

  private parseFooter(b: Buffer, p: number, end: number, base: number): number {
    this.req(p, 5, end, p);
    if (b[p] !== SEC_FOOTER) this.err(`missing section footer (byte 0x${(b[p] ?? 0).toString(16)})`, base + p);
    const id = b.readUInt32BE(p + 1);
    if (id !== this.footerId) this.err(`section footer for id ${id}, expected ${this.footerId}`, base + p);
    this.state = St.Section;
    return p + 5;
  }

  private str8(b: Buffer, p: number, end: number, item: number): [string, number] {
    this.req(p, 1, end, item);
    const n = b[p] ?? 0;
    this.req(p + 1, n, end, item);
    return [b.toString('latin1', p + 1, p + 1 + n), p + 1 + n];
  }

  private parseSection(b: Buffer, p: number, end: number, base: number): number {
    const s = p;
    const t = b[p] ?? 0;
    switch (t) {
      case SEC_CONFIGURATION:
        return this.parseConfig(b, p, end, base);
      case SEC_START:
        return this.parseRamStart(b, p, end, base);
      case SEC_PART:
      case SEC_END: {
        this.req(p, 5, end, s);
        const id = b.readUInt32BE(p + 1);
        if (!this.prefix) this.err('RAM data before RAM START', base + p);
        if (id !== this.ramId) this.err(`${t === SEC_PART ? 'PART' : 'END'} section for unknown section id ${id}`, base + p);
        this.footerId = id;
        this.stats.ramSections++;
        if (t === SEC_END) this.stats.endSections++;
        this.state = St.Ram;
        return p + 5;
      }
      case SEC_COMMAND: {
        this.req(p, 5, end, s);
        const cmd = b.readUInt16BE(p + 1);
        const len = b.readUInt16BE(p + 3);
        if (!this.prefix) this.err(`COMMAND ${cmd} before RAM START`, base + p);
        if (cmd !== MIG_CMD_SWITCHOVER_START || len !== 0) {
          this.err(
            `unsupported COMMAND ${cmd} (length ${len}); only SWITCHOVER_START is accepted ` +
              '(postcopy, return-path and COLO streams are not supported)',
            base + p,
          );
        }
        this.commands.push(Buffer.from(b.subarray(p, p + 5)));
        return p + 5;
      }
      case SEC_FULL:
      case SEC_EOF:
        if (!this.prefix) this.err(`${t === SEC_EOF ? 'EOF' : 'device section'} before RAM START`, base + p);
        this.state = St.Suffix;
        return p;
      default:
        return this.err(`unknown section type 0x${t.toString(16)}`, base + p);
    }
  }

  private parseConfig(b: Buffer, p: number, end: number, base: number): number {
    const s = p;
    if (this.sawConfig || this.prefix) this.err('CONFIGURATION section is not first', base + p);
    this.req(p, 5, end, s);
    const n = b.readUInt32BE(p + 1);
    if (n === 0 || n > MAX_MACHINE_NAME) this.err(`machine type name length ${n} out of range`, base + p + 1);
    p += 5;
    this.req(p, n, end, s);
    const machine = b.toString('latin1', p, p + n);
    p += n;
    // Subsections follow while the next byte is SUBSECTION; peeking needs one more byte.
    for (;;) {
      this.req(p, 1, end, s);
      if (b[p] !== SEC_SUBSECTION) break;
      const [name, q] = this.str8(b, p + 1, end, s);
      p = q + 4; // subsection version
      this.req(q, 4, end, s);
      if (name === 'configuration/target-page-bits') {
        this.req(p, 4, end, s);
        const bits = b.readUInt32BE(p);
        if (1 << bits !== PAGE_SIZE) this.err(`target page size 2^${bits} (only 4096 is supported)`, base + p);
        p += 4;
      } else if (name === 'configuration/capabilities') {
        this.req(p, 4, end, s);
        const cnt = b.readUInt32BE(p);
        p += 4;
        const caps: string[] = [];
        for (let i = 0; i < cnt && i < 64; i++) {
          const [c, r] = this.str8(b, p, end, s);
          caps.push(c);
          p = r;
        }
        this.err(
          `stream uses migration capabilities [${caps.join(', ')}] that change its format (not supported)`,
          base + s,
        );
      } else if (name === 'configuration/uuid') {
        this.req(p, 16, end, s);
        p += 16;
      } else {
        this.err(`unknown configuration subsection ${JSON.stringify(name)}`, base + s);
      }
    }
    this.sawConfig = true;
    this.machine = machine;
    this.prefixParts.push(Buffer.from(b.subarray(s, p)));
    return p;
  }

  private parseRamStart(b: Buffer, p: number, end: number, base: number): number {
    const s = p;
    this.req(p, 5, end, s);
    const id = b.readUInt32BE(p + 1);
    const [name, q] = this.str8(b, p + 5, end, s);
    this.req(q, 8, end, s);
    const inst = b.readUInt32BE(q);
    const ver = b.readUInt32BE(q + 4);
    p = q + 8;
    if (name !== 'ram' || inst !== 0) {
      this.err(
        `iterative section ${JSON.stringify(name)} (instance ${inst}) is not supported (only RAM)`,
        base + s,
      );
    }
    if (this.prefix) this.err('second RAM START section', base + s);
    if (ver !== RAM_SECTION_VERSION) this.err(`RAM section version ${ver} (want ${RAM_SECTION_VERSION})`, base + s);
    this.req(p, 8, end, s);
    const hi = b.readUInt32BE(p);
    const lo = b.readUInt32BE(p + 4);
    const flags = lo & (PAGE_SIZE - 1);
    if (flags !== RAM_MEM_SIZE) this.err(`RAM START flags ${describeRamFlags(flags)}, expected MEM_SIZE`, base + p);
    if (hi >= MAX_HI) this.err('RAM size >= 2^53', base + p);
    const total = hi * TWO32 + (lo - flags);
    p += 8;
    const blocks: RamBlock[] = [];
    const seen = new Set<string>();
    let sum = 0;
    while (sum < total) {
      const at = p;
      const [bn, r] = this.str8(b, p, end, s);
      this.req(r, 8, end, s);
      const bhi = b.readUInt32BE(r);
      const blo = b.readUInt32BE(r + 4);
      p = r + 8;
      if (bn.length === 0) this.err('RAM block with an empty name', base + at);
      if (seen.has(bn)) this.err(`duplicate RAM block ${JSON.stringify(bn)}`, base + at);
      if (bhi >= MAX_HI) this.err(`RAM block ${JSON.stringify(bn)} length >= 2^53`, base + r);
      const len = bhi * TWO32 + blo;
      if (len === 0 || len % PAGE_SIZE !== 0) {
        this.err(`RAM block ${JSON.stringify(bn)} length ${len} is not a positive multiple of ${PAGE_SIZE}`, base + r);
      }
      seen.add(bn);
      blocks.push({ name: bn, usedLength: len });
      sum += len;
      if (blocks.length > MAX_RAM_BLOCKS) this.err(`more than ${MAX_RAM_BLOCKS} RAM blocks`, base + at);
    }
    if (sum !== total) this.err(`RAM block lengths sum to ${sum}, header says ${total}`, base + p);
    this.req(p, 8 + 5, end, s);
    if (b.readUInt32BE(p) !== 0 || b.readUInt32BE(p + 4) !== RAM_EOS) {
      this.err(
        'RAM START block list not followed by EOS (format-changing capability such as x-ignore-shared or postcopy?)',
        base + p,
      );
    }
    p += 8;
    if (b[p] !== SEC_FOOTER || b.readUInt32BE(p + 1) !== id) this.err('missing RAM START section footer', base + p);
    p += 5;
    this.ramId = id;
    this.blocks = blocks;
    this.blockLens = blocks.map((x) => x.usedLength);
    blocks.forEach((x, i) => this.blockIndex.set(x.name, i));
    if (!this.sawConfig) this.err('RAM START without a CONFIGURATION section', base + s);
    this.prefixParts.push(Buffer.from(b.subarray(s, p)));
    this.prefix = {
      bytes: Buffer.concat(this.prefixParts),
      machine: this.machine,
      pageSize: PAGE_SIZE,
      ramSectionId: id,
      blocks,
    };
    this.prefixPending = this.prefix;
    return p;
  }

  /** Hot path: RAM records until EOS or until the buffer runs out (sets `stalled`). */
  private parseRam(b: Buffer, p: number, end: number, base: number): number {
    const lens = this.blockLens;
    const batch = this.batch;
    let cur = this.curBlock;
    let nPage = 0;
    let nZero = 0;
    for (;;) {
      if (end - p < 8) {
        this.stall(8);
        break;
      }
      const hi = b.readUInt32BE(p);
      const lo = b.readUInt32BE(p + 4);
      const flags = lo & 0xfff;
      if (flags === RAM_EOS) {
        if (hi !== 0 || lo !== RAM_EOS) this.err('EOS with a non-zero offset', base + p);
        p += 8;
        this.state = St.Footer;
        break;
      }
      if ((flags & ~(RAM_ZERO | RAM_PAGE | RAM_CONTINUE)) !== 0) {
        this.err(`unsupported RAM record flags ${describeRamFlags(flags)}`, base + p);
      }
      const isZero = (flags & RAM_ZERO) !== 0;
      if (isZero === ((flags & RAM_PAGE) !== 0)) {
        this.err(`RAM record flags ${describeRamFlags(flags)} are neither ZERO nor PAGE`, base + p);
      }
      const cont = (flags & RAM_CONTINUE) !== 0;
      let hlen = 8;
      if (!cont) {
        if (end - p < 9) {
          this.stall(9);
          break;
        }
        hlen = 9 + (b[p + 8] ?? 0);
      }
      const total = hlen + (isZero ? 1 : PAGE_SIZE);
      if (end - p < total) {
        this.stall(total);
        break;
      }
      if (cont) {
        if (cur < 0) this.err('CONTINUE record without a previous block', base + p);
      } else {
        const name = b.toString('latin1', p + 9, p + hlen);
        const idx = this.blockIndex.get(name);
        if (idx === undefined) this.err(`unknown RAM block ${JSON.stringify(name)}`, base + p);
        cur = idx;
      }
      if (hi >= MAX_HI) this.err('RAM offset >= 2^53', base + p);
      const offset = hi * TWO32 + (lo - flags);
      if (offset + PAGE_SIZE > (lens[cur] ?? 0)) {
        this.err(
          `RAM offset 0x${offset.toString(16)} beyond block ${JSON.stringify(this.blocks[cur]?.name)} ` +
            `(used_length 0x${(lens[cur] ?? 0).toString(16)})`,
          base + p,
        );
      }
      if (isZero) {
        if (b[p + hlen] !== 0) this.err(`ZERO record with fill byte ${b[p + hlen]}`, base + p + hlen);
        batch.push({ block: cur, offset, kind: 'zero' });
        nZero++;
      } else {
        batch.push({ block: cur, offset, kind: 'page', data: b.subarray(p + hlen, p + hlen + PAGE_SIZE), at: base + p + hlen });
        nPage++;
      }
      p += total;
    }
    this.curBlock = cur;
    this.stats.pageRecords += nPage;
    this.stats.zeroRecords += nZero;
    return p;
  }

  private stall(n: number): void {
    this.need = n;
    this.stalled = true;
  }
}

/**
 * Checks that the device-state suffix is complete: it must end with EOF + vmdesc whose length runs
 * exactly to the end and whose JSON parses, or (vmdesc suppressed, only if allowed) with the EOF
 * byte itself.
 * Device sections carry no length, so this is the only end-to-end check available without
 * interpreting each device's state; a suffix cut right after a 0x00 byte passes as 'eof'.
 */
function checkTrailer(suffix: Buffer, base: number, allowBareEof: boolean): 'vmdesc' | 'eof' {
  const pat = Buffer.from([SEC_EOF, SEC_VMDESC]);
  let k = suffix.lastIndexOf(pat);
  while (k >= 0) {
    if (k + 6 <= suffix.length && suffix.readUInt32BE(k + 2) === suffix.length - (k + 6)) {
      const json = suffix.toString('utf8', k + 6);
      try {
        JSON.parse(json);
        return 'vmdesc';
      } catch {
        throw new MigrationStreamError('vmdesc trailer is not valid JSON', base + k + 6);
      }
    }
    k = k > 0 ? suffix.lastIndexOf(pat, k - 1) : -1;
  }
  if (allowBareEof && suffix.length > 0 && suffix[suffix.length - 1] === SEC_EOF) return 'eof';
  throw new MigrationStreamError(
    `stream truncated in the device state (no EOF${allowBareEof ? '' : ' + vmdesc'} trailer)`,
    base + suffix.length,
  );
}

export interface MigStreamSink {
  /** Called once, before any page, with the verbatim prefix and the RAM block list. */
  onPrefix?(prefix: StreamPrefix): void | Promise<void>;
  /** Page records in stream order; `data` views are valid until the returned promise settles. */
  onPages(batch: readonly PageRecord[]): void | Promise<void>;
}

export interface ParsedStream {
  prefix: StreamPrefix;
  tail: StreamTail;
  stats: StreamStats;
}

/**
 * Parses `src` (e.g. a socket) to its end, feeding `sink`. Backpressure: the next chunk is not
 * read before the sink's promise for the previous batch settles.
 */
export async function parseMigrationStream(
  src: AsyncIterable<Uint8Array>,
  sink: MigStreamSink,
  opts: ParserOptions = {},
): Promise<ParsedStream> {
  const parser = new MigStreamParser(opts);
  for await (const chunk of src) {
    parser.push(chunk);
    const pre = parser.takePrefix();
    if (pre && sink.onPrefix) await sink.onPrefix(pre);
    const batch = parser.takeBatch();
    if (batch.length > 0) await sink.onPages(batch);
  }
  const tail = parser.finish();
  const prefix = parser.streamPrefix;
  if (!prefix) throw new MigrationStreamError('stream has no RAM START', parser.stats.bytes);
  return { prefix, tail, stats: parser.stats };
}

export type MigStreamEvent =
  | { type: 'prefix'; prefix: StreamPrefix }
  | { type: 'pages'; pages: PageRecord[] }
  | { type: 'end'; tail: StreamTail; stats: StreamStats };

/** Async-iterator form of the parser; page views are valid until the iterator is advanced. */
export async function* migrationStreamEvents(
  src: AsyncIterable<Uint8Array>,
  opts: ParserOptions = {},
): AsyncGenerator<MigStreamEvent, void, undefined> {
  const parser = new MigStreamParser(opts);
  for await (const chunk of src) {
    parser.push(chunk);
    const pre = parser.takePrefix();
    if (pre) yield { type: 'prefix', prefix: pre };
    const batch = parser.takeBatch();
    if (batch.length > 0) yield { type: 'pages', pages: batch };
  }
  const tail = parser.finish();
  yield { type: 'end', tail, stats: parser.stats };
}

/** Parses a verbatim prefix (as stored in a snapshot) back into its block list and ids. */
export function parsePrefix(bytes: Buffer): StreamPrefix {
  const parser = new MigStreamParser();
  parser.push(bytes);
  const p = parser.streamPrefix;
  if (!p || p.bytes.length !== bytes.length) {
    throw new MigrationStreamError('not a complete stream prefix (magic … RAM START footer)', bytes.length);
  }
  return p;
}
