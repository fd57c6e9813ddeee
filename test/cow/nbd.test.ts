/**
 * The NBD server against real clients (qemu-io, qemu-img, nbdinfo, nbdcopy) and hostile raw
 * sockets. The server runs in this process, so every client is spawned asynchronously.
 */
import { execFile } from 'node:child_process';
import { mkdtemp, rm, writeFile, readFile } from 'node:fs/promises';
import { randomBytes } from 'node:crypto';
import * as net from 'node:net';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { MemoryChunkStore, isZeroId } from '../../src/cow/chunk-store.js';
import { NbdServer } from '../../src/cow/nbd-server.js';
import { Volume } from '../../src/cow/volume.js';
import { cloneVolume, snapshotVolume } from '../../src/cow/snapshot.js';
import { TestNbdClient } from './helpers/nbd-client.js';

const run = promisify(execFile);
const MiB = 1 << 20;
let dir: string;
let server: NbdServer;
let vol: Volume;
let sock: string;
const uri = (name = 'vol'): string => `nbd+unix:///${name}?socket=${sock}`;

beforeAll(async () => {
  dir = await mkdtemp(path.join(tmpdir(), 'cow-nbd-'));
  sock = path.join(dir, 'nbd.sock');
  vol = await Volume.create(path.join(dir, 'vol'), { size: 64 * MiB, blockSize: 65536 });
  server = new NbdServer();
  server.addExport('vol', vol);
  await server.listen({ socketPath: sock });
});
afterAll(async () => {
  await server?.close();
  await vol?.close();
  await rm(dir, { recursive: true, force: true });
});

async function qemuIo(...cmds: string[]): Promise<string> {
  const args = ['-f', 'raw'];
  for (const c of cmds) args.push('-c', c);
  args.push(uri());
  const { stdout } = await run('qemu-io', args);
  expect(stdout).not.toMatch(/Pattern verification failed|error|failed/i);
  return stdout;
}

describe('NBD server with a client that stops reading', () => {
  it('a client that disconnects while the server waits for its socket to drain ends the connection', async () => {
    const c = await TestNbdClient.connect(sock, 'vol');
    expect(server.activeConnections).toBe(1);
    c.stopReading();
    // 96 MiB of replies: more than the 64 MiB the server lets pile up before it waits for 'drain'.
    for (let i = 0; i < 3; i++) c.sendRead(i * 16 * MiB, 32 * MiB);
    const until = Date.now() + 20_000;
    while (server.connectionsWaitingForClients === 0 && Date.now() < until) await new Promise((r) => setTimeout(r, 20));
    expect(server.connectionsWaitingForClients).toBe(1); // so the disconnect below hits the wait
    c.close();
    const deadline = Date.now() + 10_000;
    while (server.activeConnections > 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    expect(server.activeConnections).toBe(0);
  });
});

describe('NBD server with real clients', () => {
  it('qemu-io writes patterns and reads them back; qemu-img compare matches a reference file', async () => {
    await qemuIo(
      'write -P 0x11 0 4M',
      'write -P 0x22 1000 5000', // unaligned, crosses nothing
      'write -P 0x33 65000 200000', // crosses block boundaries
      'write -z 8M 2M',
      'write -P 0x44 63M 1M',
      'aio_write -P 0x55 20M 64k',
      'aio_write -P 0x66 21M 64k',
      'aio_flush',
      'read -P 0x22 1000 5000',
      'read -P 0x33 65000 200000',
      'read -P 0x44 63M 1M',
      'read -P 0x55 20M 64k',
      'read -P 0 30M 1M',
      'flush',
    );
    const ref = Buffer.alloc(64 * MiB);
    ref.fill(0x11, 0, 4 * MiB);
    ref.fill(0x22, 1000, 6000);
    ref.fill(0x33, 65000, 265000);
    ref.fill(0x44, 63 * MiB, 64 * MiB);
    ref.fill(0x55, 20 * MiB, 20 * MiB + 65536);
    ref.fill(0x66, 21 * MiB, 21 * MiB + 65536);
    const refFile = path.join(dir, 'ref.raw');
    await writeFile(refFile, ref);
    const { stdout } = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', refFile, uri()]);
    expect(stdout).toMatch(/Images are identical/);
  });

  it('nbdinfo --map shows hole/zero extents for trimmed and never-written ranges', async () => {
    await qemuIo('write -P 0x77 40M 1M', 'discard 40M 512k', 'write -z -u 41M 1M');
    const { stdout } = await run('nbdinfo', ['--map', '--json', uri()]);
    const map = JSON.parse(stdout) as { offset: number; length: number; type: number }[];
    const at = (off: number): number => map.find((e) => e.offset <= off && off < e.offset + e.length)!.type;
    expect(at(0)).toBe(0); // data
    expect(at(40 * MiB)).toBe(3); // trimmed → hole,zero
    expect(at(40 * MiB + 512 * 1024)).toBe(0);
    expect(at(41 * MiB)).toBe(3); // write zeroes with unmap
    expect(at(50 * MiB)).toBe(3); // never written
    const { stdout: list } = await run('nbdinfo', ['--list', `nbd+unix://?socket=${sock}`]);
    expect(list).toMatch(/export="vol"/);
  });

  it('nbdcopy copies a raw file in and out with many requests in flight', async () => {
    const src = path.join(dir, 'src.raw');
    const data = randomBytes(64 * MiB);
    data.fill(0, 10 * MiB, 30 * MiB);
    await writeFile(src, data);
    await run('nbdcopy', ['--requests=16', '--connections=2', src, uri()]);
    const out = path.join(dir, 'out.raw');
    await run('nbdcopy', [uri(), out]);
    expect((await readFile(out)).equals(data)).toBe(true);
    const { stdout } = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, uri()]);
    expect(stdout).toMatch(/Images are identical/);
  });

  it('serves a clone of a snapshot that reads back the snapshot bytes, over TCP on loopback', async () => {
    const store = new MemoryChunkStore(65536);
    await vol.flush();
    const { stream } = await snapshotVolume(vol, store);
    const clone = await cloneVolume(path.join(dir, 'clone'), stream, { store });
    const tcp = new NbdServer();
    tcp.addExport('clone', clone);
    const addr = await tcp.listen({ host: '127.0.0.1', port: 0 });
    try {
      const out = path.join(dir, 'clone.raw');
      await run('nbdcopy', [`nbd://127.0.0.1:${addr.port}/clone`, out]);
      const whole = Buffer.alloc(vol.size);
      await vol.read(0, vol.size, whole);
      expect((await readFile(out)).equals(whole)).toBe(true);
      expect(isZeroId(stream.chunks, 15 * 16)).toBe(true);
    } finally {
      await tcp.close();
      await clone.close();
    }
    await expect(new NbdServer().listen({ host: '0.0.0.0', port: 0 })).rejects.toThrow(/loopback/);
  });
});

