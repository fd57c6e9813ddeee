/**
 * A client of qemu-guest-agent, the program inside a guest that answers on the virtio-serial port
 * `org.qemu.guest_agent.0` (qemu.ts: QEMU exposes it on a unix socket it listens on).
 *
 * Protocol: JSON objects, one per line, like QMP but without greeting or capabilities; requests
 * are answered in order. The channel has no session: replies to a request of an earlier,
 * abandoned connection (timed out, guest paused) may still arrive, and the agent may not run at
 * all (then QEMU accepts the connection and nothing ever answers). Hence every session starts with
 * `guest-sync` carrying a random id, and everything read before the reply with that id is
 * discarded; only then are commands sent.
 *
 * Every call has a deadline: an absent or hung agent costs at most the given timeout, and is
 * reported as GuestAgentTimeoutError (the caller decides whether that is a warning).
 *
 * Commands used by vmsnap:
 *   guest-fsfreeze-freeze  → number of file systems frozen (writes to them block until thaw)
 *   guest-fsfreeze-thaw    → number thawed
 *   guest-fsfreeze-status  → "thawed" | "frozen"
 *   guest-set-time {time}  → guest clock := time (ns since the epoch), and its RTC
 *   guest-get-time         → guest clock, ns since the epoch
 */
import { randomInt } from 'node:crypto';
import * as net from 'node:net';
import { UserFacingError } from '../util/errors.js';

export class GuestAgentError extends UserFacingError {
  override readonly name: string = 'GuestAgentError';
  constructor(
    readonly command: string,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(`guest agent: ${command}: ${message}`, options);
  }
}

/** No (matching) answer within the deadline: the agent is not running, or the guest is stuck or paused. */
export class GuestAgentTimeoutError extends GuestAgentError {
  override readonly name = 'GuestAgentTimeoutError';
}

export interface GuestAgentOptions {
  /** Deadline for connecting and the guest-sync handshake (default 3 s). */
  syncTimeoutMs?: number;
}

/** One synchronised session with the agent; `close()` it (the channel takes one client at a time). */
export class GuestAgent {
  private buf = '';
  private waiters: ((line: string | Error) => void)[] = [];
  private lines: string[] = [];
  private failure: Error | null = null;

  private constructor(private readonly sock: net.Socket) {
    sock.setEncoding('utf8');
    sock.on('data', (d: string) => {
      this.buf += d;
      for (let i = this.buf.indexOf('\n'); i >= 0; i = this.buf.indexOf('\n')) {
        const line = this.buf.slice(0, i).trim();
        this.buf = this.buf.slice(i + 1);
        if (line) this.push(line);
      }
    });
    const fail = (e: Error) => {
      this.failure ??= e;
      for (const w of this.waiters.splice(0)) w(this.failure);
    };
    sock.on('error', fail);
    sock.on('close', () => fail(new Error('the channel closed')));
  }

  private push(line: string): void {
    const w = this.waiters.shift();
    if (w) w(line);
    else this.lines.push(line);
  }

  private nextLine(command: string, deadline: number): Promise<string> {
    const queued = this.lines.shift();
    if (queued !== undefined) return Promise.resolve(queued);
    if (this.failure) return Promise.reject(new GuestAgentError(command, this.failure.message));
    return new Promise((resolve, reject) => {
      const waiter = (l: string | Error) => {
        clearTimeout(timer);
        if (l instanceof Error) reject(new GuestAgentError(command, l.message, { cause: l }));
        else resolve(l);
      };
      const timer = setTimeout(() => {
        this.waiters = this.waiters.filter((w) => w !== waiter);
        reject(new GuestAgentTimeoutError(command, `no answer within ${Math.max(0, Math.round(deadline - Date.now() + 0.5))} ms left of the deadline (is qemu-guest-agent running in the guest?)`));
      }, Math.max(0, deadline - Date.now()));
      this.waiters.push(waiter);
    });
  }

