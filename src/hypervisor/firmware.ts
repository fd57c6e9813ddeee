/**
 * UEFI firmware for x86 guests: Debian's OVMF (package `ovmf`). A UEFI VM runs OVMF's code image
 * read-only (pflash 0) and its own copy of the variables template (pflash 1), which the guest
 * writes (boot entries, Secure Boot keys, its own variables).
 *
 * Code and variables images come in matched pairs (the 4 MiB build and the older 2 MiB one); a
 * variables file only works with the code image of its size, so a VM records the code image it
 * was created with and keeps using it.
 *
 * VMSNAP_OVMF_DIR replaces the search path (tests, and hosts that keep OVMF elsewhere).
 */
import { promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { UserFacingError } from '../util/errors.js';

export class FirmwareMissingError extends UserFacingError {
  override readonly name = 'FirmwareMissingError';
}

export interface OvmfPair {
  code: string;
  varsTemplate: string;
}

const DEFAULT_DIRS = ['/usr/share/OVMF', '/usr/share/edk2/ovmf', '/usr/share/qemu'];
/** Without Secure Boot keys enrolled: a guest installer boots whatever it brings. */
const PAIRS: readonly [string, string][] = [
  ['OVMF_CODE_4M.fd', 'OVMF_VARS_4M.fd'],
  ['OVMF_CODE.fd', 'OVMF_VARS.fd'],
];

function searchDirs(): string[] {
  const env = process.env.VMSNAP_OVMF_DIR;
  return env ? [env] : DEFAULT_DIRS;
}

async function readable(f: string): Promise<boolean> {
  return fsp.access(f).then(
    () => true,
    () => false,
  );
}

/** The first OVMF code + variables pair found; FirmwareMissingError naming where it looked. */
export async function findOvmf(): Promise<OvmfPair> {
  const dirs = searchDirs();
  for (const dir of dirs) {
    for (const [code, vars] of PAIRS) {
      const pair = { code: path.join(dir, code), varsTemplate: path.join(dir, vars) };
      if ((await readable(pair.code)) && (await readable(pair.varsTemplate))) return pair;
    }
  }
  throw new FirmwareMissingError(
    `UEFI firmware (OVMF) not found: looked for ${PAIRS.map((p) => p.join(' + ')).join(' or ')} in ${dirs.join(', ')}; install the Debian package ovmf (or set VMSNAP_OVMF_DIR)`,
  );
}

/** The variables template that pairs with `code` (same folder, same build). */
export function varsTemplateFor(code: string): string {
  const base = path.basename(code);
  const pair = PAIRS.find(([c]) => c === base);
  return path.join(path.dirname(code), pair ? pair[1] : base.replace('CODE', 'VARS'));
}

/** Throws FirmwareMissingError when a UEFI VM's code image is gone (a removed or upgraded ovmf). */
export async function checkFirmwareCode(code: string): Promise<void> {
  if (!(await readable(code))) throw new FirmwareMissingError(`UEFI firmware ${code}, which this VM was created with, is missing; install the Debian package ovmf`);
}
