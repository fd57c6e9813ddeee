/**
 * Acceptance (issue 12, smaller siblings): VM definitions that cannot work are refused clearly and
 * leave nothing behind; one damaged definition does not take the others down. No guest boots here.
 *  - a damaged vm.json: `vm ls` lists it as broken beside the others, `vm rm` removes it
 *  - a VM name whose sockets would not fit a unix socket path: refused at create (not a timeout)
 *  - a disk larger than the file system can hold in one file: a clear error, no half-created VM
 *  - clone of a VM with --qemu-arg flags: refused unless the clone gets its own or --keep-qemu-args
 */
import { existsSync, writeFileSync } from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { VmLab } from '../helpers/vm.js';
import type { RunResult } from '../helpers/cli.js';

function expectClearError(r: RunResult, ...patterns: RegExp[]): void {
  expect(r.code, `expected a failure, got: ${r.stdout}`).not.toBe(0);
  expect(r.stderr).toMatch(/^vmsnap: /);
  expect(r.stderr).not.toMatch(/internal error|^\s+at /m);
  for (const p of patterns) expect(r.stderr).toMatch(p);
}

describe('VM definitions', () => {
  let lab: VmLab;
  const vmDir = (name: string) => path.join(lab.dataDir, 'vms', name);

  beforeAll(async () => {
    lab = await VmLab.create('defs');
  }, 60_000);

  afterAll(async () => {
    await lab?.cleanup();
  });

  it('lists a VM with a damaged vm.json as broken beside the others, and removes it', async () => {
    await lab.createBmVm('good', { accel: 'tcg', memMiB: 1, rate: 100 });
    await lab.createBmVm('bad', { accel: 'tcg', memMiB: 1, rate: 100 });
    writeFileSync(path.join(vmDir('bad'), 'vm.json'), '{"version": 1, "name": ');
    const rows = await lab.json<{ name: string; state: string; problem?: string }[]>(['vm', 'ls']);
    expect(rows.map((r) => [r.name, r.state])).toEqual([
      ['bad', 'broken'],
      ['good', 'shutoff'],
    ]);
    expect(rows[0]!.problem).toMatch(/not valid JSON/);
    await lab.ok(['vm', 'rm', 'bad']);
    expect(existsSync(vmDir('bad'))).toBe(false);
    expect((await lab.json<{ name: string }[]>(['vm', 'ls'])).map((r) => r.name)).toEqual(['good']);
  });

  it('refuses a VM name whose sockets would not fit a unix socket path', async () => {
    const r = await lab.run(['vm', 'create', 'n'.repeat(128), '--memory', '64M']);
    expectClearError(r, /is too long for data directory/, /use a name of at most \d+ bytes/);
    expect(existsSync(vmDir('n'.repeat(128)))).toBe(false);
  });

  it('refuses a disk larger than the file system can hold, leaving no VM behind', async () => {
    const r = await lab.run(['vm', 'create', 'huge', '--memory', '64M', '--disk', '900T']);
    expectClearError(r, /disk disk0: .* is larger than the file system .* can hold in one file/);
    expect(existsSync(vmDir('huge'))).toBe(false);
  });

  it("does not copy the source VM's --qemu-arg flags into a clone silently", async () => {
    await lab.ok(['vm', 'create', 'src', '--memory', '64M', '--qemu-arg', '-name', '--qemu-arg', 'src-guest']);
    await lab.ok(['take', 'src']);
    const r = await lab.run(['clone', 'src:latest', 'c1', '--no-start']);
    expectClearError(r, /VM src was defined with extra QEMU arguments \(-name src-guest\)/, /--qemu-arg/, /--keep-qemu-args/);
    expect(existsSync(vmDir('c1'))).toBe(false);
    await lab.ok(['clone', 'src:latest', 'c1', '--no-start', '--qemu-arg', '-name', '--qemu-arg', 'c1-guest']);
    expect((await lab.json<{ qemuArgs: string[] }>(['vm', 'show', 'c1'])).qemuArgs).toEqual(['-name', 'c1-guest']);
    await lab.ok(['clone', 'src:latest', 'c2', '--no-start', '--keep-qemu-args']);
    expect((await lab.json<{ qemuArgs: string[] }>(['vm', 'show', 'c2'])).qemuArgs).toEqual(['-name', 'src-guest']);
  });
});
