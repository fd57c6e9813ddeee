/**
 * The secure channel between two vmsnap hosts: a handshake that authenticates both ends by their
 * pinned Ed25519 keys (identity.ts) and agrees on fresh session keys, then sealed, ordered records in
 * both directions over one TCP connection.
 *
 *   client (source: `vmsnap migrate`)                      server (destination: `vmsnap receive`)
 *   ── ClientHello ─────────────────────────────────────────▶
 *        "VMSNAPMG"  u16 minVersion  u16 maxVersion  eph_c(32)  random_c(32)
 *   ◀───────────────────────────────────────────── ServerHello ──
 *        "VMSNAPMG"  u16 version  eph_s(32)  random_s(32)  static_s(32)  sig_s(64)
 *        sig_s = Ed25519_sign(static_s, "vmsnap-migrate server" ‖ SHA-256(ClientHello ‖ ServerHello before sig_s))
 *        (version 0 = no version in common: a UTF-8 reason follows the magic and version; the server closes)
 *   client: verifies sig_s, and that fingerprint(static_s) is the pinned one — else it closes
 *   both:   th = SHA-256(ClientHello ‖ ServerHello)            (static_s and both ephemerals are in it)
 *           k_c2s ‖ k_s2c = HKDF-SHA256(ikm = X25519(eph_c, eph_s), salt = th, info = "vmsnap-migrate keys", 64)
 *   ── record: static_c(32) sig_c(64) ──────────────────────▶   sig_c = Ed25519_sign(static_c, "vmsnap-migrate client" ‖ th)
 *   ◀─────────────────────────────────── record: u8 1 (accepted) | u8 0 + UTF-8 reason (then close)
 *   … records both ways …
 *
 * Handshake messages are `be32 length | body` with the body at most 4 KiB. A record is
 *
 *   be32 length | nonce(12) | AES-256-GCM ciphertext | tag(16)        aad = be64 record sequence number
 *
 * with one key and one counter per direction, so a record that is replayed, reordered, dropped,
 * truncated or reflected back fails to open and ends the channel. Its plaintext is `u8 type | body`;
 * the types belong to the protocol (protocol.ts). A length above MAX_RECORD is refused before a
 * byte of it is read: a broken or hostile peer cannot make this side buffer more than one record.
 *
 * Both ends authenticate before any VM data moves: a server learns the client's key only inside the
 * first record (keyed by this session), signs its own key into the transcript the keys derive from
 * (so a relay that swaps keys ends up with keys nobody shares), and refuses a client its `authorize`
 * does not accept before reading anything else.
 *
 * Backpressure: `send` resolves once the socket accepted the record and its buffer is under its
 * high-water mark (it waits for 'drain' otherwise), and `receive` reads one record at a time from
 * the socket, which stops reading from the kernel while nothing consumes. Nothing here queues
 * without bound, so a slow link slows the sender (QEMU, for a relayed migration) as it must.
 */
import { createHash, diffieHellman, generateKeyPairSync, hkdfSync, randomBytes, sign, verify, createPublicKey, type KeyObject } from 'node:crypto';
import type * as net from 'node:net';
import { UserFacingError } from '../util/errors.js';
import { fingerprintOf, publicKeyFromRaw, type HostIdentity } from './identity.js';
import { open as openBox, sealInto, SEAL_OVERHEAD } from '../store/crypto.js';
import { PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN, negotiateVersion } from './version.js';

export const MAGIC = Buffer.from('VMSNAPMG', 'latin1');
/** The largest record plaintext (type byte included): 1 MiB of payload plus a small header. */
export const MAX_RECORD_PLAINTEXT = (1 << 20) + 256;
const MAX_RECORD = MAX_RECORD_PLAINTEXT + SEAL_OVERHEAD;
const MAX_HANDSHAKE = 4096;
const SERVER_LABEL = Buffer.from('vmsnap-migrate server');
const CLIENT_LABEL = Buffer.from('vmsnap-migrate client');
const KEY_INFO = Buffer.from('vmsnap-migrate keys');

export type ChannelStep = 'connect' | 'hello' | 'authenticate' | 'record';

/** A failure of the channel itself, naming the step; `retryable` when a new attempt may succeed. */
export class ChannelError extends UserFacingError {
  override readonly name: string = 'ChannelError';
  constructor(
    readonly step: ChannelStep,
    message: string,
    readonly retryable: boolean,
    options?: { cause?: unknown },
  ) {
    super(`${step}: ${message}`, options);
  }
}

