/**
 * Import: a file, a disk image or a byte stream stored as a one-stream snapshot. The same call
 * serves `vmsnap import` and the `import` job. The input is checked before the repository is
 * touched (a directory, an unreadable path, a qcow2 imported as a raw disk are bad input); the
 * chunks and the manifest are written inside one write session (docs/locks.md).
 */
import { createReadStream } from 'node:fs';
import { open as openFile, stat } from 'node:fs/promises';
import type { Readable } from 'node:stream';
import type { Repository } from '../store/repository.js';
import { ingestStream, type IngestResult } from '../store/streams.js';
import { dataExtents } from '../util/sparse.js';
import { refuseContainerImage } from '../util/image-format.js';
import { checkName, checkTags, STREAM_KINDS, type StreamKind } from '../store/manifest.js';
import { OperationError, UsageError } from '../store/errors.js';
import { noProgress, reporter, type ProgressSink } from './progress.js';

export interface ImportArgs {
  /** A path, or `-` for `stdin`. */
  source: string;
  vm: string;
  tags?: string[];
  /** Stream name (default disk0). */
  stream?: string;
  kind?: StreamKind;
  message?: string;
}

export interface ImportResult {
  snapshot: string;
  size: number;
  newChunks: number;
  newBytes: number;
  storedBytes: number;
  dedupChunks: number;
  zeroChunks: number;
  seconds: number;
}

/** What `source` is, checked before the repository is written: size and whether it is a regular file. */
async function inspectSource(source: string): Promise<{ total: number; regular: boolean }> {
  if (source === '-') return { total: 0, regular: false };
  try {
    const st = await stat(source);
    if (st.isDirectory()) throw new UsageError(`cannot import ${source}: it is a directory (import takes a file, a disk image or - for stdin)`);
    return { total: st.size, regular: st.isFile() };
  } catch (err) {
    if (err instanceof UsageError) throw err;
    throw new UsageError(`cannot read ${source}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
}

/**
 * Checks an import's arguments and its input, touching no repository: the CLI calls it before it
 * opens one (bad input must fail first), importSnapshot again.
 */
export async function checkImportArgs(args: ImportArgs): Promise<{ streamName: string; kind: StreamKind; tags: string[]; total: number; regular: boolean }> {
  const streamName = args.stream ?? 'disk0';
  const kind = args.kind ?? 'disk';
  const tags = args.tags ?? [];
  checkName('VM name', args.vm);
  checkName('stream name', streamName);
  checkTags(tags);
  if (!(STREAM_KINDS as readonly string[]).includes(kind)) throw new UsageError(`unknown stream kind ${JSON.stringify(kind)}`);
  const { total, regular } = await inspectSource(args.source);
  // A qcow2 (or other container) imported as a disk would store the container, not the disk.
  if (regular && kind === 'disk') await refuseContainerImage(args.source);
  return { streamName, kind, tags, total, regular };
}

export async function importSnapshot(repo: Repository, args: ImportArgs, sink: ProgressSink = noProgress, stdin: Readable = process.stdin): Promise<ImportResult> {
  const { streamName, kind, tags, total, regular } = await checkImportArgs(args);
  const r = reporter(sink);
  const t0 = performance.now();
  const { snap, res } = await repo.write('import', async () => {
    // The parent is informational: an unrelated unreadable manifest (reported by `check`) must not block a backup.
    const parent = (await repo.listSnapshotSummaries(() => undefined)).filter((s) => s.vm === args.vm).pop();
    r.phase('reading');
    // A regular file is read in place, its holes skipped; anything else (stdin, a pipe, a device) as a stream.
    const fh = regular ? await openFile(args.source, 'r') : undefined;
    let res: IngestResult;
    try {
      const input = fh
        ? { file: fh, size: total, extents: await dataExtents(args.source, total) }
        : args.source === '-'
          ? stdin
          : createReadStream(args.source, { highWaterMark: 1 << 20 });
      res = await ingestStream(repo, input, { name: streamName, kind, onProgress: (n) => r.bytes('reading', n, total || null) });
    } catch (err) {
      // The repository's own failures are BackendErrors; a bare errno here is the input (EIO, EISDIR).
      if (typeof (err as NodeJS.ErrnoException).code === 'string') throw new OperationError('import', `reading ${args.source === '-' ? 'stdin' : args.source}`, err);
      throw err;
    } finally {
      await fh?.close();
    }
    r.phase('saving');
    const snap = await repo.saveSnapshot({
      vm: args.vm,
      tags,
      parent: parent?.id ?? null,
      ...(args.message !== undefined ? { message: args.message } : {}),
      meta: { source: args.source === '-' ? 'stdin' : args.source },
      streams: [res.stream],
    });
    return { snap, res };
  });
  return {
    snapshot: snap.id,
    size: res.stream.size,
    newChunks: res.newChunks,
    newBytes: res.newBytes,
    storedBytes: res.storedBytes,
    dedupChunks: res.dedupChunks,
    zeroChunks: res.zeroChunks,
    seconds: (performance.now() - t0) / 1000,
  };
}
