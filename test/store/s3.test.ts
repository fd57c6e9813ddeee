import { randomBytes } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BackendError } from '../../src/store/backend/contract.js';
import { S3Backend, parseS3Url } from '../../src/store/backend/s3.js';
import { startS3rver, type S3rverHandle } from '../helpers/s3rver.js';
import { listAll, runBackendConformance } from './backend-conformance.js';

let s3: S3rverHandle;
beforeAll(async () => {
  s3 = await startS3rver();
});
afterAll(async () => {
  await s3?.stop();
});

function backendAt(prefix: string, extra: ConstructorParameters<typeof S3Backend>[1] = {}): S3Backend {
  return S3Backend.fromUrl(`${s3.url}/${prefix}`, {
    credentials: { accessKeyId: s3.accessKeyId, secretAccessKey: s3.secretAccessKey },
    ...extra,
  });
}

runBackendConformance(
  'S3Backend (s3rver, conditional create with If-None-Match)',
  async () => {
    const prefix = `repo-${randomBytes(6).toString('hex')}`;
    return {
      backend: backendAt(prefix, { listPageSize: 70, atomicCreate: true }),
      reopen: async () => backendAt(prefix, { atomicCreate: true }),
    };
  },
  { listCount: 300, transientListErrors: true },
);

runBackendConformance(
  'S3Backend (s3rver, HEAD-then-PUT create)',
  async () => {
    const prefix = `repo-${randomBytes(6).toString('hex')}`;
    return { backend: backendAt(prefix), reopen: async () => backendAt(prefix) };
  },
  { listCount: 120, largeObjectBytes: 8 * 1024 * 1024, transientListErrors: true },
);

describe('parseS3Url', () => {
  it('parses endpoint, bucket and prefix forms', () => {
    expect(parseS3Url('s3:http://127.0.0.1:9000/bucket/some/prefix')).toEqual({
      endpoint: 'http://127.0.0.1:9000',
      bucket: 'bucket',
      prefix: 'some/prefix',
    });
    expect(parseS3Url('s3:https://s3.example.com/bkt')).toEqual({ endpoint: 'https://s3.example.com', bucket: 'bkt', prefix: '' });
    expect(parseS3Url('s3://my-bucket/repos/laptop/')).toEqual({ endpoint: undefined, bucket: 'my-bucket', prefix: 'repos/laptop' });
    expect(parseS3Url('s3://my-bucket')).toEqual({ endpoint: undefined, bucket: 'my-bucket', prefix: '' });
  });

  it('rejects malformed URLs without echoing credentials', () => {
    for (const bad of ['s3:', 's3://', 's3://B', 's3:ftp://h/b', 's3:http://h/', 's3:http://h/b/../x', 's3://b//x', 's3:http://h/b?x=1']) {
      expect(() => parseS3Url(bad), bad).toThrow(BackendError);
    }
    let msg = '';
    try {
      parseS3Url('s3:http://AKID:supersecretvalue@127.0.0.1:9000/b/p');
    } catch (err) {
      msg = String(err) + JSON.stringify(err);
    }
    expect(msg).toMatch(/credentials are not allowed/);
    expect(msg).not.toContain('supersecretvalue');
  });
});

describe('S3Backend against s3rver', () => {
  it('has a location without credentials', () => {
    const b = backendAt('loc/x');
    expect(b.location).toBe(`${s3.url}/loc/x`);
    expect(b.location).not.toContain(s3.secretAccessKey);
    expect(b.capabilities).toEqual({ local: false, requestCost: true, atomicCreate: false });
  });

  it('probes whether the server honours conditional creates', async () => {
    const b = backendAt(`probe-${randomBytes(4).toString('hex')}`);
    const plain = await startS3rver({ conditionalWrites: false });
    const p = S3Backend.fromUrl(`${plain.url}/probe`, {
      credentials: { accessKeyId: plain.accessKeyId, secretAccessKey: plain.secretAccessKey },
    });
    try {
      expect(await b.probeConditionalCreate()).toBe(true);
      expect(await p.probeConditionalCreate()).toBe(false);
      expect(await listAll(b, 'locks')).toEqual([]);
    } finally {
      await b.close();
      await p.close();
      await plain.stop();
    }
  });

  it('reports unknown credentials as a permanent error naming the problem', async () => {
    // s3rver checks the access key id but not SigV4 signatures, so the key id is the wrong part here.
    const b = S3Backend.fromUrl(`${s3.url}/denied`, {
      credentials: { accessKeyId: 'UNKNOWNKEYID', secretAccessKey: 'wrong-secret-value-123' },
    });
    try {
      const err = await b.put('config', 'config', Buffer.from('x')).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(BackendError);
      expect((err as BackendError).retryable).toBe(false);
      expect((err as BackendError).message).toMatch(/access denied \(InvalidAccessKeyId\)/);
      expect(String(err) + JSON.stringify(err)).not.toContain('wrong-secret-value-123');
    } finally {
      await b.close();
    }
  });

  it('reports a missing bucket as permanent', async () => {
    const b = S3Backend.fromUrl(`s3:${s3.endpoint}/no-such-bucket/x`, {
      credentials: { accessKeyId: s3.accessKeyId, secretAccessKey: s3.secretAccessKey },
    });
    try {
      const err = await b.put('config', 'config', Buffer.from('x')).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(BackendError);
      expect((err as BackendError).retryable).toBe(false);
      expect((err as BackendError).message).toMatch(/bucket does not exist/);
    } finally {
      await b.close();
    }
  });
});
