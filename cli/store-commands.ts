/** Repository verbs: init, import, export, ls, show, diff, forget, prune, check, rebuild-index, unlock. */
import { createReadStream } from 'node:fs';
import { open as openFile, stat } from 'node:fs/promises';
import { openOutputTarget } from '../src/util/output-target.js';
import { refuseContainerImage } from '../src/util/image-format.js';
import type { Command } from 'commander';
import { Repository } from '../src/store/repository.js';
import { ingestStream, exportStream } from '../src/store/streams.js';
import { dataExtents } from '../src/util/sparse.js';
import { WritebackAhead } from '../src/store/writeback.js';
import { check, diffSnapshots, markLiveChunks, prune, rebuildIndex } from '../src/store/maintenance.js';
import { applyRetention, keepHeld, type RetentionPolicy } from '../src/store/retention.js';
import { removeStaleLocks } from '../src/store/lock.js';
import { describePin, forgetUnpinned, listPins, removePin, type Pin } from '../src/store/pins.js';
import { checkName, checkTags, summarize, type SnapshotSummary } from '../src/store/manifest.js';
import { NotFoundError, OperationError, UsageError } from '../src/store/errors.js';
import { codecId, type CodecName } from '../src/store/codec.js';
import { loadFileConfig, openBackendAt, openRepository, password, repoLocation, type GlobalOptions } from './context.js';
import { humanBytes, printJson, progress, shortId } from './output.js';

type Globals = () => GlobalOptions;

const collect = (v: string, prev: string[]) => [...prev, v];
const int = (flag: string) => (v: string) => {
  const n = Number(v);
  if (!Number.isInteger(n) || n < 0) throw new UsageError(`${flag} must be a non-negative whole number, got ${JSON.stringify(v)}`);
  return n;
};

export function snapshotSummary(s: SnapshotSummary) {
  return {
    id: s.id,
    short: shortId(s.id),
    vm: s.vm,
    time: s.time,
    host: s.host,
    tags: s.tags,
    parent: s.parent,
    message: s.message ?? null,
    meta: s.meta,
    streams: s.streams.map((st) => ({ name: st.name, kind: st.kind, size: st.size, chunkSize: st.chunkSize, chunks: st.chunkCount })),
  };
}

/** SNAP or SNAP:stream; the stream defaults to the snapshot's only stream, or its first disk. */
export async function resolveStreamRef(repo: Repository, ref: string) {
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
    throw new NotFoundError(
      streamName !== undefined
        ? `snapshot ${shortId(snap.id)} has no stream ${JSON.stringify(streamName)} (it has: ${snap.streams.map((s) => s.name).join(', ')})`
        : `snapshot ${shortId(snap.id)} has several streams; name one as SNAP:STREAM (${snap.streams.map((s) => s.name).join(', ')})`,
    );
  }
  return { snap, stream };
}

/** Collects manifests `listSnapshotSummaries` could not read (for ls and forget). */
function damagedCollector() {
  const list: { id: string; error: string }[] = [];
  return { list, add: (id: string, err: Error) => void list.push({ id, error: err.message }) };
}

