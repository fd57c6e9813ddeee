/**
 * NBD server for copy-on-write volumes (fixed newstyle protocol, NetworkBlockDevice/nbd
 * doc/proto.md). Export name = volume name. Unix socket by default; TCP only on loopback.
 *
 * Handshake (all integers big-endian):
 *   S: "NBDMAGIC" "IHAVEOPT" u16 handshakeFlags (FIXED_NEWSTYLE 1 | NO_ZEROES 2)
 *   C: u32 clientFlags
 *   C: "IHAVEOPT" u32 option u32 length data[length]                     (repeated)
 *   S: u64 0x3e889045565a9 u32 option u32 replyType u32 length data       (per option reply)
 *   options served: EXPORT_NAME 1, ABORT 2, LIST 3, INFO 6, GO 7, STRUCTURED_REPLY 8,
 *                   LIST_META_CONTEXT 9, SET_META_CONTEXT 10; others get ERR_UNSUP
 *   INFO/GO data:   u32 nameLen name u16 nInfo u16[nInfo]
 *   replies:        INFO EXPORT (u16 0, u64 size, u16 transmissionFlags), INFO NAME, INFO BLOCK_SIZE
 *                   (u16 3, u32 min 1, u32 preferred 4096, u32 max 32 MiB), then ACK
 *
 * Transmission:
 *   C: u32 0x25609513 u16 flags u16 type u64 cookie u64 offset u32 length [payload for WRITE]
 *   S simple:     u32 0x67446698 u32 error u64 cookie [data for READ]
 *   S structured: u32 0x668e33ef u16 flags(DONE 1) u16 type u64 cookie u32 length payload
 *                 OFFSET_DATA 1: u64 offset data; BLOCK_STATUS 5: u32 contextId (u32 len, u32 flags)*;
 *                 ERROR 32769: u32 error u16 msgLen msg; NONE 0
 *   Requests run concurrently and are answered as they complete (out of order).
 *
 * Clients that are gone: a request still unread when its client's connection ends is discarded,
 * never executed — no reply can reach that client, and the disk may have been reset since (a restore
 * kills QEMU, then resets the volume to the snapshot: a write the killed guest left in our receive
 * buffer must never land on the restored disk). `disconnectClients()` is the fence for that: it
 * drops every connection and resolves once none of their requests is executing; requests not yet
 * started by then never start.
 *
 * Hostile input: a bad request magic or a broken handshake closes that connection only; oversized,
 * out-of-range, unknown or malformed requests get an error reply (a too-large WRITE payload is read
 * and discarded, never buffered). A WRITE reaches the volume only once its whole payload arrived.
 */
import * as net from 'node:net';
import { promises as fsp } from 'node:fs';
import { VolumeRangeError, type Extent } from './volume.js';

/** What the server needs from an export (Volume implements it). */
export interface NbdTarget {
  readonly size: number;
  read(offset: number, length: number, dst: Buffer, dstOffset: number): Promise<void>;
  write(offset: number, data: readonly Buffer[], fua: boolean): Promise<void>;
  writeZeroes(offset: number, length: number, opts: { fua?: boolean; noHole?: boolean }): Promise<void>;
  trim(offset: number, length: number, fua: boolean): Promise<void>;
  flush(): Promise<void>;
  extents(offset: number, length: number, maxExtents: number): Extent[];
}

export interface NbdExportOptions {
  readOnly?: boolean;
  description?: string;
}

export type NbdListenOptions = { socketPath: string } | { host: string; port: number };

export class NbdServerError extends Error {
  override readonly name = 'NbdServerError';
}

const NBDMAGIC = Buffer.from('NBDMAGIC');
const IHAVEOPT = Buffer.from('IHAVEOPT');
const OPT_REPLY_MAGIC = Buffer.from('0003e889045565a9', 'hex');
const REQUEST_MAGIC = 0x25609513;
const SIMPLE_REPLY_MAGIC = 0x67446698;
const STRUCTURED_REPLY_MAGIC = 0x668e33ef;

