/**
 * The secure channel on real loopback TCP: both ends authenticate by pinned keys before anything
 * else moves, records arrive in order and intact, and every kind of bad peer is refused with an
 * error naming the step.
 */
import { randomBytes } from 'node:crypto';
import * as net from 'node:net';
import { afterEach, describe, expect, it } from 'vitest';
import {
  acceptServerChannel,
  ChannelError,
  FrameError,
  MAGIC,
  openClientChannel,
  PeerRejectedError,
  type SecureChannel,
} from '../../src/migration/channel.js';
import { ephemeralIdentity, type HostIdentity } from '../../src/migration/identity.js';

const servers: net.Server[] = [];
const sockets = new Set<net.Socket>();
afterEach(async () => {
  for (const s of sockets) s.destroy();
  sockets.clear();
  for (const s of servers.splice(0)) await new Promise((r) => s.close(r));
});

/** A listening loopback server whose connections go to `onConn`; resolves with its port. */
async function listen(onConn: (sock: net.Socket) => void): Promise<number> {
  const server = net.createServer((sock) => {
    sockets.add(sock);
    onConn(sock);
  });
  servers.push(server);
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  return (server.address() as net.AddressInfo).port;
}

function connect(port: number): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const s = net.connect(port, '127.0.0.1', () => resolve(s));
    s.once('error', reject);
  });
}

const pin = (id: HostIdentity) => (fp: string) => (fp === id.fingerprint ? (true as const) : `unknown host ${fp}`);

interface Pair {
  client: SecureChannel;
  server: SecureChannel;
}

async function pair(clientId: HostIdentity, serverId: HostIdentity): Promise<Pair> {
  let server!: Promise<SecureChannel>;
  const port = await listen((sock) => {
    server = acceptServerChannel(sock, { identity: serverId, authorize: pin(clientId) });
    server.catch(() => undefined);
  });
  const client = await openClientChannel(await connect(port), { identity: clientId, authorize: pin(serverId) });
  return { client, server: await server };
}

