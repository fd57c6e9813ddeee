/**
 * The huge-page re-collapse helper (src/hypervisor/native/thp-collapse.c, built by scripts/setup.sh)
 * finds a running QEMU's guest RAM and the kernel accepts MADV_COLLAPSE for all of it.
 */
import { describe, expect, it } from 'vitest';
import { execFileSync, spawn } from 'node:child_process';
import { nativeHelper } from '../../src/util/project.js';

describe('thp-collapse helper', () => {
  it('collapses the guest RAM of a running QEMU', async () => {
    const helper = nativeHelper('thp-collapse');
    expect(helper, 'run scripts/setup.sh to build .cache/native/thp-collapse').not.toBeNull();
    const qemu = spawn('qemu-system-x86_64', ['-accel', 'tcg', '-m', '128', '-mem-prealloc', '-nodefaults', '-display', 'none', '-no-user-config'], { stdio: 'ignore' });
    try {
      await new Promise((r) => setTimeout(r, 1500));
      const out = execFileSync(helper!, [String(qemu.pid)], { encoding: 'utf8' }).trim();
      // 128 MiB guest RAM, populated by -mem-prealloc (the kernel refuses to collapse never-touched
      // ranges), 2 MiB aligned: at least 126 MiB advised.
      const m = /^(\d+) ok$/.exec(out);
      expect(m, out).not.toBeNull();
      expect(Number(m![1])).toBeGreaterThanOrEqual(126 << 20);
    } finally {
      qemu.kill('SIGKILL');
    }
  });

  it('says clearly when the process does not exist', () => {
    const helper = nativeHelper('thp-collapse');
    let out = '';
    try {
      execFileSync(helper!, ['999999999'], { encoding: 'utf8' });
    } catch (err) {
      out = String((err as { stdout?: string }).stdout);
    }
    expect(out).toMatch(/cannot read \/proc\/999999999\/maps/);
  });
});