const FLAG_FIXED_NEWSTYLE = 1;
const FLAG_NO_ZEROES = 2;

const OPT_EXPORT_NAME = 1;
const OPT_ABORT = 2;
const OPT_LIST = 3;
const OPT_INFO = 6;
const OPT_GO = 7;
const OPT_STRUCTURED_REPLY = 8;
const OPT_LIST_META_CONTEXT = 9;
const OPT_SET_META_CONTEXT = 10;

const REP_ACK = 1;
const REP_SERVER = 2;
const REP_INFO = 3;
const REP_META_CONTEXT = 4;
const REP_ERR_UNSUP = 0x80000001;
const REP_ERR_INVALID = 0x80000003;
const REP_ERR_UNKNOWN = 0x80000006;
const REP_ERR_TOO_BIG = 0x80000009;

const INFO_EXPORT = 0;
const INFO_NAME = 1;
const INFO_DESCRIPTION = 2;
const INFO_BLOCK_SIZE = 3;

const TF_HAS_FLAGS = 1 << 0;
const TF_READ_ONLY = 1 << 1;
const TF_SEND_FLUSH = 1 << 2;
const TF_SEND_FUA = 1 << 3;
const TF_SEND_TRIM = 1 << 5;
const TF_SEND_WRITE_ZEROES = 1 << 6;
const TF_SEND_DF = 1 << 7;
const TF_CAN_MULTI_CONN = 1 << 8;

const CMD_READ = 0;
const CMD_WRITE = 1;
const CMD_DISC = 2;
const CMD_FLUSH = 3;
const CMD_TRIM = 4;
const CMD_WRITE_ZEROES = 6;
const CMD_BLOCK_STATUS = 7;

const CMD_FLAG_FUA = 1 << 0;
const CMD_FLAG_NO_HOLE = 1 << 1;
const CMD_FLAG_REQ_ONE = 1 << 3;

const REPLY_FLAG_DONE = 1;
const REPLY_TYPE_NONE = 0;
const REPLY_TYPE_OFFSET_DATA = 1;
const REPLY_TYPE_BLOCK_STATUS = 5;
const REPLY_TYPE_ERROR = 0x8001;

const EPERM = 1;
const EIO = 5;
const EINVAL = 22;
const ENOSPC = 28;
const EOVERFLOW = 75;

const MAX_PAYLOAD = 32 * 1024 * 1024;
const MAX_OPTION_LENGTH = 64 * 1024;
const MAX_INFLIGHT = 64;
const MAX_BUFFERED = 64 * 1024 * 1024;
const BASE_ALLOCATION = 'base:allocation';
const BASE_ALLOCATION_ID = 1;

class ConnectionClosed extends Error {
  override readonly name = 'ConnectionClosed';
}

/** Buffers socket data and hands out exact byte counts, pausing the socket when too much piles up. */
class SocketReader {
  private bufs: Buffer[] = [];
  private len = 0;
  private want = 0;
  private wake: (() => void) | null = null;
  private closedErr: Error | null = null;

  constructor(private readonly socket: net.Socket) {
    socket.on('data', (d: Buffer) => {
      this.bufs.push(d);
      this.len += d.length;
      if (this.len > MAX_BUFFERED) socket.pause();
      if (this.wake && this.len >= this.want) this.fire();
    });
    const end = (): void => this.discard();
    socket.on('end', end);
    socket.on('close', end);
    socket.on('error', end);
  }

  /** Drops what was received and not read yet, and every later read fails (the client is gone). */
  discard(): void {
    this.closedErr ??= new ConnectionClosed('client disconnected');
    this.bufs = [];
    this.len = 0;
    this.fire();
  }

  private fire(): void {
    const w = this.wake;
    this.wake = null;
    w?.();
  }

  private async fill(n: number): Promise<void> {
    while (this.len < n) {
      if (this.closedErr) throw this.closedErr;
      this.want = n;
      if (this.socket.isPaused()) this.socket.resume();
      await new Promise<void>((resolve) => (this.wake = resolve));
    }
  }

