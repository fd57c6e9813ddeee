/**
 * Cutting a live migration stream for a relay (the source side of `vmsnap migrate`).
 *
 * A relay forwards what QEMU writes to the destination QEMU *verbatim*, except that it may replace
 * the 4096 data bytes of chosen PAGE records (e.g. pages the destination already holds) by
 * something shorter that the other side expands back. The stream layout (parser.ts) has no
 * lengths for device state and reuses block names across sections, so rebuilding it is riskier
 * than forwarding it; forwarding needs only to know where each page's data lies.
 *
 *   QEMU bytes:  ┌ raw ───────────────┐┌ page data ┐┌ raw ──────────┐┌ page data ┐┌ raw … ┐
 *   pieces:      {raw}                 {page}       {raw}            {page}       {raw}
 *
 * Contract: for every input, the pieces handed to `out` in order, with each `page` piece replaced
 * by its `data`, are exactly the input bytes in order (test/migstream/relay.test.ts). Bytes are
 * handed out as soon as they are known not to belong to a page that may still be cut: everything
 * the parser has consumed; an item straddling two chunks waits for the next push. Nothing is
 * buffered beyond the chunks not yet fully handed out, so the relay's memory is bounded by the
 * chunk size its caller reads with.
 *
 * `onRecord` sees every RAM record (PAGE and ZERO) in stream order, e.g. to keep the final image.
 *
 * Piece lifetime: `raw` buffers and `page.data` are views into the input chunks (or the parser's
 * private buffer for a straddling page); they are valid until the next `push`.
 */
import { MigStreamParser } from './parser.js';
import { PAGE_SIZE, type PageRecord, type StreamPrefix, type StreamTail } from './format.js';

export type RelayPiece = { kind: 'raw'; bytes: Buffer } | { kind: 'page'; record: PageRecord & { data: Buffer; at: number } };

export class MigStreamRelay {
  private readonly parser = new MigStreamParser({ allowMissingVmdesc: true });
  /** Input chunks not yet fully handed out; held[0] starts at stream offset heldStart. */
  private held: Buffer[] = [];
  private heldStart = 0;
  /** Stream offset up to which bytes have been handed out. */
  private emitted = 0;

  /** Bytes pushed so far. */
  get bytes(): number {
    return this.parser.stats.bytes;
  }

  get stats(): MigStreamParser['stats'] {
    return this.parser.stats;
  }

  /** The stream's prefix (RAM block list) once parsed. */
  get prefix(): StreamPrefix | undefined {
    return this.parser.streamPrefix;
  }

  /** True once device state began: no page can be cut any more (the rest is forwarded as is). */
  get inDeviceState(): boolean {
    return this.parser.inDeviceState;
  }

  /**
   * Parses `chunk` and hands out its pieces: `cut(record)` decides, for each PAGE record in stream
   * order, whether its data becomes a `page` piece (true) or stays inside a `raw` one.
   */
  push(chunk: Buffer, cut: (record: PageRecord) => boolean, out: (piece: RelayPiece) => void, onRecord?: (record: PageRecord) => void): void {
    this.held.push(chunk);
    this.parser.push(chunk);
    for (const rec of this.parser.takeBatch()) {
      onRecord?.(rec);
      if (rec.kind !== 'page' || rec.data === undefined || rec.at === undefined) continue;
      if (!cut(rec)) continue;
      this.emitRaw(rec.at, out);
      out({ kind: 'page', record: rec as PageRecord & { data: Buffer; at: number } });
      this.emitted = rec.at + PAGE_SIZE;
    }
    this.emitRaw(this.parser.parsedOffset, out);
    this.dropEmitted();
  }

  /** End of input: the stream must be complete (device state and EOF); returns its tail. */
  finish(): StreamTail {
    return this.parser.finish();
  }

  private emitRaw(to: number, out: (piece: RelayPiece) => void): void {
    let start = this.heldStart;
    for (const c of this.held) {
      const end = start + c.length;
      if (end > this.emitted && start < to) {
        const a = Math.max(this.emitted, start) - start;
        const b = Math.min(to, end) - start;
        if (b > a) out({ kind: 'raw', bytes: c.subarray(a, b) });
      }
      if (end >= to) break;
      start = end;
    }
    if (to > this.emitted) this.emitted = to;
  }

  private dropEmitted(): void {
    while (this.held.length > 0 && this.heldStart + this.held[0]!.length <= this.emitted) {
      this.heldStart += this.held[0]!.length;
      this.held.shift();
    }
  }
}
