export * from './chunk-store.js';
export { BaseReader, BaseReadError, type BaseReaderOptions } from './base-reader.js';
export * from './volume.js';
export * from './snapshot.js';
export * from './nbd-server.js';
export { registerVolumeCommands, parseSize, volumeDir, VolumeCliError, type VolumeCliContext } from './cli.js';
