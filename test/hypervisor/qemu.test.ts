import { spawn } from 'node:child_process';
import { existsSync, promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  assertSupportedQemu,
  buildQemuArgv,
  chooseAccel,
  DEFAULT_MACHINE_TYPE,
  detectQemu,
  parseQemuVersion,
  QemuDetectError,
  QemuLaunchError,
  UnsupportedQemuError,
} from '../../src/hypervisor/qemu.js';
import { qemuHarness, type QemuHarness } from './helpers.js';

describe('QEMU version rule: >= 10.0 and < 11 (the stream format vmsnap verified)', () => {
  it.each([
    ['QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)', true],
    ['QEMU emulator version 10.1.0', true],
    ['QEMU emulator version 10.2', true],
    ['QEMU emulator version 9.2.0', false],
    ['QEMU emulator version 7.2.15 (Debian 1:7.2+dfsg-7+deb12u7)', false],
    ['QEMU emulator version 11.0.0', false],
  ])('%s → supported %s', (text, ok) => {
    const v = parseQemuVersion(text);
    if (ok) expect(() => assertSupportedQemu(v)).not.toThrow();
    else expect(() => assertSupportedQemu(v)).toThrow(UnsupportedQemuError);
  });

  it('refuses unparseable output and missing binaries clearly', async () => {
    expect(() => parseQemuVersion('hello')).toThrow(QemuDetectError);
    await expect(detectQemu('/nonexistent/qemu-system-x86_64')).rejects.toThrow(/cannot run/);
  });

  it('detects the installed QEMU', async () => {
    const q = await detectQemu();
    expect(q.version.major).toBe(10);
  });
});

describe('argv and accelerator', () => {
  it('builds a minimal, recorded machine with QMP, serial log, kernel, NBD disks and -incoming defer', () => {
    const argv = buildQemuArgv({
      runDir: '/run/vm,1',
      accel: 'tcg',
      memoryMiB: 256,
      cpus: 2,
      kernel: '/k',
      initrd: '/i',
      append: 'console=ttyS0',
      incomingDefer: true,
      disks: [{ socketPath: '/s/nbd,0.sock', exportName: 'root' }],
      extraArgs: ['-cpu', 'max'],
    });
    const s = argv.join(' ');
    expect(argv.slice(0, 2)).toEqual(['-machine', DEFAULT_MACHINE_TYPE]);
    expect(s).toContain('-accel tcg -m 256M -smp 2 -nodefaults -no-user-config -display none');
    expect(s).toContain('socket,id=qmp,path=/run/vm,,1/qmp.sock,server=on,wait=off');
    expect(s).toContain('file,id=serial0,path=/run/vm,,1/serial.log');
    expect(s).toContain('-kernel /k -initrd /i -append console=ttyS0');
    expect(s).toContain('-incoming defer');
    expect(s.endsWith('-cpu max')).toBe(true);
    const bd = JSON.parse(argv[argv.indexOf('-blockdev') + 1] as string) as Record<string, unknown>;
    expect(bd).toMatchObject({ driver: 'nbd', 'node-name': 'disk0', export: 'root', server: { type: 'unix', path: '/s/nbd,0.sock' } });
    expect(argv[argv.indexOf('-device') + 1]).toBe('virtio-blk-pci,drive=disk0,id=vblk0');
    expect(() => buildQemuArgv({ runDir: '/r', accel: 'tcg', memoryMiB: 1.5 })).toThrow(QemuLaunchError);
  });

  it('chooses KVM only when the device opens and the guest can use it; forcing wins', async () => {
    expect(await chooseAccel({ guestRunsUnderKvm: true }, '/nonexistent/kvm')).toBe('tcg');
    expect(await chooseAccel({ guestRunsUnderKvm: false }, '/dev/null')).toBe('tcg');
    expect(await chooseAccel({ guestRunsUnderKvm: true }, '/dev/null')).toBe('kvm'); // opens read-write
    expect(await chooseAccel({ guestRunsUnderKvm: false, force: 'kvm' }, '/nonexistent')).toBe('kvm');
    expect(await chooseAccel({ guestRunsUnderKvm: true, force: 'tcg' }, '/dev/null')).toBe('tcg');
  });
});

describe('launching QEMU', () => {
  let h: QemuHarness;
  beforeAll(async () => {
    h = await qemuHarness();
  });
  afterAll(async () => {
    await h.cleanup();
  });

  it('starts, records machine/version, and quits cleanly over QMP', async () => {
    const q = await h.start('quit');
    expect(q.machine).toBe('pc-i440fx-10.0');
    expect(q.version.major).toBe(10);
    expect(q.pid).toBeGreaterThan(0);
    const st = await q.qmp.execute<{ status: string }>('query-status');
    expect(st.status).toBe('running');
    const exit = await q.quit();
    expect(exit.code).toBe(0);
    expect(q.hasExited).toBe(true);
  });

  it('fails with QEMU’s own message when it cannot start', async () => {
    const err = await h.start('bad', { extraArgs: ['-no-such-option'] }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(QemuLaunchError);
    expect((err as Error).message).toMatch(/no-such-option/);
  });

  it('attaches an NBD-backed disk served by qemu-nbd over a unix socket', async () => {
    const img = path.join(h.dir, 'disk.raw');
    await fsp.writeFile(img, Buffer.alloc(1 << 20));
    const sock = path.join(h.dir, 'nbd.sock');
    const nbd = spawn('qemu-nbd', ['--socket', sock, '--export-name', 'root', '--format', 'raw', '--persistent', img], {
      stdio: 'ignore',
    });
    try {
      for (let i = 0; i < 500 && !existsSync(sock); i++) await new Promise((r) => setTimeout(r, 20));
      const q = await h.start('nbd', { disks: [{ socketPath: sock, exportName: 'root' }], paused: true });
      const nodes = await q.qmp.execute<Array<{ 'node-name': string; drv: string; image: { 'virtual-size': number } }>>(
        'query-named-block-nodes',
        { flat: true },
      );
      const disk = nodes.find((n) => n['node-name'] === 'disk0');
      expect(disk?.drv).toBe('nbd');
      expect(disk?.image['virtual-size']).toBe(1 << 20);
      const qtree = await q.qmp.execute<string>('human-monitor-command', { 'command-line': 'info block' });
      expect(qtree).toMatch(/disk0/);
      await q.quit();
    } finally {
      nbd.kill('SIGKILL');
      await new Promise((r) => (nbd.exitCode !== null || nbd.signalCode !== null ? r(undefined) : nbd.once('exit', r)));
    }
  });
});
