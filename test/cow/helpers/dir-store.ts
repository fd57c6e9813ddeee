/**
 * A durable ChunkStore for multi-process tests: one file per chunk under <dir>/<id hex>, written
 * atomically. Not a repository; it stands in for one until src/store provides the adapter.
 */
import { existsSync, promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { blake3 } from '@napi-rs/blake-hash';
import { atomicWriteFile } from '../../../src/util/fs.js';
import type { ChunkStore } from '../../../src/cow/chunk-store.js';

export class DirChunkStore implements ChunkStore {
  constructor(
    readonly dir: string,
    readonly chunkSize = 65536,
  ) {}
  chunkId(data: Uint8Array): Buffer {
    return blake3(Buffer.from(data.buffer, data.byteOffset, data.byteLength));
  }
  hasChunk(id: Uint8Array): boolean {
    return existsSync(path.join(this.dir, Buffer.from(id).toString('hex')));
  }
  async putChunk(data: Uint8Array): Promise<{ id: Buffer; isNew: boolean }> {
    const id = this.chunkId(data);
    const f = path.join(this.dir, id.toString('hex'));
    try {
      await fsp.access(f);
      return { id, isNew: false };
    } catch {
      await fsp.mkdir(this.dir, { recursive: true });
      await atomicWriteFile(f, data);
      return { id, isNew: true };
    }
  }
  async getChunk(id: Buffer): Promise<Buffer> {
    return fsp.readFile(path.join(this.dir, id.toString('hex')));
  }
  async flush(): Promise<void> {}
}
