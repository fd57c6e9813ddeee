/**
 * Worker thread for the CPU-heavy per-chunk work (BLAKE3, zstd/lz4, AES-GCM), so ingest and export
 * use both cores while the main thread does I/O. Messages and replies are plain objects with
 * transferred ArrayBuffers (no copies across threads). See workers.ts for the protocol.
 */
import { parentPort, workerData } from 'node:worker_threads';
import { chunkHasher, isAllZero, ID_SIZE } from './hash.js';
import { decodeInto, encodeBound, encodeInto, type CodecId } from './codec.js';
import { open, seal } from './crypto.js';
import { chunkAad } from './pack.js';
import type { WorkerRequest, WorkerReply, WorkerInit } from './workers.js';

const init = workerData as WorkerInit;
const aeadKey = init.aeadKey ? Buffer.from(init.aeadKey) : null;
const hash = chunkHasher(init.idKey ? Buffer.from(init.idKey) : null);
let scratch = Buffer.allocUnsafeSlow(0);

parentPort!.on('message', (req: WorkerRequest) => {
  try {
    parentPort!.postMessage(...handle(req));
  } catch (err) {
    const reply: WorkerReply = { type: 'error', seq: req.seq, message: (err as Error).message, name: (err as Error).name };
    parentPort!.postMessage(reply);
  }
});

function handle(req: WorkerRequest): [WorkerReply, ArrayBuffer[]] {
  const data = Buffer.from(req.buffer);
  if (req.type === 'hash') {
    const n = req.lengths.length;
    const ids = Buffer.allocUnsafe(n * ID_SIZE);
    let off = 0;
    for (let i = 0; i < n; i++) {
      const len = req.lengths[i]!;
      const chunk = data.subarray(off, off + len);
      if (isAllZero(chunk)) ids.fill(0, i * ID_SIZE, (i + 1) * ID_SIZE);
      else hash(chunk).copy(ids, i * ID_SIZE);
      off += len;
    }
    const idsAb = toTransferable(ids);
    return [{ type: 'hash', seq: req.seq, buffer: req.buffer, ids: idsAb }, [req.buffer, idsAb]];
  }
  if (req.type === 'encode') {
    // Compress into one reused scratch buffer, then copy the results into one exact-size output:
    // no per-chunk garbage in this thread (see codec.ts).
    const codecs: number[] = [];
    const sizes: number[] = [];
    const sealed: Buffer[] = [];
    let need = 0;
    for (const [, length] of req.items) need += encodeBound(length);
    if (scratch.length < need) scratch = Buffer.allocUnsafeSlow(need);
    let pos = 0;
    for (const [offset, length, idStart] of req.items) {
      const raw = data.subarray(offset, offset + length);
      const enc = encodeInto(req.codec as CodecId, raw, scratch.subarray(pos), req.level);
      codecs.push(enc.codec);
      if (aeadKey) {
        const box = seal(aeadKey, scratch.subarray(pos, pos + enc.length), chunkAad(Buffer.from(req.ids, idStart, ID_SIZE)));
        sealed.push(box);
        sizes.push(box.length);
      } else {
        sizes.push(enc.length);
        pos += enc.length;
      }
    }
    const out = aeadKey ? Buffer.concat(sealed) : Buffer.from(scratch.subarray(0, pos));
    const outAb = toTransferable(out);
    return [{ type: 'encode', seq: req.seq, buffer: req.buffer, out: outAb, codecs, sizes }, [req.buffer, outAb]];
  }
  // decode: each item is a stored blob; output the plaintexts back to back, verified against ids.
  const total = req.items.reduce((s, it) => s + it[3], 0);
  const out = Buffer.allocUnsafeSlow(total);
  let w = 0;
  const ids = Buffer.from(req.ids);
  for (const [offset, length, codec, rawLength, idStart] of req.items) {
    const id = ids.subarray(idStart, idStart + ID_SIZE);
    let stored: Buffer = data.subarray(offset, offset + length);
    if (aeadKey) stored = open(aeadKey, stored, chunkAad(id), `chunk ${id.toString('hex')}`);
    const plain = out.subarray(w, w + rawLength);
    decodeInto(codec, stored, plain);
    if (!hash(plain).equals(id)) {
      const e = new Error(`chunk ${id.toString('hex')}: content does not match its id (corrupted data)`);
      e.name = 'IntegrityError';
      throw e;
    }
    w += rawLength;
  }
  const outAb = toTransferable(out);
  return [{ type: 'decode', seq: req.seq, buffer: req.buffer, out: outAb }, [req.buffer, outAb]];
}

/** A Buffer's own ArrayBuffer when it owns all of it (no pool slab), else a copy. */
function toTransferable(b: Buffer): ArrayBuffer {
  if (b.byteOffset === 0 && b.byteLength === b.buffer.byteLength && b.buffer instanceof ArrayBuffer) return b.buffer;
  const ab = new ArrayBuffer(b.length);
  new Uint8Array(ab).set(b);
  return ab;
}
