/**
 * Errors whose message is written for the user (bad input, or a failed step in the user's words):
 * the CLI prints them as one line. Anything else reaching the CLI is a bug and is reported as one.
 * The mark is the `userFacing` property (the repository's RepositoryError and the backends'
 * BackendError carry it too), so it survives an error rebuilt on the other side of a process
 * boundary (ErrorRecord).
 */
export class UserFacingError extends Error {
  readonly userFacing = true;
}

/**
 * A user-facing error that means the command line itself was wrong (a bad size, an unknown
 * value): the CLI exits 2 for these, as for the repository's UsageError, instead of 1.
 */
export class BadInputError extends UserFacingError {
  readonly usage = true;
}

function field(err: unknown, key: string): unknown {
  return typeof err === 'object' && err !== null ? (err as Record<string, unknown>)[key] : undefined;
}

/** Whether `err` is meant for the user as is (see UserFacingError). */
export function isUserFacing(err: unknown): err is Error {
  return field(err, 'userFacing') === true;
}

/** Whether the same operation may succeed if tried again later (a timeout, a held lock). */
export function isRetryable(err: unknown): boolean {
  return field(err, 'retryable') === true;
}

/**
 * An error as it crosses a process boundary (a VM supervisor's socket; later a job queue): its
 * class name, message, the operation and step that failed, and the two verdicts a caller acts on —
 * shown to the user as is or reported as a bug, retried or not. Nothing else (no stack, no cause):
 * the full error stays in the log of the process where it happened.
 */
export interface ErrorRecord {
  name: string;
  message: string;
  userFacing: boolean;
  retryable: boolean;
  /** Bad input (the CLI exits 2). */
  usage?: boolean;
  operation?: string;
  step?: string;
}

export function errorRecord(err: unknown): ErrorRecord {
  const str = (v: unknown): string | undefined => (typeof v === 'string' ? v : undefined);
  const rec: ErrorRecord = {
    name: str(field(err, 'name')) ?? 'Error',
    message: str(field(err, 'message')) ?? String(err),
    userFacing: isUserFacing(err),
    retryable: isRetryable(err),
  };
  if (field(err, 'usage') === true || rec.name === 'UsageError') rec.usage = true;
  const operation = str(field(err, 'operation'));
  const step = str(field(err, 'step'));
  if (operation) rec.operation = operation;
  if (step) rec.step = step;
  return rec;
}

/** An error rebuilt from an ErrorRecord: same name, message, verdicts, operation and step. */
export class RemoteError extends Error {
  override readonly name: string;
  readonly userFacing: boolean;
  readonly retryable: boolean;
  readonly usage: boolean;
  readonly operation?: string;
  readonly step?: string;

  constructor(rec: ErrorRecord) {
    super(rec.message);
    this.name = rec.name;
    this.userFacing = rec.userFacing;
    this.retryable = rec.retryable;
    this.usage = rec.usage === true;
    if (rec.operation !== undefined) this.operation = rec.operation;
    if (rec.step !== undefined) this.step = rec.step;
  }
}

/** Whether `v` has the shape of an ErrorRecord (a reply from another process is not trusted). */
export function isErrorRecord(v: unknown): v is ErrorRecord {
  const r = v as Partial<ErrorRecord> | null;
  return (
    typeof r === 'object' && r !== null && typeof r.name === 'string' && typeof r.message === 'string' && typeof r.userFacing === 'boolean' && typeof r.retryable === 'boolean'
  );
}
