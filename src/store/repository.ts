/**
 * The repository: content-addressed chunks in packs, an index, and snapshot manifests, on any
 * backend (see format.ts for the layout, pack.ts, chunk-index.ts and manifest.ts for the formats).
 *
 * Write ordering (what makes a crash at any point harmless):
 *   1. chunks are appended to an in-memory pack; a full pack is uploaded (atomic put);
 *   2. flush() waits for all pack uploads, then writes one index file naming them;
 *   3. saveSnapshot() flushes, then writes the manifest.
 * A crash before (3) leaves packs and maybe an index file that no snapshot references: garbage
 * that prune removes, never a snapshot that references a missing chunk. Packs are never modified,
 * only deleted by prune under an exclusive lock after a new index no longer references them.
 *
 * Write sessions (docs/locks.md): between its first pack upload and its manifest, a writer's packs
 * are unindexed, and prune deletes unindexed packs. So every write happens inside a session
 * (`write`/`beginWrite`) that holds a repository lock, shared for writers, exclusive for prune and
 * rebuild-index. `repo.backend` refuses to put or delete packs, index files and manifests outside
 * a session (an internal error: a writer that forgot its lock is a bug, found by the first test
 * that runs it). A session begins by catching up with what other processes did since this one last
 * looked (index files replaced by a prune, manifests forgotten): a VM supervisor keeps one
 * Repository for days and must not deduplicate against chunks that are gone.
 */
import { randomBytes } from 'node:crypto';
import { hostname } from 'node:os';
import { type Backend, type ByteRange, type Leftover, type ObjectInfo, type ObjectKind, ObjectNotFoundError } from './backend/contract.js';
import { acquireLock, type HeldLock } from './lock.js';
import { codecId, decode, encode, type CodecId, type CodecName } from './codec.js';
import { MasterKey, open, parseKeyFile, seal, unwrapMasterKey, wrapMasterKey } from './crypto.js';
import { FormatError, IntegrityError, NotFoundError, UsageError, WrongPasswordError } from './errors.js';
import { DEFAULT_CHUNK_SIZE, FORMAT_NAME, INITIAL_FORMAT_VERSION, parseConfig, type RepoConfig } from './format.js';
import { ChunkIndex, decodeIndexFile, encodeIndexFile, type ChunkLocation } from './chunk-index.js';
import { chunkHasher, contentHash, ID_SIZE, isAllZero, isZeroId, ZERO_CHUNK_ID, type ChunkHasher } from './hash.js';
import {
  decodeManifest,
  encodeManifest,
  MANIFEST_AAD,
  MAX_MANIFEST_BYTES,
  summarize,
  type Snapshot,
  type SnapshotSummary,
  type SnapshotData,
} from './manifest.js';
import { chunkAad, PackWriter, type PackEntry } from './pack.js';
import { WorkerPool } from './workers.js';

/** Packs are cut at this size: large enough for ≤ 64 PUTs per GiB on S3, small enough to repack. */
export const PACK_TARGET = 32 << 20;
/**
 * Packs uploading at once while the next one fills. A local disk gains nothing from a second
 * concurrent 32 MiB write, so it gets one (and 32 MiB less peak memory); remote stores hide
 * request latency with two.
 */
const UPLOAD_CONCURRENCY = { local: 1, remote: 2 };

export interface InitOptions {
  password?: string;
  chunkSize?: number;
  codec?: CodecName;
}

export interface OpenOptions {
  /** Called only when the repository is encrypted. */
  password?: string | (() => Promise<string>);
  /** Number of chunk worker threads (default: cores, at most 4). */
  workers?: number;
}

export interface PutResult {
  id: Buffer;
  isNew: boolean;
  /** Bytes added to the repository (after compression and encryption), 0 when deduplicated. */
  storedBytes: number;
}

export interface WriteStats {
  newChunks: number;
  dedupChunks: number;
  zeroChunks: number;
  rawBytes: number;
  storedBytes: number;
  packs: number;
}

/** A span of writing under a repository lock: see the module comment and `Repository.beginWrite`. */
export interface WriteSession {
  readonly operation: string;
  readonly exclusive: boolean;
  /**
   * Throws LockedError when the lock may no longer protect this session (released, or not
   * refreshed for so long that others may call it stale). Called before every commit point.
   */
  assertHeld(): void;
  /**
   * Ends the session: whatever was buffered or uploaded but not indexed is discarded (it is garbage
   * for the next prune once the lock is gone), then the lock is released. Idempotent.
   */
  end(): Promise<void>;
}

