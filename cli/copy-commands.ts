/**
 * `vmsnap copy SNAP... --to REPO` and `vmsnap sync --from A --to B [--vm NAME]`: copy snapshots
 * between repositories (src/store/copy.ts). The source is `--repo` (copy) or `--from` (sync) with
 * the usual password (--password-file, VMSNAP_PASSWORD_FILE, VMSNAP_PASSWORD); the target's
 * password comes from --to-password-file or VMSNAP_TO_PASSWORD. `--init` creates the target if it
 * does not exist (same chunk size and codec as the source, encrypted when a target password is set).
 */
import { readFileSync } from 'node:fs';
import type { Command } from 'commander';
import type { Repository } from '../src/store/repository.js';
import { UsageError } from '../src/store/errors.js';
import { copyByRefs, openCopyTarget, syncRepos, type CopyReport } from '../src/ops/copy.js';
import type { ProgressSink } from '../src/ops/progress.js';
import { openBackendAt, openRepository, repoLocation, type GlobalOptions } from './context.js';
import { humanBytes, printJson, shortId } from './output.js';

type Globals = () => GlobalOptions;

interface TargetOptions {
  to: string;
  toPasswordFile?: string;
  init?: boolean;
}

function targetPassword(o: TargetOptions): string | undefined {
  if (o.toPasswordFile) {
    try {
      return readFileSync(o.toPasswordFile, 'utf8').replace(/\r?\n$/, '');
    } catch (err) {
      throw new UsageError(`cannot read password file ${o.toPasswordFile}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
    }
  }
  return process.env.VMSNAP_TO_PASSWORD;
}

async function openTarget(o: TargetOptions, src: Repository): Promise<Repository> {
  return openCopyTarget(await openBackendAt(o.to), src, targetPassword(o), !!o.init);
}

async function openSource(g: GlobalOptions, location: string | undefined): Promise<Repository> {
  return openRepository(location === undefined ? g : { ...g, repo: location });
}

function printReport(g: GlobalOptions, r: CopyReport, secs: number): void {
  if (g.json) {
    printJson({ ...r, seconds: secs });
    return;
  }
  for (const s of r.snapshots) {
    if (s.alreadyPresent) console.log(`${shortId(s.source)} (${s.vm}): already in the target as ${shortId(s.target)}`);
    else
      console.log(
        `${shortId(s.source)} (${s.vm}) -> ${shortId(s.target)}: ${s.sent} of ${s.chunks} chunks sent (${humanBytes(s.bytesSent)}), ${s.present} already there`,
      );
  }
  const sent = r.snapshots.reduce((a, s) => a + s.bytesSent, 0);
  console.log(
    `copied ${r.snapshots.filter((s) => !s.alreadyPresent).length} snapshot(s) in ${secs.toFixed(2)} s (${r.mode}), ${humanBytes(sent)} sent in ${r.packsWritten} pack(s)` +
      (r.adoptedPacks ? `; adopted ${r.adoptedPacks} pack(s) left by an interrupted run` : '') +
      (r.vanished.length ? `; skipped ${r.vanished.length} snapshot(s) forgotten in the source meanwhile` : ''),
  );
}

/** A line on a terminal's stderr per progress event: the snapshot, its chunks, the bytes sent. */
function progressLine(g: GlobalOptions): ProgressSink | undefined {
  if (g.quiet || g.json || !process.stderr.isTTY) return undefined;
  return {
    emit: (e) => {
      if (e.type === 'progress') process.stderr.write(`\r${e.phase.replace(/^copying /, '')}: ${e.done}/${e.total ?? '?'} chunks, ${humanBytes(e.bytes ?? 0)} sent   `);
    },
  };
}

export function registerCopyCommands(program: Command, globals: Globals): void {
  program
    .command('copy <snapshots...>')
    .description('copy snapshots (ids, prefixes, latest, VM:latest) to another repository, sending only missing data')
    .requiredOption('--to <repo>', 'target repository (a directory or s3:...)')
    .option('--to-password-file <file>', 'target repository password (env VMSNAP_TO_PASSWORD)')
    .option('--init', 'create the target repository if it does not exist')
    .action(async (refs: string[], o: TargetOptions) => {
      const g = globals();
      await transfer(g, undefined, o, (src, dst, sink) => copyByRefs(src, dst, { refs }, sink));
    });

  program
    .command('sync')
    .description('copy every snapshot of one repository (or of one VM) that another lacks')
    .option('--from <repo>', 'source repository (default: --repo)')
    .requiredOption('--to <repo>', 'target repository')
    .option('--vm <name>', 'only this VM')
    .option('--to-password-file <file>', 'target repository password (env VMSNAP_TO_PASSWORD)')
    .option('--init', 'create the target repository if it does not exist')
    .action(async (o: TargetOptions & { from?: string; vm?: string }) => {
      const g = globals();
      await transfer(g, o.from ?? repoLocation(g), o, (src, dst, sink) => syncRepos(src, dst, o.vm !== undefined ? { vm: o.vm } : {}, sink));
    });
}

/** Opens both repositories, runs one copy, reports it, and closes both whatever happened. */
async function transfer(
  g: GlobalOptions,
  from: string | undefined,
  o: TargetOptions,
  run: (src: Repository, dst: Repository, sink: ProgressSink | undefined) => Promise<CopyReport>,
): Promise<void> {
  const src = await openSource(g, from);
  try {
    const dst = await openTarget(o, src);
    try {
      const t0 = performance.now();
      const onProgress = progressLine(g);
      const r = await run(src, dst, onProgress);
      if (onProgress) process.stderr.write('\n');
      printReport(g, r, (performance.now() - t0) / 1000);
    } finally {
      await dst.close();
    }
  } finally {
    await src.close();
  }
}
