/**
 * A UEFI VM's firmware variables in its snapshots: the `nvram` stream (kind device), the bytes of
 * <vm>/nvram.fd. Every snapshot of a UEFI VM carries it (a variable the guest set after the
 * snapshot is gone after restore), and a clone starts with it.
 *
 * For a live snapshot, QEMU's own copy of the variables (the pflash RAM block) also travels in the
 * RAM stream and QEMU writes it back into the file when the restored guest runs; the stream here is
 * read from the file after the snapshot point, which is exact for a stopped VM and for a guest that
 * did not write variables in that moment (guests write them at boot and on explicit changes).
 */
import { promises as fsp } from 'node:fs';
import type { Repository } from '../store/repository.js';
import type { Snapshot, StreamRecord } from '../store/manifest.js';
import { loadBytes, storeBytes } from './ram-store.js';
import { vmPaths, type VmDefinition } from './config.js';

export const NVRAM_STREAM = 'nvram';

/** The VM's variables as a stream to commit with the snapshot; none for a BIOS VM. */
export async function storeNvram(repo: Repository, dataDir: string, def: VmDefinition): Promise<StreamRecord[]> {
  if (def.firmware !== 'uefi') return [];
  return [await storeBytes(repo, NVRAM_STREAM, 'device', await fsp.readFile(vmPaths(dataDir, def.name).nvram))];
}

/** The snapshot's variables, or null (a BIOS VM, or a snapshot taken before they were stored). */
export async function loadNvram(repo: Repository, snap: Snapshot): Promise<Buffer | null> {
  const s = snap.streams.find((x) => x.name === NVRAM_STREAM);
  return s ? loadBytes(repo, s) : null;
}
