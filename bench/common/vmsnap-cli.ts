/**
 * The vmsnap CLI as a user runs it (what bin/vmsnap.js loads), compiled by tsc into the bench
 * directory: the shared dist/ belongs to whoever runs `npm run build`, and a benchmark must not
 * race a build another engineer is running.
 */
import { promises as fsp, existsSync } from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { check, freshDir } from './measure.js';

export const REPO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');

/**
 * Compiles src/ and cli/ into `<root>/<name>`, bundles it like `npm run build`, and returns the
 * bundle's entry (bundle/main.js there). Each suite uses its own name, so one suite's build never
 * replaces the files another is running.
 */
export async function buildCli(root: string, name: string): Promise<string> {
  const out = path.join(root, name);
  await fsp.rm(out, { recursive: true, force: true });
  await fsp.mkdir(out, { recursive: true });
  await check(path.join(REPO_ROOT, 'node_modules/.bin/tsc'), ['-p', path.join(REPO_ROOT, 'tsconfig.build.json'), '--outDir', out], { cwd: REPO_ROOT });
  // ESM like the package, and the project's node_modules for bare imports.
  await fsp.writeFile(path.join(out, 'package.json'), '{ "type": "module" }\n');
  await fsp.symlink(path.join(REPO_ROOT, 'node_modules'), path.join(out, 'node_modules'));
  // Native helpers built by scripts/setup.sh (src/util/project.ts looks for them beside package.json).
  await fsp.symlink(path.join(REPO_ROOT, '.cache'), path.join(out, '.cache'));
  const main = path.join(out, 'cli/main.js');
  if (!existsSync(main)) throw new Error(`tsc did not produce ${main}`);
  // Then bundled, as `npm run build` does (scripts/bundle.mjs): what bin/vmsnap.js runs, start-up included.
  await check(process.execPath, [path.join(REPO_ROOT, 'scripts/bundle.mjs'), out], { cwd: REPO_ROOT });
  const bundled = path.join(out, 'bundle/main.js');
  if (!existsSync(bundled)) throw new Error(`scripts/bundle.mjs did not produce ${bundled}`);
  return bundled;
}

/**
 * A CLI build that can run VMs — the supervisor re-executes `<install root>/bin/vmsnap.js`, so the
 * build gets its own — with a fresh data directory and an initialised repository under `root`.
 * `cli` runs one command as a user does and resolves with its stdout.
 */
export async function vmCli(root: string, name: string): Promise<{ cli: (args: string[]) => Promise<string>; dataDir: string; repo: string }> {
  const cliMain = await buildCli(root, `build-${name}`);
  const buildDir = path.dirname(path.dirname(cliMain));
  await fsp.mkdir(path.join(buildDir, 'bin'), { recursive: true });
  await fsp.writeFile(path.join(buildDir, 'bin', 'vmsnap.js'), "process.env.UV_THREADPOOL_SIZE ??= '16';\nawait import('../bundle/main.js');\n");
  const dataDir = await freshDir(root, `${name}-data`);
  const repo = await freshDir(root, `${name}-repo`);
  await fsp.rm(repo, { recursive: true });
  const env = { ...process.env, VMSNAP_DATA_DIR: dataDir, VMSNAP_REPO: repo };
  const cli = (args: string[]): Promise<string> => check(process.execPath, [cliMain, ...args], { env });
  await cli(['init']);
  return { cli, dataDir, repo };
}
