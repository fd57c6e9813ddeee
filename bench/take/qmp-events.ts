/**
 * STOP/RESUME events from a second, listen-only QMP monitor of a vmsnap VM (the supervisor owns
 * the first): the guest pause by QEMU's own event timestamps. Used by bench/take/run.ts and
 * bench/take/desktop-guest.ts.
 */
import { QmpClient, type QmpEvent } from '../../src/hypervisor/qmp.js';

/** `vm create` arguments adding a listen-only QMP monitor on `socket`. */
export function eventMonitorArgs(socket: string): string[] {
  return ['--qemu-arg=-chardev', `--qemu-arg=socket,id=benchqmp,path=${socket},server=on,wait=off`, '--qemu-arg=-mon', '--qemu-arg=chardev=benchqmp,mode=control'];
}

function eventMs(e: QmpEvent): number {
  return e.timestamp.seconds * 1000 + e.timestamp.microseconds / 1000;
}

export class EventLog {
  readonly events: { name: string; qemuMs: number }[] = [];
  constructor(qmp: QmpClient) {
    qmp.events.on('event', (e: QmpEvent) => {
      if (e.event === 'STOP' || e.event === 'RESUME') this.events.push({ name: e.event, qemuMs: eventMs(e) });
    });
  }
  mark(): number {
    return this.events.length;
  }
  /** First STOP and last RESUME since `mark` (QEMU's clock): the guest was stopped in between. */
  pauseSince(mark: number): { pauseMs: number; stops: number; resumes: number } | null {
    const ev = this.events.slice(mark);
    const stop = ev.find((e) => e.name === 'STOP');
    const resume = [...ev].reverse().find((e) => e.name === 'RESUME');
    if (!stop || !resume || resume.qemuMs < stop.qemuMs) return null;
    return { pauseMs: resume.qemuMs - stop.qemuMs, stops: ev.filter((e) => e.name === 'STOP').length, resumes: ev.filter((e) => e.name === 'RESUME').length };
  }
}
