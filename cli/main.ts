/**
 * The `vmsnap` command. Errors: a RepositoryError (or any error marked user-facing) prints one line
 * `vmsnap: <message>` and exits 1 (2 for usage errors: unknown commands and options, bad values;
 * 3 for `check` finding problems); anything else is a bug, prints its stack and exits 70. With
 * `--json` the same error is one line of JSON on stderr instead (stdout may carry a stream):
 * `{"error":{"message","name","exitCode","step"?,"retryable"?}}`, same exit codes.
 *
 * Everything the command creates is private to its user: the umask is 077 from the start (files
 * 0600, folders 0700, also for the supervisor and QEMU it starts), on top of the explicit modes of
 * src/util/fs.ts, so a permissive umask never exposes keys, RAM images or disks.
 */
import { Command, CommanderError } from 'commander';
import { UsageError } from '../src/store/errors.js';
import { errorJson, isUsageError, isUserFacing } from './output.js';
import { registerStoreCommands } from './store-commands.js';
import { registerVmCommands } from './vm-commands.js';
import { registerCopyCommands } from './copy-commands.js';
import { registerVolumeCommands } from './volume-commands.js';
import { registerPeerCommands } from './peer-commands.js';
import { registerMigrateCommands } from './migrate-commands.js';
import { registerAgentCommands } from './agent-commands.js';
import { repositoryPinner } from '../src/store/pins.js';
import { dataDir, enableBackendStats, openRepository, printBackendStats, warnSharedFolders } from './context.js';
import { resolveStreamRef } from '../src/ops/export.js';
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
    .showHelpAfterError(!jsonErrors)
    // Under --json, commander's own error text would not be JSON: main() prints the error instead.
    .configureOutput({ outputError: (str, write) => (jsonErrors ? undefined : write(str)) })
    .exitOverride();
  const globals = () => program.opts<GlobalOptions>();
  program.hook('preAction', async () => {
    if (globals().stats) enableBackendStats();
    await warnSharedFolders(globals());
  });
  registerStoreCommands(program, globals);
  registerVmCommands(program, globals);
  registerCopyCommands(program, globals);
  registerPeerCommands(program, globals);
  registerMigrateCommands(program, globals);
  registerAgentCommands(program, globals);
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

/** Whether errors are printed as JSON (`--json` anywhere before `--`); set by main() before parsing. */
let jsonErrors = false;

export async function main(argv: string[]): Promise<number> {
  // Before anything is created: private files and folders whatever the caller's umask (see above).
  process.umask(0o077);
  const end = argv.indexOf('--');
  jsonErrors = (end < 0 ? argv : argv.slice(0, end)).includes('--json');
  const program = buildProgram();
  try {
    const unknown = unknownCommand(program, argv.slice(2));
    if (unknown) throw new UsageError(`unknown command ${JSON.stringify(unknown.name)}${unknown.parent ? ` for "${unknown.parent}"` : ''} (see vmsnap${unknown.parent ? ` ${unknown.parent}` : ''} --help)`);
    await program.parseAsync(argv);
    return typeof process.exitCode === 'number' ? process.exitCode : 0;
  } catch (err) {
    if (err instanceof CommanderError) {
      // Help and --version end with code 0; everything else commander rejects is bad usage.
      if (err.exitCode === 0) return 0;
      if (jsonErrors) process.stderr.write(errorJson(err.message.replace(/^error: /, ''), 'UsageError', 2) + '\n');
      return 2;
    }
    const code = isUserFacing(err) ? (isUsageError(err) ? 2 : 1) : 70;
    if (jsonErrors) process.stderr.write(errorJson(err, undefined, code) + '\n');
    else if (code !== 70) process.stderr.write(`vmsnap: ${(err as Error).message}\n`);
    else process.stderr.write(`vmsnap: internal error: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
    return code;
  } finally {
    printStats(program);
  }
}

/**
 * The first word naming a command that does not exist, if any. commander reports an unknown
 * command itself, except when --help follows it (`vmsnap nosuch --help` printed the main help and
 * exited 0): checked before parsing so that too is a usage error.
 */
function unknownCommand(program: Command, args: string[]): { name: string; parent: string | null } | null {
  let cmd = program;
  let parent: string | null = null;
  for (let i = 0; i < args.length; i++) {
    const a = args[i]!;
    if (a === '--') return null;
    if (a.startsWith('-')) {
      // An option's value is not a command name: skip it (`--repo DIR ls`).
      const opt = cmd.options.find((o) => o.long === a || o.short === a);
      if (opt && (opt.required || opt.optional) && !a.includes('=')) i++;
      continue;
    }
    // A command with its own arguments (or none below it) takes the rest as operands.
    if (cmd.commands.length === 0 || cmd.registeredArguments.length > 0) return null;
    const sub = cmd.commands.find((c) => c.name() === a || c.aliases().includes(a));
    if (!sub) return a === 'help' ? null : { name: a, parent };
    parent = parent ? `${parent} ${a}` : a;
    cmd = sub;
  }
  return null;
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
