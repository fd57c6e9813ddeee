/**
 * Starts a real S3 server (s3rver) in this process on a free 127.0.0.1 port, storing into a fresh
 * temp directory, with one bucket and a freshly generated key pair (so tests can search output for
 * a secret nobody else uses). `stop()` closes every connection and removes the directory.
 *
 * s3rver 3.7 differs from S3 in ways that would make backend tests fail for the server's sake, so
 * this helper patches its filesystem store once per process to give S3's guarantees:
 *  - PUT writes the object file in place and acknowledges before the data is written, so readers
 *    (and the PUT's own client) can see a partial object, and a client that disconnects mid-upload
 *    leaves a truncated object behind. Patched: the body is received completely first, then
 *    published with a temp file and rename; an aborted body publishes nothing.
 *  - Object bytes, MD5 and metadata live in three files updated one after another, so concurrent
 *    PUT/GET/HEAD of one key can mix versions. Patched: per-key serialisation of those operations
 *    (a GET holds the key only until its file is open, as S3 serves a consistent version).
 *  - `If-None-Match: *` on PUT is ignored. Patched (unless `conditionalWrites: false`): the PUT
 *    fails with 412 PreconditionFailed when the key exists, checked under the same per-key lock as
 *    the write, as AWS has done since 2024.
 * Known remaining differences (handled by S3Backend, not patched): SigV4 signatures are not
 * verified (only the access key id); ListObjectsV2 continuation
 * tokens use DES, which Node 20's OpenSSL 3 lacks (S3Backend pages with StartAfter); a range
 * `bytes=0-0` returns the whole object (S3Backend accepts a covering range and slices).
 */
