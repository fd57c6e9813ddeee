/**
 * A repository in an S3 bucket (AWS or any S3-compatible server), keys `<prefix>/<kind>/<name>`.
 *
 * Choices, and why:
 *  - One PutObject per object. Packs are at most 64 MiB and a single PUT takes up to 5 GiB, so
 *    multipart would only add requests (cost) and a window where an incomplete upload exists. A
 *    single PUT is atomic: S3 publishes the object only once the whole body arrived and matched.
 *  - Upload integrity: every PUT carries Content-MD5, which AWS checks before publishing (BadDigest
 *    otherwise). Servers that ignore the header (s3rver) are still checked afterwards: a single-part
 *    ETag is the MD5 of the body, so a mismatching ETag is reported as a retryable error. The SDK's
 *    own CRC checksums are turned off (`WHEN_REQUIRED`): they would add aws-chunked trailers that
 *    some S3-compatible servers reject, and Content-MD5 covers the same ground.
 *  - Download integrity: the body length must equal Content-Length (and the requested range);
 *    full downloads are hashed and compared with an MD5-shaped ETag. The repository verifies content
 *    hashes on top of this; the check here only makes transport corruption retryable.
 *  - The SDK's retries are off (maxAttempts 1): `openBackend` wraps S3 in RetryBackend, which retries
 *    only what this class classifies as retryable, with one policy for every backend.
 *  - Credentials come from the standard AWS chain (environment, shared config and credentials files,
 *    profiles, SSO, instance metadata) unless passed explicitly. They never appear in `location`,
 *    error messages or logs; URLs with user info are refused rather than echoed.
 *  - `create` uses `If-None-Match: *` where the server honours it (AWS since 2024), else HEAD then
 *    PUT, which is best effort (`capabilities.atomicCreate` false).
 */
import { createHash, randomBytes } from 'node:crypto';
import type { Readable } from 'node:stream';
import { inspect } from 'node:util';
import type { S3Client, S3ClientConfig } from '@aws-sdk/client-s3';
import {
  BackendError,
  OBJECT_NAME,
  destination,
  ObjectNotFoundError,
  checkObjectName,
  checkRange,
  type Backend,
  type BackendCapabilities,
  type ByteRange,
  type ObjectInfo,
  type ObjectKind,
  type Leftover,
} from './contract.js';

const MAX_SINGLE_PUT = 5 * 2 ** 30;

type S3Sdk = typeof import('@aws-sdk/client-s3');
interface S3Handle {
  client: S3Client;
  sdk: S3Sdk;
}
let sdkLoad: Promise<S3Sdk> | undefined;
/**
 * The SDK takes about 200 ms to load on this class of machine, and every CLI command opens a
 * backend: a command on a local repository must not pay for S3, and an S3 one pays on its first
 * request instead of at start.
 */
function loadSdk(): Promise<S3Sdk> {
  return (sdkLoad ??= import('@aws-sdk/client-s3'));
}
/** Slowest upload rate tolerated before a PUT counts as stalled (64 MiB pack: about 4 minutes). */
const MIN_UPLOAD_BYTES_PER_S = 256 * 1024;

export interface S3Location {
  /** `http(s)://host:port` for S3-compatible servers; undefined for AWS (`s3://bucket/prefix`). */
  endpoint: string | undefined;
  bucket: string;
  /** Key prefix without leading or trailing slash; may be empty. */
  prefix: string;
}

export class S3UrlError extends BackendError {
  override readonly name = 'S3UrlError';
  constructor(message: string) {
    super(message, false);
  }
}

const BUCKET = /^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$/;

function checkBucketAndPrefix(bucket: string, prefix: string): void {
  if (!BUCKET.test(bucket)) {
    throw new S3UrlError(`invalid S3 bucket name ${JSON.stringify(bucket)} (3-63 characters of a-z, 0-9, '.', '-')`);
  }
  for (const seg of prefix.split('/')) {
    if (prefix !== '' && (seg === '' || seg === '.' || seg === '..')) {
      throw new S3UrlError(`invalid S3 key prefix ${JSON.stringify(prefix)}: empty, '.' or '..' segment`);
    }
  }
}

/**
 * Parses `s3:https://HOST[:PORT]/BUCKET[/PREFIX]`, `s3:http://HOST[:PORT]/BUCKET[/PREFIX]`
 * (path-style, S3-compatible servers) and `s3://BUCKET[/PREFIX]` (AWS).
 */
