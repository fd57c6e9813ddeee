/**
 * Guest RAM in the repository.
 *
 * A captured migration stream is stored as streams of one snapshot:
 *
 *   mig-prefix     (device)  the verbatim stream prefix: magic, CONFIGURATION, RAM START + block list
 *   ram.<i>        (ram)     the flat image of RAM block i (i = index in the prefix's block list),
 *                            `used_length` bytes, cut into the repository's chunks
 *   mig-commands   (device)  COMMAND sections seen after RAM START, each be32 length + bytes
 *   device-state   (device)  the verbatim suffix: device sections, EOF, vmdesc
 *
 * Pages arrive in any order (a background snapshot sends pages the guest is about to write first).
 * A chunk is stored as soon as all its pages have arrived; until then its pages wait in a buffer
 * that exists only for chunks with at least one non-zero page, so memory holds just the chunks
 * "in progress" — a handful in the usual near-sequential order. All-zero chunks are never stored
 * (the zero id). Unchanged chunks deduplicate against the parent snapshot by content id: the
 * hypervisor's stream tells us nothing about which pages are unchanged since the parent, but BLAKE3
 * over what the stream delivers costs far less than compressing and storing it.
 *
 * Restore reads the ram.<i> streams back chunk by chunk (read-ahead) and emits pages for the
 * rebuilder: all-zero pages as ZERO records, everything else as PAGE records.
 */
import { promises as fsp } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { createTempFile } from '../util/fs.js';
import * as path from 'node:path';
import { PAGE_SIZE, parsePrefix, type MigStreamSink, type PageRecord, type RebuildPage, type StreamPrefix, type StreamTail } from '../migstream/index.js';
import type { Repository } from '../store/repository.js';
import type { StreamRecord } from '../store/manifest.js';
import { ID_SIZE, isAllZero, ZERO_CHUNK_ID } from '../store/hash.js';
import { chunkCount } from '../store/manifest.js';
import { UserFacingError } from '../util/errors.js';

export class RamCaptureError extends UserFacingError {
  override readonly name = 'RamCaptureError';
}

interface BlockState {
  size: number;
  ids: Buffer;
  /** pages received per chunk */
  filled: Uint16Array;
  pagesPerChunk: number[];
  /** Chunks with pages still missing: in memory, or (past the memory budget) in the spill file. */
  partial: Map<number, Buffer | 'spilled'>;
  /**
   * One bit per page: received. A page sent twice is refused whether or not its chunk is complete
   * (counting pages alone would let a repeat stand in for a page that never came, stored as zeros).
   */
  seen: Uint8Array;
  /** Chunks complete and stored. */
  done: Uint8Array;
  /** Where this block's bytes start in the spill file. */
  spillBase: number;
}

/**
 * Partial chunks held in memory at most (32 MiB at 64 KiB chunks). A background snapshot sends the
 * pages the guest is about to write first, so a busy guest can scatter thousands of early pages
 * over RAM; past this budget their chunks wait in a sparse temporary file instead.
 */
const MAX_PARTIAL_IN_MEMORY = 512;

export interface RamCaptureStats {
  pages: number;
  zeroPages: number;
  newChunks: number;
  newBytes: number;
  storedBytes: number;
  dedupChunks: number;
  zeroChunks: number;
}

export class RamStreamWriter implements MigStreamSink {
  prefix: StreamPrefix | null = null;
  readonly stats: RamCaptureStats = { pages: 0, zeroPages: 0, newChunks: 0, newBytes: 0, storedBytes: 0, dedupChunks: 0, zeroChunks: 0 };
  private blocks: BlockState[] = [];
  private firstPage: (() => void | Promise<void>) | null;
  private inMemory = 0;
  private readonly maxPartial: number;
  private spill: FileHandle | null = null;
  private readonly spillDir: string;

  constructor(
    private readonly repo: Repository,
    opts: { onFirstPage?: () => void | Promise<void>; spillDir?: string; maxPartialInMemory?: number } = {},
  ) {
    this.firstPage = opts.onFirstPage ?? null;
    this.spillDir = opts.spillDir ?? tmpdir();
    this.maxPartial = opts.maxPartialInMemory ?? MAX_PARTIAL_IN_MEMORY;
  }

  /** Removes the spill file, if one was needed. */
  async close(): Promise<void> {
    const f = this.spill;
    this.spill = null;
    if (f) await f.close().catch(() => undefined);
  }

  private async spillFile(): Promise<FileHandle> {
    if (!this.spill) {
      // The spill directory may be a shared one (/tmp): a random name opened O_EXCL|O_NOFOLLOW, so
      // a planted symlink cannot redirect guest RAM (createTempFile, docs/security.md).
      const { path: file, fh } = await createTempFile(path.join(this.spillDir, 'ram-spill'));
      this.spill = fh;
      // Unlinked at once: the space is released when the handle closes, even after a crash.
      await fsp.unlink(file);
    }
    return this.spill;
  }

