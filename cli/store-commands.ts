/** Repository verbs: init, import, export, ls, show, diff, forget, prune, check, rebuild-index, unlock. */
import type { Command } from 'commander';
import { Repository } from '../src/store/repository.js';
import { diffSnapshots, rebuildIndex } from '../src/store/maintenance.js';
import type { RetentionPolicy } from '../src/store/retention.js';
import { removeStaleLocks } from '../src/store/lock.js';
import { describePin, listPins, removePin, type Pin } from '../src/store/pins.js';
import { summarize, type SnapshotSummary, type StreamKind } from '../src/store/manifest.js';
import { NotFoundError, UsageError } from '../src/store/errors.js';
import { codecId, type CodecName } from '../src/store/codec.js';
import { checkImportArgs, importSnapshot } from '../src/ops/import.js';
import { exportSnapshot, resolveStreamRef } from '../src/ops/export.js';
import { checkRepository, damagedCollector, forgetSnapshots, pruneRepository, repositoryStats } from '../src/ops/maintenance.js';
import { loadFileConfig, openBackendAt, openRepository, password, repoLocation, type GlobalOptions } from './context.js';
import { humanBytes, printJson, progressSink, shortId } from './output.js';

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

export { resolveStreamRef };

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
      const args = { source: file, vm: o.vm, tags: o.tag, stream: o.stream, kind: o.kind as StreamKind, ...(o.message !== undefined ? { message: o.message } : {}) };
      await checkImportArgs(args);
      const repo = await openRepository(g);
      const sink = progressSink('import', { bar: !g.quiet && !g.json, info: false });
      try {
        const r = await importSnapshot(repo, args, sink);
        sink.stop();
        if (g.json) printJson({ snapshot: r.snapshot, size: r.size, newChunks: r.newChunks, newBytes: r.newBytes, storedBytes: r.storedBytes, dedupChunks: r.dedupChunks, zeroChunks: r.zeroChunks, seconds: r.seconds });
        else
          console.log(
            `snapshot ${shortId(r.snapshot)} saved: ${humanBytes(r.size)} in ${r.seconds.toFixed(2)} s, ` +
              `${humanBytes(r.newBytes)} new (${humanBytes(r.storedBytes)} stored), ${r.dedupChunks} chunks deduplicated, ${r.zeroChunks} zero`,
          );
      } finally {
        sink.stop();
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
      // No bar over the bytes of a stdout export (the terminal is the output).
      const sink = progressSink('export', { bar: !g.quiet && !g.json && target !== '-', info: false });
      try {
        const r = await exportSnapshot(repo, { ref, target, fsync: o.fsync, ...(o.force ? { force: true } : {}) }, sink);
        sink.stop();
        if (!g.json && !g.quiet && r.kind !== 'stdout') console.log(`wrote ${humanBytes(r.bytes)} to ${target}`);
      } finally {
        sink.stop();
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
        const sink = progressSink('forget', { bar: false, info: false });
        const r = await forgetSnapshots(repo, { policy, groupBy: o.groupBy, ...(o.vm !== undefined ? { vm: o.vm } : {}), ...(o.tag !== undefined ? { tag: o.tag } : {}), dryRun: !!o.dryRun, prune: !!o.prune }, sink);
        if (g.json)
          printJson(
            r.decisions.map((d) => ({
              group: d.group,
              keep: d.keep.map((k) => ({ id: k.snapshot.id, reasons: k.reasons, ...(k.held ? { pins: k.held.map(pinJson) } : {}) })),
              remove: d.remove.map((s) => s.id),
            })),
          );
        else
          for (const d of r.decisions) {
            console.log(`${d.group}: keep ${d.keep.length}, ${o.dryRun ? 'would remove' : 'removed'} ${d.remove.length}`);
            for (const k of d.keep) {
              console.log(`  keep   ${shortId(k.snapshot.id)} ${k.snapshot.time} (${k.reasons.join(', ')})`);
              for (const p of k.held ?? []) console.log(`         pinned: ${describePin(p)}`);
            }
            for (const s of d.remove) console.log(`  remove ${shortId(s.id)} ${s.time}`);
          }
        const st = r.pruned;
        if (st && !g.json) console.log(`pruned: ${st.packsDeleted} packs deleted, ${st.packsRepacked} repacked, ${humanBytes(st.bytesFreed)} freed`);
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
        const st = await pruneRepository(repo, { dryRun: !!o.dryRun, repackBelow: frac }, progressSink('prune', { bar: false, info: !g.json && !g.quiet }));
        if (g.json) printJson(st);
        else
          console.log(
            `${o.dryRun ? 'would delete' : 'deleted'} ${st.packsDeleted} packs, repacked ${st.packsRepacked}, freed ${humanBytes(st.bytesFreed)}; ${st.snapshots} snapshots, ${st.liveChunks} live chunks` +
              (st.leftoversRemoved ? `; removed ${st.leftoversRemoved} leftovers of interrupted writes` : ''),
          );
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
        const bar = progressSink('check', { bar: !!o.readData && !g.quiet && !g.json, info: false });
        const report = await checkRepository(repo, { readData: !!o.readData }, bar);
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
        const r = await repositoryStats(repo);
        if (g.json) printJson(r);
        else console.log(`${r.snapshots} snapshots, ${humanBytes(r.logicalBytes)} logical, ${humanBytes(r.storedBytes)} stored in ${r.packs} packs (${r.chunks} chunks, index ${humanBytes(r.indexMemoryBytes)} in memory)`);
      } finally {
        await repo.close();
      }
    });
}

function pinJson(p: Pin) {
  return { id: p.id, snapshot: p.snapshot, holder: p.holder, host: p.host, dataDir: p.dataDir, created: p.created };
}
