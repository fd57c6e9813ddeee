/**
 * VM definitions and their on-disk home.
 *
 *   <dataDir>/vms/<name>/vm.json         the definition (below), replaced atomically
 *   <dataDir>/vms/<name>/state.json      { lastSnapshot, repo } — what `take` diffs against
 *   <dataDir>/vms/<name>/disks/<disk>/   one copy-on-write volume per disk (src/cow)
 *   <dataDir>/vms/<name>/run/            supervisor.sock, nbd.sock, qmp.sock, serial.log,
 *                                        qemu.log, supervisor.log, supervisor.pid — while running
 *
 * vm.json: { "version": 1, "name", "memoryMiB", "cpus", "machine", "accel": "auto"|"kvm"|"tcg",
 *            "kernel"?, "initrd"?, "append"?, "display": "none"|"gtk"|"vnc", "qemuArgs": [],
 *            "disks": [{ "name": "disk0", "size": bytes }], "created",
 *            "firmware"?: "bios"|"uefi", "firmwareCode"?: path,     (absent: bios)
 *            "cdrom"?: path|null,                                   (absent: no CD-ROM drive; null: empty drive)
 *            "net"?: { "mode": "user"|"none", "mac", "forwards": [{ "proto", "hostAddr", "hostPort", "guestPort" }] },
 *            "agent"?: true,                                        (the guest agent channel)
 *            "video"?: true }                                       (VGA + USB tablet [+ spice-vdagent channel])
 * Every field after "created" is optional so that definitions written before it still load; an
 * absent field means the device is absent, because a snapshot's device state only loads into a
 * QEMU with the same devices (`vm create` writes them all for new VMs: src/vm/create.ts).
 * A UEFI VM's variables live in <dir>/nvram.fd (copied from OVMF's template at create; stored in
 * every snapshot as its `nvram` stream and put back by restore).
 * A snapshot stores vm.json as its `vm-config` stream, so `clone` and shape checks need nothing else.
 */
import { promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { atomicWriteFile, containedPath, exists } from '../util/fs.js';
import { checkName } from '../store/manifest.js';
import { DEFAULT_MACHINE_TYPE } from '../hypervisor/qemu.js';
import { UserFacingError } from '../util/errors.js';
import { processAlive } from '../util/process.js';

export class VmConfigError extends UserFacingError {
  override readonly name = 'VmConfigError';
}

export interface DiskDef {
  name: string;
  size: number;
}

export interface PortForward {
  proto: 'tcp' | 'udp';
  /** Host address QEMU listens on (127.0.0.1 unless given: a desktop VM is not served to the LAN by default). */
  hostAddr: string;
  hostPort: number;
  guestPort: number;
}

export interface NetDef {
  /** user: QEMU's user-mode network (NAT, no root); none: a NIC-less VM that still has a MAC for later. */
  mode: 'user' | 'none';
  /** Locally administered unicast (52:54:00:xx:xx:xx), fixed for the VM's life; a clone gets its own. */
  mac: string;
  forwards: PortForward[];
}

export interface VmDefinition {
  version: 1;
  name: string;
  memoryMiB: number;
  cpus: number;
  machine: string;
  accel: 'auto' | 'kvm' | 'tcg';
  kernel?: string;
  initrd?: string;
  append?: string;
  display: 'none' | 'gtk' | 'vnc' | 'spice';
  qemuArgs: string[];
  disks: DiskDef[];
  created: string;
  firmware?: 'bios' | 'uefi';
  /** UEFI: the OVMF code image chosen at create (its variables template has the matching size). */
  firmwareCode?: string;
  cdrom?: string | null;
  net?: NetDef;
  agent?: boolean;
  /**
   * A VGA adapter and a USB tablet (absolute pointer), and with spice the spice-vdagent channel
   * (clipboard, resize): set at create when the display is not none. Absent in definitions from
   * before it, whose display is kept as it was (a QEMU display without a video device).
   */
  video?: boolean;
}

export interface VmState {
  lastSnapshot: string | null;
}

export interface VmPaths {
  dir: string;
  config: string;
  state: string;
  disksDir: string;
  runDir: string;
  supervisorSocket: string;
  nbdSocket: string;
  supervisorLog: string;
  supervisorPid: string;
  serialLog: string;
  qemuLog: string;
  /** Present (holding the worker's pid) while the VM arrives by live migration (migration/incoming.ts). */
  incomingMarker: string;
  /** Present (with the pid) while a cold migration ships this stopped VM away: `vm start` refuses. */
  departingMarker: string;
  /** Written once the guest runs on another host, until this VM is removed here (supervisor.ts). */
  departedMarker: string;
  /** A UEFI VM's own variables (pflash 1). */
  nvram: string;
  /** The guest agent's virtio-serial channel (QEMU listens). */
  agentSocket: string;
}

export function vmPaths(dataDir: string, name: string): VmPaths {
  checkName('VM name', name);
  const dir = containedPath(path.join(dataDir, 'vms'), name);
  const runDir = path.join(dir, 'run');
  return {
    dir,
    config: path.join(dir, 'vm.json'),
    state: path.join(dir, 'state.json'),
    disksDir: path.join(dir, 'disks'),
    runDir,
    supervisorSocket: path.join(runDir, 'supervisor.sock'),
    nbdSocket: path.join(runDir, 'nbd.sock'),
    supervisorLog: path.join(runDir, 'supervisor.log'),
    supervisorPid: path.join(runDir, 'supervisor.pid'),
    serialLog: path.join(runDir, 'serial.log'),
    qemuLog: path.join(runDir, 'qemu.log'),
    incomingMarker: path.join(dir, 'incoming'),
    departingMarker: path.join(dir, 'departing'),
    departedMarker: path.join(dir, 'departed'),
    nvram: path.join(dir, 'nvram.fd'),
    agentSocket: path.join(runDir, 'agent.sock'),
  };
}

/**
 * The longest unix socket path under a VM's run dir: a take's migration socket (snapshot.ts:
 * mkdtemp 'vmsnap-mig-' adds 6 characters, then mig.sock).
 */
const LONGEST_SOCKET = path.join('vmsnap-mig-XXXXXX', 'mig.sock');
/** sun_path holds 108 bytes with its terminating NUL. */
const SOCKET_PATH_MAX = 107;

/**
 * Refuses a VM name (for this data directory) whose sockets would not fit a unix socket address:
 * such a VM could be defined but never started (its supervisor would time out binding).
 */
export function checkVmPathsFit(dataDir: string, name: string): void {
  const longest = path.join(vmPaths(dataDir, name).runDir, LONGEST_SOCKET);
  const over = Buffer.byteLength(longest) - SOCKET_PATH_MAX;
  if (over <= 0) return;
  const fits = Buffer.byteLength(name) - over;
  throw new VmConfigError(
    fits > 0
      ? `VM name ${JSON.stringify(name)} is too long for data directory ${dataDir}: its sockets (e.g. ${longest}) would be ${over} bytes over the ${SOCKET_PATH_MAX} a unix socket path may have; use a name of at most ${fits} bytes`
      : `data directory ${dataDir} is too long: a VM's sockets under it would not fit a unix socket path (${SOCKET_PATH_MAX} bytes); set VMSNAP_DATA_DIR to a shorter path`,
  );
}

export function diskDir(p: VmPaths, disk: string): string {
  return containedPath(p.disksDir, checkName('disk name', disk));
}

export function validateDefinition(d: VmDefinition): VmDefinition {
  checkName('VM name', d.name);
  if (!Number.isInteger(d.memoryMiB) || d.memoryMiB < 16 || d.memoryMiB > 1 << 20) throw new VmConfigError(`memory must be between 16 MiB and 1 TiB, got ${d.memoryMiB} MiB`);
  if (!Number.isInteger(d.cpus) || d.cpus < 1 || d.cpus > 64) throw new VmConfigError(`cpus must be between 1 and 64, got ${d.cpus}`);
  if (!['auto', 'kvm', 'tcg'].includes(d.accel)) throw new VmConfigError(`accel must be auto, kvm or tcg, got ${d.accel}`);
  if (!['none', 'gtk', 'vnc', 'spice'].includes(d.display)) throw new VmConfigError(`display must be none, spice, vnc or gtk, got ${d.display}`);
  const names = new Set<string>();
  for (const disk of d.disks) {
    checkName('disk name', disk.name);
    if (names.has(disk.name)) throw new VmConfigError(`disk ${disk.name} appears twice`);
    names.add(disk.name);
    if (!Number.isSafeInteger(disk.size) || disk.size <= 0) throw new VmConfigError(`disk ${disk.name}: invalid size ${disk.size}`);
  }
  if (d.firmware !== undefined && d.firmware !== 'bios' && d.firmware !== 'uefi') throw new VmConfigError(`firmware must be bios or uefi, got ${String(d.firmware)}`);
  if (d.firmware === 'uefi' && typeof d.firmwareCode !== 'string') throw new VmConfigError('a UEFI VM names its OVMF code image (firmwareCode)');
  if (d.cdrom !== undefined && d.cdrom !== null && typeof d.cdrom !== 'string') throw new VmConfigError('cdrom must be a path or null');
  if (d.net !== undefined) validateNet(d.net);
  return d;
}

const MAC_RE = /^52:54:00(:[0-9a-f]{2}){3}$/;

function validateNet(n: NetDef): void {
  if (n.mode !== 'user' && n.mode !== 'none') throw new VmConfigError(`network must be user or none, got ${String(n.mode)}`);
  if (!MAC_RE.test(n.mac)) throw new VmConfigError(`MAC address ${n.mac} is not of the form 52:54:00:xx:xx:xx`);
  const seen = new Set<string>();
  for (const f of n.forwards) {
    if (f.proto !== 'tcp' && f.proto !== 'udp') throw new VmConfigError(`port forward protocol must be tcp or udp, got ${String(f.proto)}`);
    for (const port of [f.hostPort, f.guestPort]) if (!Number.isInteger(port) || port < 1 || port > 65535) throw new VmConfigError(`port ${port} is not between 1 and 65535`);
    const key = `${f.proto}:${f.hostAddr}:${f.hostPort}`;
    if (seen.has(key)) throw new VmConfigError(`host port ${f.proto}:${f.hostPort} is forwarded twice`);
    seen.add(key);
  }
  if (n.mode === 'none' && n.forwards.length) throw new VmConfigError('port forwards need a network (--net user)');
}

export function newDefinition(p: Partial<VmDefinition> & { name: string }): VmDefinition {
  return validateDefinition({
    version: 1,
    memoryMiB: 256,
    cpus: 1,
    machine: DEFAULT_MACHINE_TYPE,
    accel: 'auto',
    display: 'none',
    qemuArgs: [],
    disks: [],
    created: new Date().toISOString(),
    ...p,
  });
}

export function parseDefinition(bytes: Buffer | string, where: string): VmDefinition {
  let d: unknown;
  try {
    d = JSON.parse(bytes.toString());
  } catch {
    throw new VmConfigError(`${where}: VM definition is not valid JSON`);
  }
  if (typeof d !== 'object' || d === null || (d as { version?: unknown }).version !== 1) throw new VmConfigError(`${where}: unsupported VM definition`);
  return validateDefinition(d as VmDefinition);
}

export async function loadDefinition(dataDir: string, name: string): Promise<VmDefinition> {
  const p = vmPaths(dataDir, name);
  let bytes: Buffer;
  try {
    bytes = await fsp.readFile(p.config);
  } catch {
    throw new VmConfigError(`no VM named ${name} (see \`vmsnap vm ls\`)`);
  }
  return parseDefinition(bytes, p.config);
}

export async function saveDefinition(dataDir: string, d: VmDefinition): Promise<void> {
  const p = vmPaths(dataDir, d.name);
  await fsp.mkdir(p.dir, { recursive: true, mode: 0o700 });
  await atomicWriteFile(p.config, JSON.stringify(d, null, 2));
}

export async function loadState(dataDir: string, name: string): Promise<VmState> {
  try {
    return JSON.parse(await fsp.readFile(vmPaths(dataDir, name).state, 'utf8')) as VmState;
  } catch {
    return { lastSnapshot: null };
  }
}

export async function saveState(dataDir: string, name: string, s: VmState): Promise<void> {
  await atomicWriteFile(vmPaths(dataDir, name).state, JSON.stringify(s));
}

export async function listVms(dataDir: string): Promise<string[]> {
  const root = path.join(dataDir, 'vms');
  if (!(await exists(root))) return [];
  const out: string[] = [];
  for (const n of await fsp.readdir(root)) if (await exists(path.join(root, n, 'vm.json'))) out.push(n);
  return out.sort();
}

/** The `departed` marker of a VM that moved away (null: none): where to, and whether its writer lives. */
export async function readDepartedMarker(paths: VmPaths): Promise<{ to: string; pid: number; alive: boolean } | null> {
  const text = await fsp.readFile(paths.departedMarker, 'utf8').catch(() => null);
  if (text === null) return null;
  const [pidLine, to] = text.split('\n');
  const pid = Number(pidLine);
  return { to: to || 'another host', pid, alive: pid > 0 && processAlive(pid) };
}
