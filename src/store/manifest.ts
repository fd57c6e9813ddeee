/**
 * Snapshot manifests: immutable descriptions of one snapshot, stored as `snapshots/<id>`.
 *
 *   stored bytes = JSON (UTF-8), sealed with AAD "snapshot" when the repository is encrypted
 *   id           = hex BLAKE3 of the plaintext JSON (keyed with the id key when encrypted)
 *
 *   {
 *     "version": 1,
 *     "vm": "work-vm", "time": "2026-11-25T12:00:00.000Z", "host": "laptop",
 *     "tags": ["daily"], "parent": "<id>" | null, "message": "...",
 *     "meta": { "qemuVersion": "10.0.2", "machine": "pc-i440fx-10.0", ... },   (strings/numbers/bools)
 *     "streams": [
 *       { "name": "disk0", "kind": "disk", "size": 4294967296, "chunkSize": 65536,
 *         "chunks": "<base64 of n × 32-byte chunk ids>" },  n = ceil(size / chunkSize)
 *       ...
 *     ]
 *   }
 *
 * A stream is a byte sequence cut into fixed-size chunks (the last one may be short). The id of 32
 * zero bytes stands for an all-zero chunk that is not stored. Everything is validated before use:
 * names are short and safe (they may become file names), sizes are bounded, and the chunk list must
 * have exactly the length the size implies — before a single chunk is fetched or a byte written.
 */
import { FormatError } from './errors.js';
import { ID_SIZE } from './hash.js';
import { MAX_CHUNK_SIZE } from './pack.js';

export const MANIFEST_VERSION = 1;
export const MANIFEST_AAD = Buffer.from('snapshot');
export const MAX_MANIFEST_BYTES = 256 << 20;
const MAX_STREAMS = 1024;
const MAX_STREAM_SIZE = 2 ** 50; // 1 PiB
export const STREAM_KINDS = ['disk', 'ram', 'device', 'config', 'file'] as const;
export type StreamKind = (typeof STREAM_KINDS)[number];
/** Names of VMs, streams and tags: they end up in file names, so no separators and no leading dot. */
export const SAFE_NAME = /^[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}$/;

export interface StreamRecord {
  name: string;
  kind: StreamKind;
  size: number;
  chunkSize: number;
  /** n × 32 bytes of chunk ids, n = ceil(size / chunkSize). */
  chunks: Buffer;
}

export type MetaValue = string | number | boolean;

export interface SnapshotData {
  vm: string;
  time: string;
  host: string;
  tags: string[];
  parent: string | null;
  message?: string;
  meta: Record<string, MetaValue>;
  streams: StreamRecord[];
}

export interface Snapshot extends SnapshotData {
  id: string;
}

/** A stream without its chunk list: what listings show. */
export interface StreamSummary extends Omit<StreamRecord, 'chunks'> {
  chunkCount: number;
}

/**
 * A snapshot without its chunk lists: a few hundred bytes, where the lists of a 128 GiB disk are 64
 * MiB. Listings (ls, forget, `latest`) hold one per snapshot in the repository.
 */
export interface SnapshotSummary extends Omit<Snapshot, 'streams'> {
  streams: StreamSummary[];
}

export function summarize(s: Snapshot): SnapshotSummary {
  const { streams, ...rest } = s;
  return { ...rest, streams: streams.map(({ chunks, ...st }) => ({ ...st, chunkCount: chunks.length / ID_SIZE })) };
}

export function chunkCount(size: number, chunkSize: number): number {
  return Math.ceil(size / chunkSize);
}

export function checkName(what: string, name: unknown): string {
  if (typeof name !== 'string' || !SAFE_NAME.test(name) || name.includes('..')) {
    throw new FormatError(
      `invalid ${what} ${JSON.stringify(name)}: use 1-128 letters, digits and . _ : @ + -, not starting with a dot or dash`,
    );
  }
  return name;
}

export function encodeManifest(data: SnapshotData): Buffer {
  validateSnapshot(data);
  const json = {
    version: MANIFEST_VERSION,
    vm: data.vm,
    time: data.time,
    host: data.host,
    tags: data.tags,
    parent: data.parent,
    ...(data.message !== undefined ? { message: data.message } : {}),
    meta: data.meta,
    streams: data.streams.map((s) => ({
      name: s.name,
      kind: s.kind,
      size: s.size,
      chunkSize: s.chunkSize,
      chunks: s.chunks.toString('base64'),
    })),
  };
  return Buffer.from(JSON.stringify(json));
}

