/**
 * Acceptance (issue 11, existing VMs): `vm import NAME --libvirt DOMAIN.xml` maps memory, CPUs,
 * firmware, disks, CD-ROM, network and display, says what it could not map, and refuses what
 * vmsnap cannot run without leaving anything behind.
 *  - a domain written here (UEFI, a q35 machine, a qcow2 made with qemu-img + qemu-io writes on
 *    virtio, a vdi made with qemu-img convert on sata, the fixture ISO as CD-ROM, a libvirt network
 *    NIC with its MAC, vnc graphics on a TCP port, a sound card): the disks import bit-exactly
 *    (qemu-img compare against a disk-only snapshot's export), the MAC is kept, each unmapped
 *    element is listed, and the VM boots (from the CD, through OVMF) and reports in
 *  - refused with a clear error and no VM: a <hostdev> (VFIO), a disk on an unknown bus, a corrupt
 *    qcow2, XML that is not well-formed
 */
import { execFileSync } from 'node:child_process';
import { existsSync, writeFileSync } from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { guestIso } from '../../fixtures/guest/index.js';
import { VmLab } from '../helpers/vm.js';
import type { RunResult } from '../helpers/cli.js';
import type { VmDefinition } from '../../src/vm/config.js';

function expectClearError(r: RunResult, ...patterns: RegExp[]): void {
  expect(r.code, `expected a failure, got: ${r.stdout}`).not.toBe(0);
  expect(r.stderr).toMatch(/^vmsnap: /m);
  expect(r.stderr).not.toMatch(/internal error|^\s+at /m);
  for (const p of patterns) expect(r.stderr).toMatch(p);
}

function domain(o: { disks: string; extra?: string; name?: string }): string {
  return `<domain type='kvm'>
  <name>${o.name ?? 'desk'}</name>
  <memory unit='KiB'>262144</memory>
  <currentMemory unit='KiB'>262144</currentMemory>
  <vcpu placement='static'>1</vcpu>
  <os firmware='efi'>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>
    <nvram>/var/lib/libvirt/qemu/nvram/desk_VARS.fd</nvram>
    <boot dev='hd'/>
  </os>
  <features><acpi/><apic/></features>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
${o.disks}
    <controller type='usb' index='0' model='qemu-xhci'/>
    <interface type='network'>
      <mac address='52:54:00:aa:bb:cc'/>
      <source network='default'/>
      <model type='virtio'/>
    </interface>
    <graphics type='vnc' port='5900' autoport='no' listen='127.0.0.1'/>
    <sound model='ich9'/>
    <video><model type='qxl'/></video>
${o.extra ?? ''}
  </devices>
</domain>
`;
}

const disk = (file: string, fmt: string, dev: string, bus: string) =>
  `    <disk type='file' device='disk'><driver name='qemu' type='${fmt}'/><source file='${file}'/><target dev='${dev}' bus='${bus}'/></disk>`;