export function parseS3Url(url: string): S3Location {
  if (url.startsWith('s3://')) {
    const rest = url.slice('s3://'.length).replace(/\/+$/, '');
    const slash = rest.indexOf('/');
    const bucket = slash < 0 ? rest : rest.slice(0, slash);
    const prefix = slash < 0 ? '' : rest.slice(slash + 1);
    if (bucket.includes('@') || bucket.includes(':')) {
      throw new S3UrlError('credentials or ports are not allowed in s3:// URLs; use the AWS credential chain');
    }
    checkBucketAndPrefix(bucket, prefix);
    return { endpoint: undefined, bucket, prefix };
  }
  if (!url.startsWith('s3:http://') && !url.startsWith('s3:https://')) {
    throw new S3UrlError('S3 URLs look like s3://BUCKET/PREFIX or s3:https://HOST:PORT/BUCKET/PREFIX');
  }
  let u: URL;
  try {
    u = new URL(url.slice('s3:'.length));
  } catch {
    throw new S3UrlError('malformed S3 endpoint URL (expected s3:https://HOST:PORT/BUCKET/PREFIX)');
  }
  if (u.username !== '' || u.password !== '') {
    // Never echo the URL: it holds a secret.
    throw new S3UrlError('credentials are not allowed in S3 URLs; use AWS_PROFILE, AWS_ACCESS_KEY_ID or ~/.aws/credentials');
  }
  if (u.search !== '' || u.hash !== '') throw new S3UrlError('S3 URLs take no query string or fragment');
  const parts = decodeURIComponent(u.pathname).replace(/^\/+|\/+$/g, '');
  const slash = parts.indexOf('/');
  const bucket = slash < 0 ? parts : parts.slice(0, slash);
  const prefix = slash < 0 ? '' : parts.slice(slash + 1);
  checkBucketAndPrefix(bucket, prefix);
  return { endpoint: `${u.protocol}//${u.host}`, bucket, prefix };
}

export interface S3Credentials {
  accessKeyId: string;
  secretAccessKey: string;
  sessionToken?: string;
}

export interface S3BackendOptions {
  /** Default: the SDK's chain (AWS_REGION, profile); 'us-east-1' for custom endpoints. */
  region?: string;
  /** Endpoint for `s3://` locations (S3-compatible services); path-style is then used. */
  endpoint?: string;
  forcePathStyle?: boolean;
  /** Explicit credentials (tests); otherwise the standard AWS credential chain. */
  credentials?: S3Credentials;
  /** A named profile from ~/.aws/config and ~/.aws/credentials. */
  profile?: string;
  /** Requests in flight at once (default 8). */
  concurrency?: number;
  /**
   * How long to wait for a request's answer (plus time for the upload at 256 KiB/s), and for the next
   * chunk of a download body (default 60 s). Expiry is a retryable error.
   */
  requestTimeoutMs?: number;
  connectionTimeoutMs?: number;
  /**
   * Whether the server honours `If-None-Match: *` on PUT. Default: true on AWS, false on custom
   * endpoints (check one with {@link S3Backend.probeConditionalCreate}).
   */
  atomicCreate?: boolean;
  /** Keys per ListObjects page (default 1000, the S3 maximum). */
  listPageSize?: number;
}

class Semaphore {
  private active = 0;
  private readonly waiters: Array<() => void> = [];
  constructor(private readonly limit: number) {}

  async run<T>(fn: () => Promise<T>): Promise<T> {
    if (this.active >= this.limit) await new Promise<void>((r) => this.waiters.push(r));
    else this.active++;
    try {
      return await fn();
    } finally {
      const next = this.waiters.shift();
      if (next) next();
      else this.active--;
    }
  }
}

interface AwsLikeError {
  name?: string;
  Code?: string;
  code?: string;
  message?: string;
  $metadata?: { httpStatusCode?: number };
  $retryable?: unknown;
}

function asAwsError(err: unknown): AwsLikeError {
  return typeof err === 'object' && err !== null ? (err as AwsLikeError) : {};
}

function statusOf(err: unknown): number | undefined {
  return asAwsError(err).$metadata?.httpStatusCode;
}

function isNotFound(err: unknown): boolean {
  const e = asAwsError(err);
  return e.name === 'NoSuchKey' || e.name === 'NotFound' || (statusOf(err) === 404 && e.name !== 'NoSuchBucket');
}