/** The peer is not the one this host paired with (or not paired at all). Never retryable. */
export class PeerRejectedError extends ChannelError {
  override readonly name = 'PeerRejectedError';
  constructor(message: string) {
    super('authenticate', message, false);
  }
}

/** The peer sent bytes that are not this protocol: malformed, oversized, forged or out of order. */
export class FrameError extends ChannelError {
  override readonly name = 'FrameError';
  constructor(step: ChannelStep, message: string) {
    super(step, message, false);
  }
}

export interface Message {
  type: number;
  body: Buffer;
}

export interface ChannelOptions {
  identity: HostIdentity;
  /**
   * Whether the peer, known by its key's fingerprint, may talk to this host: true, or the reason
   * it may not (sent to the peer, shown to the user).
   */
  authorize(fingerprint: string): true | string;
  handshakeTimeoutMs?: number;
  /** Tests only: the versions this end offers or accepts. */
  versions?: { min: number; max: number };
}

/** Reads exact byte counts from a socket, one read at a time (the socket's buffer is the only queue). */
class SocketReader {
  private ended = false;
  private failure: Error | null = null;
  private wake: (() => void) | null = null;

  constructor(private readonly sock: net.Socket) {
    const poke = () => {
      const w = this.wake;
      this.wake = null;
      w?.();
    };
    sock.on('readable', poke);
    sock.on('end', () => {
      this.ended = true;
      poke();
    });
    sock.on('close', () => {
      this.ended = true;
      poke();
    });
    sock.on('error', (err) => {
      this.failure ??= err;
      poke();
    });
  }

  /** n bytes, or null when the stream ended cleanly before the first of them. */
  async read(n: number, step: ChannelStep): Promise<Buffer | null> {
    if (n === 0) return Buffer.alloc(0);
    for (;;) {
      const chunk = this.sock.read(n) as Buffer | null;
      if (chunk !== null) {
        if (chunk.length === n) return chunk;
        // read(n) hands out fewer bytes only at the end of the stream.
        throw new FrameError(step, `the connection ended in the middle of a message (${chunk.length} of ${n} bytes)`);
      }
      if (this.failure) throw new ChannelError(step, `connection failed: ${this.failure.message}`, true, { cause: this.failure });
      if (this.ended || this.sock.destroyed) {
        if (this.sock.readableLength > 0) {
          throw new FrameError(step, `the connection ended in the middle of a message (${this.sock.readableLength} of ${n} bytes)`);
        }
        return null;
      }
      await new Promise<void>((resolve) => (this.wake = resolve));
    }
  }
}

function u16(n: number): Buffer {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(n);
  return b;
}

function x25519Raw(publicKey: KeyObject): Buffer {
  const der = publicKey.export({ type: 'spki', format: 'der' });
  return Buffer.from(der.subarray(der.length - 32));
}

function x25519FromRaw(raw: Buffer): KeyObject {
  const prefix = Buffer.from('302a300506032b656e032100', 'hex');
  return createPublicKey({ key: Buffer.concat([prefix, raw]), format: 'der', type: 'spki' });
}

