/**
 * The repository format version and the rule for which versions this vmsnap opens.
 *
 * `config/config` (plaintext JSON, never encrypted: it holds no secret and must be readable before
 * a key is known):
 *   { "format": "vmsnap-repository", "version": 1, "id": "<32 hex>", "chunkSize": 65536,
 *     "codec": "zstd", "created": "<ISO-8601>", "encryption": null | { "aead": "aes-256-gcm",
 *     "ids": "blake3-keyed", "kdf": "scrypt" } }
 *
 * Layout of a repository (any backend):
 *   config/config        the above
 *   keys/<id>            wrapped master keys (encrypted repositories; crypto.ts)
 *   packs/<hex blake3>   pack files (pack.ts)
 *   index/<hex blake3>   index files (chunk-index.ts)
 *   snapshots/<id>       snapshot manifests (manifest.ts)
 *   locks/<random>       locks (lock.ts)
 *   pins/<random>        snapshots held by volumes outside the manifests (pins.ts); version 2
 *
 * Compatibility rule (tested in test/store/format.test.ts): a vmsnap opens repositories whose version
 * is between MIN_READABLE_VERSION and FORMAT_VERSION inclusive, and refuses newer ones with a message
 * saying to upgrade, older unsupported ones with a message saying which release can migrate them.
 * Bump FORMAT_VERSION for any change an older reader would misread; additions that older readers can
 * safely ignore (a new optional JSON field) do not bump it.
 */
import { FormatError } from './errors.js';
import { codecId, type CodecName } from './codec.js';

export const FORMAT_NAME = 'vmsnap-repository';
/**
 * 2: the repository may hold pins (pins.ts). An older vmsnap would forget and prune pinned
 * snapshots silently, so the first pin raises a repository to 2; repositories without pins stay 1
 * (new ones are created at 1), so they remain usable by older releases.
 */
export const FORMAT_VERSION = 2;
export const PINS_FORMAT_VERSION = 2;
/** Version `init` writes. */
export const INITIAL_FORMAT_VERSION = 1;
export const MIN_READABLE_VERSION = 1;
export const DEFAULT_CHUNK_SIZE = 64 << 10;

export interface RepoConfig {
  format: typeof FORMAT_NAME;
  version: number;
  id: string;
  chunkSize: number;
  codec: CodecName;
  created: string;
  encryption: null | { aead: 'aes-256-gcm'; ids: 'blake3-keyed'; kdf: 'scrypt' };
}

export function checkFormatVersion(version: unknown): number {
  if (typeof version !== 'number' || !Number.isInteger(version)) {
    throw new FormatError(`repository config has no valid format version (${JSON.stringify(version)})`);
  }
  if (version > FORMAT_VERSION) {
    throw new FormatError(
      `repository format version ${version} is newer than this vmsnap supports (${FORMAT_VERSION}): upgrade vmsnap`,
    );
  }
  if (version < MIN_READABLE_VERSION) {
    throw new FormatError(`repository format version ${version} is too old for this vmsnap (reads ${MIN_READABLE_VERSION}-${FORMAT_VERSION})`);
  }
  return version;
}

export function parseConfig(bytes: Buffer): RepoConfig {
  let c: Partial<RepoConfig>;
  try {
    c = JSON.parse(bytes.toString('utf8')) as Partial<RepoConfig>;
  } catch {
    throw new FormatError('repository config is not valid JSON');
  }
  if (c.format !== FORMAT_NAME) throw new FormatError('this is not a vmsnap repository (config has no vmsnap format marker)');
  checkFormatVersion(c.version);
  const cs = c.chunkSize;
  if (typeof cs !== 'number' || cs < 4096 || cs > 16 << 20 || (cs & (cs - 1)) !== 0) {
    throw new FormatError(`repository config: invalid chunk size ${JSON.stringify(cs)}`);
  }
  codecId(String(c.codec));
  if (typeof c.id !== 'string' || !/^[0-9a-f]{32}$/.test(c.id)) throw new FormatError('repository config: invalid id');
  if (c.encryption !== null && (typeof c.encryption !== 'object' || c.encryption?.aead !== 'aes-256-gcm')) {
    throw new FormatError('repository config: unsupported encryption');
  }
  return c as RepoConfig;
}
