/** Public surface of the migration stream parser/rebuilder (layout drawn in parser.ts). */
export * from './format.js';
export {
  MigStreamParser,
  migrationStreamEvents,
  parseMigrationStream,
  parsePrefix,
  type MigStreamEvent,
  type MigStreamSink,
  type ParsedStream,
  type ParserOptions,
} from './parser.js';
export { buildStream, type BuildOptions, type RebuildPage } from './builder.js';
export { MigStreamRelay, type RelayPiece } from './relay.js';