/** Raw protocol helpers for hostile-client tests. */
class Raw {
  private buf = Buffer.alloc(0);
  private waiters: (() => void)[] = [];
  closed = false;
  constructor(readonly s: net.Socket) {
    s.on('data', (d: Buffer) => {
      this.buf = Buffer.concat([this.buf, d]);
      this.waiters.splice(0).forEach((w) => w());
    });
    s.on('close', () => {
      this.closed = true;
      this.waiters.splice(0).forEach((w) => w());
    });
    s.on('error', () => undefined);
  }
  static connect(): Promise<Raw> {
    return new Promise((resolve, reject) => {
      const s = net.connect(sock, () => resolve(new Raw(s)));
      s.once('error', reject);
    });
  }
  async read(n: number): Promise<Buffer> {
    while (this.buf.length < n) {
      if (this.closed) throw new Error('closed');
      await new Promise<void>((r) => this.waiters.push(r));
    }
    const out = this.buf.subarray(0, n);
    this.buf = this.buf.subarray(n);
    return out;
  }
  async waitClosed(): Promise<boolean> {
    while (!this.closed) await new Promise<void>((r) => this.waiters.push(r));
    return true;
  }
  opt(opt: number, data: Buffer = Buffer.alloc(0)): void {
    const h = Buffer.alloc(16);
    Buffer.from('IHAVEOPT').copy(h);
    h.writeUInt32BE(opt, 8);
    h.writeUInt32BE(data.length, 12);
    this.s.write(Buffer.concat([h, data]));
  }
  async optReply(): Promise<{ opt: number; type: number; data: Buffer }> {
    const h = await this.read(20);
    const len = h.readUInt32BE(16);
    return { opt: h.readUInt32BE(8), type: h.readUInt32BE(12), data: len ? Buffer.from(await this.read(len)) : Buffer.alloc(0) };
  }
  /** Handshake + NBD_OPT_GO on "vol" (no structured replies): returns export size. */
  static async open(): Promise<Raw> {
    const r = await Raw.connect();
    const hello = await r.read(18);
    expect(hello.subarray(0, 8).toString()).toBe('NBDMAGIC');
    r.s.write(Buffer.from([0, 0, 0, 3]));
    const name = Buffer.from('vol');
    const d = Buffer.alloc(4 + name.length + 2);
    d.writeUInt32BE(name.length);
    name.copy(d, 4);
    r.opt(7, d);
    for (;;) {
      const rep = await r.optReply();
      if (rep.type === 1) break;
      expect(rep.type).toBe(3);
    }
    return r;
  }
  req(type: number, offset: bigint, length: number, cookie: number, flags = 0, magic = 0x25609513): void {
    const h = Buffer.alloc(28);
    h.writeUInt32BE(magic, 0);
    h.writeUInt16BE(flags, 4);
    h.writeUInt16BE(type, 6);
    h.writeBigUInt64BE(BigInt(cookie), 8);
    h.writeBigUInt64BE(offset, 16);
    h.writeUInt32BE(length, 24);
    this.s.write(h);
  }
  async simpleReply(): Promise<{ error: number; cookie: number }> {
    const h = await this.read(16);
    expect(h.readUInt32BE(0)).toBe(0x67446698);
    return { error: h.readUInt32BE(4), cookie: Number(h.readBigUInt64BE(8)) };
  }
}

