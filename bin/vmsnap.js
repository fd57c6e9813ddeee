#!/usr/bin/env node
// The installed `vmsnap` command: runs the compiled CLI (npm run build writes dist/ and the bundle
// of it in dist/bundle/, which starts faster: scripts/bundle.mjs says why).
// File I/O (repository reads, export writes, the NBD data path) runs on libuv's thread pool; its
// default of 4 threads leaves the two cores idle while requests wait. Read at the pool's first use,
// so it must be set before anything touches the file system.
process.env.UV_THREADPOOL_SIZE ??= '16';
const { statSync } = await import('node:fs');
const mtime = (rel) => statSync(new URL(rel, import.meta.url), { throwIfNoEntry: false })?.mtimeMs ?? -1;
const bundled = mtime('../dist/bundle/main.js');
await import(bundled >= 0 && bundled >= mtime('../dist/cli/main.js') ? '../dist/bundle/main.js' : '../dist/cli/main.js');
