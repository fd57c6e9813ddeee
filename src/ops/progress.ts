/**
 * The one way an operation (src/ops/*, and through them the job handlers of src/jobs) tells its
 * caller how far it got. The CLI renders these events as progress bars and warning lines, the job
 * runners store the latest one with the job (`vmsnap jobs`, the dashboard), tests collect them.
 *
 * An operation never writes to the terminal itself: what the user should read goes through a
 * `message` event, so the same code runs under a CLI, a daemon or a worker without output of its own.
 */

export type ProgressEvent =
  /** A new step of the operation begins (e.g. "reading", "pruning"). */
  | { type: 'phase'; phase: string }
  /**
   * Work done within the current phase: `done` of `total` units (`total` null when unknown, e.g.
   * stdin), `bytes` when the units are not bytes themselves but bytes were moved.
   */
  | { type: 'progress'; phase: string; done: number; total: number | null; unit: 'bytes' | 'chunks' | 'items'; bytes?: number }
  /** A line for the user: `warning` for something they should act on, `info` otherwise. */
  | { type: 'message'; level: 'info' | 'warning'; text: string };

export interface ProgressSink {
  emit(event: ProgressEvent): void;
}

/** Discards every event (an operation whose caller does not watch). */
export const noProgress: ProgressSink = { emit: () => undefined };

/** Keeps every event in order, and the latest `progress` one (tests, job records). */
export class ProgressCollector implements ProgressSink {
  readonly events: ProgressEvent[] = [];
  latest: Extract<ProgressEvent, { type: 'progress' }> | null = null;

  emit(event: ProgressEvent): void {
    this.events.push(event);
    if (event.type === 'progress') this.latest = event;
  }

  /** The texts of the `message` events of one level. */
  messages(level: 'info' | 'warning'): string[] {
    return this.events.flatMap((e) => (e.type === 'message' && e.level === level ? [e.text] : []));
  }
}

/** Sends each event to every sink (a CLI bar and a job record at once). */
export function fanOut(...sinks: ProgressSink[]): ProgressSink {
  return { emit: (e) => sinks.forEach((s) => s.emit(e)) };
}

/** Shorthands an operation uses to emit. */
export function reporter(sink: ProgressSink) {
  return {
    phase: (phase: string) => sink.emit({ type: 'phase', phase }),
    bytes: (phase: string, done: number, total: number | null) => sink.emit({ type: 'progress', phase, done, total, unit: 'bytes' }),
    count: (phase: string, done: number, total: number | null, unit: 'chunks' | 'items' = 'items', bytes?: number) =>
      sink.emit({ type: 'progress', phase, done, total, unit, ...(bytes !== undefined ? { bytes } : {}) }),
    warn: (text: string) => sink.emit({ type: 'message', level: 'warning', text }),
    info: (text: string) => sink.emit({ type: 'message', level: 'info', text }),
  };
}
