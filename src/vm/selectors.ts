/**
 * Snapshot selectors for VM operations. A selector means what the context it is typed in says:
 *
 *   for VM X (restore X SEL, vm start X --restore SEL)
 *     latest / X:latest   X's latest snapshot — never another VM's, whatever was taken last
 *     Y:latest (Y ≠ X)    refused: putting X on another VM's state needs that snapshot's id…
 *     an id of Y's        …and the caller's explicit confirmation (`--from-other-vm`), because it
 *                         replaces X's RAM, devices and disks with Y's
 *   with no VM implied (clone SEL NEW, vm create --disk-from SEL:disk)
 *     latest              accepted only while the repository holds snapshots of one VM; with
 *                         several it is ambiguous and refused, naming them (say Y:latest or an id)
 *     Y:latest, an id     as the repository resolves them
 */
import type { Repository } from '../store/repository.js';
import type { Snapshot } from '../store/manifest.js';
import { UserFacingError } from '../util/errors.js';

export class SnapshotSelectorError extends UserFacingError {
  override readonly name = 'SnapshotSelectorError';
}

/** The flag that confirms restoring a snapshot of another VM (named once, for every message). */
export const FROM_OTHER_VM_FLAG = '--from-other-vm';

const LATEST = /^(?:(.+):)?latest$/;

/** Resolves `ref` as a snapshot to put VM `vm` on (restore): see the table above. */
export async function resolveForVm(repo: Repository, ref: string, vm: string, o: { fromOtherVm: boolean }): Promise<Snapshot> {
  const latest = LATEST.exec(ref);
  if (latest) {
    const owner = latest[1] ?? vm;
    if (owner !== vm) {
      throw new SnapshotSelectorError(
        `${ref} is VM ${owner}'s latest snapshot, not ${vm}'s: to put ${vm} on a snapshot of another VM give that snapshot's id and ${FROM_OTHER_VM_FLAG}`,
      );
    }
    return repo.resolveSnapshot(`${vm}:latest`);
  }
  const snap = await repo.resolveSnapshot(ref);
  if (snap.vm !== vm && !o.fromOtherVm) {
    const id = snap.id.slice(0, 12);
    throw new SnapshotSelectorError(
      `snapshot ${id} was taken of VM ${snap.vm}, not ${vm}: restoring it replaces ${vm}'s RAM, devices and disks with ${snap.vm}'s. ` +
        `Pass ${FROM_OTHER_VM_FLAG} to do that, or run it beside ${vm} as a new VM: vmsnap clone ${id} NEWVM`,
    );
  }
  return snap;
}

/** Resolves `ref` where no VM is implied (clone, --disk-from): a bare `latest` must be unambiguous. */
export async function resolveUnscoped(repo: Repository, ref: string): Promise<Snapshot> {
  if (ref === 'latest') {
    const vms = [...new Set((await repo.listSnapshotSummaries()).map((s) => s.vm))].sort();
    if (vms.length > 1) {
      throw new SnapshotSelectorError(`"latest" is ambiguous: the repository holds snapshots of VMs ${vms.join(', ')}; say whose (e.g. ${vms[0]}:latest) or give a snapshot id`);
    }
  }
  return repo.resolveSnapshot(ref);
}