  /** Connects and synchronises; GuestAgentTimeoutError when nothing answers in time. */
  static async connect(socketPath: string, o: GuestAgentOptions = {}): Promise<GuestAgent> {
    const timeoutMs = o.syncTimeoutMs ?? 3000;
    const deadline = Date.now() + timeoutMs;
    const sock = await new Promise<net.Socket>((resolve, reject) => {
      const s = net.connect(socketPath);
      const timer = setTimeout(() => {
        s.destroy();
        reject(new GuestAgentTimeoutError('connect', `no connection to ${socketPath} within ${timeoutMs} ms`));
      }, timeoutMs);
      s.once('connect', () => {
        clearTimeout(timer);
        resolve(s);
      });
      s.once('error', (e) => {
        clearTimeout(timer);
        reject(new GuestAgentError('connect', `${socketPath}: ${e.message}`, { cause: e }));
      });
    });
    const agent = new GuestAgent(sock);
    try {
      await agent.sync(deadline);
      return agent;
    } catch (err) {
      agent.close();
      throw err;
    }
  }

  private async sync(deadline: number): Promise<void> {
    const id = randomInt(1, 2 ** 31);
    // A 0xFF byte first makes an agent that was left inside a half-received request drop it.
    this.sock.write(Buffer.from([0xff]));
    this.sock.write(JSON.stringify({ execute: 'guest-sync', arguments: { id } }) + '\n');
    for (;;) {
      const line = await this.nextLine('guest-sync', deadline);
      const msg = parse(line);
      if (msg && (msg as { return?: unknown }).return === id) return;
      // Anything else is left over from an earlier session: discarded.
    }
  }

  /** Sends one command and returns its `return` value; GuestAgentError with the agent's own error text. */
  async execute<T = unknown>(command: string, args?: Record<string, unknown>, timeoutMs = 10_000): Promise<T> {
    const deadline = Date.now() + timeoutMs;
    this.sock.write(JSON.stringify(args ? { execute: command, arguments: args } : { execute: command }) + '\n');
    const msg = parse(await this.nextLine(command, deadline));
    if (!msg) throw new GuestAgentError(command, 'the agent answered with something that is not JSON');
    const err = (msg as { error?: { desc?: string; class?: string } }).error;
    if (err) throw new GuestAgentError(command, err.desc ?? err.class ?? 'failed');
    return (msg as { return: T }).return;
  }

  freeze(timeoutMs?: number): Promise<number> {
    return this.execute<number>('guest-fsfreeze-freeze', undefined, timeoutMs);
  }

  thaw(timeoutMs?: number): Promise<number> {
    return this.execute<number>('guest-fsfreeze-thaw', undefined, timeoutMs);
  }

  freezeStatus(): Promise<'thawed' | 'frozen'> {
    return this.execute('guest-fsfreeze-status');
  }

  /** Sets the guest's clock to `ms` (host time by default); the agent writes it to the RTC too. */
  setTime(ms: number = Date.now()): Promise<void> {
    return this.execute('guest-set-time', { time: Math.round(ms) * 1_000_000 });
  }

  /** The guest's clock, in ms since the epoch. */
  async getTime(): Promise<number> {
    return (await this.execute<number>('guest-get-time')) / 1_000_000;
  }

  close(): void {
    this.sock.destroy();
  }
}

function parse(line: string): object | null {
  try {
    const v: unknown = JSON.parse(line);
    return typeof v === 'object' && v !== null ? v : null;
  } catch {
    return null;
  }
}

/** Runs `fn` in a synchronised session (closed after); errors of connecting propagate. */
export async function withGuestAgent<T>(socketPath: string, fn: (a: GuestAgent) => Promise<T>, o?: GuestAgentOptions): Promise<T> {
  const a = await GuestAgent.connect(socketPath, o);
  try {
    return await fn(a);
  } finally {
    a.close();
  }
}
