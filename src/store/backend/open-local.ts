/**
 * The part of openBackend that needs no S3 SDK: local paths and memory backends. Kept apart so
 * commands on a local repository never load @aws-sdk/client-s3 (tens of MiB and ~100 ms at start);
 * open.ts adds S3 on top.
 */
import { BackendError, type Backend } from './contract.js';
import { LocalBackend } from './local.js';
import { MemoryBackend } from './memory.js';
import type { RetryOptions } from './retry.js';
import type { S3BackendOptions } from './s3.js';
import { StatsBackend } from './stats.js';

export interface OpenBackendOptions {
  /** Retry policy for remote backends; false disables retries. Local and memory never retry. */
  retry?: RetryOptions | false;
  s3?: S3BackendOptions;
  /** Wrap in StatsBackend (reachable as `OpenedBackend.stats`). */
  stats?: boolean;
}

export interface OpenedBackend {
  backend: Backend;
  /** Present when `stats` was requested. */
  stats?: StatsBackend;
  kind: 'local' | 's3' | 'memory';
}

export class OpenBackendError extends BackendError {
  override readonly name = 'OpenBackendError';
  constructor(message: string) {
    super(message, false);
  }
}

const namedMemory = new Map<string, MemoryBackend>();

/** Opens a local path, local:PATH or memory: location (anything but s3:). */
export function openNonS3(url: string, opts: OpenBackendOptions = {}): OpenedBackend {
  let kind: OpenedBackend['kind'];
  let base: Backend;
  if (url.startsWith('s3:')) {
    throw new OpenBackendError('internal: S3 locations are opened by open.ts');
  } else if (url === 'memory:' || url.startsWith('memory:')) {
    kind = 'memory';
    const name = url.slice('memory:'.length);
    if (name === '') {
      base = new MemoryBackend();
    } else {
      let m = namedMemory.get(name);
      if (!m) {
        m = new MemoryBackend(url);
        namedMemory.set(name, m);
      }
      base = sharedView(m);
    }
  } else {
    const p = url.startsWith('local:') ? url.slice('local:'.length) : url;
    if (p === '') throw new OpenBackendError('empty repository path');
    if (/^[a-z][a-z0-9+.-]*:\/\//i.test(p)) {
      // Do not echo the URL: it may carry credentials.
      throw new OpenBackendError(
        `unsupported repository URL scheme ${JSON.stringify(p.slice(0, p.indexOf(':')))} (use a path, local:PATH, s3://BUCKET/PREFIX, s3:https://HOST/BUCKET/PREFIX or memory:)`,
      );
    }
    kind = 'local';
    base = new LocalBackend(p);
  }
  // Local and memory backends never retry: their errors are final.
  const stats = opts.stats ? new StatsBackend(base) : undefined;
  const backend: Backend = stats ?? base;
  return stats ? { backend, stats, kind } : { backend, kind };
}


/** Closing one user of a named memory backend must not close it for the others. */
function sharedView(m: MemoryBackend): Backend {
  return {
    location: m.location,
    capabilities: m.capabilities,
    put: (k, n, d) => m.put(k, n, d),
    create: (k, n, d) => m.create(k, n, d),
    get: (k, n, r, into) => m.get(k, n, r, into),
    stat: (k, n) => m.stat(k, n),
    list: (k) => m.list(k),
    delete: (k, n) => m.delete(k, n),
    removeLeftovers: (age) => m.removeLeftovers(age),
    leftovers: () => m.leftovers(),
    close: async () => undefined,
  };
}