  /** n bytes as slices of the received buffers (no copy). */
  async readv(n: number): Promise<Buffer[]> {
    if (this.closedErr) throw this.closedErr;
    if (this.len < n) await this.fill(n);
    const out: Buffer[] = [];
    let left = n;
    while (left > 0) {
      const b = this.bufs[0]!;
      if (b.length <= left) {
        out.push(b);
        this.bufs.shift();
        left -= b.length;
      } else {
        out.push(b.subarray(0, left));
        this.bufs[0] = b.subarray(left);
        left = 0;
      }
    }
    this.len -= n;
    if (this.len < MAX_BUFFERED / 2 && this.socket.isPaused()) this.socket.resume();
    return out;
  }

  async read(n: number): Promise<Buffer> {
    const v = await this.readv(n);
    return v.length === 1 ? v[0]! : Buffer.concat(v, n);
  }

  async skip(n: number): Promise<void> {
    while (n > 0) {
      const k = Math.min(n, 1 << 20);
      await this.readv(k);
      n -= k;
    }
  }
}

interface ExportEntry {
  target: NbdTarget;
  readOnly: boolean;
  description: string;
}

function errnoFor(err: unknown, write: boolean): number {
  if (err instanceof VolumeRangeError) return write ? ENOSPC : EINVAL;
  return EIO;
}

export class NbdServer {
  private readonly exports = new Map<string, ExportEntry>();
  private readonly servers: net.Server[] = [];
  private readonly sockets = new Set<net.Socket>();
  private readonly connections = new Set<Connection>();
  private readonly socketPaths: string[] = [];
  private closing = false;
  private live = 0;
  private readonly waits = { count: 0 };
  /** Errors caught per connection (never thrown): for logs and tests. */
  readonly connectionErrors: string[] = [];
  /**
   * Called synchronously immediately before any request that changes an export (write, trim,
   * write-zeroes) reaches its target, on every connection. A take uses it to look at QEMU's
   * events first, so that its disk cut falls exactly between two requests (vm/stop-point-cut.ts).
   */
  beforeChange: (() => void) | null = null;

  addExport(name: string, target: NbdTarget, opts: NbdExportOptions = {}): void {
    if (Buffer.byteLength(name) > 4096) throw new NbdServerError(`export name is longer than 4096 bytes`);
    if (this.exports.has(name)) throw new NbdServerError(`export ${JSON.stringify(name)} already exists`);
    this.exports.set(name, { target, readOnly: !!opts.readOnly, description: opts.description ?? '' });
  }

  removeExport(name: string): boolean {
    return this.exports.delete(name);
  }

