/**
 * Errors whose message is written for the user (bad input, or a failed step in the user's words):
 * the CLI prints them as one line. Anything else reaching the CLI is a bug and is reported as one.
 * (The repository's RepositoryError and the backends' BackendError are user-facing by their own
 * classes.)
 */
export class UserFacingError extends Error {
  readonly userFacing = true;
}
