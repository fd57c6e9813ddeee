/**
 * Opens a backend from a repository URL:
 *   /path, ./path, local:PATH      → LocalBackend
 *   s3://BUCKET/PREFIX             → S3Backend on AWS (region and credentials from the AWS chain)
 *   s3:http(s)://HOST:PORT/BUCKET/PREFIX → S3Backend on an S3-compatible server (path-style)
 *   memory: or memory:NAME         → MemoryBackend (NAME: shared within this process, for tests)
 * Remote backends are wrapped in RetryBackend unless `retry: false`; `stats: true` adds a
 * StatsBackend inside the retry layer so it counts every billed request, retries included.
 */
import type { Backend } from './contract.js';
import { openNonS3, OpenBackendError, type OpenBackendOptions, type OpenedBackend } from './open-local.js';
import { RetryBackend } from './retry.js';
import { S3Backend } from './s3.js';
import { StatsBackend } from './stats.js';

export { OpenBackendError, type OpenBackendOptions, type OpenedBackend };

/** Classifies `url` and builds the backend; see the module comment for the accepted forms. */
export function openBackendDetailed(url: string, opts: OpenBackendOptions = {}): OpenedBackend {
  if (!url.startsWith('s3:')) return openNonS3(url, opts);
  const base: Backend = S3Backend.fromUrl(url, opts.s3);
  const stats = opts.stats ? new StatsBackend(base) : undefined;
  let backend: Backend = stats ?? base;
  if (opts.retry !== false) backend = new RetryBackend(backend, opts.retry ?? {});
  return stats ? { backend, stats, kind: 's3' } : { backend, kind: 's3' };
}

export function openBackend(url: string, opts: OpenBackendOptions = {}): Backend {
  return openBackendDetailed(url, opts).backend;
}
