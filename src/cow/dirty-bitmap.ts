/**
 * Named dirty-block trackers on a volume, like QEMU's named dirty bitmaps.
 *
 * A volume's own dirty tracking serves one consumer, the snapshot chain: generations, frozen sets,
 * journaled so that they survive a crash (volume.ts). Other consumers — a live migration's disk
 * pre-copy rounds, later a backup to a second repository — need "what changed since I last looked"
 * at their own pace, without closing the chain's generations. Each gets a DirtyBitmap: one bit per
 * block, set when a write to the block has *completed* (so a consumer that drains the bitmap and
 * then reads a block either sees that write or finds the bit set again for its next round), and
 * cleared only by that consumer's `drain`. Bitmaps are in memory only: a consumer that outlives a
 * process restart starts again from everything (`addDirtyBitmap(name, { all: true })`).
 */
export class DirtyBitmap {
  private bits: Uint8Array;
  private dirty = 0;

  constructor(
    readonly name: string,
    readonly blocks: number,
    all = false,
  ) {
    this.bits = new Uint8Array(Math.ceil(blocks / 8));
    if (all) this.markAll();
  }

  /** Blocks marked and not yet drained. */
  get count(): number {
    return this.dirty;
  }

  has(block: number): boolean {
    return (this.bits[block >>> 3]! & (1 << (block & 7))) !== 0;
  }

  /** Marks blocks first..last-1 (a completed write's range). */
  markRange(first: number, end: number): void {
    for (let b = first; b < end; b++) {
      const byte = b >>> 3;
      const bit = 1 << (b & 7);
      if ((this.bits[byte]! & bit) === 0) {
        this.bits[byte]! |= bit;
        this.dirty++;
      }
    }
  }

  markAll(): void {
    this.bits.fill(0xff);
    const tail = this.blocks & 7;
    if (tail) this.bits[this.bits.length - 1] = (1 << tail) - 1;
    this.dirty = this.blocks;
  }

  /** The marked blocks in ascending order, and clears them: the consumer's next round. */
  drain(): Uint32Array {
    const out = new Uint32Array(this.dirty);
    let k = 0;
    for (let byte = 0; byte < this.bits.length && k < out.length; byte++) {
      const v = this.bits[byte]!;
      if (v === 0) continue;
      for (let bit = 0; bit < 8; bit++) if (v & (1 << bit)) out[k++] = byte * 8 + bit;
    }
    this.bits.fill(0);
    this.dirty = 0;
    return out;
  }
}
