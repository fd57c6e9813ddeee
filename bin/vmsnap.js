#!/usr/bin/env node
// The installed `vmsnap` command: runs the compiled CLI (npm run build writes dist/).
// File I/O (repository reads, export writes, the NBD data path) runs on libuv's thread pool; its
// default of 4 threads leaves the two cores idle while requests wait. Read at the pool's first use,
// so it must be set before anything touches the file system.
process.env.UV_THREADPOOL_SIZE ??= '16';
await import('../dist/cli/main.js');