/** Kinds whose puts and deletes need a write session (locks, keys and config do not). */
const SESSION_KINDS: ReadonlySet<ObjectKind> = new Set(['packs', 'index', 'snapshots']);

export class Repository {
  private chunkIndex = new ChunkIndex(1 << 14);
  readonly chunkId: ChunkHasher;
  readonly codec: CodecId;
  readonly stats: WriteStats = { newChunks: 0, dedupChunks: 0, zeroChunks: 0, rawBytes: 0, storedBytes: 0, packs: 0 };
  private pack = new PackWriter(PACK_TARGET + (1 << 20));
  /** Chunks written this session but not yet in the index (hex id -> pack writer holding them). */
  private pending = new Map<string, PackWriter>();
  private uploads = new Set<Promise<void>>();
  private unindexed: { pack: string; entries: PackEntry[] }[] = [];
  private failure: Error | null = null;
  private pool: WorkerPool | null = null;
  private snapshotCache = new SnapshotCache(SNAPSHOT_CACHE_BYTES);
  readonly indexFiles = new Set<string>();
  /** Open write sessions of this instance (usually none or one). */
  private readonly sessions = new Set<{ operation: string; exclusive: boolean; lock: HeldLock }>();
  /**
   * The in-memory index holds entries no index file names (a session ended without its flush, or
   * a prune/rebuild-index rewrote the index files): the next session reloads it from the files.
   */
  private indexStale = false;
  /** The backend as given, for locks (the public `backend` guards writes). */
  private readonly raw: Backend;
  /** The backend; puts and deletes of packs, index files and manifests need a write session. */
  readonly backend: Backend;

  private constructor(
    backend: Backend,
    readonly config: RepoConfig,
    private readonly master: MasterKey | null,
    private readonly workerCount: number | undefined,
  ) {
    this.raw = backend;
    this.backend = new SessionGuard(backend, (what, kind, exclusive) => this.requireSession(`${what} ${kind}`, exclusive));
    this.chunkId = chunkHasher(master ? master.idKey : null);
    this.codec = codecId(config.codec);
  }

  /** The chunk index (replaced, not edited, when a session finds that a prune rewrote it). */
  get index(): ChunkIndex {
    return this.chunkIndex;
  }

  // ---- write sessions ----

  /**
   * Begins a write session: takes the repository lock (shared, or exclusive for maintenance),
   * then catches up with other processes (see `syncWithRepository`). Throws LockedError, naming
   * the holder, when a conflicting lock is held. The caller must `end()` it (use `write` where the
   * span is one function).
   */
  async beginWrite(operation: string, opts: { exclusive?: boolean } = {}): Promise<WriteSession> {
    const exclusive = opts.exclusive ?? false;
    const lock = await acquireLock(this.raw, exclusive, operation);
    const entry = { operation, exclusive, lock };
    this.sessions.add(entry);
    let ended = false;
    const session: WriteSession = {
      operation,
      exclusive,
      assertHeld: () => lock.assertHeld(),
      end: async () => {
        if (ended) return;
        ended = true;
        try {
          if (this.sessions.size === 1) await this.discardUnindexed();
          // Maintenance rewrote index files: what this instance holds in memory no longer matches.
          if (exclusive) this.indexStale = true;
        } finally {
          this.sessions.delete(entry);
          await lock.release();
        }
      },
    };
    try {
      // Another session of this instance holds a lock too, so no prune ran since it caught up;
      // swapping the index under its uploads would only lose its entries.
      await this.syncWithRepository(this.sessions.size === 1);
    } catch (err) {
      await session.end().catch(() => undefined);
      throw err;
    }
    return session;
  }

  /** Runs `fn` in a write session (see `beginWrite`). */
  async write<T>(operation: string, fn: (session: WriteSession) => Promise<T>, opts: { exclusive?: boolean } = {}): Promise<T> {
    const session = await this.beginWrite(operation, opts);
    try {
      return await fn(session);
    } finally {
      await session.end();
    }
  }

