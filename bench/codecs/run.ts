/**
 * bench/codecs: per-chunk cost of what ingest and export do to every chunk — BLAKE3 ids, zstd and
 * lz4 compression and decompression, AES-256-GCM sealing and opening — through the functions the
 * repository itself calls (src/store/hash.ts, codec.ts, crypto.ts), with peers in the same run:
 * `lz4-napi` against `lz4` (the one vmsnap uses) and node:crypto against the native AES-GCM addon.
 *
 *   npx tsx bench/codecs/run.ts [--rounds 5] [--ms 100] [--sizes 4096,65536,4194304]
 *
 * Data: 16 MiB of random bytes (incompressible) and 16 MiB of "realistic" bytes (the first files
 * of /usr/bin and /usr/lib in path order, concatenated: executables, libraries, text, the kind of
 * content the ingest benchmark's image is made of). Each operation walks the data in slices of
 * the buffer size for --ms milliseconds (at least one call); rounds repeat the whole matrix and
 * the fastest round of each cell is printed (on a shared machine other processes only ever slow a
 * cell down; peers sit in adjacent cells, so they see nearly the same machine state). MB/s counts input (plaintext) bytes, 1 MB = 10^6 bytes.
 *
 * Also timed once per round: unwrapMasterKey of a key file made with the default KDF (scrypt
 * N=2^15, r=8, p=1), what opening an encrypted repository costs before any chunk.
 *
 * The lz4-napi peer is not a dependency of the project: install it anywhere and point
 * LZ4_NAPI_DIR at that prefix (`npm install --prefix /var/tmp/vmsnap-bench-peers lz4-napi`,
 * the default); without it its rows say "not installed".
 */
import { randomBytes } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import { createRequire } from 'node:module';
import { loadavg } from 'node:os';
import * as path from 'node:path';
import { blake3 } from '@napi-rs/blake-hash';
import { arg, fmt, median, table } from '../common/measure.js';
import { CODECS, type CodecId, decodeInto, encodeBound, encodeInto } from '../../src/store/codec.js';
import { MasterKey, SEAL_OVERHEAD, aeadImplementation, open, openInto, seal, sealInto, unwrapMasterKey, wrapMasterKey } from '../../src/store/crypto.js';
import { chunkHasher } from '../../src/store/hash.js';

const CORPUS = 16 << 20;

/** The first CORPUS bytes of the regular files under `roots`, walked in path order. */
async function realistic(roots: readonly string[]): Promise<Buffer> {
  const out = Buffer.alloc(CORPUS);
  let at = 0;
  async function walk(dir: string): Promise<void> {
    const entries = (await fsp.readdir(dir, { withFileTypes: true }).catch(() => [])).sort((a, b) => (a.name < b.name ? -1 : 1));
    for (const e of entries) {
      if (at >= CORPUS) return;
      const p = path.join(dir, e.name);
      if (e.isDirectory()) await walk(p);
      else if (e.isFile()) {
        const b = await fsp.readFile(p).catch(() => Buffer.alloc(0));
        at += b.copy(out, at);
      }
    }
  }
  for (const r of roots) await walk(r);
  if (at < CORPUS) throw new Error(`only ${at} bytes under ${roots.join(', ')}`);
  return out;
}

interface Lz4Napi {
  compressSync(data: Buffer): Buffer;
  uncompressSync(data: Buffer): Buffer;
}

function loadLz4Napi(): Lz4Napi | null {
  const dir = process.env.LZ4_NAPI_DIR ?? '/var/tmp/vmsnap-bench-peers';
  try {
    return createRequire(path.join(dir, 'node_modules', 'x.js'))('lz4-napi') as Lz4Napi;
  } catch {
    return null;
  }
}

/** One operation on one slice; returns a number so the call cannot be optimised away. */
type Op = (slice: Buffer, i: number) => number;