async function withTimeout<T>(p: Promise<T>, ms: number, sock: net.Socket, step: ChannelStep): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => {
      sock.destroy();
      reject(new ChannelError(step, `the peer did not complete the handshake within ${ms} ms`, true));
    }, ms);
  });
  try {
    return await Promise.race([p, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

export class SecureChannel {
  private sendSeq = 0n;
  private recvSeq = 0n;
  private readonly seqBuf = Buffer.alloc(8);
  private scratch = Buffer.allocUnsafe(64 << 10);
  private closed = false;
  /** Bytes written to and read from the socket, headers and seals included (the link's own count). */
  bytesSent = 0;
  bytesReceived = 0;
  /** Time spent waiting for a full send buffer to drain, ms: the link, not this process, was the limit. */
  sendBlockedMs = 0;

  /** @internal built by openClientChannel / acceptServerChannel */
  constructor(
    private readonly sock: net.Socket,
    private readonly reader: SocketReader,
    private readonly sendKey: Buffer,
    private readonly recvKey: Buffer,
    private peer: string,
    readonly version: number,
  ) {}

  /** The fingerprint of the peer's host key, proven by the handshake. */
  get peerFingerprint(): string {
    return this.peer;
  }

  /** @internal the server learns the client's key inside the first record. */
  authenticated(fingerprint: string): this {
    this.peer = fingerprint;
    return this;
  }

  private aad(seq: bigint): Buffer {
    this.seqBuf.writeBigUInt64BE(seq);
    return this.seqBuf;
  }

  /**
   * Sends one message whose body is `parts` laid end to end; resolves when the socket can take
   * more (waits out a full send buffer). The record is sealed straight into the frame that is
   * written, in one write: the RAM relay sends one record per few hundred KiB at link speed, and
   * the copies and the second syscall of a separate length header were a measurable share of it.
   */
  async send(type: number, ...parts: Uint8Array[]): Promise<void> {
    if (this.closed || this.sock.destroyed) throw new ChannelError('record', 'the channel is closed', true);
    let bodyLen = 0;
    for (const p of parts) bodyLen += p.length;
    if (bodyLen + 1 > MAX_RECORD_PLAINTEXT) throw new FrameError('record', `a ${bodyLen}-byte message exceeds the ${MAX_RECORD_PLAINTEXT - 1}-byte limit`);
    // The plaintext is only read by sealInto, synchronously: one scratch buffer serves every record.
    if (this.scratch.length < bodyLen + 1) this.scratch = Buffer.allocUnsafe(Math.max(bodyLen + 1, this.scratch.length * 2));
    const plain = this.scratch.subarray(0, bodyLen + 1);
    plain[0] = type;
    let at = 1;
    for (const p of parts) {
      plain.set(p, at);
      at += p.length;
    }
    const frame = Buffer.allocUnsafe(4 + plain.length + SEAL_OVERHEAD);
    const boxLen = sealInto(this.sendKey, plain, this.aad(this.sendSeq++), frame.subarray(4));
    frame.writeUInt32BE(boxLen, 0);
    this.bytesSent += frame.length;
    if (!this.sock.write(frame)) {
      const t = performance.now();
      try {
        await this.drained();
      } finally {
        this.sendBlockedMs += performance.now() - t;
      }
    }
  }

  private drained(): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      const done = (err?: Error) => {
        this.sock.off('drain', ok);
        this.sock.off('close', closed);
        this.sock.off('error', done);
        if (err) reject(new ChannelError('record', `connection failed: ${err.message}`, true, { cause: err }));
        else resolve();
      };
      const ok = () => done();
      const closed = () => done(new Error('the connection closed'));
      this.sock.on('drain', ok);
      this.sock.once('close', closed);
      this.sock.once('error', done);
    });
  }

  /** The next message, or null when the peer closed the connection cleanly between messages. */
  async receive(): Promise<Message | null> {
    const head = await this.reader.read(4, 'record');
    if (head === null) return null;
    const len = head.readUInt32BE(0);
    if (len < SEAL_OVERHEAD + 1 || len > MAX_RECORD) {
      this.sock.destroy();
      throw new FrameError('record', `the peer announced a ${len}-byte record (allowed: ${SEAL_OVERHEAD + 1}..${MAX_RECORD})`);
    }
    const box = await this.reader.read(len, 'record');
    if (box === null) throw new FrameError('record', 'the connection ended in the middle of a record');
    this.bytesReceived += 4 + len;
    let plain: Buffer;
    try {
      plain = openBox(this.recvKey, box, this.aad(this.recvSeq++), 'migration record');
    } catch {
      this.sock.destroy();
      throw new FrameError('record', 'a record failed authentication (altered, replayed or out of order)');
    }
    return { type: plain[0]!, body: plain.subarray(1) };
  }

  /** Ends the connection after what was sent has been flushed. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    if (this.sock.destroyed) return;
    await new Promise<void>((resolve) => {
      this.sock.once('close', () => resolve());
      this.sock.end();
      setTimeout(() => {
        this.sock.destroy();
        resolve();
      }, 5000).unref();
    });
  }

  destroy(): void {
    this.closed = true;
    this.sock.destroy();
  }

  /**
   * Ends the connection after a last message (an ABORT) while the peer may still be sending: what
   * it sends is read and dropped until it closes (or `ms` pass). Destroying a socket with unread
   * data sends a TCP reset, which can reach the peer before it has read that last message — it
   * would then see "ECONNRESET" instead of the reason.
   */
  async lingerClose(ms: number): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    if (this.sock.destroyed) return;
    await new Promise<void>((resolve) => {
      const done = (): void => {
        clearTimeout(timer);
        this.sock.destroy();
        resolve();
      };
      const timer = setTimeout(done, ms);
      timer.unref();
      this.sock.once('close', done);
      this.sock.removeAllListeners('data');
      this.sock.on('data', () => undefined);
      this.sock.resume();
      this.sock.end();
    });
  }

  get socket(): net.Socket {
    return this.sock;
  }
}