  /** Throws an internal error unless a write session (an exclusive one, if asked) is open. */
  private requireSession(what: string, exclusive = false): void {
    const ok = exclusive ? [...this.sessions].some((s) => s.exclusive) : this.sessions.size > 0;
    if (!ok) {
      throw new Error(`internal: ${what} outside a${exclusive ? 'n exclusive' : ''} write session (a writer must hold the repository lock: Repository.write)`);
    }
  }

  /** Throws LockedError when any open session's lock may no longer protect it. */
  private assertSessionsHeld(what: string): void {
    this.requireSession(what);
    for (const s of this.sessions) s.lock.assertHeld();
  }

  /**
   * Catches up with other processes, under the lock (so no prune runs meanwhile): index files that
   * vanished (a prune or rebuild-index replaced them) mean chunks may be gone, so the index is
   * reloaded from the files that exist; new index files are loaded; manifests forgotten since are
   * dropped from the manifest cache.
   */
  private async syncWithRepository(mayReload: boolean): Promise<void> {
    const names = new Set<string>();
    for await (const o of this.raw.list('index')) names.add(o.name);
    const vanished = [...this.indexFiles].some((n) => !names.has(n));
    if (mayReload && (vanished || this.indexStale)) {
      const fresh = new ChunkIndex(Math.max(1 << 14, this.chunkIndex.size));
      const loaded = new Set<string>();
      await this.loadIndexFiles([...names], fresh, loaded);
      this.chunkIndex = fresh;
      this.indexFiles.clear();
      for (const n of loaded) this.indexFiles.add(n);
      this.indexStale = false;
    } else {
      await this.loadIndexFiles([...names].filter((n) => !this.indexFiles.has(n)), this.chunkIndex, this.indexFiles);
    }
    this.snapshotCache.retain(new Set(await this.snapshotIds()));
  }

  /**
   * Waits for uploads in flight, then forgets chunks that were buffered or uploaded but not
   * indexed: once the lock is gone, a prune may delete those packs.
   */
  private async discardUnindexed(): Promise<void> {
    while (this.uploads.size) await Promise.allSettled([...this.uploads]);
    if (this.unindexed.length || this.failure) this.indexStale = true;
    this.unindexed = [];
    if (this.pack.count || this.pending.size) this.abandon();
    this.failure = null;
  }

  get chunkSize(): number {
    return this.config.chunkSize;
  }
  get encrypted(): boolean {
    return this.master !== null;
  }
  get aeadKey(): Buffer | null {
    return this.master ? this.master.aeadKey : null;
  }

  static async init(backend: Backend, opts: InitOptions = {}): Promise<Repository> {
    const chunkSize = opts.chunkSize ?? DEFAULT_CHUNK_SIZE;
    const codec = opts.codec ?? 'zstd';
    codecId(codec);
    if (chunkSize < 4096 || chunkSize > 16 << 20 || (chunkSize & (chunkSize - 1)) !== 0) {
      throw new UsageError(`invalid chunk size ${chunkSize}: use a power of two between 4 KiB and 16 MiB`);
    }
    if (opts.password !== undefined && opts.password.length === 0) throw new UsageError('an empty password is not allowed');
    const config: RepoConfig = {
      format: FORMAT_NAME,
      version: INITIAL_FORMAT_VERSION,
      id: randomBytes(16).toString('hex'),
      chunkSize,
      codec,
      created: new Date().toISOString(),
      encryption: opts.password !== undefined ? { aead: 'aes-256-gcm', ids: 'blake3-keyed', kdf: 'scrypt' } : null,
    };
    let master: MasterKey | null = null;
    if (opts.password !== undefined) {
      master = MasterKey.generate();
      const key = await wrapMasterKey(master, opts.password, hostname());
      await backend.put('keys', randomBytes(16).toString('hex'), Buffer.from(JSON.stringify(key)));
    }
    // The config is created last and exclusively: a half-initialised directory has no config, and two
    // concurrent inits cannot both succeed.
    const created = await backend.create('config', 'config', Buffer.from(JSON.stringify(config, null, 2)));
    if (!created) throw new UsageError(`a repository already exists at ${backend.location}`);
    return new Repository(backend, config, master, undefined);
  }

