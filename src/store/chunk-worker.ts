/**
 * Worker thread for the CPU-heavy per-chunk work (BLAKE3, zstd/lz4, AES-GCM), so ingest and export
 * use both cores while the main thread does I/O. Messages and replies are plain objects with
 * transferred ArrayBuffers or ids of buffers shared once (no copies across threads). See workers.ts
 * for the protocol.
 */
import { parentPort, workerData } from 'node:worker_threads';
import { writeSync } from 'node:fs';
import { chunkHasher, isAllZero, ID_SIZE } from './hash.js';
import { decodeInto, encodeBound, encodeInto, type CodecId } from './codec.js';
import { openInto, SEAL_OVERHEAD, sealInto } from './crypto.js';
import { chunkAad } from './pack.js';
import { IntegrityError } from './errors.js';
import type { WorkerRequest, WorkerReply, WorkerInit } from './workers.js';

const init = workerData as WorkerInit;
const aeadKey = init.aeadKey ? Buffer.from(init.aeadKey) : null;
const hash = chunkHasher(init.idKey ? Buffer.from(init.idKey) : null);
let scratch = Buffer.allocUnsafeSlow(0);
/**
 * Decoded bytes bound for a file collect here, written when the next chunk would not fit: one
 * pwrite per 64 KiB chunk. Larger writes measured slower and far less steady (2 GiB export, sys
 * time 0.6-0.7 s at 64-256 KiB, 1.3-2.9 s at 1-8 MiB): a buffered write holds the inode's lock
 * for its whole copy, which the other worker spins on, and large aligned writes get large
 * page-cache folios, slow to first-touch on a virtual machine whose free memory the host reclaims.
 */
const WRITE_SLICE = 64 << 10;
let writeSlice = Buffer.allocUnsafeSlow(0);
/** Decrypted (still compressed) chunks land here, one at a time, on their way to decodeInto. */
let openScratch = Buffer.allocUnsafeSlow(0);

/** Shared buffers by id (see WorkerPool.acquireShared): registered once, used by many jobs. */
const shared = new Map<number, Buffer>();

parentPort!.on('message', (req: WorkerRequest) => {
  if (req.type === 'share') {
    shared.set(req.id, Buffer.from(req.sab));
    return;
  }
  if (req.type === 'unshare') {
    shared.delete(req.id);
    return;
  }
  try {
    parentPort!.postMessage(...handle(req));
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    const reply: WorkerReply = { type: 'error', seq: req.seq, message: (err as Error).message, name: (err as Error).name, ...(code ? { code } : {}) };
    parentPort!.postMessage(reply);
  }
});

function sharedBuffer(id: number): Buffer {
  const b = shared.get(id);
  if (!b) throw new Error(`internal: shared buffer ${id} was never registered`);
  return b;
}

