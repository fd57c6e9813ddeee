/**
 * QMP (QEMU Machine Protocol) client over a unix stream socket.
 *
 * Wire protocol (one JSON object per line, UTF-8, both directions):
 *
 *   QEMU → us   {"QMP": {"version": {"qemu": {"major","minor","micro"}, "package"}, "capabilities": [...]}}
 *   us → QEMU   {"execute": "qmp_capabilities", "id": "vmsnap-1"}
 *   QEMU → us   {"return": {}, "id": "vmsnap-1"}
 *   us → QEMU   {"execute": CMD, "arguments": {...}, "id": "vmsnap-N"}
 *   QEMU → us   {"return": VALUE, "id": "vmsnap-N"}
 *            |  {"error": {"class": C, "desc": D}, "id": "vmsnap-N"}
 *            |  {"event": NAME, "data": {...}, "timestamp": {"seconds", "microseconds"}}  (any time)
 *
 * Replies are matched by id, so several commands may be in flight and events may arrive between
 * (or before) replies. When the socket closes — QEMU exited or crashed — every pending command and
 * every event waiter rejects at once with QmpClosedError, instead of hanging until its timeout.
 */
import { EventEmitter } from 'node:events';
import { readSync } from 'node:fs';
import * as net from 'node:net';

export class QmpError extends Error {
  override readonly name = 'QmpError';
  constructor(
    readonly command: string,
    readonly errorClass: string,
    readonly desc: string,
  ) {
    super(`QMP command ${command} failed: ${errorClass}: ${desc}`);
  }
}

export class QmpTimeoutError extends Error {
  override readonly name = 'QmpTimeoutError';
  constructor(
    readonly what: string,
    readonly timeoutMs: number,
  ) {
    super(`QMP ${what} timed out after ${timeoutMs} ms`);
  }
}

export class QmpClosedError extends Error {
  override readonly name = 'QmpClosedError';
  constructor(
    readonly what: string,
    readonly reason: string,
  ) {
    super(`QMP ${what}: connection closed (${reason})`);
  }
}

export class QmpProtocolError extends Error {
  override readonly name = 'QmpProtocolError';
}

export type QmpArgs = Record<string, unknown>;

export interface QmpEvent {
  event: string;
  data: Record<string, unknown>;
  timestamp: { seconds: number; microseconds: number };
}

export interface QmpVersion {
  major: number;
  minor: number;
  micro: number;
  package: string;
}

export interface QmpConnectOptions {
  /** How long to keep retrying while the socket does not exist yet / refuses (QEMU starting). */
  timeoutMs?: number;
  /** Aborts the connect loop early, e.g. when the QEMU process exited before its socket appeared. */
  signal?: AbortSignal;
}

interface Pending {
  command: string;
  resolve: (v: unknown) => void;
  reject: (e: Error) => void;
  timer: NodeJS.Timeout | undefined;
}

const DEFAULT_COMMAND_TIMEOUT_MS = 30_000;
/** A QMP line is small; a bound keeps a misbehaving peer from growing our buffer forever. */
const MAX_LINE_BYTES = 64 << 20;

export class QmpClient {
  readonly events = new EventEmitter();
  private nextId = 1;
  private readonly pending = new Map<string, Pending>();
  private closedReason: string | undefined;
  private buf = '';
  private greetingWaiter: ((g: QmpVersion | Error) => void) | undefined;
  private version_: QmpVersion | undefined;

  private constructor(private readonly sock: net.Socket) {
    // Many waiters may listen for the same event name during a migration.
    this.events.setMaxListeners(0);
    sock.setEncoding('utf8');
    sock.on('data', (s: string) => this.onData(s));
    sock.on('error', (e) => this.onClose(e.message));
    sock.on('close', () => this.onClose('socket closed'));
  }

  /** Connects (retrying until the socket appears), reads the greeting and negotiates capabilities. */
  static async connect(socketPath: string, opts: QmpConnectOptions = {}): Promise<QmpClient> {
    const timeoutMs = opts.timeoutMs ?? 30_000;
    const deadline = Date.now() + timeoutMs;
    let lastErr = 'not tried';
    for (;;) {
      if (opts.signal?.aborted) {
        throw new QmpClosedError(`connect to ${socketPath}`, String(opts.signal.reason ?? 'aborted'));
      }
      try {
        const sock = await openSocket(socketPath);
        const client = new QmpClient(sock);
        await client.handshake(Math.max(1000, deadline - Date.now()));
        return client;
      } catch (e) {
        const code = (e as NodeJS.ErrnoException).code;
        if (code !== 'ENOENT' && code !== 'ECONNREFUSED' && code !== 'EAGAIN') throw e;
        lastErr = code;
      }
      if (Date.now() >= deadline) {
        throw new QmpTimeoutError(`connect to ${socketPath} (last error ${lastErr})`, timeoutMs);
      }
      await new Promise((r) => setTimeout(r, 25));
    }
  }