export function registerStoreCommands(program: Command, globals: Globals): void {
  program
    .command('init')
    .description('create a repository')
    .option('--encrypt', 'encrypt everything stored (password from VMSNAP_PASSWORD, --password-file or a prompt)')
    .option('--codec <codec>', 'default compression: zstd, lz4 or none')
    .option('--chunk-size <bytes>', 'chunk size (power of two, 4 KiB - 16 MiB)', int('--chunk-size'))
    .action(async (o: { encrypt?: boolean; codec?: string; chunkSize?: number }) => {
      const g = globals();
      const cfg = loadFileConfig();
      const codec = (o.codec ?? cfg.codec ?? 'zstd') as CodecName;
      codecId(codec);
      const location = repoLocation(g);
      const backend = await openBackendAt(location);
      const encrypt = o.encrypt ?? cfg.encrypt ?? false;
      const repo = await Repository.init(backend, {
        codec,
        ...(o.chunkSize !== undefined ? { chunkSize: o.chunkSize } : {}),
        ...(encrypt ? { password: await password(g, 'new') } : {}),
      });
      if (g.json) printJson({ location: backend.location, id: repo.config.id, encrypted: repo.encrypted, codec, chunkSize: repo.chunkSize });
      else console.log(`created ${repo.encrypted ? 'encrypted ' : ''}repository ${repo.config.id.slice(0, 8)} at ${backend.location}`);
      await repo.close();
    });

  program
    .command('import <file>')
    .description('store a file, a disk image or stdin (-) as a snapshot stream')
    .requiredOption('--vm <name>', 'the VM (or group) the snapshot belongs to')
    .option('--tag <tag>', 'tag the snapshot (repeatable)', collect, [] as string[])
    .option('--stream <name>', 'stream name (default: disk0)', 'disk0')
    .option('--kind <kind>', 'stream kind: disk, file, ram, device, config', 'disk')
    .option('-m, --message <text>', 'a note stored with the snapshot')
    .action(async (file: string, o: { vm: string; tag: string[]; stream: string; kind: string; message?: string }) => {
      const g = globals();
      checkName('VM name', o.vm);
      checkName('stream name', o.stream);
      checkTags(o.tag);
      if (!['disk', 'file', 'ram', 'device', 'config'].includes(o.kind)) throw new UsageError(`unknown stream kind ${JSON.stringify(o.kind)}`);
      let total = 0;
      let regular = false;
      if (file !== '-') {
        try {
          const st = await stat(file);
          total = st.size;
          regular = st.isFile();
          if (st.isDirectory()) throw new UsageError(`cannot import ${file}: it is a directory (import takes a file, a disk image or - for stdin)`);
        } catch (err) {
          if (err instanceof UsageError) throw err;
          throw new UsageError(`cannot read ${file}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
        }
      }
      // A qcow2 (or other container) imported as a disk would store the container, not the disk.
      if (regular && o.kind === 'disk') await refuseContainerImage(file);
      const repo = await openRepository(g);
      const t0 = performance.now();
      try {
        const snap = await repo.write('import', async () => {
          // The parent is informational: an unrelated unreadable manifest (reported by `check`) must not block a backup.
          const parent = (await repo.listSnapshotSummaries(() => undefined)).filter((s) => s.vm === o.vm).pop();
          const bar = progress('import', total, !g.quiet && !g.json);
          // A regular file is read in place, its holes skipped; anything else (stdin, a pipe, a device) as a stream.
          const fh = regular ? await openFile(file, 'r') : undefined;
          let res;
          try {
            const input = fh
              ? { file: fh, size: total, extents: await dataExtents(file, total) }
              : file === '-'
                ? process.stdin
                : createReadStream(file, { highWaterMark: 1 << 20 });
            res = await ingestStream(repo, input, { name: o.stream, kind: o.kind as 'disk', onProgress: (n) => bar.update(n) });
          } catch (err) {
            // The repository's own failures are BackendErrors; a bare errno here is the input (EIO, EISDIR).
            if (typeof (err as NodeJS.ErrnoException).code === 'string') throw new OperationError('import', `reading ${file === '-' ? 'stdin' : file}`, err);
            throw err;
          } finally {
            await fh?.close();
          }
          bar.stop();
          const s = await repo.saveSnapshot({
            vm: o.vm,
            tags: o.tag,
            parent: parent?.id ?? null,
            ...(o.message !== undefined ? { message: o.message } : {}),
            meta: { source: file === '-' ? 'stdin' : file },
            streams: [res.stream],
          });
          return { s, res };
        });
        const secs = (performance.now() - t0) / 1000;
        const r = snap.res;
        if (g.json) printJson({ snapshot: snap.s.id, size: r.stream.size, newChunks: r.newChunks, newBytes: r.newBytes, storedBytes: r.storedBytes, dedupChunks: r.dedupChunks, zeroChunks: r.zeroChunks, seconds: secs });
        else
          console.log(
            `snapshot ${shortId(snap.s.id)} saved: ${humanBytes(r.stream.size)} in ${secs.toFixed(2)} s, ` +
              `${humanBytes(r.newBytes)} new (${humanBytes(r.storedBytes)} stored), ${r.dedupChunks} chunks deduplicated, ${r.zeroChunks} zero`,
          );
      } finally {
        await repo.close();
      }
    });

  program
    .command('export <snapshot> <target>')
    .description('write a snapshot stream (SNAP[:stream]) to a new file, stdout (-), a block or character device, or a FIFO')
    .option('--force', 'replace an existing regular file')
    .option('--no-fsync', 'do not flush the output to disk before putting it in place (faster; after a power loss it may be incomplete)')
    .action(async (ref: string, target: string, o: { fsync: boolean; force?: boolean }) => {
      const g = globals();
      const repo = await openRepository(g);
      try {
        const { stream } = await resolveStreamRef(repo, ref);
        // What the target is decides how it is written (src/util/output-target.ts): a device is
        // written in place, a file through a private temp file, nothing through a planted link.
        const out = await openOutputTarget(target, { size: stream.size, ...(o.force ? { force: true } : {}) });
        const where = target === '-' ? 'to stdout' : target;
        const bar = progress('export', stream.size, !g.quiet && !g.json && out.kind !== 'stdout');
        try {
          const writeback = o.fsync && out.kind !== 'stdout' && out.writingPath ? new WritebackAhead(out.writingPath) : null;
          // A fresh file gets positional writes and keeps holes; everything else is written in
          // order, zeros included (a device holds old data). Straight to the descriptor: no copy
          // per group, and nothing buffered when the reader is slower than the export.
          const dest = out.file ? { file: out.file } : { fd: out.fd! };
          await exportStream(repo, stream, dest, (n) => {
            bar.update(n);
            writeback?.progress(n);
          });
          await writeback?.settle();
          await out.commit({ fsync: o.fsync });
        } catch (err) {
          await out.abort();
          // A failed write of the output (ENOSPC, EIO, EPIPE) is the user's disk, not a bug: one line, naming it.
          if (typeof (err as NodeJS.ErrnoException).code === 'string') throw new OperationError('export', `writing ${where}`, err);
          throw err;
        } finally {
          bar.stop();
        }
        if (!g.json && !g.quiet && out.kind !== 'stdout') console.log(`wrote ${humanBytes(stream.size)} to ${target}`);
      } finally {
        await repo.close();
      }
    });

  program
    .command('ls')
    .description('list snapshots')
    .option('--vm <name>', 'only this VM')
    .option('--tag <tag>', 'only snapshots with this tag')
    .action(async (o: { vm?: string; tag?: string }) => {
      const g = globals();
      const repo = await openRepository(g);
      try {
        // One damaged manifest must not hide every other snapshot: it is listed as damaged.
        const damaged = damagedCollector();
        const snaps = (await repo.listSnapshotSummaries(damaged.add)).filter((s) => (!o.vm || s.vm === o.vm) && (!o.tag || s.tags.includes(o.tag)));
        if (g.json) return printJson([...snaps.map(snapshotSummary), ...damaged.list.map((d) => ({ id: d.id, short: shortId(d.id), damaged: d.error }))]);
        if (!snaps.length && !damaged.list.length) return console.log('no snapshots');
        console.log('ID            TIME                  VM              SIZE        TAGS');
        for (const s of snaps) {
          const size = s.streams.reduce((a, st) => a + st.size, 0);
          console.log(`${shortId(s.id)}  ${s.time.slice(0, 19).replace('T', ' ')}   ${s.vm.padEnd(14)}  ${humanBytes(size).padEnd(10)}  ${s.tags.join(',')}`);
        }
        for (const d of damaged.list) console.log(`${shortId(d.id)}  DAMAGED: ${d.error} (run \`vmsnap check\`)`);
      } finally {
        await repo.close();
      }
    });

  program
    .command('show <snapshot>')
    .description('show a snapshot and its streams')
    .action(async (ref: string) => {
      const g = globals();
      const repo = await openRepository(g);
      try {
        const s = await repo.resolveSnapshot(ref);
        if (g.json) return printJson(snapshotSummary(summarize(s)));
        console.log(`snapshot ${s.id}\n  vm:      ${s.vm}\n  time:    ${s.time}\n  host:    ${s.host}\n  parent:  ${s.parent ?? '-'}\n  tags:    ${s.tags.join(', ') || '-'}`);
        if (s.message) console.log(`  message: ${s.message}`);
        for (const [k, v] of Object.entries(s.meta)) console.log(`  ${k}: ${String(v)}`);
        console.log('  streams:');
        for (const st of s.streams) console.log(`    ${st.name.padEnd(16)} ${st.kind.padEnd(7)} ${humanBytes(st.size).padStart(10)}  ${st.chunks.length / 32} chunks of ${humanBytes(st.chunkSize)}`);
      } finally {
        await repo.close();
      }
    });

  program
    .command('diff <a> <b>')
    .description('which regions differ between two snapshots, per stream')
    .action(async (a: string, b: string) => {
      const g = globals();
      const repo = await openRepository(g);
      try {
        const [sa, sb] = [await repo.resolveSnapshot(a), await repo.resolveSnapshot(b)];
        const d = diffSnapshots(sa, sb);
        if (g.json) return printJson({ a: sa.id, b: sb.id, streams: d });
        for (const s of d) {
          console.log(`${s.stream}: ${humanBytes(s.changedBytes)} differ in ${s.extents.length} extent(s)${s.sizeA !== s.sizeB ? ` (size ${s.sizeA ?? '-'} -> ${s.sizeB ?? '-'})` : ''}`);
          for (const e of s.extents.slice(0, 20)) console.log(`  ${e.offset}+${e.length}`);
          if (s.extents.length > 20) console.log(`  ... ${s.extents.length - 20} more`);
        }
      } finally {
        await repo.close();
      }
    });

  program
    .command('forget')
    .description('remove snapshots by retention policy (restic semantics), optionally pruning')
    .option('--keep-last <n>', 'keep the n newest', int('--keep-last'))
    .option('--keep-hourly <n>', 'keep the newest of each of the last n hours', int('--keep-hourly'))
    .option('--keep-daily <n>', 'keep the newest of each of the last n days', int('--keep-daily'))
    .option('--keep-weekly <n>', 'keep the newest of each of the last n weeks', int('--keep-weekly'))
    .option('--keep-monthly <n>', 'keep the newest of each of the last n months', int('--keep-monthly'))
    .option('--keep-yearly <n>', 'keep the newest of each of the last n years', int('--keep-yearly'))
    .option('--keep-tag <tag>', 'keep snapshots with this tag (repeatable)', collect, [] as string[])
    .option('--vm <name>', 'only this VM')
    .option('--tag <tag>', 'only snapshots with this tag')
    .option('--group-by <g>', 'vm or vm,tags', 'vm')
    .option('--dry-run', 'show what would be removed')
    .option('--prune', 'prune afterwards')
    .action(async (o: { keepLast?: number; keepHourly?: number; keepDaily?: number; keepWeekly?: number; keepMonthly?: number; keepYearly?: number; keepTag: string[]; vm?: string; tag?: string; groupBy: string; dryRun?: boolean; prune?: boolean }) => {
      const g = globals();
      if (o.groupBy !== 'vm' && o.groupBy !== 'vm,tags') throw new UsageError('--group-by must be "vm" or "vm,tags"');
      const policy: RetentionPolicy = { last: o.keepLast, hourly: o.keepHourly, daily: o.keepDaily, weekly: o.keepWeekly, monthly: o.keepMonthly, yearly: o.keepYearly, tags: o.keepTag };
      const repo = await openRepository(g);
      try {
        const session = await repo.beginWrite('forget');
        let pinnedDecisions;
        try {
          // A damaged manifest's VM, time and tags are unknown: no policy can decide it, so it is
          // kept (never deleted silently) and named.
          const damaged = damagedCollector();
          const snaps = (await repo.listSnapshotSummaries(damaged.add)).filter((s) => (!o.vm || s.vm === o.vm) && (!o.tag || s.tags.includes(o.tag)));
          for (const d of damaged.list) console.error(`vmsnap: warning: skipped snapshot ${shortId(d.id)}: its manifest is damaged (${d.error}); forget keeps it, \`vmsnap check\` reports it`);
          const decisions = applyRetention(snaps, policy, o.groupBy as 'vm');
          // A snapshot a volume still reads (a pin) is kept whatever the policy says, and says why.
          const doomed = decisions.flatMap((d) => d.remove.map((s) => s.id));
          const pinned = o.dryRun ? await pinnedAmong(repo, doomed) : (await forgetUnpinned(repo, doomed)).pinned;
          pinnedDecisions = decisions.map((d) => keepHeld(d, pinned));
        } finally {
          await session.end();
        }
        if (g.json)
          printJson(
            pinnedDecisions.map((d) => ({
              group: d.group,
              keep: d.keep.map((k) => ({ id: k.snapshot.id, reasons: k.reasons, ...(k.held ? { pins: k.held.map(pinJson) } : {}) })),
              remove: d.remove.map((s) => s.id),
            })),
          );
        else
          for (const d of pinnedDecisions) {
            console.log(`${d.group}: keep ${d.keep.length}, ${o.dryRun ? 'would remove' : 'removed'} ${d.remove.length}`);
            for (const k of d.keep) {
              console.log(`  keep   ${shortId(k.snapshot.id)} ${k.snapshot.time} (${k.reasons.join(', ')})`);
              for (const p of k.held ?? []) console.log(`         pinned: ${describePin(p)}`);
            }
            for (const s of d.remove) console.log(`  remove ${shortId(s.id)} ${s.time}`);
          }
        if (o.prune && !o.dryRun) {
          const st = await prune(repo);
          if (!g.json) console.log(`pruned: ${st.packsDeleted} packs deleted, ${st.packsRepacked} repacked, ${humanBytes(st.bytesFreed)} freed`);
        }
      } finally {
        await repo.close();
      }
    });

  program
    .command('prune')
    .description('delete data no snapshot references (repacks mostly-garbage packs)')
    .option('--dry-run', 'only report')
    .option('--repack-below <fraction>', 'repack packs with less live data than this fraction', '0.5')
    .action(async (o: { dryRun?: boolean; repackBelow: string }) => {
      const g = globals();
      const frac = Number(o.repackBelow);
      if (!(frac >= 0 && frac <= 1)) throw new UsageError('--repack-below must be between 0 and 1');
      const repo = await openRepository(g);
      try {
        const st = await prune(repo, { dryRun: !!o.dryRun, repackBelow: frac, onProgress: (m) => !g.json && !g.quiet && console.error(m) });
        if (g.json) printJson(st);
        else
          console.log(
            `${o.dryRun ? 'would delete' : 'deleted'} ${st.packsDeleted} packs, repacked ${st.packsRepacked}, freed ${humanBytes(st.bytesFreed)}; ${st.snapshots} snapshots, ${st.liveChunks} live chunks` +
              (st.leftoversRemoved ? `; removed ${st.leftoversRemoved} leftovers of interrupted writes` : ''),
          );
        if (st.leftoversError) console.error(`vmsnap: warning: leftovers of interrupted writes were not removed: ${st.leftoversError}`);
      } finally {
        await repo.close();
      }
    });

  program
    .command('check')
    .description('verify the repository structure (and with --read-data every chunk)')
    .option('--read-data', 'download and verify every chunk')
    .action(async (o: { readData?: boolean }) => {
      const g = globals();
      const repo = await openRepository(g);
      try {
        const bar = progress('check', 0, !!o.readData && !g.quiet && !g.json);
        const report = await check(repo, { readData: !!o.readData, onProgress: (d, t) => bar.update(d, t) });
        bar.stop();
        const errors = report.problems.filter((p) => p.severity === 'error');
        if (g.json) printJson(report);
        else {
          for (const p of report.problems) {
            console.log(`${p.severity}: ${p.message}`);
            for (const a of p.affected) console.log(`  affects snapshot ${shortId(a.snapshot)} (vm ${a.vm}) stream ${a.stream}`);
          }
          console.log(`${report.snapshots} snapshots, ${report.packs} packs, ${report.chunks} chunks, ${report.pins} pin(s)${report.readData ? ', all data read' : ''}: ${errors.length ? `${errors.length} error(s)` : 'no errors'}`);
        }
        if (errors.length) process.exitCode = 3;
      } finally {
        await repo.close();
      }
    });

  program
    .command('rebuild-index')
    .description('recreate the index from the packs')
    .action(async () => {
      const g = globals();
      const repo = await openRepository(g);
      try {
        const r = await rebuildIndex(repo);
        if (g.json) printJson(r);
        else {
          console.log(`index rebuilt from ${r.packs} packs (${r.chunks} chunks)`);
          for (const u of r.unreadable) console.log(`  unreadable pack ${u}`);
        }
      } finally {
        await repo.close();
      }
    });

  const pins = program.command('pins').description('snapshots held by copy-on-write volumes (kept by forget and prune)');
  pins
    .command('ls')
    .description('list pins: which volume on which host holds which snapshot')
    .action(async () => {
      const g = globals();
      const repo = await openRepository(g);
      try {
        const { pins: list, unreadable } = await listPins(repo);
        if (g.json) return printJson({ pins: list.map(pinJson), unreadable });
        for (const p of list) console.log(`${p.id}  snapshot ${shortId(p.snapshot)}  ${p.holder} on ${p.host} (${p.dataDir}) since ${p.created}`);
        for (const u of unreadable) console.log(`${u.id}  unreadable: ${u.error}`);
        if (!list.length && !unreadable.length) console.log('no pins');
      } finally {
        await repo.close();
      }
    });
  pins
    .command('rm <id>')
    .description("remove a pin whose holder is gone (a lost host's volume); forget and prune may then delete its snapshot")
    .action(async (id: string) => {
      const g = globals();
      const repo = await openRepository(g);
      try {
        const { pins: list } = await listPins(repo);
        const p = list.find((x) => x.id === id);
        if (!p && !(await repo.backend.stat('pins', id).catch(() => null))) throw new NotFoundError(`no pin ${id} (see \`vmsnap pins ls\`)`);
        await removePin(repo, id);
        if (g.json) printJson({ removed: id });
        else console.log(`removed pin ${id}${p ? ` (${p.holder} on ${p.host}, snapshot ${shortId(p.snapshot)})` : ''}`);
      } finally {
        await repo.close();
      }
    });

  program
    .command('unlock')
    .description('remove stale locks (locks of dead processes or older than 30 minutes)')
    .action(async () => {
      const g = globals();
      const backend = await openBackendAt(repoLocation(g));
      const removed = await removeStaleLocks(backend);
      if (g.json) printJson({ removed });
      else console.log(`removed ${removed.length} stale lock(s)`);
    });

  program
    .command('stats')
    .description('repository size and deduplication figures')
    .action(async () => {
      const g = globals();
      const repo = await openRepository(g);
      try {
        let logical = 0;
        const used = await markLiveChunks(repo.index, repo.eachSnapshot(), (s) => (logical += s.streams.reduce((b, st) => b + st.size, 0)));
        let packBytes = 0;
        let packs = 0;
        for await (const o of repo.backend.list('packs')) {
          packBytes += o.size;
          packs++;
        }
        const r = { snapshots: used.snapshots, logicalBytes: logical, storedBytes: packBytes, packs, chunks: repo.index.size, liveChunks: used.count + used.missing.size, indexMemoryBytes: repo.index.memoryBytes };
        if (g.json) printJson(r);
        else console.log(`${r.snapshots} snapshots, ${humanBytes(logical)} logical, ${humanBytes(packBytes)} stored in ${packs} packs (${r.chunks} chunks, index ${humanBytes(r.indexMemoryBytes)} in memory)`);
      } finally {
        await repo.close();
      }
    });
}

function pinJson(p: Pin) {
  return { id: p.id, snapshot: p.snapshot, holder: p.holder, host: p.host, dataDir: p.dataDir, created: p.created };
}

/** Pins among `ids` (a dry run deletes nothing, so it only looks). */
async function pinnedAmong(repo: Repository, ids: readonly string[]): Promise<Map<string, Pin[]>> {
  const { pins } = await listPins(repo);
  const out = new Map<string, Pin[]>();
  for (const p of pins) if (ids.includes(p.snapshot)) out.set(p.snapshot, [...(out.get(p.snapshot) ?? []), p]);
  return out;
}