  /** Starts listening; returns the bound address (the port when port 0 was asked for). */
  async listen(opts: NbdListenOptions): Promise<{ socketPath?: string; host?: string; port?: number }> {
    const server = net.createServer({ noDelay: true }, (sock) => this.accept(sock));
    this.servers.push(server);
    if ('socketPath' in opts) {
      await fsp.rm(opts.socketPath, { force: true });
      await new Promise<void>((resolve, reject) => {
        server.once('error', reject);
        server.listen(opts.socketPath, () => resolve());
      });
      this.socketPaths.push(opts.socketPath);
      return { socketPath: opts.socketPath };
    }
    if (!['127.0.0.1', '::1', 'localhost'].includes(opts.host)) {
      throw new NbdServerError(`refusing to listen on ${opts.host}: TCP is served on loopback only (127.0.0.1 or ::1)`);
    }
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(opts.port, opts.host, () => resolve());
    });
    const addr = server.address() as net.AddressInfo;
    return { host: addr.address, port: addr.port };
  }

  /** Connections whose handler has not finished (a client gone while we waited must not stay here). */
  get activeConnections(): number {
    return this.live;
  }

  /** Connections not reading requests right now because their clients are not reading replies. */
  get connectionsWaitingForClients(): number {
    return this.waits.count;
  }

  /**
   * The fence before a disk is reset: drops every client connection (their unread requests are
   * discarded) and resolves once none of their requests is executing. Later clients are served.
   */
  async disconnectClients(): Promise<void> {
    await Promise.all([...this.connections].map((c) => c.fence()));
  }

  /** Stops listening, disconnects clients and waits for the listeners to close. */
  async close(): Promise<void> {
    this.closing = true;
    for (const s of this.sockets) s.destroy();
    await Promise.all(this.servers.map((s) => new Promise<void>((resolve) => s.close(() => resolve()))));
    for (const p of this.socketPaths) await fsp.rm(p, { force: true });
  }

  private accept(sock: net.Socket): void {
    if (this.closing) {
      sock.destroy();
      return;
    }
    this.sockets.add(sock);
    sock.setNoDelay(true);
    sock.on('close', () => this.sockets.delete(sock));
    sock.on('error', () => undefined);
    const conn = new Connection(sock, this.exports, this.waits, () => this.beforeChange?.());
    this.live++;
    this.connections.add(conn);
    conn
      .run()
      .then(
        () => sock.end(),
        (err: unknown) => {
          if (!(err instanceof ConnectionClosed)) this.connectionErrors.push((err as Error).message);
          sock.destroy();
        },
      )
      .finally(() => {
        this.live--;
        this.connections.delete(conn);
      });
  }
}

class ProtocolError extends Error {
  override readonly name = 'NbdProtocolError';
}

class Connection {
  private readonly reader: SocketReader;
  private structured = false;
  private noZeroes = false;
  private metaExport: string | null = null;
  private inflight = 0;
  private slotFree: (() => void) | null = null;
  private corked = false;
  private readonly done = new Set<Promise<void>>();
  /** Set by fence(): no request of this connection starts any more. */
  private fenced = false;

  constructor(
    private readonly sock: net.Socket,
    private readonly exports: Map<string, ExportEntry>,
    private readonly waits: { count: number },
    private readonly beforeChange: () => void,
  ) {
    this.reader = new SocketReader(sock);
  }

  async run(): Promise<void> {
    const hello = Buffer.alloc(18);
    NBDMAGIC.copy(hello, 0);
    IHAVEOPT.copy(hello, 8);
    hello.writeUInt16BE(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES, 16);
    this.sock.write(hello);
    const cflags = (await this.reader.read(4)).readUInt32BE(0);
    if (cflags & ~(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)) throw new ProtocolError(`unknown client flags 0x${cflags.toString(16)}`);
    if (!(cflags & FLAG_FIXED_NEWSTYLE)) throw new ProtocolError('client does not speak fixed newstyle');
    this.noZeroes = (cflags & FLAG_NO_ZEROES) !== 0;
    const exp = await this.negotiate();
    if (!exp) return;
    await this.transmit(exp.entry, exp.name);
  }

  private optReply(opt: number, type: number, data?: Buffer): void {
    const h = Buffer.allocUnsafe(20);
    OPT_REPLY_MAGIC.copy(h, 0);
    h.writeUInt32BE(opt, 8);
    h.writeUInt32BE(type >>> 0, 12);
    h.writeUInt32BE(data ? data.length : 0, 16);
    this.sock.write(data ? Buffer.concat([h, data]) : h);
  }

  private optError(opt: number, type: number, msg: string): void {
    this.optReply(opt, type, Buffer.from(msg));
  }

  private transmissionFlags(e: ExportEntry): number {
    let f = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_CAN_MULTI_CONN;
    if (e.readOnly) f |= TF_READ_ONLY;
    else f |= TF_SEND_TRIM | TF_SEND_WRITE_ZEROES;
    if (this.structured) f |= TF_SEND_DF;
    return f;
  }

