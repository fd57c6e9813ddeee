/**
 * `vm view`: where a VM's screen is and which program shows it. A vnc or spice display is served
 * on a unix socket in the VM's run dir (private to its user, no password needed); remote-viewer
 * (Debian package virt-viewer) opens both as `vnc+unix://` / `spice+unix://` addresses. A gtk
 * display is QEMU's own window; none has no screen.
 */
import { constants as fsc, promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { VmConfigError, type VmDefinition, type VmPaths } from './config.js';
import { screenSocket } from './devices.js';

export interface ViewTarget {
  /** e.g. spice+unix:///…/run/spice.sock */
  address: string;
  /** remote-viewer's path when it is installed. */
  viewer: string | null;
}

export async function viewTarget(def: VmDefinition, paths: VmPaths): Promise<ViewTarget> {
  if (def.display === 'none') throw new VmConfigError(`VM ${def.name} has no display (it was created with --display none)`);
  if (def.display === 'gtk') throw new VmConfigError(`VM ${def.name} shows its screen in QEMU's own window (--display gtk) on the desktop it was started from`);
  const socket = screenSocket(def, paths)!;
  return { address: `${def.display}+unix://${socket}`, viewer: await onPath('remote-viewer') };
}

async function onPath(program: string): Promise<string | null> {
  for (const dir of (process.env.PATH ?? '').split(path.delimiter)) {
    if (!dir) continue;
    const f = path.join(dir, program);
    if (await fsp.access(f, fsc.X_OK).then(() => true, () => false)) return f;
  }
  return null;
}