function handle(req: Exclude<WorkerRequest, { type: 'share' | 'unshare' }>): [WorkerReply, ArrayBuffer[]] {
  if (req.type === 'decode') return [decode(req), []];
  if (req.type === 'hash') {
    const data = sharedBuffer(req.input);
    const n = req.lengths.length;
    const ids = new ArrayBuffer(n * ID_SIZE);
    const idBytes = Buffer.from(ids);
    const holes = new Set(req.holes);
    let off = 0;
    for (let i = 0; i < n; i++) {
      const len = req.lengths[i]!;
      const chunk = data.subarray(off, off + len);
      // A hole was never read into the buffer: it is zeros by definition, not by inspection.
      if (holes.has(i) || isAllZero(chunk)) idBytes.fill(0, i * ID_SIZE, (i + 1) * ID_SIZE);
      else hash(chunk).copy(idBytes, i * ID_SIZE);
      off += len;
    }
    return [{ type: 'hash', seq: req.seq, ids }, [ids]];
  }
  if (req.type === 'encode') {
    // Compressed (and sealed) chunks go back to back into the shared output buffer; only the
    // sealing path needs the scratch buffer in between. No per-chunk garbage in this thread.
    const data = sharedBuffer(req.input);
    const out = sharedBuffer(req.output);
    const ids = Buffer.from(req.ids.buffer, req.ids.byteOffset, req.ids.byteLength);
    const codecs: number[] = [];
    const sizes: number[] = [];
    let pos = 0;
    for (const [offset, length, idStart] of req.items) {
      const raw = data.subarray(offset, offset + length);
      const bound = encodeBound(length);
      if (aeadKey) {
        if (scratch.length < bound) scratch = Buffer.allocUnsafeSlow(bound);
        const enc = encodeInto(req.codec as CodecId, raw, scratch, req.level);
        if (pos + enc.length + SEAL_OVERHEAD > out.length) throw new Error('internal: encoded chunks overflow the shared output buffer');
        const n = sealInto(aeadKey, scratch.subarray(0, enc.length), chunkAad(ids.subarray(idStart, idStart + ID_SIZE)), out.subarray(pos));
        codecs.push(enc.codec);
        sizes.push(n);
        pos += n;
      } else {
        if (pos + bound > out.length) throw new Error('internal: encoded chunks overflow the shared output buffer');
        const enc = encodeInto(req.codec as CodecId, raw, out.subarray(pos), req.level);
        codecs.push(enc.codec);
        sizes.push(enc.length);
        pos += enc.length;
      }
    }
    return [{ type: 'encode', seq: req.seq, codecs, sizes }, []];
  }
  const _exhaustive: never = req;
  throw new Error(`unknown job ${JSON.stringify(_exhaustive)}`);
}

/**
 * Each item is a stored blob in the shared input buffer; its plaintext is verified against its id
 * before it goes anywhere. To a file, plaintexts are written from here a slice at a time, while
 * they are still in this core's cache; to a shared output buffer, back to back.
 */
function decode(req: Extract<WorkerRequest, { type: 'decode' }>): WorkerReply {
  const data = sharedBuffer(req.input);
  const ids = Buffer.from(req.ids.buffer, req.ids.byteOffset, req.ids.byteLength);
  const output = req.output;
  let out: Buffer;
  if ('fd' in output) {
    const biggest = req.items.reduce((m, it) => Math.max(m, it[3]), 0);
    if (writeSlice.length < Math.max(WRITE_SLICE, biggest)) writeSlice = Buffer.allocUnsafeSlow(Math.max(WRITE_SLICE, biggest));
    out = writeSlice;
  } else {
    out = sharedBuffer(output.slot);
    const total = req.items.reduce((s, it) => s + it[3], 0);
    if (total > out.length) throw new Error(`internal: ${total} decoded bytes do not fit shared buffer ${output.slot}`);
  }
  let w = 0;
  let flushedTo = 'fd' in output ? output.position : 0;
  const flush = (): void => {
    if (!('fd' in output)) return;
    let done = 0;
    while (done < w) done += writeSync(output.fd, out, done, w - done, flushedTo + done);
    flushedTo += w;
    w = 0;
  };
  for (const [offset, length, codec, rawLength, idStart] of req.items) {
    if (w + rawLength > out.length) flush();
    const id = ids.subarray(idStart, idStart + ID_SIZE);
    let stored: Buffer = data.subarray(offset, offset + length);
    if (aeadKey) {
      if (openScratch.length < length) openScratch = Buffer.allocUnsafeSlow(Math.max(length, WRITE_SLICE + SEAL_OVERHEAD));
      stored = openScratch.subarray(0, openInto(aeadKey, stored, chunkAad(id), openScratch, `chunk ${id.toString('hex')}`));
    }
    const plain = out.subarray(w, w + rawLength);
    decodeInto(codec, stored, plain);
    if (!hash(plain).equals(id)) throw new IntegrityError(`chunk ${id.toString('hex')}: content does not match its id (corrupted data)`);
    w += rawLength;
  }
  flush();
  return { type: 'decode', seq: req.seq };
}
