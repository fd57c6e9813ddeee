/**
 * The CD-ROM drive's medium: `vm eject` / `vm insert`. The definition's `cdrom` field is the
 * medium the next QEMU of the VM starts with; a running QEMU changes it over QMP first, then the
 * definition follows, so the two never disagree once the command returned.
 *
 * A VM defined before vmsnap VMs had a CD-ROM drive (no `cdrom` field) has none: adding one would
 * change its devices, and its snapshots would no longer restore into it.
 */
import type { QmpClient } from '../hypervisor/qmp.js';
import { CDROM_ID } from '../hypervisor/qemu.js';
import { loadDefinition, saveDefinition, VmConfigError, type VmDefinition } from './config.js';

function checkHasDrive(def: VmDefinition): void {
  if (def.cdrom === undefined) throw new VmConfigError(`VM ${def.name} has no CD-ROM drive (it was created before vmsnap VMs had one); create a new VM with --cdrom`);
}

/** A stopped VM: the definition changes, the next start uses it. */
export async function setMedium(dataDir: string, name: string, medium: string | null): Promise<void> {
  const def = await loadDefinition(dataDir, name);
  checkHasDrive(def);
  await saveDefinition(dataDir, { ...def, cdrom: medium });
}

/**
 * A running VM: the tray is opened and the medium removed (`force`: a guest that locked the tray
 * still gets it ejected, as the eject button of a real drive would not), then the new one is put
 * in and the tray closed; `def` (the runtime's) and the saved definition follow.
 */
export async function changeMedium(qmp: QmpClient, dataDir: string, def: VmDefinition, medium: string | null): Promise<void> {
  checkHasDrive(def);
  if (medium === null) await qmp.execute('eject', { id: CDROM_ID, force: true });
  else await qmp.execute('blockdev-change-medium', { id: CDROM_ID, filename: medium, format: 'raw', 'read-only-mode': 'read-only' });
  def.cdrom = medium;
  await saveDefinition(dataDir, def);
}
