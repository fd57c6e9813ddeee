/**
 * Constants and types of the QEMU 10 migration stream as vmsnap reads and writes it. The layout is
 * drawn in parser.ts; this module only names its numbers.
 */
import { UserFacingError } from '../util/errors.js';

export const QEVM_MAGIC = 0x5145564d; // "QEVM"
export const QEVM_VERSION = 3;

/** Section types (migration/savevm.c QEMU_VM_*). */
export const SEC_EOF = 0x00;
export const SEC_START = 0x01;
export const SEC_PART = 0x02;
export const SEC_END = 0x03;
export const SEC_FULL = 0x04;
export const SEC_SUBSECTION = 0x05;
export const SEC_VMDESC = 0x06;
export const SEC_CONFIGURATION = 0x07;
export const SEC_COMMAND = 0x08;
export const SEC_FOOTER = 0x7e;

/** RAM record flags (migration/ram.c RAM_SAVE_FLAG_*), the low bits of the be64 offset word. */
export const RAM_ZERO = 0x02;
export const RAM_MEM_SIZE = 0x04;
export const RAM_PAGE = 0x08;
export const RAM_EOS = 0x10;
export const RAM_CONTINUE = 0x20;
export const RAM_XBZRLE = 0x40;
export const RAM_HOOK = 0x80;
export const RAM_COMPRESS = 0x100;
export const RAM_MULTIFD_FLUSH = 0x200;

export const RAM_FLAG_NAMES: ReadonlyArray<[number, string]> = [
  [RAM_ZERO, 'ZERO'],
  [RAM_MEM_SIZE, 'MEM_SIZE'],
  [RAM_PAGE, 'PAGE'],
  [RAM_EOS, 'EOS'],
  [RAM_CONTINUE, 'CONTINUE'],
  [RAM_XBZRLE, 'XBZRLE'],
  [RAM_HOOK, 'HOOK(RDMA)'],
  [RAM_COMPRESS, 'COMPRESS'],
  [RAM_MULTIFD_FLUSH, 'MULTIFD_FLUSH'],
];

export function describeRamFlags(flags: number): string {
  const names = RAM_FLAG_NAMES.filter(([f]) => (flags & f) !== 0).map(([, n]) => n);
  const known = RAM_FLAG_NAMES.reduce((a, [f]) => a | f, 0);
  if (flags & ~known) names.push(`unknown 0x${(flags & ~known).toString(16)}`);
  return `0x${flags.toString(16)} (${names.join('|') || 'none'})`;
}

/** COMMAND sub-commands (savevm.c enum qemu_vm_cmd); the only one vmsnap accepts. */
export const MIG_CMD_SWITCHOVER_START = 11;

/** TARGET_PAGE_SIZE on x86. */
export const PAGE_SIZE = 4096;
export const PAGE_SHIFT = 12;
export const RAM_SECTION_VERSION = 4;

/** Limits that turn hostile lengths into errors instead of allocations. */
export const MAX_MACHINE_NAME = 256;
export const MAX_RAM_BLOCKS = 4096;
export const DEFAULT_MAX_SUFFIX_BYTES = 256 << 20;

export class MigrationStreamError extends UserFacingError {
  override readonly name = 'MigrationStreamError';
  constructor(
    readonly what: string,
    /** Absolute byte offset in the stream where the problem was found. */
    readonly offset: number,
  ) {
    super(`migration stream: ${what} at offset ${offset}`);
  }
}

export class MigrationBuildError extends Error {
  override readonly name = 'MigrationBuildError';
}

export interface RamBlock {
  name: string;
  usedLength: number;
}

export interface StreamPrefix {
  /** Verbatim bytes: magic, version, CONFIGURATION, RAM START section through its footer. */
  bytes: Buffer;
  machine: string;
  pageSize: number;
  ramSectionId: number;
  blocks: RamBlock[];
}

export type PageKind = 'page' | 'zero';

export interface PageRecord {
  /** Index into StreamPrefix.blocks. */
  block: number;
  /** Byte offset inside the block, a multiple of the page size. */
  offset: number;
  kind: PageKind;
  /** 4096 bytes for kind 'page'; a view into the parser's input (see parser.ts for its lifetime). */
  data?: Buffer;
  /** For kind 'page': the stream offset of `data`'s first byte (a relay cuts the stream there). */
  at?: number;
}

export interface StreamTail {
  /** COMMAND sections seen after RAM START (verbatim, in order), e.g. switchover-start. */
  commands: Buffer[];
  /** Verbatim bytes from the first device FULL section (or EOF) to the end of the stream. */
  suffix: Buffer;
  /** How the suffix ends: EOF + vmdesc JSON, or a bare EOF (machine suppress-vmdesc=on). */
  trailer: 'vmdesc' | 'eof';
}

export interface StreamStats {
  bytes: number;
  pageRecords: number;
  zeroRecords: number;
  ramSections: number;
  endSections: number;
}