  /** QEMU's version as announced in the greeting. */
  get version(): QmpVersion {
    if (!this.version_) throw new QmpProtocolError('QMP greeting not received');
    return this.version_;
  }

  get closed(): boolean {
    return this.closedReason !== undefined;
  }

  private async handshake(timeoutMs: number): Promise<void> {
    const g = await new Promise<QmpVersion | Error>((resolve) => {
      const t = setTimeout(() => resolve(new QmpTimeoutError('greeting', timeoutMs)), timeoutMs);
      this.greetingWaiter = (v) => {
        clearTimeout(t);
        resolve(v);
      };
    });
    if (g instanceof Error) {
      this.sock.destroy();
      throw g;
    }
    this.version_ = g;
    await this.execute('qmp_capabilities', undefined, { timeoutMs });
  }

  /** Sends one command and resolves with its `return` value. */
  execute<T = unknown>(command: string, args?: QmpArgs, opts: { timeoutMs?: number } = {}): Promise<T> {
    if (this.closedReason !== undefined) {
      return Promise.reject(new QmpClosedError(command, this.closedReason));
    }
    const id = `vmsnap-${this.nextId++}`;
    const timeoutMs = opts.timeoutMs ?? DEFAULT_COMMAND_TIMEOUT_MS;
    return new Promise<T>((resolve, reject) => {
      const p: Pending = {
        command,
        resolve: resolve as (v: unknown) => void,
        reject,
        timer: undefined,
      };
      if (timeoutMs > 0 && Number.isFinite(timeoutMs)) {
        p.timer = setTimeout(() => {
          // A late reply for this id is dropped in onMessage.
          this.pending.delete(id);
          reject(new QmpTimeoutError(`command ${command}`, timeoutMs));
        }, timeoutMs);
      }
      this.pending.set(id, p);
      const msg = args === undefined ? { execute: command, id } : { execute: command, arguments: args, id };
      this.sock.write(JSON.stringify(msg) + '\n');
    });
  }

  /**
   * Resolves with the next event `name` that satisfies `pred`. Register the waiter before issuing
   * the command that triggers the event: events are not replayed.
   */
  waitEvent(name: string, pred: (e: QmpEvent) => boolean = () => true, timeoutMs = 30_000): Promise<QmpEvent> {
    if (this.closedReason !== undefined) {
      return Promise.reject(new QmpClosedError(`waiting for event ${name}`, this.closedReason));
    }
    return new Promise<QmpEvent>((resolve, reject) => {
      const cleanup = (): void => {
        clearTimeout(timer);
        this.events.off(name, onEvent);
        this.events.off('close', onClose);
      };
      const onEvent = (e: QmpEvent): void => {
        let ok: boolean;
        try {
          ok = pred(e);
        } catch (err) {
          cleanup();
          reject(err as Error);
          return;
        }
        if (ok) {
          cleanup();
          resolve(e);
        }
      };
      const onClose = (reason: string): void => {
        cleanup();
        reject(new QmpClosedError(`waiting for event ${name}`, reason));
      };
      const timer = setTimeout(() => {
        cleanup();
        reject(new QmpTimeoutError(`waiting for event ${name}`, timeoutMs));
      }, timeoutMs);
      this.events.on(name, onEvent);
      this.events.on('close', onClose);
    });
  }

  /**
   * Whether readPendingSync can see the socket (its file descriptor is reachable: Node on a unix
   * socket). Callers that depend on it for ordering must check it first.
   */
  get canReadPendingSync(): boolean {
    return this.fd() !== undefined;
  }