export function decodeManifest(plain: Buffer, id: string): Snapshot {
  if (plain.length > MAX_MANIFEST_BYTES) throw new FormatError(`snapshot ${id}: manifest is too large`);
  let raw: unknown;
  try {
    raw = JSON.parse(plain.toString('utf8'));
  } catch {
    throw new FormatError(`snapshot ${id}: manifest is not valid JSON`);
  }
  if (typeof raw !== 'object' || raw === null) throw new FormatError(`snapshot ${id}: manifest is not an object`);
  const m = raw as Record<string, unknown>;
  if (m.version !== MANIFEST_VERSION) {
    throw new FormatError(`snapshot ${id}: manifest version ${JSON.stringify(m.version)} is not supported (this vmsnap reads version ${MANIFEST_VERSION})`);
  }
  if (!Array.isArray(m.streams) || m.streams.length > MAX_STREAMS) throw new FormatError(`snapshot ${id}: bad stream list`);
  const streams = m.streams.map((s: unknown, i: number): StreamRecord => {
    if (typeof s !== 'object' || s === null) throw new FormatError(`snapshot ${id}: stream #${i} is not an object`);
    const r = s as Record<string, unknown>;
    if (typeof r.chunks !== 'string') throw new FormatError(`snapshot ${id}: stream #${i} has no chunk list`);
    const size = r.size;
    const chunkSize = r.chunkSize;
    checkStreamShape(id, i, size, chunkSize);
    // Check the encoded length before decoding: base64 of n ids has a known length.
    const n = chunkCount(size as number, chunkSize as number);
    if (r.chunks.length !== Math.ceil((n * ID_SIZE) / 3) * 4) {
      throw new FormatError(`snapshot ${id}: stream #${i} chunk list has the wrong length for ${String(size)} bytes`);
    }
    return {
      name: checkName('stream name', r.name),
      kind: checkKind(id, r.kind),
      size: size as number,
      chunkSize: chunkSize as number,
      chunks: Buffer.from(r.chunks, 'base64'),
    };
  });
  const snap: Snapshot = {
    id,
    vm: checkName('VM name', m.vm),
    time: checkTime(id, m.time),
    host: typeof m.host === 'string' ? m.host.slice(0, 256) : '',
    tags: checkTags(m.tags),
    parent: m.parent === null || m.parent === undefined ? null : checkId(m.parent),
    meta: checkMeta(id, m.meta),
    streams,
  };
  if (typeof m.message === 'string') snap.message = m.message.slice(0, 4096);
  validateSnapshot(snap);
  return snap;
}

export function validateSnapshot(s: SnapshotData): void {
  checkName('VM name', s.vm);
  checkTags(s.tags);
  const seen = new Set<string>();
  s.streams.forEach((st, i) => {
    checkName('stream name', st.name);
    if (seen.has(st.name)) throw new FormatError(`stream name ${st.name} appears twice`);
    seen.add(st.name);
    checkStreamShape('(new)', i, st.size, st.chunkSize);
    if (st.chunks.length !== chunkCount(st.size, st.chunkSize) * ID_SIZE) {
      throw new FormatError(`stream ${st.name}: ${st.chunks.length / ID_SIZE} chunk ids for ${st.size} bytes`);
    }
  });
}

function checkStreamShape(id: string, i: number, size: unknown, chunkSize: unknown): void {
  if (typeof size !== 'number' || !Number.isSafeInteger(size) || size < 0 || size > MAX_STREAM_SIZE) {
    throw new FormatError(`snapshot ${id}: stream #${i} has an invalid size ${JSON.stringify(size)}`);
  }
  if (
    typeof chunkSize !== 'number' ||
    !Number.isInteger(chunkSize) ||
    chunkSize < 512 ||
    chunkSize > MAX_CHUNK_SIZE ||
    (chunkSize & (chunkSize - 1)) !== 0
  ) {
    throw new FormatError(`snapshot ${id}: stream #${i} has an invalid chunk size ${JSON.stringify(chunkSize)}`);
  }
}

function checkKind(id: string, k: unknown): StreamKind {
  if (typeof k !== 'string' || !(STREAM_KINDS as readonly string[]).includes(k)) {
    throw new FormatError(`snapshot ${id}: unknown stream kind ${JSON.stringify(k)}`);
  }
  return k as StreamKind;
}

function checkTime(id: string, t: unknown): string {
  if (typeof t !== 'string' || Number.isNaN(Date.parse(t))) throw new FormatError(`snapshot ${id}: invalid time`);
  return t;
}

export function checkTags(tags: unknown): string[] {
  if (!Array.isArray(tags) || tags.length > 64) throw new FormatError('tags must be a list of at most 64 names');
  return tags.map((t) => checkName('tag', t));
}

export function checkId(id: unknown): string {
  if (typeof id !== 'string' || !/^[0-9a-f]{64}$/.test(id)) throw new FormatError(`invalid snapshot id ${JSON.stringify(id)}`);
  return id;
}

function checkMeta(id: string, meta: unknown): Record<string, MetaValue> {
  if (meta === undefined) return {};
  if (typeof meta !== 'object' || meta === null || Array.isArray(meta)) throw new FormatError(`snapshot ${id}: meta is not an object`);
  const out: Record<string, MetaValue> = {};
  for (const [k, v] of Object.entries(meta)) {
    if (typeof v !== 'string' && typeof v !== 'number' && typeof v !== 'boolean') {
      throw new FormatError(`snapshot ${id}: meta ${k} is not a string, number or boolean`);
    }
    out[k] = v;
  }
  return out;
}
