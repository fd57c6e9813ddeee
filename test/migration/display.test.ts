/**
 * A VM's display follows it: a guest created with --display vnc or --display spice live-migrates,
 * and on the destination its QEMU serves that screen on the VM's socket there (the VNC server
 * greets with its RFB version, the SPICE server answers a link request), as `vm view` says.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import * as net from 'node:net';
import * as path from 'node:path';
import { guestArtifacts } from '../../fixtures/guest/index.js';
import { VmLab } from '../helpers/vm.js';
import { expectArrived, PairedHosts } from './helpers.js';

/** The first bytes a display server sends on `socket` after `hello` (none for VNC: it speaks first). */
function firstBytes(socket: string, n: number, hello?: Buffer): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const s = net.connect(socket);
    let got = Buffer.alloc(0);
    const t = setTimeout(() => {
      s.destroy();
      reject(new Error(`no ${n} bytes from ${socket} within 10 s (got ${got.length})`));
    }, 10_000);
    s.on('connect', () => hello && s.write(hello));
    s.on('data', (d: Buffer) => {
      got = Buffer.concat([got, d]);
      if (got.length >= n) {
        clearTimeout(t);
        s.destroy();
        resolve(got.subarray(0, n));
      }
    });
    s.on('error', (err) => {
      clearTimeout(t);
      reject(err);
    });
  });
}

/** A SPICE link request for the main channel (SpiceLinkHeader + SpiceLinkMess, protocol 2.2). */
function spiceLink(): Buffer {
  const mess = Buffer.alloc(18);
  mess.writeUInt32LE(0, 0); // connection id
  mess[4] = 1; // main channel
  mess[5] = 0; // channel id
  mess.writeUInt32LE(0, 6); // common caps
  mess.writeUInt32LE(0, 10); // channel caps
  mess.writeUInt32LE(18, 14); // caps offset
  const head = Buffer.alloc(16);
  head.write('REDQ', 0, 'latin1');
  head.writeUInt32LE(2, 4);
  head.writeUInt32LE(2, 8);
  head.writeUInt32LE(mess.length, 12);
  return Buffer.concat([head, mess]);
}

const serves = async (lab: VmLab, vm: string, kind: 'vnc' | 'spice'): Promise<void> => {
  const view = await lab.json<{ address: string }>(['vm', 'view', vm, '--print']);
  const socket = path.join(lab.runDir(vm), `${kind}.sock`);
  expect(view.address).toBe(`${kind}+unix://${socket}`);
  if (kind === 'vnc') expect((await firstBytes(socket, 12)).toString('latin1')).toMatch(/^RFB 003\.00\d\n$/);
  else expect((await firstBytes(socket, 4, spiceLink())).toString('latin1')).toBe('REDQ');
};

describe('the display follows a migrated VM', () => {
  let h: PairedHosts;
  let a: VmLab;
  let b: VmLab;

  beforeAll(async () => {
    h = await PairedHosts.create('migd');
    ({ a, b } = h);
  }, 120_000);

  afterAll(() => h?.stop());

  for (const kind of ['vnc', 'spice'] as const) {
    it(`a VM with --display ${kind} is served on the destination after a live migration`, async () => {
      const vm = `screen-${kind}`;
      const g = guestArtifacts();
      await a.ok([
        'vm', 'create', vm, '--memory', '256M', '--net', 'none', '--display', kind, '--accel', 'tcg',
        '--kernel', g.kernel, '--initrd', g.initrd, '--append', 'console=ttyS0 quiet vmsnap.mem=16 vmsnap.rate=100',
      ]);
      await a.start(vm);
      await a.waitLines(vm, 3, 120_000);
      await serves(a, vm, kind);
      const r = await a.run(['--json', 'migrate', vm, 'desktop', '--wait']);
      expect(r.code, r.stderr).toBe(0);
      await expectArrived(b, vm);
      await serves(b, vm, kind);
      expect((await b.json<{ display: string }>(['vm', 'show', vm])).display).toBe(kind);
      await b.ok(['vm', 'stop', vm]);
    }, 400_000);
  }
});
