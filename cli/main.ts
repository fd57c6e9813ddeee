/**
 * The `vmsnap` command. Errors: a RepositoryError (or any error marked user-facing) prints one line
 * `vmsnap: <message>` and exits 1 (2 for usage errors, 3 for `check` finding problems); anything else
 * is a bug and prints its stack.
 */
import { Command, CommanderError } from 'commander';
import { UsageError } from '../src/store/errors.js';
import { isUserFacing } from './output.js';
import { registerStoreCommands } from './store-commands.js';
import { registerVmCommands } from './vm-commands.js';
import { registerCopyCommands } from './copy-commands.js';
import { registerVolumeCommands } from '../src/cow/cli.js';
import { repositoryPinner } from '../src/store/pins.js';
import { dataDir, enableBackendStats, openRepository, printBackendStats } from './context.js';
import { resolveStreamRef } from './store-commands.js';
import type { Repository } from '../src/store/repository.js';
import type { GlobalOptions } from './context.js';

export function buildProgram(): Command {
  const program = new Command();
  program
    .name('vmsnap')
    .description('snapshots, backups and live migration for desktop virtual machines')
    .version('0.1.0')
    .option('-r, --repo <location>', 'repository: a directory, or s3:https://host/bucket/prefix (env VMSNAP_REPO)')
    .option('--password-file <file>', 'read the repository password from a file (env VMSNAP_PASSWORD_FILE)')
    .option('--json', 'machine-readable output')
    .option('-q, --quiet', 'no progress output')
    .option('--stats', 'print backend requests and bytes per operation to stderr at exit (JSON with --json)')
    .showHelpAfterError()
    .exitOverride();
  const globals = () => program.opts<GlobalOptions>();
  program.hook('preAction', () => {
    if (globals().stats) enableBackendStats();
  });
  registerStoreCommands(program, globals);
  registerVmCommands(program, globals);
  registerCopyCommands(program, globals);
  // A volume command opens the repository at most once (a clone resolves the snapshot and reads
  // chunks through the same one: one key derivation, one index load) and closes it when done.
  let volumeRepo: Promise<Repository> | null = null;
  const volumeStore = (): Promise<Repository> => (volumeRepo ??= openRepository(globals()));
  program.hook('postAction', async () => {
    const repo = volumeRepo;
    volumeRepo = null;
    if (repo) await (await repo).close();
  });
  registerVolumeCommands(program, {
    get dataDir() {
      return dataDir();
    },
    openStore: volumeStore,
    resolveDisk: async (ref: string) => {
      const { snap, stream } = await resolveStreamRef(await volumeStore(), ref);
      return { ...stream, snapshot: snap.id };
    },
    openPinner: async () => repositoryPinner(await volumeStore(), dataDir()),
  });
  return program;
}

export async function main(argv: string[]): Promise<number> {
  const program = buildProgram();
  try {
    await program.parseAsync(argv);
    return typeof process.exitCode === 'number' ? process.exitCode : 0;
  } catch (err) {
    if (err instanceof CommanderError) return err.exitCode === 0 ? 0 : 2;
    if (isUserFacing(err)) {
      process.stderr.write(`vmsnap: ${err.message}\n`);
      return err instanceof UsageError ? 2 : 1;
    }
    process.stderr.write(`vmsnap: internal error: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
    return 70;
  } finally {
    printStats(program);
  }
}

let statsPrinted = false;
/** `--stats`: once, whether the command succeeded or failed (failures cost requests too). */
function printStats(program: Command): void {
  if (statsPrinted) return;
  statsPrinted = true;
  printBackendStats(!!program.opts<GlobalOptions>().json);
}

const code = await main(process.argv);
// Flush stdout before exiting: a pipe reader must get everything (export to '-').
process.stdout.write('', () => process.exit(code));
