/**
 * Errors of the repository layer. Each operation throws its own class naming the step that failed, so
 * the CLI can print one clear line and tests can assert on the kind of failure.
 *
 * `RepositoryError` subclasses are user-facing (their message is shown as is). Anything else that
 * escapes is an internal bug and is printed with a stack trace by the CLI.
 */

export class RepositoryError extends Error {
  override readonly name: string = 'RepositoryError';
  readonly userFacing = true;
  /** The same operation may succeed if retried later (backend timeouts, lock held). */
  get retryable(): boolean {
    return false;
  }
}

/** The repository's own bytes are not what they should be: corruption, truncation, tampering. */
export class IntegrityError extends RepositoryError {
  override readonly name: string = 'IntegrityError';
}

/** Input that vmsnap refuses to interpret: wrong version, absurd length, unsafe name. */
export class FormatError extends RepositoryError {
  override readonly name: string = 'FormatError';
}

export class WrongPasswordError extends RepositoryError {
  override readonly name = 'WrongPasswordError';
}

export class NotFoundError extends RepositoryError {
  override readonly name = 'NotFoundError';
}

export class LockedError extends RepositoryError {
  override readonly name = 'LockedError';
  override get retryable(): boolean {
    return true;
  }
}

/** The input of an import is not what it claimed to be (a file that shrank while it was read). */
export class IngestError extends RepositoryError {
  override readonly name = 'IngestError';
}

export class UsageError extends RepositoryError {
  override readonly name = 'UsageError';
}

/** Wraps the failure of one step of a multi-step operation: "import: writing pack 3fa2…: ENOSPC". */
export class OperationError extends RepositoryError {
  override readonly name = 'OperationError';
  constructor(
    readonly operation: string,
    readonly step: string,
    cause: unknown,
  ) {
    super(`${operation}: ${step}: ${cause instanceof Error ? cause.message : String(cause)}`, { cause });
  }
  override get retryable(): boolean {
    const c = this.cause as { retryable?: unknown } | undefined;
    return c?.retryable === true;
  }
}
