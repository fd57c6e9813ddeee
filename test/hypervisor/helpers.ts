/**
 * Test helpers: temp dirs, QEMU launches that are always cleaned up, and a tiny firmware that keeps
 * dirtying guest RAM (so live migrations must resend pages) without needing a guest kernel.
 */
import { promises as fsp } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { launchQemu, type QemuLaunchOptions, type QemuProcess } from '../../src/hypervisor/qemu.js';
import type { QmpClient } from '../../src/hypervisor/qmp.js';

/**
 * 64 KiB firmware image for -bios, mapped at 0xF0000. Code at F000:0000 (as --32, .code16):
 *
 *   cli; mov $0x1000,%bx
 *   outer: mov %bx,%ds; xor %si,%si
 *   inner: incb (%si); add $4096,%si; jnz inner      ; one byte in each of the segment's 16 pages
 *          add $0x1000,%bx; cmp $0xA000,%bx; jb outer ; segments 0x1000..0x9000 → 144 pages
 *          mov $0x1000,%bx; jmp outer                 ; forever
 *
 * and the reset vector at 0xFFFF0: ljmp $0xF000,$0.
 */
export function dirtyFirmware(): Buffer {
  const img = Buffer.alloc(64 * 1024, 0xff);
  Buffer.from('fabb00108edb31f6fe0481c6001075f881c3001081fb00a072eabb0010ebe5', 'hex').copy(img, 0);
  Buffer.from('ea000000f0', 'hex').copy(img, 0xfff0);
  return img;
}

export interface QemuHarness {
  dir: string;
  firmware: string;
  start(name: string, o?: Partial<QemuLaunchOptions>): Promise<QemuProcess>;
  cleanup(): Promise<void>;
}

export async function qemuHarness(): Promise<QemuHarness> {
  const dir = await fsp.mkdtemp(path.join(os.tmpdir(), 'vmsnap-hv-'));
  const firmware = path.join(dir, 'dirty-bios.bin');
  await fsp.writeFile(firmware, dirtyFirmware());
  const procs: QemuProcess[] = [];
  return {
    dir,
    firmware,
    async start(name, o = {}) {
      const p = await launchQemu({ runDir: path.join(dir, name), accel: 'tcg', memoryMiB: 64, ...o });
      procs.push(p);
      return p;
    },
    async cleanup() {
      await Promise.all(procs.map((p) => p.kill('SIGKILL').catch(() => undefined)));
      await fsp.rm(dir, { recursive: true, force: true });
    },
  };
}

/** Guest-physical RAM [0, size) via pmemsave. */
export async function pmem(qmp: QmpClient, dir: string, name: string, size: number): Promise<Buffer> {
  const f = path.join(dir, `${name}.pmem`);
  await qmp.execute('pmemsave', { val: 0, size, filename: f });
  const b = await fsp.readFile(f);
  await fsp.rm(f);
  return b;
}

/**
 * Resolves once the dirty firmware is running its loop: the byte it increments at 0x10000 changes.
 * Started QEMUs on a loaded machine may not have run a guest instruction yet, and a live migration
 * of a guest that has not started dirtying resends nothing.
 */
export async function waitDirtying(qmp: QmpClient, dir: string, name: string, timeoutMs = 30_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  const first = (await pmem(qmp, dir, `${name}-probe`, 0x10001))[0x10000];
  for (;;) {
    const now = (await pmem(qmp, dir, `${name}-probe`, 0x10001))[0x10000];
    if (now !== first) return;
    if (Date.now() > deadline) throw new Error(`guest ${name} did not start dirtying RAM in ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

export async function waitStatus(qmp: QmpClient, want: string, timeoutMs = 30_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const s = await qmp.execute<{ status: string }>('query-status');
    if (s.status === want) return;
    if (Date.now() > deadline) throw new Error(`status ${s.status}, wanted ${want}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}
