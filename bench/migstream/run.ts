/**
 * bench/migstream: throughput of the migration-stream parser, against a plain copy of the same
 * bytes measured in the same run (the rate no reader of the stream can beat by much).
 *
 *   npx tsx bench/migstream/run.ts [--mib 256] [--rounds 10]
 *
 * The stream is synthetic (test/helpers/migstream-synth.ts): a guest of --mib MiB whose every
 * fourth page is zero, as a background snapshot sends it. Two measurements, rounds interleaved
 * with their baseline so both see the same machine state:
 *   in memory    the stream cut into 64 KiB chunks (socket-sized) is pushed through
 *                MigStreamParser, pages taken as views; baseline: the same chunks copied into
 *                one reused 64 KiB buffer (memcpy rate).
 *   unix socket  a server in this process writes the stream to a unix socket; the reader is
 *                parseMigrationStream with a sink that copies every page into a new Buffer (what
 *                a capture costs before hashing); baseline: the same socket read by a sink that
 *                copies every received chunk into a new Buffer, no parsing.
 * Reported: best and median MB/s (1 MB = 10^6 bytes) of each, and parser / baseline as the ratio
 * of medians. QEMU's own reader (scripts/analyze-migration.py) is not installed here; the copy
 * baselines stand in for a peer.
 */
import * as net from 'node:net';
import { loadavg } from 'node:os';
import * as path from 'node:path';
import { argNum, benchRoot, fmt, freshDir, median, table } from '../common/measure.js';
import { MigStreamParser, parseMigrationStream } from '../../src/migstream/index.js';
import { PS, chunked, guestStream } from '../../test/helpers/migstream-synth.js';

/** MB/s of `fn` over `bytes`, failing if `fn` did not see every page. */
async function rate(bytes: number, fn: () => Promise<number> | number, wantPages: number): Promise<number> {
  const t0 = performance.now();
  const pages = await fn();
  const s = (performance.now() - t0) / 1000;
  if (pages !== wantPages) throw new Error(`saw ${pages} pages, expected ${wantPages}`);
  return bytes / s / 1e6;
}

function parseInMemory(input: readonly Buffer[]): number {
  const p = new MigStreamParser();
  let n = 0;
  for (const c of input) {
    p.push(c);
    n += p.takeBatch().length;
  }
  p.finish();
  return n;
}

function copyInMemory(input: readonly Buffer[], pages: number): number {
  const dst = Buffer.allocUnsafe(65536);
  for (const c of input) c.copy(dst);
  return pages;
}

async function overSocket(sockPath: string, parse: boolean, pages: number, streamBytes: number): Promise<number> {
  const conn = net.createConnection({ path: sockPath });
  if (parse) {
    let n = 0;
    let copied = 0;
    await parseMigrationStream(conn, {
      onPages(batch) {
        for (const r of batch) if (r.data) copied += Buffer.from(r.data).length;
        n += batch.length;
      },
    });
    if (copied !== ((pages * 3) / 4) * PS) throw new Error(`copied ${copied} page bytes`);
    return n;
  }
  let copied = 0;
  for await (const c of conn) copied += Buffer.from(c as Buffer).length;
  if (copied !== streamBytes) throw new Error(`read ${copied} bytes`);
  return pages;
}

async function main(): Promise<void> {
  const mibArg = argNum('--mib', 256);
  const rounds = argNum('--rounds', 10);
  const pages = (mibArg << 20) / PS;
  const stream = await guestStream(pages);
  const input = [...chunked(stream, [65536])];
  const dir = await freshDir(benchRoot(), 'migstream');
  const sockPath = path.join(dir, 's');
  const server = net.createServer((c) => {
    c.on('error', () => undefined);
    c.end(stream);
  });
  await new Promise<void>((r) => server.listen(sockPath, r));

  const r: Record<string, number[]> = { parse: [], copy: [], sockParse: [], sockCopy: [] };
  const loads: number[] = [];
  try {
    // Round 0 warms the JIT and the allocator up and is not counted.
    for (let i = 0; i <= rounds; i++) {
      if (i === 0) {
        parseInMemory(input);
        await overSocket(sockPath, true, pages, stream.length);
        continue;
      }
      r.copy!.push(await rate(stream.length, () => copyInMemory(input, pages), pages));
      r.parse!.push(await rate(stream.length, () => parseInMemory(input), pages));
      r.sockCopy!.push(await rate(stream.length, () => overSocket(sockPath, false, pages, stream.length), pages));
      r.sockParse!.push(await rate(stream.length, () => overSocket(sockPath, true, pages, stream.length), pages));
      loads.push(loadavg()[0]!);
    }
  } finally {
    await new Promise((res) => server.close(res));
  }

  const row = (what: string, key: string, base: string): string[] => [
    what,
    fmt(Math.max(...r[key]!), 0),
    fmt(median(r[key]!), 0),
    r[key]!.map((x) => fmt(x, 0)).join(' '),
    key === base ? '–' : `${fmt(median(r[key]!) / median(r[base]!), 2)}x`,
  ];
  console.log(
    `stream ${fmt(stream.length / 1e6, 0)} MB (${pages} pages of a ${mibArg} MiB guest, 1 in 4 zero), ${rounds} rounds interleaved after a warm-up round, ` +
      `load ${fmt(Math.min(...loads), 1)}–${fmt(Math.max(...loads), 1)}, node ${process.version}`,
  );
  console.log(
    table(
      ['measurement', 'best MB/s', 'median MB/s', 'rounds MB/s', 'median / baseline'],
      [
        row('in memory: copy 64 KiB chunks (baseline)', 'copy', 'copy'),
        row('in memory: MigStreamParser, pages as views', 'parse', 'copy'),
        row('unix socket: read + copy chunks (baseline)', 'sockCopy', 'sockCopy'),
        row('unix socket: parseMigrationStream + copy pages', 'sockParse', 'sockCopy'),
      ],
    ),
  );
}

main().catch((e: unknown) => {
  console.error(e);
  process.exit(1);
});
