/** The QEMU driver's lower half: QMP, process launcher, migration stream, snapshot capture/restore. */
export * from './qmp.js';
export * from './qemu.js';
export * from './snapshot.js';
export * from './migstream/index.js';