describe('NBD server with hostile clients', () => {
  it('answers unknown options, malformed GO and unknown exports with option errors', async () => {
    const r = await Raw.connect();
    await r.read(18);
    r.s.write(Buffer.from([0, 0, 0, 3]));
    r.opt(99);
    expect((await r.optReply()).type).toBe(0x80000001);
    r.opt(7, Buffer.from([0, 0, 0, 50, 1])); // name length past the data
    expect((await r.optReply()).type).toBe(0x80000003);
    const name = Buffer.from('nope');
    const d = Buffer.alloc(4 + name.length + 2);
    d.writeUInt32BE(name.length);
    name.copy(d, 4);
    r.opt(6, d);
    expect((await r.optReply()).type).toBe(0x80000006);
    r.opt(10, Buffer.alloc(8)); // SET_META_CONTEXT before structured replies
    expect((await r.optReply()).type).toBe(0x80000003);
    r.opt(3);
    const s = await r.optReply();
    expect(s.type).toBe(2);
    expect(s.data.subarray(4).toString()).toBe('vol');
    expect((await r.optReply()).type).toBe(1);
    r.opt(2); // ABORT
    expect((await r.optReply()).type).toBe(1);
    expect(await r.waitClosed()).toBe(true);
  });

  it('rejects bad requests with errors and keeps serving; bad magic closes only that connection', async () => {
    const r = await Raw.open();
    const size = BigInt(64 * MiB);
    r.req(0, size - 10n, 20, 1); // read past the end
    expect(await r.simpleReply()).toEqual({ error: 22, cookie: 1 });
    r.req(0, 0n, 0x7fffffff, 2); // oversized read
    expect((await r.simpleReply()).error).toBe(22);
    r.req(0, 2n ** 63n, 512, 3); // absurd offset
    expect((await r.simpleReply()).error).toBe(22);
    r.req(77, 0n, 0, 4); // unknown command
    expect(await r.simpleReply()).toEqual({ error: 22, cookie: 4 });
    r.req(7, 0n, 4096, 5); // block status without a negotiated context
    expect((await r.simpleReply()).error).toBe(22);
    r.req(1, size - 2n, 4, 6); // write past the end (payload still sent)
    r.s.write(Buffer.alloc(4, 0xee));
    expect(await r.simpleReply()).toEqual({ error: 28, cookie: 6 });
    r.req(1, 0n, 40 * MiB, 7); // oversized write: payload is discarded, not buffered
    r.s.write(Buffer.alloc(40 * MiB, 0xee));
    expect((await r.simpleReply()).error).toBe(22);
    // still in sync: a valid read works
    r.req(0, 0n, 16, 8);
    const rep = await r.simpleReply();
    expect(rep).toEqual({ error: 0, cookie: 8 });
    await r.read(16);
    r.req(0, 0n, 16, 9, 0, 0xdeadbeef);
    expect(await r.waitClosed()).toBe(true);
    const before = Buffer.alloc(4 * MiB);
    await vol.read(0, before.length, before);
    // abrupt disconnect in the middle of a write payload: nothing of it is applied
    const r2 = await Raw.open();
    r2.req(1, 0n, 1 * MiB, 10);
    r2.s.write(Buffer.alloc(512 * 1024, 0x99));
    await new Promise((res) => setTimeout(res, 50));
    r2.s.destroy();
    await r2.waitClosed();
    // garbage instead of a handshake
    const r3 = await Raw.connect();
    await r3.read(18);
    r3.s.write(Buffer.from('GET / HTTP/1.1\r\n\r\n'));
    expect(await r3.waitClosed()).toBe(true);
    const after = Buffer.alloc(4 * MiB);
    await vol.read(0, after.length, after);
    expect(after.equals(before)).toBe(true);
  });
});