  static async open(backend: Backend, opts: OpenOptions = {}): Promise<Repository> {
    let bytes: Buffer;
    try {
      bytes = await backend.get('config', 'config');
    } catch (err) {
      if (err instanceof ObjectNotFoundError) {
        throw new NotFoundError(`no vmsnap repository at ${backend.location} (run \`vmsnap init\` first)`);
      }
      throw err;
    }
    const config = parseConfig(bytes);
    let master: MasterKey | null = null;
    if (config.encryption) {
      if (opts.password === undefined) {
        throw new WrongPasswordError(`repository ${backend.location} is encrypted: give a password (VMSNAP_PASSWORD or --password-file)`);
      }
      const password = typeof opts.password === 'string' ? opts.password : await opts.password();
      master = await unlock(backend, password);
    }
    const repo = new Repository(backend, config, master, opts.workers);
    await repo.loadIndex();
    return repo;
  }

  /** Reads every index file. Damaged index files are reported, not fatal: packs can rebuild them. */
  async loadIndex(onDamage?: (name: string, err: Error) => void): Promise<void> {
    const names: string[] = [];
    for await (const o of this.backend.list('index')) names.push(o.name);
    await this.loadIndexFiles(names, this.chunkIndex, this.indexFiles, onDamage);
  }

  /**
   * Loads index files into `into`, recording each loaded name in `loaded`. Damaged files go to
   * `onDamage` (skipped without it); files deleted meanwhile are skipped.
   */
  private async loadIndexFiles(names: readonly string[], into: ChunkIndex, loaded: Set<string>, onDamage?: (name: string, err: Error) => void): Promise<void> {
    await mapLimit(names, 8, async (name) => {
      try {
        await this.loadIndexFile(name, into);
        loaded.add(name);
      } catch (err) {
        if (onDamage && !(err instanceof ObjectNotFoundError)) onDamage(name, err as Error);
        else if (!(err instanceof ObjectNotFoundError || err instanceof IntegrityError || err instanceof FormatError)) throw err;
      }
    });
  }

  /**
   * Loads index files written by other processes since this one opened the repository (a VM
   * supervisor lives for days while `vmsnap import` or another VM's snapshots add data).
   */
  async refreshIndex(): Promise<number> {
    const fresh: string[] = [];
    for await (const o of this.backend.list('index')) if (!this.indexFiles.has(o.name)) fresh.push(o.name);
    await this.loadIndexFiles(fresh, this.chunkIndex, this.indexFiles);
    return fresh.length;
  }

  /** One index file, checked against its name (unencrypted: the name is its hash), into `into`. */
  private async loadIndexFile(name: string, into: ChunkIndex): Promise<void> {
    const bytes = await this.backend.get('index', name);
    if (!this.master && contentHash(bytes).toString('hex') !== name) {
      throw new IntegrityError(`index ${name}: content does not match its name`);
    }
    decodeIndexFile(bytes, this.aeadKey, name, into);
  }

  workers(): WorkerPool {
    if (!this.pool) {
      this.pool = new WorkerPool(
        { aeadKey: this.master ? this.master.aeadKey : null, idKey: this.master ? this.master.idKey : null },
        this.workerCount,
      );
    }
    return this.pool;
  }

  hasChunk(id: Uint8Array): boolean {
    return isZeroId(id) || this.index.has(id) || this.pending.has(Buffer.from(id.buffer, id.byteOffset, ID_SIZE).toString('hex'));
  }

  /** Hashes, deduplicates, compresses and stores one chunk (on this thread; ingest uses workers). */
  async putChunk(data: Uint8Array): Promise<PutResult> {
    this.requireSession('putChunk');
    this.throwIfFailed();
    if (isAllZero(data)) {
      this.stats.zeroChunks++;
      return { id: ZERO_CHUNK_ID, isNew: false, storedBytes: 0 };
    }
    const id = this.chunkId(data);
    if (this.hasChunk(id)) {
      this.stats.dedupChunks++;
      return { id, isNew: false, storedBytes: 0 };
    }
    const enc = encode(this.codec, data);
    const stored = this.master ? seal(this.master.aeadKey, enc.data, chunkAad(id)) : enc.data;
    await this.addEncoded(id, enc.codec, stored, data.length);
    return { id, isNew: true, storedBytes: stored.length };
  }

