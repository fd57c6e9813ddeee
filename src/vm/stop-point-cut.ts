/**
 * The disk cut of a live take, placed at QEMU's own stop point of a background snapshot.
 *
 * A background snapshot pauses the guest itself, and only after its setup (populating and
 * registering all of guest RAM for write-protection: seconds on a fresh 1 GiB QEMU):
 *
 *   migrate ─ setup (guest runs) ─ MIGRATION active ─ STOP ─ drain+flush disks ─ device state ─
 *   write-protect RAM ─ RESUME ─ RAM streams while the guest runs
 *
 * RAM and device state describe the instant between STOP and RESUME. The disks (our volumes, which
 * QEMU reaches over NBD) must be cut in that same interval: every write the guest issued before
 * STOP in the snapshot, none issued after RESUME. The cut is made when RESUME is seen, which is
 * exact given two facts about QEMU:
 *
 *  1. It writes each event into the QMP socket synchronously, on the thread that emits it, before
 *     it goes on (monitor_qapi_event_emit → chardev write). STOP is emitted before the drain,
 *     RESUME before any vCPU runs again (vm_prepare_start).
 *  2. The stop drains every disk request in flight — each needs our reply — before the guest can
 *     be resumed; nothing else issues requests while the guest is stopped.
 *
 * So: a request written by QEMU after RESUME finds RESUME already in our QMP socket; and by the
 * time RESUME exists, every request from before STOP has been executed and answered by us. Before
 * any request that changes a disk is executed, the NBD server calls beforeChange, which reads the
 * QMP socket synchronously (QmpClient.readPendingSync): if RESUME is there, the volumes are frozen
 * right then, before the request. Requests executed before RESUME is seen belong to the snapshot,
 * later ones to the next generation. No timing, no guessing which FLUSH was QEMU's.
 */
import type { NbdServer } from '../cow/nbd-server.js';
import type { QmpClient, QmpEvent } from '../hypervisor/qmp.js';

/** Our own clock on the same scale as eventTimeMs (wall clock, sub-millisecond). */
export function nowMs(): number {
  return performance.timeOrigin + performance.now();
}

export class StopPointCut {
  stop: QmpEvent | null = null;
  resume: QmpEvent | null = null;
  /** When the volumes were frozen (nowMs), or null while not yet. */
  cutAt: number | null = null;
  /** Set when reading QMP from inside the NBD hook failed: the cut cannot be trusted. */
  error: Error | null = null;
  private readonly onStop = (e: QmpEvent): void => {
    this.stop ??= e;
  };
  private readonly onResume = (e: QmpEvent): void => {
    // Only the resume that ends the snapshot's own stop; an earlier one belongs to someone else.
    if (!this.stop || this.resume) return;
    this.resume = e;
    this.cut();
  };

  private readonly hook = (): void => {
    if (this.cutAt !== null) return;
    try {
      this.qmp.readPendingSync();
    } catch (err) {
      this.error ??= err as Error;
    }
  };

  private constructor(
    private readonly qmp: QmpClient,
    private readonly nbd: NbdServer,
    private readonly freeze: () => void,
  ) {}

  /**
   * Starts watching, before `migrate` is issued. Returns null when this QMP connection cannot be
   * read synchronously (then the exact cut is impossible and the caller stops the guest itself).
   */
  static arm(qmp: QmpClient, nbd: NbdServer, freeze: () => void): StopPointCut | null {
    if (!qmp.canReadPendingSync || nbd.beforeChange) return null;
    const c = new StopPointCut(qmp, nbd, freeze);
    qmp.events.on('STOP', c.onStop);
    qmp.events.on('RESUME', c.onResume);
    nbd.beforeChange = c.hook;
    return c;
  }

  get done(): boolean {
    return this.cutAt !== null;
  }

  private cut(): void {
    if (this.cutAt !== null) return;
    this.freeze();
    this.cutAt = nowMs();
    if (this.nbd.beforeChange === this.hook) this.nbd.beforeChange = null;
  }

  /** Stops watching (idempotent). Takes in flight are never left with a hook installed. */
  disarm(): void {
    this.qmp.events.off('STOP', this.onStop);
    this.qmp.events.off('RESUME', this.onResume);
    if (this.nbd.beforeChange === this.hook) this.nbd.beforeChange = null;
  }
}