/** Calls `op` on consecutive slices of `data` for `ms` ms (at least once); returns µs per call. */
function time(op: Op, slices: readonly Buffer[], ms: number): number {
  let calls = 0;
  let sink = 0;
  const t0 = performance.now();
  let t = t0;
  do {
    sink += op(slices[calls % slices.length]!, calls % slices.length);
    calls++;
    if ((calls & 7) === 0 || slices[0]!.length > 1 << 20) t = performance.now();
  } while (t - t0 < ms);
  if (Number.isNaN(sink)) throw new Error('unreachable');
  return ((t - t0) * 1000) / calls;
}

async function main(): Promise<void> {
  const rounds = Number(arg('--rounds', '5'));
  const ms = Number(arg('--ms', '100'));
  const sizes = arg('--sizes', '4096,65536,4194304').split(',').map(Number);
  const data: Record<string, Buffer> = { random: randomBytes(CORPUS), realistic: await realistic(['/usr/bin', '/usr/lib']) };
  const lz4napi = loadLz4Napi();
  const key = randomBytes(32);
  const aad = Buffer.from('bench');
  const keyed = chunkHasher(randomBytes(32));

  const results = new Map<string, number[]>(); // `${kind}|${size}|${op}` → µs per call, per round
  const stored = new Map<string, number>(); // `${kind}|${size}|${codec}` → stored / raw bytes
  const loads: number[] = [];
  const keyFile = await wrapMasterKey(MasterKey.generate(), 'bench', 'bench');
  const unwrapMs: number[] = [];
  for (let round = 0; round < rounds; round++) {
    const u0 = performance.now();
    await unwrapMasterKey(keyFile, 'bench');
    unwrapMs.push(performance.now() - u0);
    for (const [kind, corpus] of Object.entries(data)) {
      for (const size of sizes) {
        const slices: Buffer[] = [];
        for (let o = 0; o + size <= corpus.length; o += size) slices.push(corpus.subarray(o, o + size));
        const dst = Buffer.allocUnsafe(Math.max(encodeBound(size), size + SEAL_OVERHEAD));
        const plain = Buffer.allocUnsafe(size);
        // Encoded forms for the decode rows, made once per slice (outside the timing).
        const encoded = (codec: CodecId, level = 3): { codec: CodecId; data: Buffer }[] =>
          slices.map((s) => {
            const e = encodeInto(codec, s, dst, level);
            return { codec: e.codec, data: Buffer.from(dst.subarray(0, e.length)) };
          });
        const zstd3 = encoded(CODECS.zstd);
        const lz4 = encoded(CODECS.lz4);
        const boxes = slices.map((s) => seal(key, s, aad));
        const napiBlocks = lz4napi ? slices.map((s) => lz4napi.compressSync(s)) : [];
        if (round === 0) {
          const ratio = (enc: { data: Buffer }[]): number => enc.reduce((a, e) => a + e.data.length, 0) / (slices.length * size);
          stored.set(`${kind}|${size}|zstd-3`, ratio(zstd3));
          stored.set(`${kind}|${size}|zstd-1`, ratio(encoded(CODECS.zstd, 1)));
          stored.set(`${kind}|${size}|zstd-9`, ratio(encoded(CODECS.zstd, 9)));
          stored.set(`${kind}|${size}|lz4`, ratio(lz4));
          if (lz4napi) stored.set(`${kind}|${size}|lz4-napi`, napiBlocks.reduce((a, b) => a + b.length, 0) / (slices.length * size));
        }
        const ops: [string, Op | null][] = [
          ['BLAKE3 (blake3)', (s) => blake3(s)[0]!],
          ['BLAKE3 keyed (chunkHasher)', (s) => keyed(s)[0]!],
          ['zstd -1 encodeInto', (s) => encodeInto(CODECS.zstd, s, dst, 1).length],
          ['zstd -3 encodeInto (default)', (s) => encodeInto(CODECS.zstd, s, dst, 3).length],
          ['zstd -9 encodeInto', (s) => encodeInto(CODECS.zstd, s, dst, 9).length],
          ['zstd -3 decodeInto', (_s, i) => (decodeInto(zstd3[i]!.codec, zstd3[i]!.data, plain), plain[0]!)],
          ['lz4 encodeInto (lz4, used)', (s) => encodeInto(CODECS.lz4, s, dst).length],
          ['lz4 decodeInto (lz4, used)', (_s, i) => (decodeInto(lz4[i]!.codec, lz4[i]!.data, plain), plain[0]!)],
          ['lz4-napi compressSync (peer)', lz4napi ? (s) => lz4napi.compressSync(s).length : null],
          ['lz4-napi uncompressSync (peer)', lz4napi ? (_s, i) => lz4napi.uncompressSync(napiBlocks[i]!).length : null],
          ['AES-256-GCM seal, node:crypto', (s) => seal(key, s, aad).length],
          [`AES-256-GCM sealInto (${aeadImplementation()})`, (s) => sealInto(key, s, aad, dst)],
          ['AES-256-GCM open, node:crypto', (_s, i) => open(key, boxes[i]!, aad, 'bench').length],
          [`AES-256-GCM openInto (${aeadImplementation()})`, (_s, i) => openInto(key, boxes[i]!, aad, plain, 'bench')],
        ];
        for (const [name, op] of ops) {
          const k = `${kind}|${size}|${name}`;
          if (!results.has(k)) results.set(k, []);
          if (op) results.get(k)!.push(time(op, slices, ms));
        }
      }
    }
    loads.push(loadavg()[0]!);
    console.error(`round ${round + 1}/${rounds} done, load ${fmt(loads[loads.length - 1]!, 1)}`);
  }

  const sizeName = (n: number): string => (n >= 1 << 20 ? `${n >> 20} MiB` : `${n >> 10} KiB`);
  console.log(
    `node ${process.version}, fastest of ${rounds} rounds of ${ms} ms per cell; load ${fmt(Math.min(...loads), 1)}–${fmt(Math.max(...loads), 1)}; ` +
      `AES-GCM chunk path: ${aeadImplementation()}; lz4-napi ${lz4napi ? 'installed' : 'not installed'}`,
  );
  console.log(
    `unwrapMasterKey (scrypt N=${keyFile.N}, r=${keyFile.r}, p=${keyFile.p}): median ${fmt(median(unwrapMs), 0)} ms, ` +
      `rounds ${unwrapMs.map((x) => fmt(x, 0)).join(' ')} ms`,
  );
  for (const kind of Object.keys(data)) {
    const storedRow = (codec: string): string[] => [
      `stored / raw, ${codec}`,
      ...sizes.map((s) => (stored.has(`${kind}|${s}|${codec}`) ? fmt(stored.get(`${kind}|${s}|${codec}`)!, 3) : '–')),
    ];
    const rows: string[][] = [];
    const names = [...new Set([...results.keys()].filter((k) => k.startsWith(`${kind}|`)).map((k) => k.split('|')[2]!))];
    for (const name of names) {
      rows.push([
        name,
        ...sizes.map((s) => {
          const us = results.get(`${kind}|${s}|${name}`)!;
          if (us.length === 0) return 'not installed';
          const m = Math.min(...us);
          return `${fmt(s / m, 0)} MB/s, ${fmt(m, m < 10 ? 2 : 1)} µs`;
        }),
      ]);
    }
    for (const c of ['zstd-1', 'zstd-3', 'zstd-9', 'lz4', 'lz4-napi']) rows.push(storedRow(c));
    console.log(`\n${kind} data (${kind === 'random' ? 'incompressible' : 'first 16 MiB of /usr/bin, /usr/lib in path order'})`);
    console.log(table(['operation (per buffer)', ...sizes.map(sizeName)], rows));
  }
}

main().catch((e: unknown) => {
  console.error(e);
  process.exit(1);
});
