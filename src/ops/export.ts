/**
 * Export: one snapshot stream (SNAP[:stream]) written to a new file, stdout (`-`), a device or a
 * FIFO. What the target is decides how it is written (src/util/output-target.ts): a device in
 * place, a file through a private temp file put in place only when complete, nothing through a
 * planted link. A failed export leaves no partial file behind.
 */
import type { Repository } from '../store/repository.js';
import { exportStream } from '../store/streams.js';
import { WritebackAhead } from '../store/writeback.js';
import { NotFoundError, OperationError } from '../store/errors.js';
import { openOutputTarget, type OutputKind } from '../util/output-target.js';
import type { Snapshot, StreamRecord } from '../store/manifest.js';
import { noProgress, reporter, type ProgressSink } from './progress.js';

export interface ExportArgs {
  /** SNAP or SNAP:stream (see resolveStreamRef). */
  ref: string;
  /** A path, or `-` for stdout. */
  target: string;
  /** Replace an existing regular file. */
  force?: boolean;
  /** Flush the output before putting it in place (default true). */
  fsync?: boolean;
}

export interface ExportResult {
  snapshot: string;
  stream: string;
  bytes: number;
  target: string;
  kind: OutputKind;
}

/** SNAP or SNAP:stream; the stream defaults to the snapshot's only stream, or its first disk. */
export async function resolveStreamRef(repo: Repository, ref: string): Promise<{ snap: Snapshot; stream: StreamRecord }> {
  const colon = ref.lastIndexOf(':');
  let snapRef = ref;
  let streamName: string | undefined;
  if (colon > 0 && !ref.endsWith(':latest')) {
    snapRef = ref.slice(0, colon);
    streamName = ref.slice(colon + 1);
  }
  const snap = await repo.resolveSnapshot(snapRef);
  const stream = streamName !== undefined ? snap.streams.find((s) => s.name === streamName) : snap.streams.length === 1 ? snap.streams[0] : snap.streams.find((s) => s.kind === 'disk');
  if (!stream) {
    const short = snap.id.slice(0, 12);
    throw new NotFoundError(
      streamName !== undefined
        ? `snapshot ${short} has no stream ${JSON.stringify(streamName)} (it has: ${snap.streams.map((s) => s.name).join(', ')})`
        : `snapshot ${short} has several streams; name one as SNAP:STREAM (${snap.streams.map((s) => s.name).join(', ')})`,
    );
  }
  return { snap, stream };
}

export async function exportSnapshot(repo: Repository, args: ExportArgs, sink: ProgressSink = noProgress): Promise<ExportResult> {
  const fsync = args.fsync !== false;
  const { snap, stream } = await resolveStreamRef(repo, args.ref);
  const out = await openOutputTarget(args.target, { size: stream.size, ...(args.force ? { force: true } : {}) });
  const where = args.target === '-' ? 'to stdout' : args.target;
  const r = reporter(sink);
  r.phase('writing');
  try {
    const writeback = fsync && out.kind !== 'stdout' && out.writingPath ? new WritebackAhead(out.writingPath) : null;
    // A fresh file gets positional writes and keeps holes; everything else is written in
    // order, zeros included (a device holds old data). Straight to the descriptor: no copy
    // per group, and nothing buffered when the reader is slower than the export.
    const dest = out.file ? { file: out.file } : { fd: out.fd! };
    await exportStream(repo, stream, dest, (n) => {
      r.bytes('writing', n, stream.size);
      writeback?.progress(n);
    });
    await writeback?.settle();
    await out.commit({ fsync });
  } catch (err) {
    await out.abort();
    // A failed write of the output (ENOSPC, EIO, EPIPE) is the user's disk, not a bug: one line, naming it.
    if (typeof (err as NodeJS.ErrnoException).code === 'string') throw new OperationError('export', `writing ${where}`, err);
    throw err;
  }
  return { snapshot: snap.id, stream: stream.name, bytes: stream.size, target: args.target, kind: out.kind };
}
