/**
 * What a take did when, in one list: vmsnap's own steps (its clock) and QEMU's events (QEMU's
 * timestamps, the same host wall clock), so the order can be checked afterwards — e.g. that the
 * guest was not paused while QEMU's migration setup ran (test/vm/take-order.test.ts) — and the
 * pause, the setup and the background save can be reported apart.
 */
import type { QmpClient, QmpEvent } from '../hypervisor/qmp.js';
import { nowMs } from './stop-point-cut.js';
import { eventTimeMs } from '../hypervisor/qmp.js';

export interface TakeEvent {
  /** ms since the epoch (fractional). */
  at: number;
  /** e.g. 'stop sent', 'migration setup', 'STOP', 'RESUME', 'disks cut', 'first RAM record'. */
  what: string;
  by: 'vmsnap' | 'qemu';
}

/** The take's phases, from its timeline (ms; null when the take had no such phase). */
export interface TakePhases {
  /** QEMU's migration setup: `migrate` sent → QEMU reports the migration active. */
  setupMs: number | null;
  /** Whether the guest was paused while that setup ran (vmsnap paused it before `migrate`). */
  setupInPause: boolean | null;
  /** The background save: the guest running again → RAM and device state stored. */
  saveMs: number | null;
}

const QEMU_EVENTS = ['STOP', 'RESUME', 'MIGRATION'] as const;

export class TakeTimeline {
  readonly events: TakeEvent[] = [];
  private readonly onEvent = (e: QmpEvent): void => {
    const what = e.event === 'MIGRATION' ? `migration ${String(e.data.status)}` : e.event;
    this.events.push({ at: eventTimeMs(e), what, by: 'qemu' });
  };

  constructor(private readonly qmp: QmpClient) {
    for (const n of QEMU_EVENTS) qmp.events.on(n, this.onEvent);
  }

  mark(what: string): void {
    this.events.push({ at: nowMs(), what, by: 'vmsnap' });
  }

  /** Stops listening (idempotent); the events are sorted by time. */
  close(): TakeEvent[] {
    for (const n of QEMU_EVENTS) this.qmp.events.off(n, this.onEvent);
    this.events.sort((a, b) => a.at - b.at);
    return this.events;
  }

  first(what: string, by?: TakeEvent['by']): TakeEvent | undefined {
    return this.events.find((e) => e.what === what && (by === undefined || e.by === by));
  }

  phases(): TakePhases {
    const migrate = this.first('migrate sent');
    const active = this.first('migration active');
    const stopSent = this.first('stop sent');
    const running = this.first('RESUME') ?? this.first('cont answered');
    const saved = this.first('RAM and device state saved');
    return {
      setupMs: migrate && active ? active.at - migrate.at : null,
      setupInPause: migrate ? !!stopSent && stopSent.at <= migrate.at : null,
      saveMs: running && saved ? saved.at - running.at : null,
    };
  }

  /** One line for logs: each step's offset from the first, in ms. */
  summary(): string {
    const t0 = this.events[0]?.at ?? 0;
    return this.events.map((e) => `${e.what} +${(e.at - t0).toFixed(1)}`).join(', ');
  }
}