describe('secure channel', () => {
  it('authenticates both ends and carries messages in order, both ways, up to the size limit', async () => {
    const a = ephemeralIdentity();
    const b = ephemeralIdentity();
    const { client, server } = await pair(a, b);
    expect(client.peerFingerprint).toBe(b.fingerprint);
    expect(server.peerFingerprint).toBe(a.fingerprint);
    const big = randomBytes(1 << 20);
    const sent = [Buffer.from('hello'), Buffer.alloc(0), big, randomBytes(4096)];
    const sending = (async () => {
      for (const [i, m] of sent.entries()) await client.send(10 + i, m);
    })();
    for (const [i, m] of sent.entries()) {
      const got = await server.receive();
      expect(got?.type).toBe(10 + i);
      expect(got?.body.equals(m)).toBe(true);
    }
    await sending;
    await server.send(99, Buffer.from('back'));
    expect((await client.receive())?.body.toString()).toBe('back');
    await client.close();
    expect(await server.receive()).toBeNull();
    expect(client.bytesSent).toBe(server.bytesReceived);
    server.destroy();
  });

  it('refuses a message over the limit before sending it', async () => {
    const { client, server } = await pair(ephemeralIdentity(), ephemeralIdentity());
    await expect(client.send(1, Buffer.alloc((1 << 20) + 256))).rejects.toBeInstanceOf(FrameError);
    client.destroy();
    server.destroy();
  });

  it('the client refuses a server whose key is not the pinned one, and sends nothing after the hello', async () => {
    const a = ephemeralIdentity();
    const impostor = ephemeralIdentity();
    const expected = ephemeralIdentity();
    let serverSide!: Promise<SecureChannel>;
    const port = await listen((sock) => {
      serverSide = acceptServerChannel(sock, { identity: impostor, authorize: () => true });
      serverSide.catch(() => undefined);
    });
    const err = await openClientChannel(await connect(port), { identity: a, authorize: pin(expected) }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(PeerRejectedError);
    expect((err as Error).message).toContain(impostor.fingerprint);
    // The server never learns who the client is: the connection ends during authentication.
    const serverErr = await serverSide.catch((e: unknown) => e);
    expect(serverErr).toBeInstanceOf(ChannelError);
    expect((serverErr as ChannelError).step).toBe('authenticate');
  });

  it('the server refuses a client it was not paired with, and the client is told why', async () => {
    const stranger = ephemeralIdentity();
    const b = ephemeralIdentity();
    let serverSide!: Promise<SecureChannel>;
    const port = await listen((sock) => {
      serverSide = acceptServerChannel(sock, { identity: b, authorize: () => 'not paired with this host' });
      serverSide.catch(() => undefined);
    });
    const err = await openClientChannel(await connect(port), { identity: stranger, authorize: pin(b) }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(PeerRejectedError);
    expect((err as Error).message).toContain('not paired with this host');
    expect(await serverSide.catch((e: unknown) => e)).toBeInstanceOf(PeerRejectedError);
  });

  it('names both version ranges when there is none in common', async () => {
    const a = ephemeralIdentity();
    const b = ephemeralIdentity();
    let serverSide!: Promise<SecureChannel>;
    const port = await listen((sock) => {
      serverSide = acceptServerChannel(sock, { identity: b, authorize: pin(a), versions: { min: 1, max: 1 } });
      serverSide.catch(() => undefined);
    });
    const err = await openClientChannel(await connect(port), { identity: a, authorize: pin(b), versions: { min: 2, max: 3 } }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(ChannelError);
    expect((err as Error).message).toMatch(/no protocol version in common.*1\.\.1.*2\.\.3/);
    expect(((err as ChannelError).retryable)).toBe(false);
    await expect(serverSide).rejects.toBeInstanceOf(ChannelError);
  });

  it('a server refuses a peer that does not speak the protocol, and an oversized hello', async () => {
    const b = ephemeralIdentity();
    const results: Promise<unknown>[] = [];
    const port = await listen((sock) => {
      results.push(acceptServerChannel(sock, { identity: b, authorize: () => true }).catch((e: unknown) => e));
    });
    const junk = await connect(port);
    junk.write(Buffer.concat([Buffer.from([0, 0, 0, 16]), Buffer.from('GET / HTTP/1.1\r\n')]));
    const huge = await connect(port);
    huge.write(Buffer.from([0x7f, 0xff, 0xff, 0xff]));
    await new Promise((r) => setTimeout(r, 300));
    const errs = await Promise.all(results);
    expect(errs).toHaveLength(2);
    for (const e of errs) expect(e).toBeInstanceOf(FrameError);
    expect(errs.map((e) => (e as Error).message).join('\n')).toMatch(/does not speak the vmsnap migration protocol/);
    expect(errs.map((e) => (e as Error).message).join('\n')).toMatch(/handshake message \(at most 4096\)/);
    junk.destroy();
    huge.destroy();
  });

  it('ends the channel on an oversized, an altered, a replayed and a truncated record', async () => {
    // A man in the middle that forwards the handshake and then tampers with the client's records.
    type Tamper = (record: Buffer, index: number) => Buffer[];
    const cases: Record<string, { tamper: Tamper; message: RegExp }> = {
      oversized: { tamper: (r, i) => (i === 1 ? [Buffer.from([0x10, 0, 0, 0])] : [r]), message: /announced a 268435456-byte record/ },
      altered: { tamper: (r, i) => (i === 1 ? [Buffer.concat([r.subarray(0, 20), Buffer.from([r[20]! ^ 1]), r.subarray(21)])] : [r]), message: /failed authentication/ },
      replayed: { tamper: (r, i) => (i === 1 ? [r, r] : [r]), message: /failed authentication/ },
      truncated: { tamper: (r, i) => (i === 1 ? [r.subarray(0, r.length - 5)] : [r]), message: /ended in the middle/ },
    };
    for (const [name, { tamper, message }] of Object.entries(cases)) {
      const a = ephemeralIdentity();
      const b = ephemeralIdentity();
      let serverSide!: Promise<SecureChannel>;
      const serverPort = await listen((sock) => {
        serverSide = acceptServerChannel(sock, { identity: b, authorize: pin(a) });
      serverSide.catch(() => undefined);
      });
      // The proxy splits the client's bytes into length-prefixed units (the 2 handshake-era units,
      // then records); unit 0 is the hello, unit 1 the authentication record, unit 2 the first data record.
      const proxyPort = await listen((down) => {
        const up = net.connect(serverPort, '127.0.0.1');
        sockets.add(up);
        up.on('data', (d) => down.write(d));
        up.on('error', () => down.destroy());
        down.on('error', () => up.destroy());
        let buf = Buffer.alloc(0);
        let unit = -1;
        down.on('data', (d: Buffer) => {
          buf = Buffer.concat([buf, d]);
          while (buf.length >= 4 && buf.length >= 4 + buf.readUInt32BE(0)) {
            const len = buf.readUInt32BE(0);
            const rec = buf.subarray(0, 4 + len);
            buf = buf.subarray(4 + len);
            unit++;
            for (const out of unit >= 1 ? tamper(rec, unit - 1) : [rec]) up.write(out);
            if (name === 'truncated' && unit === 2) up.end();
          }
        });
      });
      const client = await openClientChannel(await connect(proxyPort), { identity: a, authorize: pin(b) });
      const server = await serverSide;
      await client.send(5, Buffer.from(`payload for ${name}`)).catch(() => undefined);
      // The replayed record follows a valid one: the first receive succeeds, the copy must not.
      let err: unknown = await server.receive().catch((e: unknown) => e);
      if (name === 'replayed') {
        expect((err as { body: Buffer }).body.toString()).toBe('payload for replayed');
        err = await server.receive().catch((e: unknown) => e);
      }
      expect(err, name).toBeInstanceOf(FrameError);
      expect((err as Error).message, name).toMatch(message);
      client.destroy();
      server.destroy();
    }
  });

  it('MAGIC names the protocol', () => {
    expect(MAGIC.toString('latin1')).toBe('VMSNAPMG');
  });
});
