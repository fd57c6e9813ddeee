/**
 * The vmsnap CLI as a user runs it (what bin/vmsnap.js loads), compiled by tsc into the bench
 * directory: the shared dist/ belongs to whoever runs `npm run build`, and a benchmark must not
 * race a build another engineer is running.
 */
import { promises as fsp, existsSync } from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { check } from './measure.js';

export const REPO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');

/**
 * Compiles src/ and cli/ into `<root>/<name>` and returns the path of cli/main.js there. Each suite
 * uses its own name, so one suite's build never replaces the files another is running.
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
  return main;
}