async function readHandshake(reader: SocketReader, step: ChannelStep): Promise<Buffer> {
  const head = await reader.read(4, step);
  if (head === null) throw new ChannelError(step, 'the peer closed the connection during the handshake', true);
  const len = head.readUInt32BE(0);
  if (len > MAX_HANDSHAKE) throw new FrameError(step, `the peer sent a ${len}-byte handshake message (at most ${MAX_HANDSHAKE})`);
  const body = await reader.read(len, step);
  if (body === null) throw new FrameError(step, 'the connection ended in the middle of a handshake message');
  return body;
}

function writeHandshake(sock: net.Socket, body: Buffer): void {
  const head = Buffer.alloc(4);
  head.writeUInt32BE(body.length);
  sock.write(Buffer.concat([head, body]));
}

function deriveKeys(ephPrivate: KeyObject, peerEph: Buffer, th: Buffer): { c2s: Buffer; s2c: Buffer } {
  let shared: Buffer;
  try {
    shared = diffieHellman({ privateKey: ephPrivate, publicKey: x25519FromRaw(peerEph) });
  } catch {
    throw new FrameError('hello', 'the peer sent an invalid key exchange value');
  }
  const okm = Buffer.from(hkdfSync('sha256', shared, th, KEY_INFO, 64));
  return { c2s: okm.subarray(0, 32), s2c: okm.subarray(32, 64) };
}

function checkMagic(msg: Buffer, step: ChannelStep): void {
  if (msg.length < MAGIC.length + 2 || !msg.subarray(0, MAGIC.length).equals(MAGIC)) {
    throw new FrameError(step, 'the peer does not speak the vmsnap migration protocol');
  }
}

/** The client side (the source host). `opts.authorize` decides on the server's fingerprint. */
export async function openClientChannel(sock: net.Socket, opts: ChannelOptions): Promise<SecureChannel> {
  const reader = new SocketReader(sock);
  const versions = opts.versions ?? { min: PROTOCOL_VERSION_MIN, max: PROTOCOL_VERSION_MAX };
  const run = async (): Promise<SecureChannel> => {
    const eph = generateKeyPairSync('x25519');
    const clientHello = Buffer.concat([MAGIC, u16(versions.min), u16(versions.max), x25519Raw(eph.publicKey), randomBytes(32)]);
    writeHandshake(sock, clientHello);

    const serverHello = await readHandshake(reader, 'hello');
    checkMagic(serverHello, 'hello');
    const version = serverHello.readUInt16BE(MAGIC.length);
    if (version === 0) {
      const reason = serverHello.subarray(MAGIC.length + 2).toString('utf8');
      throw new ChannelError('hello', `the peer refused: ${reason}`, false);
    }
    if (version < versions.min || version > versions.max) throw new FrameError('hello', `the peer chose protocol version ${version}, outside the offered ${versions.min}..${versions.max}`);
    const fixed = MAGIC.length + 2 + 32 + 32 + 32;
    if (serverHello.length !== fixed + 64) throw new FrameError('hello', `the server hello has ${serverHello.length} bytes, not ${fixed + 64}`);
    const ephS = serverHello.subarray(MAGIC.length + 2, MAGIC.length + 34);
    const staticS = serverHello.subarray(MAGIC.length + 66, fixed);
    const sigS = serverHello.subarray(fixed);
    const signedPart = createHash('sha256').update(clientHello).update(serverHello.subarray(0, fixed)).digest();
    if (!verify(null, Buffer.concat([SERVER_LABEL, signedPart]), publicKeyFromRaw(staticS), sigS)) {
      throw new PeerRejectedError('the peer could not prove it holds the key it presented');
    }
    const fingerprint = fingerprintOf(staticS);
    const verdict = opts.authorize(fingerprint);
    if (verdict !== true) throw new PeerRejectedError(verdict);

    const th = createHash('sha256').update(clientHello).update(serverHello).digest();
    const keys = deriveKeys(eph.privateKey, ephS, th);
    const channel = new SecureChannel(sock, reader, keys.c2s, keys.s2c, fingerprint, version);
    const sigC = sign(null, Buffer.concat([CLIENT_LABEL, th]), opts.identity.privateKey);
    await channel.send(0, Buffer.concat([opts.identity.publicKey, sigC]));
    const answer = await channel.receive();
    if (answer === null) throw new ChannelError('authenticate', 'the peer closed the connection instead of answering our authentication', true);
    if (answer.type !== 0 || answer.body.length < 1) throw new FrameError('authenticate', 'the peer answered the authentication with an unexpected message');
    if (answer.body[0] !== 1) throw new PeerRejectedError(`the peer refused this host (${opts.identity.fingerprint}): ${answer.body.subarray(1).toString('utf8')}`);
    return channel;
  };
  try {
    return await withTimeout(run(), opts.handshakeTimeoutMs ?? 15_000, sock, 'hello');
  } catch (err) {
    sock.destroy();
    throw err;
  }
}

