/**
 * Crash driver for test/store/crash.test.ts. Runs one or more `vmsnap` commands in this process,
 * using the compiled CLI's own command code (dist/cli/store-commands.js), with the local backend
 * wrapped so that the process SIGKILLs itself at a chosen backend operation:
 *
 *   node --import tsx test/helpers/store-crash-child.ts '<json>'
 *   json = { "repo": DIR, "commands": [["import", FILE, "--vm", "a"], ["prune"]],
 *            "killAt": N | null, "mode": "before" | "during" | "after" }
 *
 * Backend mutations (put, create, delete) are counted from 1 across all commands; with `killAt: N`
 * the process kills itself before the Nth mutation starts, right after it started (while its temp
 * file is being written), or after it completed. Without `killAt` it runs everything and prints
 * `{"mutations": total}` on stdout, which the test uses to choose kill points.
 *
 * Needs `npm run build` (the test calls ensureBuilt()).
 */
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';

type LocalModule = typeof import('../../src/store/backend/local.js');
type CommandsModule = typeof import('../../cli/store-commands.js');
type CommanderModule = typeof import('commander');

interface DriverInput {
  repo: string;
  commands: string[][];
  killAt: number | null;
  mode: 'before' | 'during' | 'after';
}

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const dist = (p: string) => path.join(root, 'dist', p);

const input = JSON.parse(process.argv[2] ?? '{}') as DriverInput;
const { LocalBackend } = (await import(dist('src/store/backend/local.js'))) as LocalModule;
const { registerStoreCommands } = (await import(dist('cli/store-commands.js'))) as CommandsModule;
const { Command } = (await import('commander')) as CommanderModule;

let mutations = 0;
const die = (): never => {
  process.kill(process.pid, 'SIGKILL');
  throw new Error('unreachable');
};

type Mutation = 'put' | 'create' | 'delete';
const proto = LocalBackend.prototype as unknown as Record<Mutation, (...args: unknown[]) => Promise<unknown>>;
for (const op of ['put', 'create', 'delete'] as const) {
  const original = proto[op];
  proto[op] = async function (this: unknown, ...args: unknown[]): Promise<unknown> {
    const n = ++mutations;
    if (input.killAt === n && input.mode === 'before') die();
    const p = original.apply(this, args);
    if (input.killAt === n && input.mode === 'during') setImmediate(die);
    const r = await p;
    if (input.killAt === n && input.mode === 'after') die();
    return r;
  };
}

for (const argv of input.commands) {
  const program = new Command();
  program
    .option('-r, --repo <location>')
    .option('--password-file <file>')
    .option('--json')
    .option('-q, --quiet')
    .exitOverride();
  registerStoreCommands(program, () => program.opts());
  await program.parseAsync(['node', 'vmsnap', '--repo', input.repo, '--quiet', ...argv]);
}
process.stdout.write(JSON.stringify({ mutations }) + '\n');