  /** Option haggling; returns the chosen export or null after ABORT. */
  private async negotiate(): Promise<{ name: string; entry: ExportEntry } | null> {
    for (;;) {
      const h = await this.reader.read(16);
      if (!h.subarray(0, 8).equals(IHAVEOPT)) throw new ProtocolError('bad option magic');
      const opt = h.readUInt32BE(8);
      const len = h.readUInt32BE(12);
      if (len > MAX_OPTION_LENGTH) {
        if (len > MAX_PAYLOAD) throw new ProtocolError(`option ${opt} data of ${len} bytes is absurd`);
        await this.reader.skip(len);
        this.optError(opt, REP_ERR_TOO_BIG, `option data of ${len} bytes exceeds ${MAX_OPTION_LENGTH}`);
        continue;
      }
      const data = len ? await this.reader.read(len) : Buffer.alloc(0);
      switch (opt) {
        case OPT_EXPORT_NAME: {
          const name = data.toString('utf8');
          const entry = this.exports.get(name);
          if (!entry) throw new ProtocolError(`client asked for unknown export ${JSON.stringify(name)}`);
          const r = Buffer.alloc(this.noZeroes ? 10 : 134);
          r.writeBigUInt64BE(BigInt(entry.target.size), 0);
          r.writeUInt16BE(this.transmissionFlags(entry), 8);
          this.sock.write(r);
          return { name, entry };
        }
        case OPT_ABORT:
          this.optReply(opt, REP_ACK);
          return null;
        case OPT_LIST: {
          if (len !== 0) {
            this.optError(opt, REP_ERR_INVALID, 'NBD_OPT_LIST takes no data');
            break;
          }
          for (const name of this.exports.keys()) {
            const n = Buffer.from(name);
            const d = Buffer.allocUnsafe(4 + n.length);
            d.writeUInt32BE(n.length, 0);
            n.copy(d, 4);
            this.optReply(opt, REP_SERVER, d);
          }
          this.optReply(opt, REP_ACK);
          break;
        }
        case OPT_INFO:
        case OPT_GO: {
          const parsed = parseInfoRequest(data);
          if (!parsed) {
            this.optError(opt, REP_ERR_INVALID, 'malformed NBD_OPT_INFO/GO data');
            break;
          }
          const entry = this.exports.get(parsed.name);
          if (!entry) {
            this.optError(opt, REP_ERR_UNKNOWN, `no export named ${JSON.stringify(parsed.name)}`);
            break;
          }
          const ex = Buffer.allocUnsafe(12);
          ex.writeUInt16BE(INFO_EXPORT, 0);
          ex.writeBigUInt64BE(BigInt(entry.target.size), 2);
          ex.writeUInt16BE(this.transmissionFlags(entry), 10);
          this.optReply(opt, REP_INFO, ex);
          if (parsed.infos.includes(INFO_NAME)) {
            const n = Buffer.from(parsed.name);
            const d = Buffer.allocUnsafe(2 + n.length);
            d.writeUInt16BE(INFO_NAME, 0);
            n.copy(d, 2);
            this.optReply(opt, REP_INFO, d);
          }
          if (parsed.infos.includes(INFO_DESCRIPTION) && entry.description) {
            const n = Buffer.from(entry.description);
            const d = Buffer.allocUnsafe(2 + n.length);
            d.writeUInt16BE(INFO_DESCRIPTION, 0);
            n.copy(d, 2);
            this.optReply(opt, REP_INFO, d);
          }
          const bsz = Buffer.allocUnsafe(14);
          bsz.writeUInt16BE(INFO_BLOCK_SIZE, 0);
          bsz.writeUInt32BE(1, 2);
          bsz.writeUInt32BE(4096, 6);
          bsz.writeUInt32BE(MAX_PAYLOAD, 10);
          this.optReply(opt, REP_INFO, bsz);
          this.optReply(opt, REP_ACK);
          if (opt === OPT_GO) {
            if (this.metaExport !== null && this.metaExport !== parsed.name) this.metaExport = null;
            return { name: parsed.name, entry };
          }
          break;
        }
        case OPT_STRUCTURED_REPLY:
          if (len !== 0) this.optError(opt, REP_ERR_INVALID, 'NBD_OPT_STRUCTURED_REPLY takes no data');
          else {
            this.structured = true;
            this.optReply(opt, REP_ACK);
          }
          break;
        case OPT_LIST_META_CONTEXT:
        case OPT_SET_META_CONTEXT: {
          if (!this.structured) {
            this.optError(opt, REP_ERR_INVALID, 'meta contexts need structured replies first');
            break;
          }
          const q = parseMetaRequest(data);
          if (!q) {
            this.optError(opt, REP_ERR_INVALID, 'malformed meta context request');
            break;
          }
          if (!this.exports.has(q.name)) {
            this.optError(opt, REP_ERR_UNKNOWN, `no export named ${JSON.stringify(q.name)}`);
            break;
          }
          const list = opt === OPT_LIST_META_CONTEXT;
          const match =
            (list && q.queries.length === 0) ||
            q.queries.some((s) => s === BASE_ALLOCATION || (list && (s === 'base:' || s === 'base:allocation')));
          if (!list) this.metaExport = null;
          if (match) {
            const n = Buffer.from(BASE_ALLOCATION);
            const d = Buffer.allocUnsafe(4 + n.length);
            d.writeUInt32BE(list ? 0 : BASE_ALLOCATION_ID, 0);
            n.copy(d, 4);
            this.optReply(opt, REP_META_CONTEXT, d);
            if (!list) this.metaExport = q.name;
          }
          this.optReply(opt, REP_ACK);
          break;
        }
        default:
          this.optError(opt, REP_ERR_UNSUP, `option ${opt} is not supported`);
      }
    }
  }