  /**
   * Adds a chunk that is already compressed (and sealed). The caller must have checked hasChunk();
   * a duplicate is ignored. Resolves once the chunk is buffered (it waits only when uploads lag).
   */
  async addEncoded(id: Buffer, codec: number, stored: Buffer, rawLength: number): Promise<void> {
    this.requireSession('addEncoded');
    this.throwIfFailed();
    const key = id.toString('hex');
    if (this.index.has(id) || this.pending.has(key)) {
      this.stats.dedupChunks++;
      return;
    }
    this.pack.add(Buffer.from(id), codec, stored, rawLength);
    this.pending.set(key, this.pack);
    this.stats.newChunks++;
    this.stats.rawBytes += rawLength;
    this.stats.storedBytes += stored.length;
    if (this.pack.byteLength >= PACK_TARGET) await this.cutPack();
  }

  noteDedup(n: number, zero: number): void {
    this.stats.dedupChunks += n;
    this.stats.zeroChunks += zero;
  }

  private async cutPack(): Promise<void> {
    if (this.pack.count === 0) return;
    const writer = this.pack;
    this.pack = new PackWriter(PACK_TARGET + (1 << 20));
    // Backpressure: a bounded number of packs in flight (bounded memory).
    const limit = this.backend.capabilities.local ? UPLOAD_CONCURRENCY.local : UPLOAD_CONCURRENCY.remote;
    while (this.uploads.size >= limit) await Promise.race(this.uploads);
    this.throwIfFailed();
    const { name, bytes, entries } = writer.finish(this.aeadKey);
    const upload = this.backend
      .put('packs', name, bytes)
      .then(() => {
        for (const e of entries) {
          this.index.add(e.id, name, e);
          this.pending.delete(e.id.toString('hex'));
        }
        this.unindexed.push({ pack: name, entries });
        this.stats.packs++;
      })
      .catch((err: unknown) => {
        this.failure ??= err instanceof Error ? err : new Error(String(err));
      })
      .finally(() => this.uploads.delete(upload));
    this.uploads.add(upload);
  }

  /** Uploads the open pack, waits for all uploads, and writes an index file for the new packs. */
  async flush(): Promise<void> {
    this.throwIfFailed();
    await this.cutPack();
    while (this.uploads.size) await Promise.all(this.uploads);
    this.throwIfFailed();
    if (this.unindexed.length === 0) return;
    const batch = this.unindexed;
    this.unindexed = [];
    const bytes = encodeIndexFile({ packs: batch, superseded: [] }, this.aeadKey);
    const name = contentHash(bytes).toString('hex');
    try {
      await this.backend.put('index', name, bytes);
    } catch (err) {
      this.failure = err as Error;
      throw err;
    }
    this.indexFiles.add(name);
  }

  /** Discards buffered, unflushed chunks (used after a failed operation). */
  abandon(): void {
    this.pack = new PackWriter();
    this.pending.clear();
  }

  private throwIfFailed(): void {
    if (this.failure) throw this.failure;
  }

  locate(id: Uint8Array): ChunkLocation {
    const loc = this.index.get(id);
    if (!loc) throw new IntegrityError(`chunk ${Buffer.from(id).toString('hex')} is not in the index (missing data)`);
    return loc;
  }

  /** Returns a chunk's verified plaintext. `rawLength` is needed only for the zero id. */
  async getChunk(id: Uint8Array, rawLength = this.chunkSize): Promise<Buffer> {
    if (isZeroId(id)) return Buffer.alloc(rawLength);
    const idBuf = Buffer.from(id.buffer, id.byteOffset, ID_SIZE);
    if (!this.index.has(idBuf)) {
      if (this.pending.has(idBuf.toString('hex'))) await this.flush();
      else await this.refreshIndex();
    }
    const loc = this.locate(idBuf);
    try {
      return this.openChunk(idBuf, loc, await this.backend.get('packs', loc.pack, { offset: loc.offset, length: loc.storedLength }));
    } catch (err) {
      // Readers hold no lock (a VM's base reads, hydration, a clone's first reads): a prune by
      // another process may have repacked this chunk and deleted the pack this index names. Prune
      // writes the new index files before it deletes anything, so the chunk's new place is
      // already listed: catch up and read it there. With a session open no prune can have run
      // since the session caught up, so the pack is really missing (check reports it).
      if (!(err instanceof ObjectNotFoundError) || this.sessions.size > 0) throw err;
      await this.catchUpForReaders();
      const moved = this.locate(idBuf);
      if (moved.pack === loc.pack && moved.offset === loc.offset) throw err;
      return this.openChunk(idBuf, moved, await this.backend.get('packs', moved.pack, { offset: moved.offset, length: moved.storedLength }));
    }
  }