  /**
   * Reads, synchronously, everything QEMU has written to the socket so far and handles it as if it
   * had arrived normally (events are emitted, replies resolve) before returning.
   *
   * Why: QEMU writes an event into this socket before it goes on (the write is a plain send on the
   * emitting thread). After this call, every event QEMU emitted before the call began has been
   * seen — an ordering guarantee across sockets that the event loop does not give (it may hand us
   * another socket's later data first). The take relies on it to place its disk cut exactly
   * (vm/stop-point-cut.ts). QEMU's JSON output is ASCII (it escapes everything else), so bytes and
   * characters coincide and a read may split a message anywhere.
   */
  readPendingSync(): void {
    const fd = this.fd();
    if (fd === undefined || this.closedReason !== undefined) return;
    const b = Buffer.allocUnsafe(64 * 1024);
    for (;;) {
      let n: number;
      try {
        n = readSync(fd, b, 0, b.length, null);
      } catch (e) {
        const code = (e as NodeJS.ErrnoException).code;
        if (code === 'EAGAIN' || code === 'EWOULDBLOCK') return;
        throw e;
      }
      if (n === 0) return; // end of stream: the socket's own 'close' reports it
      this.onData(b.toString('latin1', 0, n));
    }
  }

  private fd(): number | undefined {
    const fd = (this.sock as unknown as { _handle?: { fd?: number } })._handle?.fd;
    return typeof fd === 'number' && fd >= 0 ? fd : undefined;
  }

  /** Closes the connection; pending commands reject with QmpClosedError. */
  close(): void {
    this.sock.destroy();
    this.onClose('closed by client');
  }

  private onData(s: string): void {
    this.buf += s;
    let nl: number;
    while ((nl = this.buf.indexOf('\n')) >= 0) {
      const line = this.buf.slice(0, nl).trim();
      this.buf = this.buf.slice(nl + 1);
      if (line.length > 0) this.onLine(line);
    }
    if (this.buf.length > MAX_LINE_BYTES) {
      this.sock.destroy();
      this.onClose(`QMP line longer than ${MAX_LINE_BYTES} bytes`);
    }
  }

  private onLine(line: string): void {
    let msg: Record<string, unknown>;
    try {
      msg = JSON.parse(line) as Record<string, unknown>;
    } catch {
      this.sock.destroy();
      this.onClose(`unparseable QMP message: ${line.slice(0, 200)}`);
      return;
    }
    if ('QMP' in msg) {
      const q = msg.QMP as { version?: { qemu?: { major: number; minor: number; micro: number }; package?: string } };
      const v = q.version?.qemu;
      const w = this.greetingWaiter;
      this.greetingWaiter = undefined;
      if (w) {
        w(v ? { ...v, package: q.version?.package ?? '' } : new QmpProtocolError('QMP greeting without version'));
      }
      return;
    }
    if (typeof msg.event === 'string') {
      const ev = msg as unknown as QmpEvent;
      if (ev.data === undefined) ev.data = {};
      this.events.emit(ev.event, ev);
      this.events.emit('event', ev);
      return;
    }
    const id = typeof msg.id === 'string' ? msg.id : undefined;
    const p = id === undefined ? undefined : this.pending.get(id);
    if (!p || id === undefined) return; // reply to a timed-out command, or one we never sent
    this.pending.delete(id);
    if (p.timer) clearTimeout(p.timer);
    if ('error' in msg) {
      const e = msg.error as { class?: string; desc?: string };
      p.reject(new QmpError(p.command, e.class ?? 'GenericError', e.desc ?? 'no description'));
    } else {
      p.resolve(msg.return);
    }
  }

  private onClose(reason: string): void {
    if (this.closedReason !== undefined) return;
    this.closedReason = reason;
    const w = this.greetingWaiter;
    this.greetingWaiter = undefined;
    if (w) w(new QmpClosedError('greeting', reason));
    for (const [id, p] of this.pending) {
      this.pending.delete(id);
      if (p.timer) clearTimeout(p.timer);
      p.reject(new QmpClosedError(`command ${p.command}`, reason));
    }
    this.events.emit('close', reason);
  }
}

function openSocket(path: string): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const s = net.createConnection({ path });
    const onErr = (e: Error): void => {
      s.destroy();
      reject(e);
    };
    s.once('error', onErr);
    s.once('connect', () => {
      s.off('error', onErr);
      resolve(s);
    });
  });
}

/** QEMU's event timestamp (host wall clock, µs) in ms since the epoch. */
export function eventTimeMs(e: QmpEvent): number {
  return e.timestamp.seconds * 1000 + e.timestamp.microseconds / 1000;
}
