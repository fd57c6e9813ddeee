/**
 * `vm create`: from what a user typed to a checked VM definition, before anything is written.
 *
 * Contract: `buildDefinition` validates every option (sizes, files that must exist, port forwards
 * whose host ports must be free now, firmware that must be installed) and fills the defaults of a
 * new VM — user-mode networking with a fresh MAC, the guest agent channel, BIOS firmware — and
 * throws a VmConfigError naming the bad option otherwise. It writes nothing: the caller creates
 * the disks and then calls `writeNewVm`, and removes the VM folder if any step fails, so a refused
 * create leaves no VM behind.
 *
 * Defaults differ from definitions written before these devices existed (config.ts): there an
 * absent field means "no such device", so their snapshots still restore into the same machine.
 */
import { randomBytes } from 'node:crypto';
import * as dgram from 'node:dgram';
import { constants as fsc, promises as fsp } from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { findOvmf, varsTemplateFor } from '../hypervisor/firmware.js';
import { atomicWriteFile } from '../util/fs.js';
import { parseSize } from '../util/size.js';
import { newDefinition, saveDefinition, VmConfigError, vmPaths, type DiskDef, type NetDef, type PortForward, type VmDefinition } from './config.js';

/** The options of `vm create`, as typed (strings); the CLI only parses argv into this. */
export interface CreateRequest {
  name: string;
  memory: string;
  cpus: string;
  /** Sizes of empty disks. */
  disks: string[];
  /** Images or snapshot disks the next disks start as. */
  diskFrom: string[];
  kernel?: string;
  initrd?: string;
  append?: string;
  cdrom?: string;
  firmware?: string;
  /** user (default) or none. */
  net?: string;
  /** [proto:][addr:]HOSTPORT:GUESTPORT, repeatable. */
  forwards: string[];
  display: string;
  accel: string;
  qemuArgs: string[];
}

export interface DiskSource {
  def: DiskDef;
  /** An image file or a snapshot disk reference; absent: an empty disk of def.size. */
  from?: string;
}

export interface CreatePlan {
  def: VmDefinition;
  disks: DiskSource[];
}

/** A locally administered unicast MAC in QEMU's range; collisions only matter on a shared bridge. */
export function newMac(): string {
  return ['52', '54', '00', ...[...randomBytes(3)].map((b) => b.toString(16).padStart(2, '0'))].join(':');
}

/** `tcp:8080:80`, `udp:5353:53`, `8080:80` (tcp), `tcp:0.0.0.0:8080:80` (listen on every address). */
export function parseForward(spec: string): PortForward {
  const parts = spec.split(':');
  const proto = parts[0] === 'tcp' || parts[0] === 'udp' ? (parts.shift() as 'tcp' | 'udp') : 'tcp';
  const hostAddr = parts.length === 3 ? parts.shift()! : '127.0.0.1';
  const port = (s: string | undefined) => (s !== undefined && /^\d{1,5}$/.test(s) ? Number(s) : NaN);
  const [hostPort, guestPort] = [port(parts[0]), port(parts[1])];
  if (parts.length !== 2 || !(hostPort >= 1 && hostPort <= 65535) || !(guestPort >= 1 && guestPort <= 65535) || net.isIP(hostAddr) !== 4) {
    throw new VmConfigError(`--forward ${spec}: expected [tcp|udp:][IPv4 address:]HOSTPORT:GUESTPORT with ports 1-65535 (e.g. tcp:8080:80)`);
  }
  return { proto, hostAddr, hostPort, guestPort };
}

/** Binds each forward's host port for a moment: one taken now would fail the VM's start. */
export async function checkPortsFree(forwards: readonly PortForward[]): Promise<void> {
  for (const f of forwards) {
    const err = await (f.proto === 'tcp' ? tryTcp(f) : tryUdp(f));
    if (err) {
      const why = err.code === 'EADDRINUSE' ? 'is already in use' : err.code === 'EACCES' ? 'needs privileges to listen on' : `cannot be listened on (${err.code ?? err.message})`;
      throw new VmConfigError(`--forward ${f.proto}:${f.hostPort}:${f.guestPort}: host port ${f.proto} ${f.hostAddr}:${f.hostPort} ${why}; pick another host port`, { cause: err });
    }
  }
}

function tryTcp(f: PortForward): Promise<NodeJS.ErrnoException | null> {
  return new Promise((resolve) => {
    const s = net.createServer();
    s.once('error', (e: NodeJS.ErrnoException) => resolve(e));
    s.listen({ port: f.hostPort, host: f.hostAddr, exclusive: true }, () => s.close(() => resolve(null)));
  });
}

function tryUdp(f: PortForward): Promise<NodeJS.ErrnoException | null> {
  return new Promise((resolve) => {
    const s = dgram.createSocket('udp4');
    s.once('error', (e: NodeJS.ErrnoException) => {
      s.close();
      resolve(e);
    });
    s.bind({ port: f.hostPort, address: f.hostAddr, exclusive: true }, () => s.close(() => resolve(null)));
  });
}

