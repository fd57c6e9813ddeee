/**
 * Minimal NBD client for tests that must know exactly which requests were acknowledged
 * (crash tests): fixed newstyle, NBD_OPT_GO, simple replies, many requests in flight.
 */
import * as net from 'node:net';

export class TestNbdClient {
  private buf: Buffer = Buffer.alloc(0);
  private wake: (() => void) | null = null;
  private closed = false;
  private nextCookie = 1n;
  private readonly pending = new Map<bigint, { resolve: (d: Buffer) => void; reject: (e: Error) => void; readLen: number }>();
  size = 0;

  private constructor(private readonly s: net.Socket) {
    s.on('data', (d: Buffer) => {
      this.buf = this.buf.length ? Buffer.concat([this.buf, d]) : d;
      this.wake?.();
    });
    const end = (): void => {
      this.closed = true;
      this.wake?.();
      for (const p of this.pending.values()) p.reject(new Error('connection closed'));
      this.pending.clear();
    };
    s.on('close', end);
    s.on('error', end);
  }

  static async connect(socketPath: string, name: string): Promise<TestNbdClient> {
    const s = await new Promise<net.Socket>((resolve, reject) => {
      const c = net.connect(socketPath, () => resolve(c));
      c.once('error', reject);
    });
    const c = new TestNbdClient(s);
    await c.take(18);
    s.write(Buffer.from([0, 0, 0, 3]));
    const nb = Buffer.from(name);
    const d = Buffer.alloc(16 + 4 + nb.length + 2);
    Buffer.from('IHAVEOPT').copy(d);
    d.writeUInt32BE(7, 8);
    d.writeUInt32BE(4 + nb.length + 2, 12);
    d.writeUInt32BE(nb.length, 16);
    nb.copy(d, 20);
    s.write(d);
    for (;;) {
      const h = await c.take(20);
      const type = h.readUInt32BE(12);
      const data = await c.take(h.readUInt32BE(16));
      if (type === 1) break;
      if (type !== 3) throw new Error(`NBD_OPT_GO failed with reply type 0x${type.toString(16)}`);
      if (data.readUInt16BE(0) === 0) c.size = Number(data.readBigUInt64BE(2));
    }
    void c.replyLoop();
    return c;
  }

  private async take(n: number): Promise<Buffer> {
    while (this.buf.length < n) {
      if (this.closed) throw new Error('connection closed');
      await new Promise<void>((r) => (this.wake = r));
      this.wake = null;
    }
    const out = this.buf.subarray(0, n);
    this.buf = this.buf.subarray(n);
    return out;
  }

  private async replyLoop(): Promise<void> {
    try {
      for (;;) {
        const h = await this.take(16);
        const err = h.readUInt32BE(4);
        const cookie = h.readBigUInt64BE(8);
        const p = this.pending.get(cookie);
        if (!p) throw new Error(`reply for unknown cookie ${cookie}`);
        this.pending.delete(cookie);
        const data = err === 0 && p.readLen ? Buffer.from(await this.take(p.readLen)) : Buffer.alloc(0);
        if (err) p.reject(new Error(`NBD error ${err}`));
        else p.resolve(data);
      }
    } catch {
      /* connection gone; pending requests were rejected */
    }
  }

  private request(type: number, flags: number, offset: number, length: number, payload?: Buffer): Promise<Buffer> {
    if (this.closed) return Promise.reject(new Error('connection closed'));
    const cookie = this.nextCookie++;
    const h = Buffer.alloc(28);
    h.writeUInt32BE(0x25609513, 0);
    h.writeUInt16BE(flags, 4);
    h.writeUInt16BE(type, 6);
    h.writeBigUInt64BE(cookie, 8);
    h.writeBigUInt64BE(BigInt(offset), 16);
    h.writeUInt32BE(length, 24);
    const p = new Promise<Buffer>((resolve, reject) => this.pending.set(cookie, { resolve, reject, readLen: type === 0 ? length : 0 }));
    this.s.write(payload ? Buffer.concat([h, payload]) : h);
    return p;
  }

  read(offset: number, length: number): Promise<Buffer> {
    return this.request(0, 0, offset, length);
  }
  async write(offset: number, data: Buffer, fua = false): Promise<void> {
    await this.request(1, fua ? 1 : 0, offset, data.length, data);
  }
  async flush(): Promise<void> {
    await this.request(3, 0, 0, 0);
  }
  /** Stops reading replies (the server's socket backs up); requests can still be sent. */
  stopReading(): void {
    this.s.pause();
  }
  /** Sends a read and does not wait for (or ever collect) its reply. */
  sendRead(offset: number, length: number): void {
    this.read(offset, length).catch(() => undefined);
  }
  close(): void {
    this.s.destroy();
  }
}
