/**
 * Starting writeback early for a file that will be fsynced at the end (export). Every `every`
 * bytes of progress, the native helper src/store/native/sync-range.c asks the kernel to start
 * writing the file's dirty pages out, without waiting; one helper runs at a time. The final fsync
 * then waits only for what is left. Without the helper (not built) this does nothing: the final
 * fsync alone is always what makes the file durable, this only moves the disk's work earlier.
 */
import { execFile } from 'node:child_process';
import { nativeHelper } from '../util/project.js';

export class WritebackAhead {
  private readonly helper = nativeHelper('sync-range');
  private running: Promise<void> | null = null;
  private startedAt = 0;
  /** How many times writeback was started (for tests and --stats-style reporting). */
  starts = 0;

  constructor(
    private readonly path: string,
    private readonly every = 256 << 20,
  ) {}

  /** Call with the bytes written so far. */
  progress(bytes: number): void {
    if (!this.helper || this.running || bytes - this.startedAt < this.every) return;
    this.startedAt = bytes;
    this.starts++;
    const helper = this.helper;
    this.running = new Promise<void>((resolve) => {
      // Best effort by design: a failure only means the final fsync has more to do.
      execFile(helper, [this.path], () => resolve());
    }).finally(() => (this.running = null));
  }

  /** Waits for a helper still running (before the final fsync and rename). */
  async settle(): Promise<void> {
    await this.running;
  }
}