async function existingFile(f: string | undefined, what: string): Promise<string | undefined> {
  if (f === undefined) return undefined;
  const p = path.resolve(f);
  const st = await fsp.stat(p).catch(() => null);
  if (!st) throw new VmConfigError(`${what} ${f} does not exist`);
  if (!st.isFile() && !st.isBlockDevice()) throw new VmConfigError(`${what} ${f} is not a file`);
  return p;
}

/** An ISO for the CD-ROM drive: an existing, readable file, by absolute path. */
export async function checkIso(f: string): Promise<string> {
  const p = (await existingFile(f, 'ISO'))!;
  await fsp.access(p, fsc.R_OK).catch(() => {
    throw new VmConfigError(`ISO ${f} is not readable`);
  });
  return p;
}

/** Checks the options and builds the definition; writes nothing (see the contract above). */
export async function buildDefinition(r: CreateRequest): Promise<CreatePlan> {
  const memory = parseSize(/^\d+$/.test(r.memory) ? `${r.memory}M` : r.memory, '--memory');
  if (!/^\d+$/.test(r.cpus)) throw new VmConfigError(`--cpus takes a whole number, got ${JSON.stringify(r.cpus)}`);
  const disks: DiskSource[] = [];
  r.disks.forEach((s) => disks.push({ def: { name: `disk${disks.length}`, size: parseSize(s, '--disk') } }));
  for (const f of r.diskFrom) {
    const st = await fsp.stat(f).catch(() => null);
    // Not a file: a snapshot disk reference, sized when it is resolved.
    disks.push({ def: { name: `disk${disks.length}`, size: st?.size || 1 }, from: f });
  }
  const kernel = await existingFile(r.kernel, 'kernel');
  const initrd = await existingFile(r.initrd, 'initrd');
  if (initrd && !kernel) throw new VmConfigError('--initrd needs --kernel');
  if (r.append !== undefined && !kernel) throw new VmConfigError('--append needs --kernel');
  const cdrom = r.cdrom !== undefined ? await checkIso(r.cdrom) : undefined;
  const firmware = r.firmware ?? 'bios';
  if (firmware !== 'bios' && firmware !== 'uefi') throw new VmConfigError(`--firmware must be bios or uefi, got ${JSON.stringify(firmware)}`);
  const firmwareCode = firmware === 'uefi' ? (await findOvmf()).code : undefined;
  const mode = r.net ?? 'user';
  if (mode !== 'user' && mode !== 'none') throw new VmConfigError(`--net must be user or none, got ${JSON.stringify(mode)}`);
  const forwards = r.forwards.map(parseForward);
  const netDef: NetDef = { mode, mac: newMac(), forwards };
  const def = newDefinition({
    name: r.name,
    memoryMiB: Math.round(memory / (1 << 20)),
    cpus: Number(r.cpus),
    ...(kernel ? { kernel } : {}),
    ...(initrd ? { initrd } : {}),
    ...(r.append !== undefined ? { append: r.append } : {}),
    display: r.display as VmDefinition['display'],
    accel: r.accel as VmDefinition['accel'],
    qemuArgs: r.qemuArgs,
    disks: disks.map((d) => d.def),
    firmware,
    ...(firmwareCode ? { firmwareCode } : {}),
    // Every new VM has a CD-ROM drive (empty unless --cdrom), so `vm insert` never changes its devices.
    cdrom: cdrom ?? null,
    net: netDef,
    agent: true,
    ...(r.display !== 'none' ? { video: true } : {}),
  });
  // Last: the ports are probed after every cheaper check passed.
  await checkPortsFree(forwards);
  return { def, disks };
}

/**
 * Writes a new VM's firmware variables (UEFI: `nvram`, or OVMF's template) and then its
 * definition, the file that makes the VM exist.
 */
export async function writeNewVm(dataDir: string, def: VmDefinition, nvram?: Buffer): Promise<void> {
  await writeNvram(dataDir, def, nvram);
  await saveDefinition(dataDir, def);
}

/** A UEFI VM's variables file := `bytes` (a snapshot's), or a fresh copy of OVMF's template. */
export async function writeNvram(dataDir: string, def: VmDefinition, bytes?: Buffer): Promise<void> {
  if (def.firmware !== 'uefi') return;
  const p = vmPaths(dataDir, def.name);
  await fsp.mkdir(p.dir, { recursive: true, mode: 0o700 });
  await atomicWriteFile(p.nvram, bytes ?? (await fsp.readFile(varsTemplateFor(def.firmwareCode!))));
}

/**
 * A clone's definition: the source's devices with the clone's own name and MAC, and without the
 * source's host port forwards (those ports are the source VM's: the clone could not start beside
 * it). Returns the forwards left out, for the caller to report.
 */
export function cloneDefinition(source: VmDefinition, name: string): { def: VmDefinition; droppedForwards: PortForward[] } {
  const def: VmDefinition = { ...source, name, created: new Date().toISOString() };
  if (source.net) def.net = { ...source.net, mac: newMac(), forwards: [] };
  return { def, droppedForwards: source.net?.forwards ?? [] };
}
