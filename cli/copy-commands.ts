/**
 * `vmsnap copy SNAP... --to REPO` and `vmsnap sync --from A --to B [--vm NAME]`: copy snapshots
 * between repositories (src/store/copy.ts). The source is `--repo` (copy) or `--from` (sync) with
 * the usual password (--password-file, VMSNAP_PASSWORD_FILE, VMSNAP_PASSWORD); the target's
 * password comes from --to-password-file or VMSNAP_TO_PASSWORD. `--init` creates the target if it
 * does not exist (same chunk size and codec as the source, encrypted when a target password is set).
 */
import { readFileSync } from 'node:fs';
import type { Command } from 'commander';
import { Repository } from '../src/store/repository.js';
import { copySnapshots, syncRepositories, type CopyReport } from '../src/store/copy.js';
import { NotFoundError, UsageError } from '../src/store/errors.js';
import { openBackendAt, openRepository, repoLocation, type GlobalOptions } from './context.js';
import { humanBytes, printJson, shortId } from './output.js';
import type { Snapshot } from '../src/store/manifest.js';

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
  const backend = await openBackendAt(o.to);
  const pw = targetPassword(o);
  const open = () =>
    Repository.open(backend, {
      password: () => {
        if (pw === undefined) throw new UsageError('the target repository is encrypted: give its password with --to-password-file or VMSNAP_TO_PASSWORD');
        return Promise.resolve(pw);
      },
    });
  try {
    return await open();
  } catch (err) {
    if (!(err instanceof NotFoundError) || !o.init) throw err;
    await Repository.init(backend, { chunkSize: src.chunkSize, codec: src.config.codec, ...(pw !== undefined ? { password: pw } : {}) });
    return open();
  }
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

function progressLine(g: GlobalOptions): ((p: { snapshot: string; chunksDone: number; chunksTotal: number; bytesSent: number }) => void) | undefined {
  if (g.quiet || g.json || !process.stderr.isTTY) return undefined;
  return (p) => process.stderr.write(`\r${shortId(p.snapshot)}: ${p.chunksDone}/${p.chunksTotal} chunks, ${humanBytes(p.bytesSent)} sent   `);
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
      await transfer(g, undefined, o, async (src, dst, onProgress) => {
        const snaps: Snapshot[] = [];
        for (const ref of refs) snaps.push(await src.resolveSnapshot(ref));
        const unique = [...new Map(snaps.map((s) => [s.id, s])).values()];
        return copySnapshots(src, dst, unique, onProgress ? { onProgress } : {});
      });
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
      await transfer(g, o.from ?? repoLocation(g), o, (src, dst, onProgress) =>
        syncRepositories(src, dst, { ...(o.vm !== undefined ? { vm: o.vm } : {}), ...(onProgress ? { onProgress } : {}) }),
      );
    });
}

/** Opens both repositories, runs one copy, reports it, and closes both whatever happened. */
async function transfer(
  g: GlobalOptions,
  from: string | undefined,
  o: TargetOptions,
  run: (src: Repository, dst: Repository, onProgress: ReturnType<typeof progressLine>) => Promise<CopyReport>,
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