  /**
   * Queues a transmission-phase reply. Replies completed in the same event-loop turn leave in one
   * writev (the socket is corked until setImmediate), instead of one system call per request.
   */
  private send(b: Buffer): void {
    if (!this.corked) {
      this.corked = true;
      this.sock.cork();
      setImmediate(this.uncork);
    }
    this.sock.write(b);
  }

  private readonly uncork = (): void => {
    this.corked = false;
    this.sock.uncork();
  };

  private simpleReply(cookie: Buffer, error: number, data?: Buffer): void {
    const h = Buffer.allocUnsafe(16);
    h.writeUInt32BE(SIMPLE_REPLY_MAGIC, 0);
    h.writeUInt32BE(error, 4);
    cookie.copy(h, 8);
    this.send(h);
    if (data) this.send(data);
  }

  private chunkHeader(buf: Buffer, at: number, cookie: Buffer, flags: number, type: number, len: number): void {
    buf.writeUInt32BE(STRUCTURED_REPLY_MAGIC, at);
    buf.writeUInt16BE(flags, at + 4);
    buf.writeUInt16BE(type, at + 6);
    cookie.copy(buf, at + 8);
    buf.writeUInt32BE(len, at + 16);
  }

  private replyError(cookie: Buffer, error: number, msg: string): void {
    if (!this.structured) return this.simpleReply(cookie, error);
    const m = Buffer.from(msg.slice(0, 4096));
    const b = Buffer.allocUnsafe(20 + 6 + m.length);
    this.chunkHeader(b, 0, cookie, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 6 + m.length);
    b.writeUInt32BE(error, 20);
    b.writeUInt16BE(m.length, 24);
    m.copy(b, 26);
    this.send(b);
  }

  private replyOk(cookie: Buffer): void {
    if (!this.structured) return this.simpleReply(cookie, 0);
    const b = Buffer.allocUnsafe(20);
    this.chunkHeader(b, 0, cookie, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0);
    this.send(b);
  }

