/**
 * Errors whose message is written for the user (bad input, or a failed step in the user's words):
 * the CLI prints them as one line. Anything else reaching the CLI is a bug and is reported as one.
 * (The repository's RepositoryError and the backends' BackendError are user-facing by their own
 * classes.)
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
