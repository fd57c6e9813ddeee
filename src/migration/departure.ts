/**
 * The guest's state at departure, kept on the source for the return trip.
 *
 * After a migration QEMU refuses to migrate again ("paused due to previous migration"), so the
 * final RAM cannot be captured from it. The relay, though, sees every RAM record QEMU sends, and
 * the last record of each page is its final content: the recorder writes each one into an image
 * file (one region per RAM block, sparse: a page never sent non-zero stays a hole), and keeps the
 * stream's prefix and device state. Once the destination runs the guest, the image is stored as a
 * snapshot with the volumes (whose guest is stopped), off the critical path of the move, and then
 * kept as the departure cache (holdings.ts) for the guest's return.
 */
import { closeSync, openSync, writeSync, constants as fsc } from 'node:fs';
import { promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import { PAGE_SIZE, type PageRecord, type StreamPrefix, type StreamTail } from '../migstream/index.js';
import { isAllZero } from '../store/hash.js';

const ZERO_PAGE = Buffer.alloc(PAGE_SIZE);
/** Consecutive pages are gathered into one write of up to this many bytes (see `record`). */
const RUN_BYTES = 1 << 20;

export class DepartureRecorder {
  private fd: number | null = null;
  private bases: number[] = [];
  /** One bit per page: written non-zero at some point (a later ZERO record must then overwrite it). */
  private nonZero: Uint8Array = new Uint8Array(0);
  prefix: StreamPrefix | null = null;
  tail: StreamTail | null = null;
  readonly file: string;
  /**
   * Pages not yet written: a run of consecutive ones starting at runPos. QEMU sends RAM mostly in
   * address order, so one write per run instead of one per page takes the recorder (which runs
   * inside the relay loop, synchronously) from ~50k syscalls per 200 MB to ~200.
   */
  private run = Buffer.allocUnsafe(RUN_BYTES);
  private runPos = 0;
  private runLen = 0;

  constructor(dir: string) {
    this.file = path.join(dir, `departure-${randomBytes(6).toString('hex')}.ram`);
  }

  /** Called for every RAM record, in stream order (synchronously: the page data is a view). */
  record(prefix: StreamPrefix | undefined, rec: PageRecord): void {
    if (!prefix) return;
    if (this.fd === null) {
      this.prefix = prefix;
      let b = 0;
      this.bases = prefix.blocks.map((x) => {
        const at = b;
        b += x.usedLength;
        return at;
      });
      this.nonZero = new Uint8Array(Math.ceil(b / PAGE_SIZE / 8));
      this.fd = openSync(this.file, fsc.O_CREAT | fsc.O_EXCL | fsc.O_RDWR | fsc.O_NOFOLLOW, 0o600);
    }
    const pos = this.bases[rec.block]! + rec.offset;
    const page = pos / PAGE_SIZE;
    const bit = 1 << (page & 7);
    if (rec.kind === 'page' && rec.data) {
      if (this.runLen === 0 || pos !== this.runPos + this.runLen || this.runLen === RUN_BYTES) {
        this.flushRun();
        this.runPos = pos;
      }
      rec.data.copy(this.run, this.runLen, 0, PAGE_SIZE);
      this.runLen += PAGE_SIZE;
      this.nonZero[page >>> 3]! |= bit;
    } else if (this.nonZero[page >>> 3]! & bit) {
      // The pending run may hold this page's older content: it must land first.
      this.flushRun();
      writeSync(this.fd, ZERO_PAGE, 0, PAGE_SIZE, pos);
      this.nonZero[page >>> 3]! &= ~bit;
    }
  }

  private flushRun(): void {
    if (this.runLen === 0 || this.fd === null) return;
    let done = 0;
    while (done < this.runLen) done += writeSync(this.fd, this.run, done, this.runLen - done, this.runPos + done);
    this.runLen = 0;
  }

  finish(tail: StreamTail): void {
    this.flushRun();
    this.tail = tail;
  }

  /** The final RAM, page by page in block order, for a RamStreamWriter; `pos` is the page's offset in `file`. */
  async *pages(): AsyncGenerator<PageRecord & { pos: number }> {
    if (!this.prefix) return;
    this.flushRun();
    const fh = await fsp.open(this.file, 'r');
    try {
      const buf = Buffer.allocUnsafe(1 << 20);
      for (let bi = 0; bi < this.prefix.blocks.length; bi++) {
        const len = this.prefix.blocks[bi]!.usedLength;
        for (let off = 0; off < len; off += buf.length) {
          const n = Math.min(buf.length, len - off);
          const { bytesRead } = await fh.read(buf, 0, n, this.bases[bi]! + off);
          buf.fill(0, bytesRead, n);
          for (let p = 0; p < n; p += PAGE_SIZE) {
            const data = buf.subarray(p, p + PAGE_SIZE);
            const pos = this.bases[bi]! + off + p;
            if (isAllZero(data)) yield { block: bi, offset: off + p, kind: 'zero', pos };
            else yield { block: bi, offset: off + p, kind: 'page', data, pos };
          }
        }
      }
    } finally {
      await fh.close();
    }
  }

  async dispose(): Promise<void> {
    this.runLen = 0;
    if (this.fd !== null) closeSync(this.fd);
    this.fd = null;
    await fsp.rm(this.file, { force: true });
  }
}