  /** One reload at a time for concurrent readers that all found their pack gone. */
  private readerCatchUp: Promise<void> | null = null;

  private catchUpForReaders(): Promise<void> {
    this.readerCatchUp ??= (async () => {
      try {
        this.indexStale = true;
        await this.syncWithRepository(true);
      } finally {
        this.readerCatchUp = null;
      }
    })();
    return this.readerCatchUp;
  }

  /** Decrypts, decompresses and verifies one stored chunk. */
  openChunk(id: Buffer, loc: Pick<ChunkLocation, 'codec' | 'rawLength'>, stored: Buffer): Buffer {
    const what = `chunk ${id.toString('hex')}`;
    const body = this.master ? open(this.master.aeadKey, stored, chunkAad(id), what) : stored;
    const plain = decode(loc.codec, body, loc.rawLength);
    if (!this.chunkId(plain).equals(id)) throw new IntegrityError(`${what}: content does not match its id (corrupted data)`);
    return plain;
  }

  // ---- snapshots ----

  async saveSnapshot(data: Omit<SnapshotData, 'time' | 'host'> & Partial<Pick<SnapshotData, 'time' | 'host'>>): Promise<Snapshot> {
    const full: SnapshotData = { time: new Date().toISOString(), host: hostname(), ...data };
    const plain = encodeManifest(full);
    // Every chunk a manifest references must be durable and indexed before the manifest exists.
    await this.flush();
    for (const s of full.streams) {
      for (let off = 0; off < s.chunks.length; off += ID_SIZE) {
        const id = s.chunks.subarray(off, off + ID_SIZE);
        if (!isZeroId(id) && !this.index.has(id)) {
          throw new IntegrityError(`stream ${s.name} references chunk ${id.toString('hex')}, which is not in the repository`);
        }
      }
    }
    const id = this.chunkId(plain).toString('hex');
    const stored = this.master ? seal(this.master.aeadKey, plain, MANIFEST_AAD) : plain;
    // Commit point: only while prune cannot have touched the packs just indexed.
    this.assertSessionsHeld('saveSnapshot');
    await this.backend.put('snapshots', id, stored);
    const snap: Snapshot = { id, ...full };
    this.snapshotCache.set(id, snap);
    return snap;
  }

  /** A snapshot's manifest, verified. `keep: false`: do not add it to the cache (one-pass readers). */
  async readSnapshot(id: string, opts: { keep?: boolean } = {}): Promise<Snapshot> {
    const cached = this.snapshotCache.get(id);
    if (cached) return cached;
    let info;
    try {
      info = await this.backend.stat('snapshots', id);
    } catch (err) {
      if (err instanceof ObjectNotFoundError) throw new NotFoundError(`snapshot ${id} does not exist`);
      throw err;
    }
    if (info.size > MAX_MANIFEST_BYTES) throw new FormatError(`snapshot ${id}: manifest of ${info.size} bytes is over the limit`);
    const stored = await this.backend.get('snapshots', id).catch((err: unknown) => {
      // Forgotten between the stat and the read.
      throw err instanceof ObjectNotFoundError ? new NotFoundError(`snapshot ${id} does not exist`) : err;
    });
    const plain = this.master ? open(this.master.aeadKey, stored, MANIFEST_AAD, `snapshot ${id}`) : stored;
    if (this.chunkId(plain).toString('hex') !== id) {
      throw new IntegrityError(`snapshot ${id}: manifest content does not match its id (corrupted)`);
    }
    const snap = decodeManifest(plain, id);
    if (opts.keep !== false) this.snapshotCache.set(id, snap);
    return snap;
  }

  async snapshotIds(): Promise<string[]> {
    const ids: string[] = [];
    for await (const o of this.backend.list('snapshots')) ids.push(o.name);
    return ids;
  }