const RETRYABLE_NAMES = new Set([
  'SlowDown',
  'RequestTimeout',
  'RequestTimeoutException',
  'InternalError',
  'ServiceUnavailable',
  'Throttling',
  'ThrottlingException',
  'TooManyRequestsException',
  'RequestThrottled',
  'TimeoutError',
  'BadDigest',
  'IncompleteBody',
  'RequestTimeTooSkewed',
  'ConditionalRequestConflict',
  'OperationAborted',
]);
const RETRYABLE_CODES = new Set([
  'ECONNRESET',
  'ECONNREFUSED',
  'ECONNABORTED',
  'EPIPE',
  'ETIMEDOUT',
  'EAI_AGAIN',
  'EHOSTUNREACH',
  'ENETUNREACH',
  'ENETDOWN',
  'UND_ERR_SOCKET',
]);

/**
 * A failed S3 request. It carries the HTTP status and S3 error code but not the SDK's error object:
 * that one holds the raw request and response (signed headers, sockets), which must not reach logs.
 */
export class S3RequestError extends BackendError {
  override readonly name = 'S3RequestError';
  constructor(
    message: string,
    retryable: boolean,
    readonly status: number | undefined,
    readonly code: string,
  ) {
    super(message, retryable);
  }
}

/** Classifies an SDK or socket error; the message names the step and object, never credentials. */
export function s3Error(step: string, what: string, err: unknown): BackendError {
  if (err instanceof BackendError) return err;
  const e = asAwsError(err);
  const status = statusOf(err);
  const name = e.name ?? 'Error';
  let retryable =
    (status !== undefined && (status >= 500 || status === 429 || status === 408)) ||
    RETRYABLE_NAMES.has(name) ||
    (e.code !== undefined && RETRYABLE_CODES.has(e.code)) ||
    /socket hang up|ECONNRESET|aborted|premature close/i.test(e.message ?? '');
  let reason = e.message ?? String(err);
  if (name === 'NoSuchBucket') {
    retryable = false;
    reason = 'the bucket does not exist';
  } else if (status === 403 || status === 401 || name === 'InvalidAccessKeyId' || name === 'SignatureDoesNotMatch' || name === 'AccessDenied') {
    retryable = false;
    reason = `access denied (${name}): check the AWS credentials (AWS_PROFILE, AWS_ACCESS_KEY_ID, ~/.aws/credentials) and the bucket policy`;
  } else if (name === 'CredentialsProviderError') {
    retryable = false;
    reason = 'no AWS credentials found (environment, ~/.aws/credentials, AWS_PROFILE, SSO or instance role)';
  }
  const detail = status !== undefined ? `HTTP ${status} ${name}` : name;
  return new S3RequestError(`s3 backend: ${step} ${what} failed: ${detail}: ${reason}`, retryable, status, e.code ?? name);
}

/** Reads a response body fully, failing retryably when it stalls or ends short. */
async function readBody(body: unknown, expected: number | undefined, idleMs: number, what: string, dest?: () => Buffer): Promise<Buffer> {
  const stream = body as Readable;
  if (typeof stream?.[Symbol.asyncIterator] !== 'function') {
    throw new BackendError(`s3 backend: get ${what}: response has no readable body`, true);
  }
  const out = expected !== undefined ? (dest?.() ?? Buffer.allocUnsafe(expected)) : undefined;
  const chunks: Buffer[] = [];
  let got = 0;
  let timer: NodeJS.Timeout | undefined;
  const arm = (): void => {
    clearTimeout(timer);
    timer = setTimeout(() => {
      stream.destroy(new BackendError(`s3 backend: get ${what}: body transfer stalled for ${idleMs} ms`, true));
    }, idleMs);
  };
  try {
    arm();
    for await (const c of stream) {
      const chunk = c as Buffer;
      arm();
      if (out) {
        if (got + chunk.length > out.length) {
          throw new BackendError(`s3 backend: get ${what}: body longer than Content-Length ${expected}`, true);
        }
        chunk.copy(out, got);
      } else {
        chunks.push(chunk);
      }
      got += chunk.length;
    }
  } catch (err) {
    throw s3Error('get (body)', what, err);
  } finally {
    clearTimeout(timer);
  }
  if (out) {
    if (got !== out.length) {
      throw new BackendError(`s3 backend: get ${what}: body ended after ${got} of ${expected} bytes`, true);
    }
    return out;
  }
  return Buffer.concat(chunks, got);
}

function md5Etag(etag: string | undefined): string | undefined {
  const m = /^"?([0-9a-f]{32})"?$/.exec(etag ?? '');
  return m?.[1];
}