  onPrefix(prefix: StreamPrefix): void {
    if (prefix.pageSize !== PAGE_SIZE) throw new RamCaptureError(`page size ${prefix.pageSize} is not supported`);
    this.prefix = { ...prefix, bytes: Buffer.from(prefix.bytes) };
    const cs = this.repo.chunkSize;
    const ppc = cs / PAGE_SIZE;
    let spillBase = 0;
    this.blocks = prefix.blocks.map((b) => {
      const n = chunkCount(b.usedLength, cs);
      const pagesPerChunk = Array.from({ length: n }, (_, i) => Math.ceil(Math.min(cs, b.usedLength - i * cs) / PAGE_SIZE));
      const state: BlockState = { size: b.usedLength, ids: Buffer.alloc(n * ID_SIZE), filled: new Uint16Array(n), pagesPerChunk, partial: new Map(), seen: new Uint8Array(Math.ceil(b.usedLength / PAGE_SIZE / 8)), done: new Uint8Array(n), spillBase };
      spillBase += n * cs;
      return state;
    });
    if (ppc > 0xffff) throw new RamCaptureError('chunk size too large for RAM capture');
  }

  async onPages(batch: readonly PageRecord[]): Promise<void> {
    if (this.firstPage) {
      // The first RAM record leaves QEMU only after write tracking is armed: the caller may resume
      // the guest now (see take in vm-runtime.ts).
      const f = this.firstPage;
      this.firstPage = null;
      await f();
    }
    const cs = this.repo.chunkSize;
    for (const p of batch) {
      const b = this.blocks[p.block];
      if (!b) throw new RamCaptureError(`page for unknown RAM block #${p.block}`);
      const ci = Math.floor(p.offset / cs);
      const page = p.offset / PAGE_SIZE;
      if (b.seen[page >> 3]! & (1 << (page & 7))) {
        throw new RamCaptureError(`page ${p.offset} of RAM block ${this.prefix!.blocks[p.block]!.name} was sent twice (not a point-in-time snapshot stream)`);
      }
      b.seen[page >> 3]! |= 1 << (page & 7);
      this.stats.pages++;
      if (p.kind === 'page' && !isAllZero(p.data!)) {
        let buf = b.partial.get(ci);
        if (!buf) {
          if (this.inMemory < this.maxPartial) {
            buf = Buffer.alloc(Math.min(cs, b.size - ci * cs));
            this.inMemory++;
          } else buf = 'spilled';
          b.partial.set(ci, buf);
        }
        if (buf === 'spilled') await (await this.spillFile()).write(p.data!, 0, PAGE_SIZE, b.spillBase + p.offset);
        else p.data!.copy(buf, p.offset - ci * cs);
      } else this.stats.zeroPages++;
      if (++b.filled[ci]! === b.pagesPerChunk[ci]) await this.complete(b, ci);
    }
  }

  private async complete(b: BlockState, ci: number): Promise<void> {
    b.done[ci] = 1;
    const held = b.partial.get(ci);
    b.partial.delete(ci);
    let buf: Buffer | undefined;
    if (held === 'spilled') {
      // Pages never written to the spill file read back as zeros: they were zero pages.
      buf = Buffer.alloc(Math.min(this.repo.chunkSize, b.size - ci * this.repo.chunkSize));
      await this.spill!.read(buf, 0, buf.length, b.spillBase + ci * this.repo.chunkSize);
    } else if (held) {
      buf = held;
      this.inMemory--;
    }
    if (!buf) {
      this.stats.zeroChunks++;
      return; // ids are zero-initialised: the zero id
    }
    const r = await this.repo.putChunk(buf);
    r.id.copy(b.ids, ci * ID_SIZE);
    if (r.isNew) {
      this.stats.newChunks++;
      this.stats.newBytes += buf.length;
      this.stats.storedBytes += r.storedBytes;
    } else this.stats.dedupChunks++;
  }

  /** The snapshot streams for this capture; fails if any page never arrived. */
  streams(): StreamRecord[] {
    if (!this.prefix) throw new RamCaptureError('the stream ended before its RAM block list');
    const cs = this.repo.chunkSize;
    const out: StreamRecord[] = [];
    this.blocks.forEach((b, i) => {
      const missing = b.done.indexOf(0);
      if (missing >= 0) throw new RamCaptureError(`RAM block ${this.prefix!.blocks[i]!.name}: chunk ${missing} incomplete (pages missing from the stream)`);
      out.push({ name: `ram.${i}`, kind: 'ram', size: b.size, chunkSize: cs, chunks: b.ids });
    });
    return out;
  }