  private async transmit(e: ExportEntry, name: string): Promise<void> {
    const t = e.target;
    try {
      for (;;) {
        while (this.inflight >= MAX_INFLIGHT || this.sock.writableLength > MAX_BUFFERED) {
          // Woken by a request finishing, the socket draining, or the socket closing (a client that
          // disconnects while we wait on 'drain' would otherwise leave this connection hanging).
          let wake = (): void => undefined;
          this.waits.count++;
          await new Promise<void>((resolve) => {
            wake = resolve;
            this.slotFree = resolve;
            this.sock.once('drain', resolve);
            this.sock.once('close', resolve);
          }).finally(() => this.waits.count--);
          this.sock.removeListener('drain', wake);
          this.sock.removeListener('close', wake);
          this.slotFree = null;
          if (this.sock.destroyed) throw new ConnectionClosed('client disconnected');
        }
        const h = await this.reader.read(28);
        if (h.readUInt32BE(0) !== REQUEST_MAGIC) throw new ProtocolError(`bad request magic 0x${h.readUInt32BE(0).toString(16)}`);
        const flags = h.readUInt16BE(4);
        const type = h.readUInt16BE(6);
        const cookie = Buffer.from(h.subarray(8, 16));
        const offBig = h.readBigUInt64BE(16);
        const length = h.readUInt32BE(24);
        const offset = offBig > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(offBig);
        const inRange = offset + length <= t.size;
        const fua = (flags & CMD_FLAG_FUA) !== 0;

        switch (type) {
          case CMD_READ:
            if (length > MAX_PAYLOAD) this.replyError(cookie, this.structured ? EOVERFLOW : EINVAL, `read of ${length} bytes exceeds ${MAX_PAYLOAD}`);
            else if (!inRange) this.replyError(cookie, EINVAL, `read past the end of the ${t.size}-byte export`);
            else this.spawn(this.doRead(t, cookie, offset, length));
            break;
          case CMD_WRITE: {
            if (length > MAX_PAYLOAD) {
              await this.reader.skip(length);
              this.replyError(cookie, EINVAL, `write of ${length} bytes exceeds ${MAX_PAYLOAD}`);
              break;
            }
            const data = length ? await this.reader.readv(length) : [];
            if (e.readOnly) this.replyError(cookie, EPERM, 'export is read-only');
            else if (!inRange) this.replyError(cookie, ENOSPC, `write past the end of the ${t.size}-byte export`);
            else this.spawn(this.run1(cookie, true, () => (this.beforeChange(), t.write(offset, data, fua))));
            break;
          }
          case CMD_DISC:
            await this.drain();
            return;
          case CMD_FLUSH:
            this.spawn(this.run1(cookie, true, () => t.flush()));
            break;
          case CMD_TRIM:
            if (e.readOnly) this.replyError(cookie, EPERM, 'export is read-only');
            else if (!inRange) this.replyError(cookie, EINVAL, `trim past the end of the ${t.size}-byte export`);
            else this.spawn(this.run1(cookie, true, () => (this.beforeChange(), t.trim(offset, length, fua))));
            break;
          case CMD_WRITE_ZEROES:
            if (e.readOnly) this.replyError(cookie, EPERM, 'export is read-only');
            else if (!inRange) this.replyError(cookie, ENOSPC, `write-zeroes past the end of the ${t.size}-byte export`);
            else this.spawn(this.run1(cookie, true, () => (this.beforeChange(), t.writeZeroes(offset, length, { fua, noHole: (flags & CMD_FLAG_NO_HOLE) !== 0 }))));
            break;
          case CMD_BLOCK_STATUS:
            if (!this.structured || this.metaExport !== name) this.replyError(cookie, EINVAL, 'no metadata context was negotiated');
            else if (length === 0 || !inRange) this.replyError(cookie, EINVAL, 'block status range is empty or past the end');
            else this.blockStatus(t, cookie, offset, length, (flags & CMD_FLAG_REQ_ONE) !== 0);
            break;
          default:
            // An unknown command may carry a payload we cannot know about; its length is not trusted.
            this.replyError(cookie, EINVAL, `unknown command ${type}`);
        }
      }
    } finally {
      await this.drain();
    }
  }

  /** Drops the connection; resolves once none of its requests is executing (NbdServer.disconnectClients). */
  async fence(): Promise<void> {
    this.fenced = true;
    this.reader.discard();
    this.sock.destroy();
    await this.drain();
  }