export type S3Operation = 'put' | 'get' | 'head' | 'list' | 'delete';

export class S3Backend implements Backend {
  readonly location: string;
  readonly capabilities: BackendCapabilities;
  readonly bucket: string;
  private readonly base: string;
  private readonly config: S3ClientConfig;
  private handle: Promise<S3Handle> | undefined;
  private readonly sem: Semaphore;
  private readonly idleMs: number;
  private readonly pageSize: number;
  private closed = false;
  /** HTTP requests sent, by operation (ListObjects pages counted one each): the billed unit on S3. */
  readonly requestCounts: Record<S3Operation, number> = { put: 0, get: 0, head: 0, list: 0, delete: 0 };

  constructor(loc: S3Location, opts: S3BackendOptions = {}) {
    const endpoint = loc.endpoint ?? opts.endpoint;
    this.bucket = loc.bucket;
    this.base = loc.prefix === '' ? '' : `${loc.prefix}/`;
    this.location = loc.endpoint
      ? `s3:${loc.endpoint}/${loc.bucket}${loc.prefix ? `/${loc.prefix}` : ''}`
      : `s3://${loc.bucket}${loc.prefix ? `/${loc.prefix}` : ''}`;
    this.capabilities = { local: false, requestCost: true, atomicCreate: opts.atomicCreate ?? endpoint === undefined };
    const concurrency = Math.max(1, opts.concurrency ?? 8);
    this.sem = new Semaphore(concurrency);
    this.idleMs = opts.requestTimeoutMs ?? 60_000;
    this.pageSize = opts.listPageSize ?? 1000;
    const config: S3ClientConfig = {
      maxAttempts: 1,
      requestChecksumCalculation: 'WHEN_REQUIRED',
      responseChecksumValidation: 'WHEN_REQUIRED',
      forcePathStyle: opts.forcePathStyle ?? endpoint !== undefined,
      requestHandler: {
        requestTimeout: this.idleMs,
        connectionTimeout: opts.connectionTimeoutMs ?? 10_000,
        httpAgent: { keepAlive: true, maxSockets: concurrency },
        httpsAgent: { keepAlive: true, maxSockets: concurrency },
      },
    };
    const region = opts.region ?? (endpoint !== undefined ? 'us-east-1' : undefined);
    if (region !== undefined) config.region = region;
    if (endpoint !== undefined) config.endpoint = endpoint;
    if (opts.credentials) config.credentials = { ...opts.credentials };
    if (opts.profile !== undefined) config.profile = opts.profile;
    this.config = config;
  }

  private s3(): Promise<S3Handle> {
    return (this.handle ??= loadSdk().then((sdk) => ({ sdk, client: new sdk.S3Client(this.config) })));
  }

  static fromUrl(url: string, opts: S3BackendOptions = {}): S3Backend {
    return new S3Backend(parseS3Url(url), opts);
  }

  private key(kind: ObjectKind, name: string): string {
    if (this.closed) throw new BackendError(`s3 backend ${this.location} is closed`, false);
    checkObjectName(kind, name);
    return `${this.base}${kind}/${name}`;
  }

  /**
   * Runs one SDK request with a deadline for its answer (headers): the SDK's socket timeout does not
   * cover a server that accepts the request and then never answers. Uploads get extra time in
   * proportion to their size (a floor of {@link MIN_UPLOAD_BYTES_PER_S}) so slow links still work.
   */
  private async timed<T>(op: S3Operation, uploadBytes: number, fn: (abortSignal: AbortSignal, s3: S3Handle) => Promise<T>): Promise<T> {
    const s3 = await this.s3();
    this.requestCounts[op]++;
    const ac = new AbortController();
    const ms = this.idleMs + Math.ceil((uploadBytes / MIN_UPLOAD_BYTES_PER_S) * 1000);
    const timer = setTimeout(() => ac.abort(), ms);
    try {
      return await fn(ac.signal, s3);
    } catch (err) {
      if (ac.signal.aborted) throw Object.assign(new Error(`no answer within ${ms} ms`), { name: 'TimeoutError' });
      throw err;
    } finally {
      clearTimeout(timer);
    }
  }

  async put(kind: ObjectKind, name: string, data: Uint8Array): Promise<void> {
    const key = this.key(kind, name);
    await this.upload('put', kind, name, key, data, false);
  }