  /**
   * Every snapshot, one at a time, in no particular order: for passes over the whole repository
   * (prune, check, stats) that must not hold every manifest at once (30 snapshots of a 128 GiB disk
   * are 1.9 GiB of chunk lists). A few are read ahead. Unreadable manifests go to `onError` (or
   * throw without it). `listed`: these ids (a listing the caller made earlier) instead of a new one.
   */
  async *eachSnapshot(onError?: (id: string, err: Error) => void, listed?: readonly string[]): AsyncGenerator<Snapshot> {
    const ids = listed ?? (await this.snapshotIds());
    const read = (id: string): { id: string; p: Promise<Snapshot> } => {
      // Not cached: a pass over every manifest would only push out the ones worth keeping.
      const p = this.readSnapshot(id, { keep: false });
      p.catch(() => undefined); // surfaced in order below
      return { id, p };
    };
    const ahead: { id: string; p: Promise<Snapshot> }[] = [];
    let next = 0;
    while (ahead.length < 4 && next < ids.length) ahead.push(read(ids[next++]!));
    while (ahead.length) {
      const { id, p } = ahead.shift()!;
      if (next < ids.length) ahead.push(read(ids[next++]!));
      let snap: Snapshot;
      try {
        snap = await p;
      } catch (err) {
        if (!onError) throw err;
        onError(id, err as Error);
        continue;
      }
      yield snap;
    }
  }

  /**
   * Every snapshot without its chunk lists, oldest first: for listings, which would otherwise hold
   * every manifest's chunk lists at once. Unreadable manifests go to `onError` (or throw without it).
   */
  async listSnapshotSummaries(onError?: (id: string, err: Error) => void): Promise<SnapshotSummary[]> {
    const out: SnapshotSummary[] = [];
    await mapLimit(await this.snapshotIds(), 8, async (id) => {
      try {
        out.push(summarize(await this.readSnapshot(id, { keep: false })));
      } catch (err) {
        if (err instanceof NotFoundError) return; // forgotten since the listing
        if (!onError) throw err;
        onError(id, err as Error);
      }
    });
    return out.sort((a, b) => Date.parse(a.time) - Date.parse(b.time) || a.id.localeCompare(b.id));
  }

  /** All snapshots, oldest first. Unreadable manifests go to `onError` (or throw without it). */
  async listSnapshots(onError?: (id: string, err: Error) => void): Promise<Snapshot[]> {
    const out: Snapshot[] = [];
    await mapLimit(await this.snapshotIds(), 8, async (id) => {
      try {
        out.push(await this.readSnapshot(id));
      } catch (err) {
        if (err instanceof NotFoundError) return; // forgotten since the listing
        if (!onError) throw err;
        onError(id, err as Error);
      }
    });
    // By instant, not by text: times may carry different UTC offsets.
    return out.sort((a, b) => Date.parse(a.time) - Date.parse(b.time) || a.id.localeCompare(b.id));
  }

  /** Resolves a full id, a unique prefix (≥ 4 hex digits), or `latest` / `VM:latest`. */
  async resolveSnapshot(ref: string): Promise<Snapshot> {
    const latest = /^(?:(.+):)?latest$/.exec(ref);
    if (latest) {
      const vm = latest[1];
      // A damaged manifest (reported by `check`) cannot be the latest of anything we can restore.
      const all = (await this.listSnapshotSummaries(() => undefined)).filter((s) => vm === undefined || s.vm === vm);
      const last = all[all.length - 1];
      if (!last) throw new NotFoundError(vm ? `VM ${vm} has no snapshots` : 'the repository has no snapshots');
      return this.readSnapshot(last.id);
    }
    if (!/^[0-9a-f]{4,64}$/.test(ref)) {
      throw new UsageError(`invalid snapshot id ${JSON.stringify(ref)}: give at least 4 hex digits of an id, or "latest"`);
    }
    const matches = (await this.snapshotIds()).filter((id) => id.startsWith(ref));
    if (matches.length === 0) throw new NotFoundError(`no snapshot matches ${ref}`);
    if (matches.length > 1) throw new UsageError(`snapshot id prefix ${ref} is ambiguous (${matches.length} snapshots match)`);
    return this.readSnapshot(matches[0]!);
  }

  async deleteSnapshot(id: string): Promise<void> {
    this.assertSessionsHeld('deleteSnapshot');
    await this.backend.delete('snapshots', id);
    this.snapshotCache.delete(id);
  }

  async close(): Promise<void> {
    if (this.pool) await this.pool.close();
    this.pool = null;
  }
}

async function unlock(backend: Backend, password: string): Promise<MasterKey> {
  const names: string[] = [];
  for await (const o of backend.list('keys')) names.push(o.name);
  if (names.length === 0) throw new IntegrityError('repository is encrypted but has no key objects');
  let lastErr: Error | null = null;
  for (const name of names) {
    try {
      return await unwrapMasterKey(parseKeyFile(await backend.get('keys', name), name), password);
    } catch (err) {
      lastErr = err as Error;
      if (!(err instanceof WrongPasswordError || err instanceof FormatError)) throw err;
    }
  }
  throw lastErr instanceof FormatError ? lastErr : new WrongPasswordError('wrong password: it opens no key of this repository');
}