  private spawn(p: Promise<void>): void {
    this.inflight++;
    this.done.add(p);
    p.finally(() => {
      this.inflight--;
      this.done.delete(p);
      this.slotFree?.();
    }).catch(() => undefined);
  }

  private async drain(): Promise<void> {
    while (this.done.size) await Promise.allSettled([...this.done]);
  }

  private async run1(cookie: Buffer, write: boolean, fn: () => Promise<void>): Promise<void> {
    // Synchronous with the caller: a request parsed after the fence never reaches the disk.
    if (this.fenced) return;
    try {
      await fn();
      if (!this.sock.destroyed) this.replyOk(cookie);
    } catch (err) {
      if (!this.sock.destroyed) this.replyError(cookie, errnoFor(err, write), (err as Error).message);
    }
  }

  private async doRead(t: NbdTarget, cookie: Buffer, offset: number, length: number): Promise<void> {
    if (this.fenced) return;
    try {
      if (this.structured) {
        if (length === 0) return this.replyOk(cookie);
        const b = Buffer.allocUnsafe(28 + length);
        await t.read(offset, length, b, 28);
        this.chunkHeader(b, 0, cookie, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 8 + length);
        b.writeBigUInt64BE(BigInt(offset), 20);
        if (!this.sock.destroyed) this.send(b);
      } else {
        const b = Buffer.allocUnsafe(16 + length);
        await t.read(offset, length, b, 16);
        b.writeUInt32BE(SIMPLE_REPLY_MAGIC, 0);
        b.writeUInt32BE(0, 4);
        cookie.copy(b, 8);
        if (!this.sock.destroyed) this.send(b);
      }
    } catch (err) {
      if (!this.sock.destroyed) this.replyError(cookie, errnoFor(err, false), (err as Error).message);
    }
  }

  private blockStatus(t: NbdTarget, cookie: Buffer, offset: number, length: number, one: boolean): void {
    let ext: Extent[];
    try {
      ext = t.extents(offset, length, one ? 1 : 4096);
    } catch (err) {
      return this.replyError(cookie, errnoFor(err, false), (err as Error).message);
    }
    const b = Buffer.allocUnsafe(20 + 4 + ext.length * 8);
    this.chunkHeader(b, 0, cookie, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, 4 + ext.length * 8);
    b.writeUInt32BE(BASE_ALLOCATION_ID, 20);
    let p = 24;
    for (const x of ext) {
      b.writeUInt32BE(x.length, p);
      b.writeUInt32BE(x.flags, p + 4);
      p += 8;
    }
    this.send(b);
  }
}

function parseInfoRequest(d: Buffer): { name: string; infos: number[] } | null {
  if (d.length < 6) return null;
  const nl = d.readUInt32BE(0);
  if (4 + nl + 2 > d.length) return null;
  const name = d.toString('utf8', 4, 4 + nl);
  const n = d.readUInt16BE(4 + nl);
  if (4 + nl + 2 + 2 * n !== d.length) return null;
  const infos: number[] = [];
  for (let k = 0; k < n; k++) infos.push(d.readUInt16BE(6 + nl + 2 * k));
  return { name, infos };
}

function parseMetaRequest(d: Buffer): { name: string; queries: string[] } | null {
  if (d.length < 8) return null;
  const nl = d.readUInt32BE(0);
  if (4 + nl + 4 > d.length) return null;
  const name = d.toString('utf8', 4, 4 + nl);
  const nq = d.readUInt32BE(4 + nl);
  let p = 8 + nl;
  const queries: string[] = [];
  for (let k = 0; k < nq; k++) {
    if (p + 4 > d.length) return null;
    const ql = d.readUInt32BE(p);
    if (p + 4 + ql > d.length) return null;
    queries.push(d.toString('utf8', p + 4, p + 4 + ql));
    p += 4 + ql;
  }
  if (p !== d.length) return null;
  return { name, queries };
}