import { AsyncLocalStorage } from 'node:async_hooks';
import { createHash, randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, rename, rm, writeFile } from 'node:fs/promises';
import type { IncomingMessage, Server, ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import * as path from 'node:path';

interface S3rverInstance {
  run(): Promise<AddressInfo>;
  close(): Promise<void>;
  httpServer?: Server;
}
type S3rverCtor = new (opts: Record<string, unknown>) => S3rverInstance;
interface AccountModule {
  DUMMY_ACCOUNT: {
    createKeyPair(id: string, secret: string): void;
    revokeAccessKey(id: string): void;
  };
}

const require = createRequire(import.meta.url);

interface StoreObject {
  bucket: string;
  key: string;
  content: Buffer | NodeJS.ReadableStream;
  metadata: Record<string, unknown>;
}
interface FilesystemStoreProto {
  getResourcePath(bucket: string, key: string, resource: string): string;
  putMetadata(bucket: string, key: string, metadata: Record<string, unknown>, md5: string): Promise<void>;
  putObject(object: StoreObject): Promise<{ size: number; md5: string }>;
  getObject(bucket: string, key: string, options?: unknown): Promise<unknown>;
  getMetadata(bucket: string, key: string): Promise<unknown>;
  existsObject(bucket: string, key: string): Promise<boolean>;
  deleteObject(bucket: string, key: string): Promise<void>;
  vmsnapAtomic?: boolean;
}

async function readAll(content: Buffer | NodeJS.ReadableStream): Promise<Buffer> {
  if (Buffer.isBuffer(content)) return content;
  const stream = content as NodeJS.ReadableStream & { readableAborted?: boolean };
  return new Promise<Buffer>((resolve, reject) => {
    const chunks: Buffer[] = [];
    let ended = false;
    stream.on('data', (c: Buffer) => chunks.push(c));
    stream.on('end', () => {
      ended = true;
      resolve(Buffer.concat(chunks));
    });
    stream.on('error', reject);
    stream.on('close', () => {
      if (!ended) reject(new Error('request body aborted before its end'));
    });
  });
}

/** Per request: whether this PUT must fail when the key exists (set by the request wrapper). */
const conditional = new AsyncLocalStorage<{ ifNoneMatch: boolean; awsChunked?: boolean }>();

/**
 * Decodes an `aws-chunked` body (SigV4 streaming upload: `hex-size;chunk-signature=…\r\n data \r\n`
 * … `0;chunk-signature=…\r\n\r\n`), which s3rver would otherwise store verbatim. minio-go (restic)
 * uploads this way over plain HTTP.
 */
function decodeAwsChunked(body: Buffer): Buffer {
  const parts: Buffer[] = [];
  let p = 0;
  for (;;) {
    const eol = body.indexOf('\r\n', p);
    if (eol < 0) throw new Error('aws-chunked body: missing chunk header');
    const m = /^([0-9a-fA-F]+)(;chunk-signature=[0-9a-f]{64})?$/.exec(body.subarray(p, eol).toString('latin1'));
    if (!m) throw new Error('aws-chunked body: bad chunk header');
    const n = parseInt(m[1]!, 16);
    p = eol + 2;
    if (n === 0) return Buffer.concat(parts);
    parts.push(body.subarray(p, p + n));
    p += n + 2;
  }
}

type S3ErrorCtor = new (code: string, message: string, detail?: Record<string, string>) => Error;

const ALLOWED_METADATA = new Set((require('s3rver/lib/models/object.js') as { ALLOWED_METADATA: string[] }).ALLOWED_METADATA);

function patchStoreForS3Semantics(): void {
  const Store = require('s3rver/lib/stores/filesystem.js') as { prototype: FilesystemStoreProto };
  const proto = Store.prototype;
  if (proto.vmsnapAtomic) return;
  proto.vmsnapAtomic = true;
  const tails = new Map<string, Promise<void>>();
  const held = new AsyncLocalStorage<Set<string>>();
  const withKey = async <T>(bucket: string, key: string, fn: () => Promise<T>): Promise<T> => {
    const id = `${bucket}\0${key}`;
    // getObject calls getMetadata on the same key: re-entry from inside the held section runs directly.
    if (held.getStore()?.has(id)) return fn();
    const prev = tails.get(id) ?? Promise.resolve();
    let release = (): void => undefined;
    const mine = new Promise<void>((r) => (release = r));
    const tail = prev.then(() => mine);
    tails.set(id, tail);
    await prev;
    try {
      return await held.run(new Set([...(held.getStore() ?? []), id]), fn);
    } finally {
      release();
      if (tails.get(id) === tail) tails.delete(id);
    }
  };
  const { getObject, getMetadata, existsObject, deleteObject } = proto;
  proto.putMetadata = async function (this: FilesystemStoreProto, bucket: string, key: string, metadata: Record<string, unknown>, md5: string) {
    const dir = path.dirname(this.getResourcePath(bucket, key, 'object'));
    await mkdir(dir, { recursive: true });
    const json: Record<string, unknown> = {};
    for (const [k, v] of Object.entries(metadata)) if (ALLOWED_METADATA.has(k) || k.startsWith('x-amz-meta-')) json[k] = v;
    const writeAtomic = async (file: string, data: string) => {
      const tmp = `${file}.tmp-${randomBytes(6).toString('hex')}`;
      await writeFile(tmp, data);
      await rename(tmp, file);
    };
    if (md5) await writeAtomic(this.getResourcePath(bucket, key, 'object.md5'), md5);
    await writeAtomic(this.getResourcePath(bucket, key, 'metadata.json'), JSON.stringify(json, null, 2));
  };
  proto.putObject = async function (this: FilesystemStoreProto, object: StoreObject) {
    const raw = await readAll(object.content);
    const body = conditional.getStore()?.awsChunked ? decodeAwsChunked(raw) : raw;
    const md5 = createHash('md5').update(body).digest('hex');
    const file = this.getResourcePath(object.bucket, object.key, 'object');
    return withKey(object.bucket, object.key, async () => {
      if (conditional.getStore()?.ifNoneMatch && (await existsObject.call(this, object.bucket, object.key))) {
        const S3Error = require('s3rver/lib/models/error.js') as S3ErrorCtor;
        throw new S3Error('PreconditionFailed', 'At least one of the pre-conditions you specified did not hold', {
          Condition: 'If-None-Match',
        });
      }
      await mkdir(path.dirname(file), { recursive: true });
      const tmp = `${file}.tmp-${randomBytes(6).toString('hex')}`;
      await writeFile(tmp, body);
      // Metadata first, each file replaced atomically: a listing that finds the object file must
      // find complete metadata beside it (s3rver's own writeFile let a concurrent LIST parse a
      // half-written metadata.json and answer 500).
      await this.putMetadata(object.bucket, object.key, object.metadata, md5);
      await rename(tmp, file);
      return { size: body.length, md5 };
    });
  };
  proto.getObject = function (this: FilesystemStoreProto, bucket: string, key: string, options?: unknown) {
    return withKey(bucket, key, () => getObject.call(this, bucket, key, options));
  };
  proto.getMetadata = function (this: FilesystemStoreProto, bucket: string, key: string) {
    return withKey(bucket, key, () => getMetadata.call(this, bucket, key));
  };
  proto.existsObject = function (this: FilesystemStoreProto, bucket: string, key: string) {
    return withKey(bucket, key, () => existsObject.call(this, bucket, key));
  };
  proto.deleteObject = function (this: FilesystemStoreProto, bucket: string, key: string) {
    return withKey(bucket, key, () => deleteObject.call(this, bucket, key));
  };
}

export interface S3rverHandle {
  /** `http://127.0.0.1:PORT` */
  endpoint: string;
  /** `s3:http://127.0.0.1:PORT/BUCKET` — append `/PREFIX` for a repository location. */
  url: string;
  bucket: string;
  accessKeyId: string;
  secretAccessKey: string;
  port: number;
  directory: string;
  stop(): Promise<void>;
}

export async function startS3rver(opts: { bucket?: string; conditionalWrites?: boolean } = {}): Promise<S3rverHandle> {
  patchStoreForS3Semantics();
  const S3rver = require('s3rver') as S3rverCtor;
  const account = require('s3rver/lib/models/account.js') as AccountModule;
  const bucket = opts.bucket ?? 'vmsnap-test';
  const directory = await mkdtemp(path.join(tmpdir(), 'vmsnap-s3rver-'));
  const accessKeyId = `VMSNAPTEST${randomBytes(5).toString('hex').toUpperCase()}`;
  const secretAccessKey = randomBytes(30).toString('base64url');
  account.DUMMY_ACCOUNT.createKeyPair(accessKeyId, secretAccessKey);
  const server = new S3rver({
    address: '127.0.0.1',
    port: 0,
    silent: true,
    directory,
    configureBuckets: [{ name: bucket }],
    vhostBuckets: false,
  });
  const addr = await server.run();
  const http = server.httpServer;
  if (!http) throw new Error('s3rver did not start an HTTP server');
  const honour = opts.conditionalWrites ?? true;
  const handlers = http.listeners('request') as Array<(req: IncomingMessage, res: ServerResponse) => void>;
  http.removeAllListeners('request');
  http.on('request', (req: IncomingMessage, res: ServerResponse) => {
    const ifNoneMatch = honour && req.method === 'PUT' && req.headers['if-none-match'] === '*';
    const awsChunked = req.method === 'PUT' && req.headers['x-amz-content-sha256'] === 'STREAMING-AWS4-HMAC-SHA256-PAYLOAD';
    conditional.run({ ifNoneMatch, awsChunked }, () => {
      for (const h of handlers) h.call(http, req, res);
    });
  });
  const endpoint = `http://127.0.0.1:${addr.port}`;
  return {
    endpoint,
    url: `s3:${endpoint}/${bucket}`,
    bucket,
    accessKeyId,
    secretAccessKey,
    port: addr.port,
    directory,
    async stop() {
      server.httpServer?.closeAllConnections();
      await server.close();
      account.DUMMY_ACCOUNT.revokeAccessKey(accessKeyId);
      await rm(directory, { recursive: true, force: true });
    },
  };
}