export async function mapLimit<T>(items: readonly T[], limit: number, fn: (item: T, i: number) => Promise<void>): Promise<void> {
  let next = 0;
  const run = async () => {
    while (next < items.length) {
      const i = next++;
      await fn(items[i]!, i);
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, run));
}

/**
 * Manifests read recently, bounded by the bytes of their chunk lists (a 128 GiB disk's list is 64
 * MiB): a supervisor lives for days and reads every snapshot it takes or restores, and prune and
 * check read every manifest in the repository once.
 */
const SNAPSHOT_CACHE_BYTES = 64 << 20;

export class SnapshotCache {
  private readonly entries = new Map<string, { snap: Snapshot; bytes: number }>();
  private total = 0;
  constructor(private readonly limit: number) {}

  get(id: string): Snapshot | undefined {
    const e = this.entries.get(id);
    if (!e) return undefined;
    this.entries.delete(id); // most recently used last
    this.entries.set(id, e);
    return e.snap;
  }

  /**
   * Adds a manifest, evicting the least recently used ones. The newest stays even when it alone is
   * over the limit (a 128 GiB disk's chunk list is the whole 64 MiB): a supervisor's next take
   * needs exactly that one, its parent.
   */
  set(id: string, snap: Snapshot): void {
    this.delete(id);
    const bytes = snap.streams.reduce((n, s) => n + s.chunks.length, 0) + 1024;
    this.entries.set(id, { snap, bytes });
    this.total += bytes;
    for (const [oldest, e] of this.entries) {
      if (this.total <= this.limit || oldest === id) break;
      this.entries.delete(oldest);
      this.total -= e.bytes;
    }
  }

  delete(id: string): void {
    const e = this.entries.get(id);
    if (!e) return;
    this.entries.delete(id);
    this.total -= e.bytes;
  }

  /** Drops every manifest not in `ids` (forgotten by another process). */
  retain(ids: ReadonlySet<string>): void {
    for (const id of [...this.entries.keys()]) if (!ids.has(id)) this.delete(id);
  }

  /** Chunk-list bytes held (tests). */
  get bytes(): number {
    return this.total;
  }
}


/**
 * The backend as the repository's users see it: reads pass through; puts and deletes of packs,
 * index files and manifests first ask `check` (which throws outside a write session), and
 * removing leftovers needs an exclusive session (a younger writer's temp files are not leftovers).
 */
class SessionGuard implements Backend {
  constructor(
    private readonly inner: Backend,
    private readonly check: (what: string, kind: string, exclusive?: boolean) => void,
  ) {}
  get location(): string {
    return this.inner.location;
  }
  get capabilities(): Backend['capabilities'] {
    return this.inner.capabilities;
  }
  async put(kind: ObjectKind, name: string, data: Uint8Array): Promise<void> {
    if (SESSION_KINDS.has(kind)) this.check('put', kind);
    return this.inner.put(kind, name, data);
  }
  async create(kind: ObjectKind, name: string, data: Uint8Array): Promise<boolean> {
    if (SESSION_KINDS.has(kind)) this.check('create', kind);
    return this.inner.create(kind, name, data);
  }
  async delete(kind: ObjectKind, name: string): Promise<void> {
    if (SESSION_KINDS.has(kind)) this.check('delete', kind);
    return this.inner.delete(kind, name);
  }
  async removeLeftovers(olderThanMs: number): Promise<number> {
    this.check('removeLeftovers', 'temp files', true);
    return this.inner.removeLeftovers(olderThanMs);
  }
  leftovers(): Promise<Leftover[]> {
    return this.inner.leftovers();
  }
  get(kind: ObjectKind, name: string, range?: ByteRange, into?: Uint8Array): Promise<Buffer> {
    return this.inner.get(kind, name, range, into);
  }
  stat(kind: ObjectKind, name: string): Promise<ObjectInfo> {
    return this.inner.stat(kind, name);
  }
  list(kind: ObjectKind): AsyncIterable<ObjectInfo> {
    return this.inner.list(kind);
  }
  close(): Promise<void> {
    return this.inner.close();
  }
}
