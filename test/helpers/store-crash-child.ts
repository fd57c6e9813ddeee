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
 * With `"verify": true` it then opens the repository and prints, as the last line,
 *   {"mutations": n, "problems": [...check --read-data problems...],
 *    "snapshots": [{"id", "source", "sha256"}]}     (sha256 of each snapshot's export)
 * using the same library calls as `vmsnap check --read-data` and `vmsnap export` — one process
 * instead of one per snapshot keeps 20+ kill points fast.
 *
 * Needs `npm run build` (the test calls ensureBuilt()).
 */
import { createHash } from 'node:crypto';
import * as path from 'node:path';
import { Writable } from 'node:stream';
import { fileURLToPath } from 'node:url';

type LocalModule = typeof import('../../src/store/backend/local.js');
type CommandsModule = typeof import('../../cli/store-commands.js');
type CommanderModule = typeof import('commander');
type RepositoryModule = typeof import('../../src/store/repository.js');
type MaintenanceModule = typeof import('../../src/store/maintenance.js');
type StreamsModule = typeof import('../../src/store/streams.js');

interface DriverInput {
  repo: string;
  commands: string[][];
  killAt: number | null;
  mode: 'before' | 'during' | 'after';
  verify?: boolean;
}

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const distRoot = process.env.VMSNAP_TEST_DIST ? path.resolve(root, process.env.VMSNAP_TEST_DIST) : path.join(root, 'dist');
const dist = (p: string) => path.join(distRoot, p);

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
if (!input.verify) {
  process.stdout.write(JSON.stringify({ mutations }) + '\n');
} else {
  const { Repository } = (await import(dist('src/store/repository.js'))) as RepositoryModule;
  const { check } = (await import(dist('src/store/maintenance.js'))) as MaintenanceModule;
  const { exportStream } = (await import(dist('src/store/streams.js'))) as StreamsModule;
  const repo = await Repository.open(new LocalBackend(input.repo));
  const report = await check(repo, { readData: true });
  const snapshots: { id: string; source: string; sha256: string }[] = [];
  for (const s of await repo.listSnapshots()) {
    const hash = createHash('sha256');
    const sink = new Writable({
      write(chunk: Buffer, _enc, cb) {
        hash.update(chunk);
        cb();
      },
    });
    let sha256: string;
    try {
      await exportStream(repo, s.streams[0]!, { writable: sink });
      sha256 = hash.digest('hex');
    } catch (err) {
      sha256 = `export failed: ${(err as Error).message}`;
    }
    snapshots.push({ id: s.id, source: String(s.meta.source), sha256 });
  }
  await repo.close();
  process.stdout.write(JSON.stringify({ mutations, problems: report.problems, snapshots }) + '\n');
}
