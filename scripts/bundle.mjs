/**
 * Bundles the compiled CLI (dist/cli/main.js and everything it imports from src/) into
 * dist/bundle/: one file per entry point plus shared chunks, npm packages left as imports.
 *
 * Why: every vmsnap command is a fresh Node process, and resolving, reading and compiling the ~120
 * separate ESM files of dist/ cost about 150 ms before the command does anything (measured on this
 * 2-core machine: `vmsnap --version` 0.40 s from dist/, 0.25 s from the bundle; `node -e 0` 0.10 s).
 * A 1%-change take is a few hundred milliseconds of work, so start-up was a third of it.
 *
 * chunk-worker.js is its own entry point: src/store/workers.ts starts it by its path beside the
 * module that spawns it, which in the bundle is this directory.
 * bin/vmsnap.js runs the bundle only when it is at least as new as dist/cli/main.js, so a plain
 * `tsc` build is never shadowed by an older bundle.
 */
import { build } from 'esbuild';
import { rmSync } from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const dist = process.argv[2] ? path.resolve(process.argv[2]) : path.join(root, 'dist');
const out = path.join(dist, 'bundle');
rmSync(out, { recursive: true, force: true });
await build({
  entryPoints: [path.join(dist, 'cli/main.js'), path.join(dist, 'src/store/chunk-worker.js')],
  bundle: true,
  splitting: true,
  format: 'esm',
  platform: 'node',
  target: 'node20',
  packages: 'external',
  outdir: out,
  entryNames: '[name]',
  sourcemap: 'linked',
  logLevel: 'warning',
});