  private async upload(
    step: string,
    kind: ObjectKind,
    name: string,
    key: string,
    data: Uint8Array,
    ifNoneMatch: boolean,
  ): Promise<void> {
    const what = `${kind}/${name}`;
    if (data.length > MAX_SINGLE_PUT) {
      throw new BackendError(`s3 backend: ${step} ${what}: ${data.length} bytes exceeds the 5 GiB single-PUT limit`, false);
    }
    const md5 = createHash('md5').update(data).digest();
    const res = await this.sem.run(async () => {
      try {
        return await this.timed('put', data.length, (abortSignal, { client, sdk }) =>
          client.send(
            new sdk.PutObjectCommand({
              Bucket: this.bucket,
              Key: key,
              Body: data,
              ContentLength: data.length,
              ContentMD5: md5.toString('base64'),
              ContentType: 'application/octet-stream',
              ...(ifNoneMatch ? { IfNoneMatch: '*' } : {}),
            }),
            { abortSignal },
          ),
        );
      } catch (err) {
        throw s3Error(step, what, err);
      }
    });
    const etag = md5Etag(res.ETag);
    if (etag !== undefined && etag !== md5.toString('hex')) {
      // The server stored bytes other than ours (corrupted in transit and not checked server-side).
      throw new BackendError(`s3 backend: ${step} ${what}: stored object's MD5 does not match the upload`, true);
    }
  }

  async create(kind: ObjectKind, name: string, data: Uint8Array): Promise<boolean> {
    const key = this.key(kind, name);
    if (this.capabilities.atomicCreate) {
      try {
        await this.upload('create', kind, name, key, data, true);
        return true;
      } catch (err) {
        if (err instanceof S3RequestError && err.status === 412) return false;
        throw err;
      }
    }
    const exists = await this.stat(kind, name).then(
      () => true,
      (err: unknown) => {
        if (err instanceof ObjectNotFoundError) return false;
        throw err;
      },
    );
    if (exists) return false;
    await this.upload('create', kind, name, key, data, false);
    return true;
  }

  async get(kind: ObjectKind, name: string, range?: ByteRange, into?: Uint8Array): Promise<Buffer> {
    const key = this.key(kind, name);
    const what = `${kind}/${name}`;
    if (range) {
      // Validates the numbers; the size check against the object happens on the response.
      checkRange(kind, name, range, Number.MAX_SAFE_INTEGER);
      if (range.length === 0) {
        // HTTP cannot express an empty range; the size tells whether the offset is in bounds.
        const { size } = await this.stat(kind, name);
        checkRange(kind, name, range, size);
        return Buffer.alloc(0);
      }
    }
    return this.sem.run(async () => {
      let res;
      try {
        res = await this.timed('get', 0, (abortSignal, { client, sdk }) =>
          client.send(
            new sdk.GetObjectCommand({
              Bucket: this.bucket,
              Key: key,
              ...(range ? { Range: `bytes=${range.offset}-${range.offset + range.length - 1}` } : {}),
            }),
            { abortSignal },
          ),
        );
      } catch (err) {
        if (isNotFound(err)) throw new ObjectNotFoundError(kind, name);
        if (statusOf(err) === 416 && range) {
          throw new BackendError(`range ${range.offset}+${range.length} is past the end of ${what}`, false);
        }
        throw s3Error('get', what, err);
      }
      if (range) {
        // HTTP lets a server answer a range with the whole object (200) or a wider range; accept any
        // answer that covers the request and slice it, reject one that does not.
        const cr = /^bytes (\d+)-(\d+)\/(\d+|\*)$/.exec(res.ContentRange ?? '');
        const first = cr ? Number(cr[1]) : 0;
        const total = cr ? (cr[3] === '*' ? undefined : Number(cr[3])) : res.ContentLength;
        const bodyLength = res.ContentLength ?? (cr ? Number(cr[2]) - first + 1 : undefined);
        if (total !== undefined && range.offset + range.length > total) {
          (res.Body as Readable | undefined)?.destroy?.();
          throw new BackendError(`range ${range.offset}+${range.length} is past the end of ${what} (${total} bytes)`, false);
        }
        if (bodyLength === undefined || first > range.offset || first + bodyLength < range.offset + range.length) {
          (res.Body as Readable | undefined)?.destroy?.();
          throw new BackendError(
            `s3 backend: get ${what}: server answered range ${range.offset}+${range.length} with ${res.ContentRange ?? 'no Content-Range'}`,
            true,
          );
        }
        const exact = first === range.offset && bodyLength === range.length;
        const dest = exact && into ? () => destination(kind, name, range.length, into) : undefined;
        const body = await readBody(res.Body, bodyLength, this.idleMs, what, dest);
        if (exact) return body;
        return Buffer.from(body.subarray(range.offset - first, range.offset - first + range.length));
      }
      const size = res.ContentLength;
      const data = await readBody(res.Body, size, this.idleMs, what, into && size !== undefined ? () => destination(kind, name, size, into) : undefined);
      const etag = md5Etag(res.ETag);
      if (etag !== undefined && createHash('md5').update(data).digest('hex') !== etag) {
        throw new BackendError(`s3 backend: get ${what}: downloaded bytes do not match the object's MD5`, true);
      }
      return data;
    });
  }

