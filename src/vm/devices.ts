/**
 * The devices a VM definition implies beyond CPU, memory and disks: firmware, CD-ROM drive,
 * network, guest agent channel. One function, used by every QEMU a VM's supervisor launches
 * (start, restore target), so a snapshot's device state always meets the same devices.
 *
 * Checked at each launch, with errors naming the cause: the UEFI code image still installed, the
 * VM's variables file present, the ISO in the drive still there, the forwarded host ports free.
 */
import { promises as fsp } from 'node:fs';
import { checkFirmwareCode } from '../hypervisor/firmware.js';
import type { QemuLaunchOptions } from '../hypervisor/qemu.js';
import { checkPortsFree } from './create.js';
import { VmConfigError, type VmDefinition, type VmPaths } from './config.js';

export type DeviceOptions = Pick<QemuLaunchOptions, 'firmware' | 'cdrom' | 'net' | 'agentSocket' | 'screen'> & { displayArgs?: string[] };

/** Where a VM's screen is served (vnc, spice), or null. */
export function screenSocket(def: VmDefinition, paths: VmPaths): string | null {
  return def.display === 'vnc' || def.display === 'spice' ? `${paths.runDir}/${def.display}.sock` : null;
}

export async function launchDevices(def: VmDefinition, paths: VmPaths): Promise<DeviceOptions> {
  const o: DeviceOptions = {};
  if (def.firmware === 'uefi') {
    await checkFirmwareCode(def.firmwareCode!);
    if (!(await fsp.stat(paths.nvram).catch(() => null))) throw new VmConfigError(`VM ${def.name} is a UEFI VM but its variables file ${paths.nvram} is missing`);
    o.firmware = { code: def.firmwareCode!, vars: paths.nvram };
  }
  if (def.cdrom !== undefined) {
    if (def.cdrom !== null && !(await fsp.stat(def.cdrom).catch(() => null))) {
      throw new VmConfigError(`the ISO in VM ${def.name}'s CD-ROM drive, ${def.cdrom}, is gone: \`vmsnap vm eject ${def.name}\` or \`vmsnap vm insert ${def.name} ISO\``);
    }
    o.cdrom = { medium: def.cdrom };
  }
  if (def.net?.mode === 'user') {
    await checkPortsFree(def.net.forwards);
    o.net = { mac: def.net.mac, forwards: def.net.forwards };
  }
  if (def.agent) o.agentSocket = paths.agentSocket;
  const socket = screenSocket(def, paths);
  if (def.video && def.display !== 'none') o.screen = def.display === 'gtk' ? { kind: 'gtk' } : { kind: def.display, socket: socket! };
  // A definition from before `video`: its display exactly as it was launched then.
  else if (!def.video && def.display !== 'none') o.displayArgs = def.display === 'vnc' ? ['-display', `vnc=unix:${socket}`] : ['-display', 'gtk'];
  return o;
}

/**
 * How two definitions differ in the devices a snapshot's state must meet (restore refuses a
 * snapshot of another shape before it stops anything); the medium in the drive and the MAC may differ.
 */
export function deviceShapeDifferences(taken: VmDefinition, def: VmDefinition): string[] {
  const shape = (d: VmDefinition) => ({
    firmware: d.firmware ?? 'bios',
    'CD-ROM drive': d.cdrom === undefined ? 'none' : 'present',
    network: d.net?.mode ?? 'none',
    'guest agent channel': d.agent ? 'present' : 'none',
    'video adapter': d.video ? (d.display === 'spice' ? 'present (spice)' : 'present') : 'none',
  });
  const [a, b] = [shape(taken), shape(def)];
  return (Object.keys(a) as (keyof typeof a)[]).filter((k) => a[k] !== b[k]).map((k) => `${k} ${a[k]} vs ${b[k]}`);
}
