/**
 * `vm import --libvirt DOMAIN.xml`: a libvirt domain (the output of `virsh dumpxml`) as a vmsnap
 * `vm create` request.
 *
 * Contract: `planLibvirtImport` reads the XML and returns the request (memory, vCPUs, firmware,
 * disks as images to copy, CD-ROM, network, display), the values that `vm create` cannot take as
 * options (the domain's MAC, its UEFI variables), and `notMapped`: one line per element it left
 * out or changed, for the caller to print. It refuses (LibvirtImportError, naming the element) what
 * vmsnap cannot run — host devices passed through (VFIO), disks on an unknown bus or from the
 * network, a domain that is not an x86 HVM guest — and writes nothing, so a refused import leaves
 * nothing behind. Disk images are read by `vm create --disk-from` (qcow2, raw, vmdk, vdi, …).
 */
import { promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { parse, validate } from 'fast-xml-parser';
import { UserFacingError } from '../util/errors.js';
import type { CreateRequest } from './create.js';

export class LibvirtImportError extends UserFacingError {
  override readonly name = 'LibvirtImportError';
}

export interface LibvirtPlan {
  request: CreateRequest;
  /** The domain's MAC, when it is one vmsnap can keep (52:54:00:…). */
  mac?: string;
  /** The domain's UEFI variables file, if it names one that exists. */
  nvram?: Buffer;
  notMapped: string[];
}

type Node = Record<string, unknown>;

/** One or many children, always as a list. */
function list(v: unknown): Node[] {
  if (v === undefined || v === null) return [];
  return (Array.isArray(v) ? v : [v]).map((x) => (typeof x === 'object' && x !== null ? (x as Node) : { '#text': x }));
}

function attr(n: Node | undefined, name: string): string | undefined {
  const v = n?.[`@${name}`];
  return v === undefined ? undefined : String(v);
}

function text(n: Node | undefined): string | undefined {
  if (!n) return undefined;
  const v = n['#text'];
  return v === undefined ? undefined : String(v).trim();
}

const UNIT: Record<string, number> = { b: 1, bytes: 1, k: 1024, kib: 1024, kb: 1000, m: 1 << 20, mib: 1 << 20, mb: 1e6, g: 1 << 30, gib: 1 << 30, gb: 1e9, t: 2 ** 40, tib: 2 ** 40, tb: 1e12 };

/** Buses whose disks vmsnap runs as virtio-blk (the guest needs virtio drivers if it had others). */
const DISK_BUSES = new Set(['virtio', 'sata', 'ide', 'scsi', 'usb']);
/** Devices vmsnap provides its own way, or that carry nothing to map: not reported. */
const QUIET_DEVICES = new Set(['emulator', 'controller', 'input', 'video', 'console', 'serial', 'channel', 'memballoon', 'rng', 'watchdog']);

export async function planLibvirtImport(name: string, xmlFile: string): Promise<LibvirtPlan> {
  const xml = await fsp.readFile(xmlFile, 'utf8').catch((err: Error) => {
    throw new LibvirtImportError(`cannot read ${xmlFile}: ${err.message}`);
  });
  const valid = validate(xml);
  if (valid !== true) throw new LibvirtImportError(`${xmlFile} is not well-formed XML: ${valid.err.msg} (line ${valid.err.line})`);
  const doc = parse(xml, { ignoreAttributes: false, attributeNamePrefix: '@', parseAttributeValue: false, parseNodeValue: false, textNodeName: '#text' }) as Node;
  const dom = list(doc.domain)[0];
  if (!dom) throw new LibvirtImportError(`${xmlFile} is not a libvirt domain (no <domain> element)`);
  const where = (what: string) => `${xmlFile}: ${what}`;
  const notMapped: string[] = [];
  const os = list(dom.os)[0];
  const type = list(os?.type)[0];
  if (text(type) !== 'hvm') throw new LibvirtImportError(where(`<os><type> is ${JSON.stringify(text(type) ?? null)}: vmsnap runs hardware-virtualised (hvm) x86 guests only`));
  const arch = attr(type, 'arch');
  if (arch && arch !== 'x86_64' && arch !== 'i686') throw new LibvirtImportError(where(`architecture ${arch}: vmsnap runs x86 guests only`));
  const machine = attr(type, 'machine');
  if (machine && !machine.startsWith('pc-i440fx') && machine !== 'pc') notMapped.push(`machine type ${machine}: the VM runs as pc-i440fx-10.0 (a q35 guest sees other chipset devices)`);

  // Memory and CPUs.
  const mem = list(dom.memory)[0];
  const unit = (attr(mem, 'unit') ?? 'KiB').toLowerCase();
  const amount = Number(text(mem));
  if (!(amount > 0) || !(unit in UNIT)) throw new LibvirtImportError(where(`<memory> ${JSON.stringify(text(mem) ?? null)} ${unit} is not a memory size`));
  const memoryMiB = Math.max(16, Math.round((amount * UNIT[unit]!) / (1 << 20)));
  const cpus = Number(text(list(dom.vcpu)[0]) ?? 1);
  if (!Number.isInteger(cpus) || cpus < 1) throw new LibvirtImportError(where(`<vcpu> ${JSON.stringify(text(list(dom.vcpu)[0]) ?? null)} is not a number of CPUs`));

  // Firmware: <os firmware='efi'> or a pflash <loader>.
  const loader = list(os?.loader)[0];
  const uefi = attr(os, 'firmware') === 'efi' || attr(loader, 'type') === 'pflash' || /OVMF|edk2/i.test(text(loader) ?? '');
  if (uefi && attr(loader, 'secure') === 'yes') notMapped.push('Secure Boot (loader secure=yes): the VM runs OVMF without Secure Boot');
  let nvram: Buffer | undefined;
  const nvramPath = text(list(os?.nvram)[0]);
  if (uefi && nvramPath) {
    nvram = await fsp.readFile(nvramPath).catch(() => undefined);
    if (!nvram) notMapped.push(`UEFI variables ${nvramPath}: not readable, the VM starts with OVMF's empty variables`);
  }

  // Devices.
  const devices = list(dom.devices)[0] ?? {};
  const hostdev = list(devices.hostdev);
  if (hostdev.length) throw new LibvirtImportError(where(`<hostdev> (a host device passed through, VFIO/PCI/USB): vmsnap cannot snapshot or run a VM with host devices; remove it from the XML to import the rest`));
  const diskFrom: string[] = [];
  let cdrom: string | undefined;
  for (const d of list(devices.disk)) {
    const device = attr(d, 'device') ?? 'disk';
    const target = list(d.target)[0];
    const dev = attr(target, 'dev') ?? '?';
    const bus = attr(target, 'bus') ?? 'virtio';
    const src = list(d.source)[0];
    const file = attr(src, 'file') ?? attr(src, 'dev');
    if (attr(d, 'type') === 'network' || attr(src, 'protocol')) throw new LibvirtImportError(where(`disk ${dev} is a network disk (${attr(src, 'protocol') ?? 'network'}): vmsnap imports disk image files only`));
    if (device === 'cdrom') {
      if (cdrom !== undefined || !file) {
        if (file) notMapped.push(`CD-ROM ${dev} (${file}): a vmsnap VM has one CD-ROM drive`);
        continue;
      }
      if (await fsp.stat(file).catch(() => null)) cdrom = file;
      else notMapped.push(`CD-ROM ${dev}: ${file} does not exist, the drive is empty`);
      continue;
    }
    if (device !== 'disk') {
      notMapped.push(`${device} ${dev}: not mapped (vmsnap VMs have disks and one CD-ROM drive)`);
      continue;
    }
    if (!DISK_BUSES.has(bus)) throw new LibvirtImportError(where(`disk ${dev} is on bus ${JSON.stringify(bus)}, which vmsnap cannot run (known: ${[...DISK_BUSES].join(', ')})`));
    if (!file) throw new LibvirtImportError(where(`disk ${dev} has no source file`));
    if (!(await fsp.stat(file).catch(() => null))) throw new LibvirtImportError(where(`disk ${dev}: image ${file} does not exist`));
    if (bus !== 'virtio') notMapped.push(`disk ${dev} on bus ${bus}: attached as virtio-blk (disk${diskFrom.length}; the guest needs virtio drivers)`);
    diskFrom.push(path.resolve(file));
  }

  const ifaces = list(devices.interface);
  let net: 'user' | 'none' = 'none';
  let mac: string | undefined;
  const first = ifaces[0];
  if (first) {
    net = 'user';
    const t = attr(first, 'type') ?? 'network';
    if (t !== 'user') notMapped.push(`interface of type ${t}${attr(list(first.source)[0], 'bridge') ? ` (bridge ${attr(list(first.source)[0], 'bridge')})` : ''}: mapped to user-mode networking (NAT); port forwards are not set`);
    const m = attr(list(first.mac)[0], 'address')?.toLowerCase();
    if (m && /^52:54:00(:[0-9a-f]{2}){3}$/.test(m)) mac = m;
    else if (m) notMapped.push(`MAC ${m}: outside 52:54:00:…, the VM gets a new MAC`);
    const model = attr(list(first.model)[0], 'type');
    if (model && model !== 'virtio') notMapped.push(`NIC model ${model}: the VM has a virtio NIC (the guest needs virtio drivers)`);
  }
  for (const extra of ifaces.slice(1)) notMapped.push(`interface ${attr(list(extra.mac)[0], 'address') ?? ''}: a vmsnap VM has one NIC`.replace(' :', ':'));

  const gfx = list(devices.graphics);
  let display = 'none';
  const g = gfx[0];
  if (g) {
    const t = attr(g, 'type') ?? '';
    if (t === 'spice' || t === 'vnc') display = t;
    else if (t === 'sdl' || t === 'egl-headless' || t === 'dbus') {
      display = 'gtk';
      notMapped.push(`graphics ${t}: shown as gtk`);
    } else notMapped.push(`graphics ${t}: not mapped, no display`);
    if (attr(g, 'port') || attr(g, 'listen') || list(g.listen).length) notMapped.push(`graphics ${t} listen address and port: served on a unix socket in the VM's run dir (\`vmsnap vm view ${name}\`)`);
  }
  for (const extra of gfx.slice(1)) notMapped.push(`graphics ${attr(extra, 'type') ?? ''}: a vmsnap VM has one display`);

  for (const tag of Object.keys(devices)) {
    if (tag.startsWith('@') || tag === '#text' || ['disk', 'interface', 'graphics', 'hostdev'].includes(tag) || QUIET_DEVICES.has(tag)) continue;
    notMapped.push(`device <${tag}>: not mapped`);
  }
  if (!diskFrom.length && !cdrom) notMapped.push('no disk image and no CD: the VM has nothing to boot');

  return {
    request: {
      name,
      memory: `${memoryMiB}M`,
      cpus: String(cpus),
      disks: [],
      diskFrom,
      ...(cdrom ? { cdrom } : {}),
      firmware: uefi ? 'uefi' : 'bios',
      net,
      forwards: [],
      display,
      accel: 'auto',
      qemuArgs: [],
    },
    ...(mac ? { mac } : {}),
    ...(nvram ? { nvram } : {}),
    notMapped,
  };
}