  async stat(kind: ObjectKind, name: string): Promise<ObjectInfo> {
    const key = this.key(kind, name);
    return this.sem.run(async () => {
      try {
        const res = await this.timed('head', 0, (abortSignal, { client, sdk }) =>
          client.send(new sdk.HeadObjectCommand({ Bucket: this.bucket, Key: key }), { abortSignal }),
        );
        return { name, size: res.ContentLength ?? 0 };
      } catch (err) {
        if (isNotFound(err)) throw new ObjectNotFoundError(kind, name);
        throw s3Error('stat', `${kind}/${name}`, err);
      }
    });
  }

  async *list(kind: ObjectKind): AsyncIterable<ObjectInfo> {
    const prefix = this.key(kind, 'x').slice(0, -1);
    // ListObjects (v1) paged by Marker = last key seen: every S3-compatible server implements it,
    // while v2 continuation tokens break on some (s3rver makes them with DES, missing from OpenSSL 3).
    // Same cost, same 1000-key pages, same key order.
    let marker: string | undefined;
    for (;;) {
      const page = await this.sem.run(async () => {
        try {
          return await this.timed('list', 0, (abortSignal, { client, sdk }) =>
            client.send(
              new sdk.ListObjectsCommand({
                Bucket: this.bucket,
                Prefix: prefix,
                MaxKeys: this.pageSize,
                ...(marker !== undefined ? { Marker: marker } : {}),
              }),
              { abortSignal },
            ),
          );
        } catch (err) {
          throw s3Error('list', `${kind}/`, err);
        }
      });
      const contents = page.Contents ?? [];
      for (const o of contents) {
        const name = o.Key?.slice(prefix.length);
        // Keys from other tools (nested paths, odd names) are not repository objects.
        if (name !== undefined && OBJECT_NAME.test(name)) yield { name, size: o.Size ?? 0 };
      }
      const last = contents[contents.length - 1]?.Key;
      if (!page.IsTruncated || last === undefined || last === marker) return;
      marker = last;
    }
  }

  async delete(kind: ObjectKind, name: string): Promise<void> {
    const key = this.key(kind, name);
    await this.sem.run(async () => {
      try {
        await this.timed('delete', 0, (abortSignal, { client, sdk }) =>
          client.send(new sdk.DeleteObjectCommand({ Bucket: this.bucket, Key: key }), { abortSignal }),
        );
      } catch (err) {
        if (isNotFound(err)) return;
        throw s3Error('delete', `${kind}/${name}`, err);
      }
    });
  }

  /**
   * Finds out whether the server rejects a conditional PUT over an existing key (412), i.e. whether
   * `create` can be atomic here. Writes and deletes one probe key outside the kind folders.
   */
  async probeConditionalCreate(): Promise<boolean> {
    const key = `${this.base}probe-create-${randomBytes(8).toString('hex')}`;
    const body = Buffer.from('probe');
    try {
      await this.upload('probe', 'locks', 'probe', key, body, true);
      try {
        await this.upload('probe', 'locks', 'probe', key, body, true);
        return false;
      } catch (err) {
        if (err instanceof S3RequestError && err.status === 412) return true;
        throw err;
      }
    } finally {
      const { client, sdk } = await this.s3();
      await client.send(new sdk.DeleteObjectCommand({ Bucket: this.bucket, Key: key })).catch(() => undefined);
    }
  }

  /** Single PUTs only (see the header): an interrupted upload leaves nothing in the bucket. */
  async removeLeftovers(_olderThanMs: number): Promise<number> {
    return 0;
  }

  async leftovers(): Promise<Leftover[]> {
    return [];
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    if (this.handle) await this.handle.then((h) => h.client.destroy(), () => undefined);
  }

  /** Printing the backend shows where it points, never the client and its credential provider. */
  [inspect.custom](): string {
    return `S3Backend(${this.location})`;
  }
}