describe('vm import --libvirt', () => {
  let lab: VmLab;
  let qcow2: string;
  let vdi: string;
  const vmDir = (name: string) => path.join(lab.dataDir, 'vms', name);

  beforeAll(async () => {
    lab = await VmLab.create('import');
    qcow2 = path.join(lab.root, 'a.qcow2');
    vdi = path.join(lab.root, 'b.vdi');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', qcow2, '32M']);
    execFileSync('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0xab 0 1M', '-c', 'write -P 0xcd 17M 64k', '-c', 'write -P 0x11 31M 4k', qcow2]);
    const raw = path.join(lab.root, 'b.raw');
    execFileSync('qemu-img', ['create', '-q', '-f', 'raw', raw, '8M']);
    execFileSync('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 2M 128k', raw]);
    execFileSync('qemu-img', ['convert', '-O', 'vdi', raw, vdi]);
  }, 60_000);

  afterAll(async () => {
    await lab?.cleanup();
  });

  it('maps a domain, lists what it could not map, imports its disks bit-exactly, and the VM boots', async () => {
    const iso = guestIso();
    const xml = path.join(lab.root, 'desk.xml');
    writeFileSync(
      xml,
      domain({
        disks: [
          disk(qcow2, 'qcow2', 'vda', 'virtio'),
          disk(vdi, 'vdi', 'sdb', 'sata'),
          `    <disk type='file' device='cdrom'><driver name='qemu' type='raw'/><source file='${iso}'/><target dev='sdc' bus='sata'/><readonly/></disk>`,
        ].join('\n'),
      }),
    );
    const r = await lab.run(['--json', 'vm', 'import', 'desk', '--libvirt', xml]);
    expect(r.code, r.stderr).toBe(0);
    lab.adopt('desk');
    console.log(r.stderr);
    const def = JSON.parse(r.stdout) as VmDefinition & { notMapped: string[] };
    expect(def).toMatchObject({ memoryMiB: 256, cpus: 1, firmware: 'uefi', cdrom: iso, display: 'vnc', video: true });
    expect(def.net).toMatchObject({ mode: 'user', mac: '52:54:00:aa:bb:cc', forwards: [] });
    expect(def.disks.map((d) => d.size)).toEqual([32 << 20, 8 << 20]);
    for (const p of [/machine type pc-q35-7\.2/, /disk sdb on bus sata: attached as virtio-blk/, /interface of type network/, /graphics vnc listen address and port/, /device <sound>/, /UEFI variables .*desk_VARS\.fd: not readable/]) {
      expect(r.stderr, String(p)).toMatch(new RegExp(`vmsnap: not mapped: .*${p.source}`));
    }
    // Bit-exact: a disk-only snapshot of the stopped VM, exported, equals each source image.
    const snap = (await lab.json<{ snapshot: string }>(['take', 'desk'])).snapshot;
    for (const [name, src] of [['disk0', qcow2], ['disk1', vdi]] as const) {
      const out = path.join(lab.root, `${name}.raw`);
      await lab.ok(['export', `${snap}:${name}`, out]);
      expect(execFileSync('qemu-img', ['compare', '-q', src, out]).toString()).toBe('');
    }
    await lab.start('desk');
    await lab.waitLines('desk', 3, 180_000);
    await lab.ok(['vm', 'stop', 'desk']);
  }, 400_000);

  it('refuses what vmsnap cannot run, leaving no VM behind', async () => {
    const cases: [string, string, RegExp][] = [
      ['vfio', domain({ disks: disk(qcow2, 'qcow2', 'vda', 'virtio'), extra: "<hostdev mode='subsystem' type='pci' managed='yes'><source><address domain='0x0000' bus='0x01' slot='0x00' function='0x0'/></source></hostdev>" }), /<hostdev> \(a host device passed through, VFIO/],
      ['xenbus', domain({ disks: disk(qcow2, 'qcow2', 'xvda', 'xen') }), /disk xvda is on bus "xen", which vmsnap cannot run/],
      ['nofile', domain({ disks: disk(path.join(lab.root, 'gone.qcow2'), 'qcow2', 'vda', 'virtio') }), /disk vda: image .*gone\.qcow2 does not exist/],
      ['broken', '<domain><name>x</name><memory>1', /is not well-formed XML/],
    ];
    const corrupt = path.join(lab.root, 'corrupt.qcow2');
    writeFileSync(corrupt, Buffer.concat([Buffer.from('QFI\xfb\x00\x00\x00\x03', 'latin1'), Buffer.alloc(4096, 0x77)]));
    cases.push(['corrupt', domain({ disks: disk(corrupt, 'qcow2', 'vda', 'virtio') }), /corrupt\.qcow2/]);
    for (const [name, xml, pattern] of cases) {
      const f = path.join(lab.root, `${name}.xml`);
      writeFileSync(f, xml);
      const r = await lab.run(['vm', 'import', name, '--libvirt', f]);
      console.log(`${name}: ${r.stderr.trim().split('\n').pop()}`);
      expectClearError(r, pattern);
      expect(existsSync(vmDir(name)), `${name}: no VM left`).toBe(false);
    }
  }, 120_000);
});
