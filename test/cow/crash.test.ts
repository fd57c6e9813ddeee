/**
 * kill -9 of the NBD server at >= 20 random points under a concurrent write load. After each
 * restart: every write acknowledged before an acknowledged FLUSH (or with FUA) reads back, no
 * sector holds anything but a value it could legitimately hold, the next snapshot passes the
 * chunk check and exports exactly the volume's content (qemu-img compare against the server).
 * Kill points are chosen by acknowledged-request counts from a seeded generator, not by timing.
 */
import { spawn, execFile, type ChildProcess } from 'node:child_process';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { promisify } from 'node:util';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';
import { MemoryChunkStore, checkDiskStream, isZeroId, type DiskStream } from '../../src/cow/chunk-store.js';
import { Volume } from '../../src/cow/volume.js';
import { snapshotVolume } from '../../src/cow/snapshot.js';
import { TestNbdClient } from './helpers/nbd-client.js';

const run = promisify(execFile);
const here = path.dirname(fileURLToPath(import.meta.url));
const SECTOR = 4096;
const SIZE = 16 << 20;
const NSECT = SIZE / SECTOR;
const KILLS = 20;

let seed = 0x2545f491;
const rnd = (n: number): number => {
  seed ^= seed << 13;
  seed ^= seed >>> 17;
  seed ^= seed << 5;
  return (seed >>> 0) % n;
};

function sectorData(id: number, sector: number): Buffer {
  const b = Buffer.alloc(SECTOR, (id * 31 + sector) & 0xff);
  b.writeUInt32LE(id, 0);
  b.writeUInt32LE(sector, 4);
  return b;
}

const children = new Set<ChildProcess>();
let dir = '';
afterAll(async () => {
  for (const c of children) c.kill('SIGKILL');
  if (dir) await rm(dir, { recursive: true, force: true });
});

async function startServer(volDir: string, sock: string, create: boolean): Promise<ChildProcess> {
  const args = ['--import', 'tsx', path.join(here, 'helpers/serve.ts'), volDir, sock];
  if (create) args.push('--create', String(SIZE));
  const child = spawn(process.execPath, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  children.add(child);
  child.on('exit', () => children.delete(child));
  let err = '';
  child.stderr!.on('data', (d: Buffer) => (err += d.toString()));
  await new Promise<void>((resolve, reject) => {
    child.stdout!.on('data', (d: Buffer) => {
      if (d.toString().includes('ready')) resolve();
    });
    child.on('exit', (code) => reject(new Error(`server exited with ${code}: ${err}`)));
  });
  return child;
}

async function streamContent(s: DiskStream, store: MemoryChunkStore): Promise<Buffer> {
  const out = Buffer.alloc(s.size);
  for (let i = 0; i < s.size / s.chunkSize; i++) {
    if (!isZeroId(s.chunks, i)) (await store.getChunk(s.chunks.subarray(i * 32, i * 32 + 32))).copy(out, i * s.chunkSize);
  }
  return out;
}

describe('crash safety', () => {
  it(`survives kill -9 at ${KILLS} random points under write load`, async () => {
    dir = await mkdtemp(path.join(tmpdir(), 'cow-crash-'));
    const volDir = path.join(dir, 'vol');
    const sock = path.join(dir, 'nbd.sock');
    const store = new MemoryChunkStore(65536);
    // Per sector: the id known durable, and every id written since then (any of them may be there).
    const durable = new Uint32Array(NSECT);
    const since: number[][] = Array.from({ length: NSECT }, () => []);
    let nextId = 1;
    let checkedFlushedWrites = 0;
    let server = await startServer(volDir, sock, true);

    for (let round = 0; round < KILLS; round++) {
      const client = await TestNbdClient.connect(sock, 'vol');
      const killAfter = 20 + rnd(250);
      let acks = 0;
      const busy = new Uint8Array(NSECT);
      const acked: { id: number; first: number; count: number }[] = [];
      const inflight = new Set<Promise<void>>();
      let killed = false;
      const exited = new Promise<void>((r) => server.once('exit', () => r()));
      const ack = (): void => {
        if (++acks >= killAfter && !killed) {
          killed = true;
          server.kill('SIGKILL');
        }
      };
      while (!killed) {
        if (inflight.size >= 8) {
          await Promise.race(inflight);
          continue;
        }
        const r = rnd(100);
        if (r < 10) {
          const covered = acked.slice();
          const p = client.flush().then(
            () => {
              for (const w of covered) for (let s = w.first; s < w.first + w.count; s++) if (w.id > durable[s]!) durable[s] = w.id;
              ack();
            },
            () => undefined,
          );
          const t = p.finally(() => inflight.delete(t));
          inflight.add(t);
          continue;
        }
        const count = 1 + rnd(24);
        const first = rnd(NSECT - count);
        let overlap = false;
        for (let s = first; s < first + count; s++) if (busy[s]) overlap = true;
        if (overlap) {
          if (inflight.size) await Promise.race(inflight);
          continue;
        }
        const id = nextId++;
        const data = Buffer.concat(Array.from({ length: count }, (_, k) => sectorData(id, first + k)));
        for (let s = first; s < first + count; s++) {
          busy[s] = 1;
          since[s]!.push(id);
        }
        const fua = r < 15;
        const p = client.write(first * SECTOR, data, fua).then(
          () => {
            acked.push({ id, first, count });
            if (fua) for (let s = first; s < first + count; s++) if (id > durable[s]!) durable[s] = id;
            ack();
          },
          () => undefined,
        );
        const t = p.finally(() => {
          for (let s = first; s < first + count; s++) busy[s] = 0;
          inflight.delete(t);
        });
        inflight.add(t);
      }
      await exited;
      await Promise.allSettled([...inflight]);
      client.close();

      // Recover in this process (the dead server's lock is taken over), verify, snapshot.
      const vol = await Volume.open(volDir);
      const content = Buffer.alloc(SIZE);
      await vol.read(0, SIZE, content);
      for (let s = 0; s < NSECT; s++) {
        const sec = content.subarray(s * SECTOR, (s + 1) * SECTOR);
        const id = sec.readUInt32LE(0);
        const allowed = id === durable[s] || since[s]!.includes(id);
        if (!allowed) throw new Error(`round ${round}: sector ${s} holds write ${id}; durable ${durable[s]}, later ${since[s]!.join(',')}`);
        if (id !== 0 && !sec.equals(sectorData(id, s))) throw new Error(`round ${round}: sector ${s} is torn`);
        if (id === 0 && sec.some((b) => b !== 0)) throw new Error(`round ${round}: sector ${s} holds garbage`);
        if (durable[s]! > 0) checkedFlushedWrites++;
        durable[s] = id;
        since[s] = [];
      }
      const { stream } = await snapshotVolume(vol, store);
      expect(await checkDiskStream(stream, store)).toEqual([]);
      const exported = await streamContent(stream, store);
      expect(exported.equals(content)).toBe(true);
      await vol.close();
      server = await startServer(volDir, sock, false);
      if (round % 4 === 0 || round === KILLS - 1) {
        const raw = path.join(dir, 'snap.raw');
        await writeFile(raw, exported);
        const { stdout } = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', raw, `nbd+unix:///vol?socket=${sock}`]);
        expect(stdout).toMatch(/Images are identical/);
      }
    }
    expect(checkedFlushedWrites).toBeGreaterThan(0);
    server.kill('SIGTERM');
    await new Promise((r) => server.once('exit', r));
  });
});
