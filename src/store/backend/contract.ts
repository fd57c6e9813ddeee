/**
 * The backend contract: where a repository keeps its objects.
 *
 * A backend is a flat namespace of immutable objects grouped by {@link ObjectKind}. The repository
 * layer above it never edits an object in place: it writes new objects and deletes old ones. Every
 * implementation (local directory, S3, in-memory, and every wrapper such as the fault injector,
 * retry or statistics) must satisfy all of the following; `test/store/backend-conformance.ts`
 * checks them and runs against every implementation.
 *
 * 1. Atomic put. `put(kind, name, data)` makes the object visible whole or not at all. A reader,
 *    a `list`, or a process that starts after a crash in the middle of `put` never sees a partially
 *    written object (local: temp file, fsync, rename, fsync the directory; S3: a single PUT or a
 *    completed multipart upload).
 * 2. Read-after-write. Once `put` has resolved, `get`, `stat` and `list` in this process and any other
 *    see the object. Once `delete` has resolved, they no longer do.
 * 3. Durability. A resolved `put` survives a crash of the process and (local) of the machine.
 * 4. Names. `name` matches {@link OBJECT_NAME}: no separators, no dots at the start, so no object can
 *    escape its kind's folder. Anything else is rejected with a BackendError before any I/O.
 * 5. Overwrite. Putting an existing name replaces it atomically (used only by `config`, `locks`
 *    and `keys`; content-addressed kinds never write different bytes under one name).
 * 6. Missing objects. `get`/`stat` of an object that does not exist rejects with
 *    {@link ObjectNotFoundError}; `delete` of one resolves (deletes are idempotent).
 * 7. Ranges. `get(kind, name, {offset, length})` returns exactly that byte range; a range that extends
 *    past the end of the object rejects with a BackendError (it is never silently short).
 * 8. Destination buffers. `get(kind, name, range, into)` may read the bytes straight into `into`
 *    (which must hold at least the range's length, or the object's size without a range) and then
 *    resolves with a view of `into`; callers reuse such buffers on hot paths, because first-touching
 *    fresh memory costs more than the copy (measured in docs/benchmarks.md). Callers must use the
 *    returned Buffer, never assume `into` holds the bytes: an implementation may ignore `into`. After
 *    a rejection, `into`'s contents are unspecified.
 * 9. Listing. `list(kind)` yields every object of that kind exactly once, in no particular order,
 *    with its size.
 * 10. Leftovers. `removeLeftovers(olderThanMs)` deletes what interrupted writes left behind (local:
 *    temp files of puts killed before their rename) that is older than `olderThanMs`, and nothing
 *    else: never a visible object, never a younger leftover (another process may still be writing
 *    it). Resolves with how many it removed; a backend whose writes leave nothing resolves 0.
 *    `leftovers()` lists the same things, whatever their age, and removes nothing (for `check`).
 * 11. Errors. Failures are BackendError with `retryable` true for conditions that may pass
 *    (timeouts, 5xx, throttling, ECONNRESET) and false for those that will not (ENOSPC, EACCES,
 *    auth). Wrappers may retry only retryable errors.
 */

export const OBJECT_KINDS = ['config', 'keys', 'packs', 'index', 'snapshots', 'locks', 'pins'] as const;
export type ObjectKind = (typeof OBJECT_KINDS)[number];

/** Object names: 1-128 characters of [A-Za-z0-9_-], starting with an alphanumeric. */
export const OBJECT_NAME = /^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$/;

export interface ObjectInfo {
  name: string;
  size: number;
}

export interface Leftover {
  name: string;
  size: number;
  ageMs: number;
}

export interface ByteRange {
  offset: number;
  length: number;
}

export interface BackendCapabilities {
  /** Objects are on this machine's disks (cheap ranged reads, no request cost). */
  local: boolean;
  /** Reads and writes are billed per request (S3): callers batch and avoid needless reads. */
  requestCost: boolean;
  /** Conditional create (put only if absent) is atomic on this backend: used by locks. */
  atomicCreate: boolean;
}

export interface Backend {
  /** A human-readable location (never contains credentials). */
  readonly location: string;
  readonly capabilities: BackendCapabilities;
  put(kind: ObjectKind, name: string, data: Uint8Array): Promise<void>;
  /**
   * Put only if the object does not exist yet. Resolves true when this call created it, false when
   * it already existed. Atomic where `capabilities.atomicCreate`; otherwise best effort.
   */
  create(kind: ObjectKind, name: string, data: Uint8Array): Promise<boolean>;
  get(kind: ObjectKind, name: string, range?: ByteRange, into?: Uint8Array): Promise<Buffer>;
  stat(kind: ObjectKind, name: string): Promise<ObjectInfo>;
  list(kind: ObjectKind): AsyncIterable<ObjectInfo>;
  delete(kind: ObjectKind, name: string): Promise<void>;
  /** See item 10: removes leftovers of interrupted writes older than `olderThanMs`. */
  removeLeftovers(olderThanMs: number): Promise<number>;
  /** See item 10: every leftover of an interrupted write (name relative to the store), with its age. */
  leftovers(): Promise<Leftover[]>;
  /** Release sockets, file handles. The backend is unusable afterwards. */
  close(): Promise<void>;
}

export class BackendError extends Error {
  override readonly name: string = 'BackendError';
  /** A backend's errors say what failed in the user's terms (src/util/errors.ts). */
  readonly userFacing = true;
  constructor(
    message: string,
    readonly retryable: boolean,
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
}

export class ObjectNotFoundError extends BackendError {
  override readonly name = 'ObjectNotFoundError';
  constructor(
    readonly kind: ObjectKind,
    readonly object: string,
  ) {
    super(`${kind}/${object} does not exist`, false);
  }
}

export function checkObjectName(kind: ObjectKind, name: string): void {
  if (!(OBJECT_KINDS as readonly string[]).includes(kind)) {
    throw new BackendError(`invalid object kind ${JSON.stringify(kind)}`, false);
  }
  if (!OBJECT_NAME.test(name)) {
    throw new BackendError(`invalid object name ${JSON.stringify(name)} for ${kind}`, false);
  }
}

/**
 * The buffer a `get` fills: a view of `into` when one is given (rejected when too small: a caller
 * bug, never retryable), else a fresh allocation.
 */
export function destination(kind: ObjectKind, name: string, length: number, into?: Uint8Array): Buffer {
  if (!into) return Buffer.allocUnsafe(length);
  if (into.byteLength < length) {
    throw new BackendError(`destination buffer of ${into.byteLength} bytes cannot hold ${length} bytes of ${kind}/${name}`, false);
  }
  return Buffer.from(into.buffer, into.byteOffset, length);
}

export function checkRange(kind: ObjectKind, name: string, range: ByteRange, size: number): void {
  const { offset, length } = range;
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
    throw new BackendError(`invalid range ${offset}+${length} for ${kind}/${name}`, false);
  }
  if (offset + length > size) {
    throw new BackendError(
      `range ${offset}+${length} is past the end of ${kind}/${name} (${size} bytes)`,
      false,
    );
  }
}
