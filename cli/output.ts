/** Output helpers: progress bars only on a terminal, JSON for machines, human sizes. */
import cliProgress from 'cli-progress';
import { UsageError } from '../src/store/errors.js';
import type { ProgressEvent, ProgressSink } from '../src/ops/progress.js';

export function humanBytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${i === 0 ? v : v.toFixed(v < 10 ? 2 : 1)} ${units[i]}`;
}

export interface Progress {
  update(value: number, total?: number): void;
  stop(): void;
}

export function progress(label: string, total: number, enabled: boolean): Progress {
  if (!enabled || !process.stderr.isTTY) return { update: () => undefined, stop: () => undefined };
  const bar = new cliProgress.SingleBar(
    {
      format: `${label} [{bar}] {percentage}% | {done} of {all} | {speed}`,
      stream: process.stderr,
      hideCursor: true,
      clearOnComplete: true,
    },
    cliProgress.Presets.shades_classic,
  );
  const t0 = Date.now();
  bar.start(total, 0, { done: humanBytes(0), all: total ? humanBytes(total) : '?', speed: '' });
  return {
    update(value, newTotal) {
      if (newTotal !== undefined) bar.setTotal(newTotal);
      const s = (Date.now() - t0) / 1000;
      bar.update(value, { done: humanBytes(value), all: humanBytes(newTotal ?? total), speed: s > 0 ? `${humanBytes(value / s)}/s` : '' });
    },
    stop() {
      bar.stop();
    },
  };
}

export function printJson(v: unknown): void {
  process.stdout.write(JSON.stringify(v, null, 2) + '\n');
}

export function shortId(id: string): string {
  return id.slice(0, 12);
}

export { isUserFacing } from '../src/util/errors.js';

/** Bad usage (exit 2): the repository's UsageError, and any user-facing error marked `usage`. */
export function isUsageError(err: unknown): boolean {
  if (err instanceof UsageError) return true;
  const e = err as { usage?: unknown } | null;
  return typeof e === 'object' && e !== null && e.usage === true;
}

/**
 * An error as the one line of JSON that `--json` prints on stderr:
 * `{"error":{"message","name","exitCode","step"?,"retryable"?}}`. `step` names the failed step of
 * an operation (OperationError); `retryable` says whether the same command may succeed later.
 */
export function errorJson(err: unknown, name: string | undefined, exitCode: number): string {
  const e = (typeof err === 'object' && err !== null ? err : { message: String(err) }) as { message?: unknown; name?: unknown; step?: unknown; operation?: unknown; retryable?: unknown };
  const out: { message: string; name: string; exitCode: number; step?: string; retryable?: boolean } = {
    message: typeof err === 'string' ? err : String(e.message),
    name: name ?? (typeof e.name === 'string' ? e.name : 'Error'),
    exitCode,
  };
  if (typeof e.step === 'string') out.step = typeof e.operation === 'string' ? `${e.operation}: ${e.step}` : e.step;
  if (typeof e.retryable === 'boolean') out.retryable = e.retryable;
  return JSON.stringify({ error: out });
}

/**
 * Renders an operation's ProgressEvents (src/ops/progress.ts) on stderr: byte progress as a bar
 * (on a terminal, unless disabled), `info` messages as lines when not quiet, and warnings always as
 * `vmsnap: warning: ...` (they ask the user to act, even under --json, whose stdout stays clean).
 */
export function progressSink(label: string, opts: { bar: boolean; info: boolean }): ProgressSink & { stop(): void } {
  let bar: Progress | null = null;
  return {
    emit(e: ProgressEvent) {
      if (e.type === 'message') {
        if (e.level === 'warning') console.error(`vmsnap: warning: ${e.text}`);
        else if (opts.info) console.error(e.text);
        return;
      }
      if (e.type !== 'progress' || !opts.bar) return;
      bar ??= progress(label, e.total ?? 0, true);
      bar.update(e.done, e.total ?? undefined);
    },
    stop() {
      bar?.stop();
    },
  };
}