  /** Small byte streams (prefix, commands, device state) are stored as ordinary streams. */
  async metaStreams(tail: StreamTail): Promise<StreamRecord[]> {
    const cmds = Buffer.concat(tail.commands.flatMap((c) => [u32(c.length), c]));
    return [
      await this.bytesStream('mig-prefix', this.prefix!.bytes),
      await this.bytesStream('mig-commands', cmds),
      await this.bytesStream('device-state', tail.suffix),
    ];
  }

  private async bytesStream(name: string, bytes: Buffer): Promise<StreamRecord> {
    return storeBytes(this.repo, name, 'device', bytes);
  }
}

function u32(n: number): Buffer {
  const b = Buffer.allocUnsafe(4);
  b.writeUInt32BE(n, 0);
  return b;
}

export async function storeBytes(repo: Repository, name: string, kind: StreamRecord['kind'], bytes: Buffer): Promise<StreamRecord> {
  const cs = repo.chunkSize;
  const n = chunkCount(bytes.length, cs);
  const ids = Buffer.alloc(n * ID_SIZE);
  for (let i = 0; i < n; i++) (await repo.putChunk(bytes.subarray(i * cs, (i + 1) * cs))).id.copy(ids, i * ID_SIZE);
  return { name, kind, size: bytes.length, chunkSize: cs, chunks: ids };
}

export async function loadBytes(repo: Repository, s: StreamRecord): Promise<Buffer> {
  const parts: Buffer[] = [];
  const n = chunkCount(s.size, s.chunkSize);
  for (let i = 0; i < n; i++) {
    const raw = Math.min(s.chunkSize, s.size - i * s.chunkSize);
    parts.push(await repo.getChunk(s.chunks.subarray(i * ID_SIZE, (i + 1) * ID_SIZE), raw));
  }
  return Buffer.concat(parts);
}

export function decodeCommands(bytes: Buffer): Buffer[] {
  const out: Buffer[] = [];
  for (let p = 0; p < bytes.length; ) {
    if (p + 4 > bytes.length) throw new RamCaptureError('mig-commands stream is truncated');
    const n = bytes.readUInt32BE(p);
    if (p + 4 + n > bytes.length) throw new RamCaptureError('mig-commands stream is truncated');
    out.push(bytes.subarray(p + 4, p + 4 + n));
    p += 4 + n;
  }
  return out;
}

export interface StoredRam {
  prefix: Buffer;
  commands: Buffer[];
  suffix: Buffer;
  ram: StreamRecord[];
}

/** Loads the small parts of a RAM snapshot and checks the RAM streams match the block list. */
export async function loadStoredRam(repo: Repository, streams: readonly StreamRecord[]): Promise<StoredRam> {
  const get = (name: string) => {
    const s = streams.find((x) => x.name === name);
    if (!s) throw new RamCaptureError(`snapshot has no ${name} stream (it is a disk-only snapshot?)`);
    return s;
  };
  const prefix = await loadBytes(repo, get('mig-prefix'));
  const parsed = parsePrefix(prefix);
  const ram = parsed.blocks.map((b, i) => {
    const s = get(`ram.${i}`);
    if (s.size !== b.usedLength) throw new RamCaptureError(`stream ram.${i} is ${s.size} bytes but block ${b.name} is ${b.usedLength}`);
    return s;
  });
  return { prefix, commands: decodeCommands(await loadBytes(repo, get('mig-commands'))), suffix: await loadBytes(repo, get('device-state')), ram };
}

/** Pages of the stored RAM for buildStream, chunks fetched ahead of use. */
export async function* ramPages(repo: Repository, ram: readonly StreamRecord[], readAhead = 8): AsyncGenerator<RebuildPage> {
  for (let bi = 0; bi < ram.length; bi++) {
    const s = ram[bi]!;
    const n = chunkCount(s.size, s.chunkSize);
    const fetch = (i: number) => {
      const raw = Math.min(s.chunkSize, s.size - i * s.chunkSize);
      const id = s.chunks.subarray(i * ID_SIZE, (i + 1) * ID_SIZE);
      const p = id.equals(ZERO_CHUNK_ID) ? Promise.resolve(null) : repo.getChunk(id, raw);
      p.catch(() => undefined);
      return { p, raw };
    };
    const queue: { p: Promise<Buffer | null>; raw: number }[] = [];
    let next = 0;
    while (queue.length < readAhead && next < n) queue.push(fetch(next++));
    for (let i = 0; i < n; i++) {
      const { p, raw } = queue.shift()!;
      if (next < n) queue.push(fetch(next++));
      const data = await p;
      for (let off = 0; off < raw; off += PAGE_SIZE) {
        const offset = i * s.chunkSize + off;
        const page = data ? data.subarray(off, off + PAGE_SIZE) : null;
        if (!page || isAllZero(page)) yield { block: bi, offset, kind: 'zero' };
        else yield { block: bi, offset, kind: 'page', data: page };
      }
    }
  }
}
