/**
 * Migration as a job: the embedded runner (no Redis) runs a `migrate` job to a `vmsnap receive` on
 * loopback and the guest arrives intact; delivered again with its key after it worked, the job
 * reports the move instead of failing; a malformed migrate payload is refused naming what is wrong.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { existsSync } from 'node:fs';
import * as path from 'node:path';
import { VmLab } from '../helpers/vm.js';
import { EmbeddedRunner } from '../../src/jobs/embedded.js';
import { runJob } from '../../src/jobs/handlers.js';
import { parseJobSpec, type MigrateJobResult } from '../../src/jobs/model.js';
import { ProgressCollector } from '../../src/ops/progress.js';
import { readMigrationRecord } from '../../src/ops/migrate.js';
import { labContext } from '../jobs/helpers.js';
import { expectArrived, PairedHosts } from './helpers.js';

const VM = 'jobbed';

describe('migrate job payloads', () => {
  it('a malformed migrate payload is refused, naming the field', () => {
    const refused = (args: unknown) => () => parseJobSpec({ kind: 'migrate', args });
    expect(refused({ vm: 'x' })).toThrow(/malformed job payload: "destination" must be a non-empty string/);
    expect(refused({ destination: 'desktop' })).toThrow(/"vm" must be a non-empty string/);
    expect(refused({ vm: 'x', destination: 'desktop', pair: 'SHA256:abc' })).toThrow(/unknown migrate option "pair".*peer add/);
    expect(refused({ vm: 'x', destination: 'desktop', maxDowntimeMs: 5 })).toThrow(/maxDowntimeMs 5: give a value between 10 and 60000 ms/);
    expect(refused({ vm: 'x', destination: 'desktop', compress: 'gzip' })).toThrow(/compress "gzip"/);
    expect(refused({ vm: 'x', destination: 'desktop', cold: 'yes' })).toThrow(/"cold" must be true or false/);
    expect(parseJobSpec({ kind: 'migrate', args: { vm: 'x', destination: 'desktop', cold: true, timeoutMs: 60_000 } })).toEqual({
      kind: 'migrate',
      args: { vm: 'x', destination: 'desktop', cold: true, timeoutMs: 60_000 },
    });
  });
});

describe('migrate jobs under the embedded runner (no Redis)', () => {
  let h: PairedHosts;
  let a: VmLab;
  let b: VmLab;

  beforeAll(async () => {
    h = await PairedHosts.create('migj');
    ({ a, b } = h);
  }, 120_000);

  afterAll(() => h?.stop());

  it('moves the guest to the paired host; delivered again, it reports the move; another request for it fails for good', async () => {
    await a.createLinuxVm(VM, { rate: 100, memMiB: 32, diskRate: 20 });
    await a.start(VM);
    await a.waitLines(VM, 5);
    const ctx = labContext(a, 'laptop');
    const runner = new EmbeddedRunner({ ctx, retry: { attempts: 3, backoffMs: 200 } });
    try {
      const job = runner.submit({ kind: 'migrate', args: { vm: VM, destination: 'desktop' }, key: 'move-1' });
      const done = await runner.wait(job.id);
      expect(done.state, JSON.stringify(done.error)).toBe('completed');
      const r = done.result as MigrateJobResult;
      expect(r).toMatchObject({ alreadyMigrated: false, vm: VM, mode: 'live', destination: `127.0.0.1:${h.rb.port}`, destinationState: 'running' });
      await expectArrived(b, VM);
      expect(existsSync(path.join(a.dataDir, 'vms', VM))).toBe(false);
      expect(await readMigrationRecord(a.dataDir, VM)).toMatchObject({ vm: VM, key: 'move-1', mode: 'live' });

      // At-least-once: the same job again (a redelivery after a crash) finds its own record.
      const sink = new ProgressCollector();
      const again = (await runJob(ctx, { kind: 'migrate', args: { vm: VM, destination: 'desktop' }, key: 'move-1' }, { key: 'move-1', sink })) as MigrateJobResult;
      expect(again).toMatchObject({ alreadyMigrated: true, vm: VM, key: 'move-1' });
      expect(sink.messages('info').join('\n')).toMatch(/already migrated to 127\.0\.0\.1:\d+ by this job/);

      // Another request for the guest that left: a permanent failure (one attempt), saying where it went.
      const other = runner.submit({ kind: 'migrate', args: { vm: VM, destination: 'desktop' }, key: 'move-2' });
      const failed = await runner.wait(other.id);
      expect(failed.state).toBe('failed');
      expect(failed.attempts).toBe(1);
      expect(failed.error?.message).toMatch(new RegExp(`VM ${VM} is not on this host; it was migrated to 127\\.0\\.0\\.1:\\d+`));
      expect(failed.error?.retryable).toBe(false);
      // The guest runs on, on the destination.
      expect((await b.show(VM)).status.state).toBe('running');
    } finally {
      await runner.close();
    }
  }, 600_000);

  it('a cold migrate job moves a stopped VM, which arrives stopped', async () => {
    const vm = 'parkedjob';
    await a.createLinuxVm(vm, { disk: '16M' });
    const runner = new EmbeddedRunner({ ctx: labContext(a, 'laptop') });
    try {
      const done = await runner.wait(runner.submit({ kind: 'migrate', args: { vm, destination: 'desktop', cold: true }, key: 'cold-1' }).id);
      expect(done.state, JSON.stringify(done.error)).toBe('completed');
      expect(done.result).toMatchObject({ alreadyMigrated: false, vm, mode: 'cold', destinationState: 'shutoff' });
    } finally {
      await runner.close();
    }
    b.adopt(vm);
    expect((await b.show(vm)).status.state).toBe('shutoff');
    expect(existsSync(path.join(a.dataDir, 'vms', vm))).toBe(false);
  }, 300_000);
});