/** The server side (the destination host). `opts.authorize` decides on the client's fingerprint. */
export async function acceptServerChannel(sock: net.Socket, opts: ChannelOptions): Promise<SecureChannel> {
  const reader = new SocketReader(sock);
  const versions = opts.versions ?? { min: PROTOCOL_VERSION_MIN, max: PROTOCOL_VERSION_MAX };
  const run = async (): Promise<SecureChannel> => {
    const clientHello = await readHandshake(reader, 'hello');
    checkMagic(clientHello, 'hello');
    if (clientHello.length !== MAGIC.length + 4 + 64) throw new FrameError('hello', `the client hello has ${clientHello.length} bytes, not ${MAGIC.length + 68}`);
    const min = clientHello.readUInt16BE(MAGIC.length);
    const max = clientHello.readUInt16BE(MAGIC.length + 2);
    const version = negotiateVersion({ min, max }, versions);
    if (version === null) {
      const reason = `no protocol version in common (this host speaks ${versions.min}..${versions.max}, the peer ${min}..${max})`;
      writeHandshake(sock, Buffer.concat([MAGIC, u16(0), Buffer.from(reason)]));
      sock.end();
      throw new ChannelError('hello', reason, false);
    }
    const ephC = clientHello.subarray(MAGIC.length + 4, MAGIC.length + 36);
    const eph = generateKeyPairSync('x25519');
    const body = Buffer.concat([MAGIC, u16(version), x25519Raw(eph.publicKey), randomBytes(32), opts.identity.publicKey]);
    const signedPart = createHash('sha256').update(clientHello).update(body).digest();
    const sigS = sign(null, Buffer.concat([SERVER_LABEL, signedPart]), opts.identity.privateKey);
    const serverHello = Buffer.concat([body, sigS]);
    writeHandshake(sock, serverHello);

    const th = createHash('sha256').update(clientHello).update(serverHello).digest();
    const keys = deriveKeys(eph.privateKey, ephC, th);
    const channel = new SecureChannel(sock, reader, keys.s2c, keys.c2s, '', version);
    const auth = await channel.receive();
    if (auth === null) throw new ChannelError('authenticate', 'the peer closed the connection during authentication', true);
    if (auth.type !== 0 || auth.body.length !== 96) throw new FrameError('authenticate', 'the peer sent a malformed authentication');
    const staticC = auth.body.subarray(0, 32);
    const sigC = auth.body.subarray(32);
    let valid = false;
    try {
      valid = verify(null, Buffer.concat([CLIENT_LABEL, th]), publicKeyFromRaw(staticC), sigC);
    } catch {
      valid = false;
    }
    if (!valid) {
      await channel.send(0, Buffer.concat([Buffer.from([0]), Buffer.from('authentication failed')])).catch(() => undefined);
      throw new PeerRejectedError('the peer could not prove it holds the key it presented');
    }
    const fingerprint = fingerprintOf(staticC);
    const verdict = opts.authorize(fingerprint);
    if (verdict !== true) {
      await channel.send(0, Buffer.concat([Buffer.from([0]), Buffer.from(verdict)])).catch(() => undefined);
      await channel.close();
      throw new PeerRejectedError(`${fingerprint}: ${verdict}`);
    }
    await channel.send(0, Buffer.from([1]));
    return channel.authenticated(fingerprint);
  };
  try {
    return await withTimeout(run(), opts.handshakeTimeoutMs ?? 15_000, sock, 'hello');
  } catch (err) {
    sock.destroy();
    throw err;
  }
}
