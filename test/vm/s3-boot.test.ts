/**
 * Acceptance: a guest boots straight from a snapshot in an S3 repository (s3rver). The Linux fixture
 * guest runs with its repository on S3, a live snapshot is taken into it, and `vmsnap clone` starts a
 * new VM whose copy-on-write disk has that snapshot as its base: base blocks are fetched on demand
 * from S3 (ranged GETs through S3Backend, read-ahead in BaseReader) while the guest runs. The clone
 * must report zero memory and disk errors in its VMSNAP-STATUS lines — while background hydration
 * (`--hydrate`, rate-limited so that it is provably still running) is copying the rest.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { VmLab, last } from '../helpers/vm.js';
import { startS3rver, type S3rverHandle } from '../helpers/s3rver.js';

describe('boot from S3', () => {
  let lab: VmLab;
  let s3: S3rverHandle;

  beforeAll(async () => {
    s3 = await startS3rver();
    lab = await VmLab.create('s3boot', { repo: () => `${s3.url}/vms`, init: false });
    Object.assign(lab.env, { AWS_ACCESS_KEY_ID: s3.accessKeyId, AWS_SECRET_ACCESS_KEY: s3.secretAccessKey, AWS_REGION: 'us-east-1', NODE_NO_WARNINGS: '1' });
    await lab.ok(['init']);
  }, 120_000);

  afterAll(async () => {
    await lab?.cleanup();
    await s3?.stop();
  });

  it('clones a snapshot stored in S3 and the clone runs with zero errors', async () => {
    await lab.createLinuxVm('s3g', { rate: 2000 });
    await lab.start('s3g');
    const boot = await lab.waitFor('s3g', (s) => s.length >= 2 && last(s).diskSeq > 0, 'boot');
    expect(last(boot).errors).toBe(0);
    const w = await lab.takeWindow('s3g', ['-m', 's3']);
    console.log(`take into S3: paused ${w.take.pauseMs.toFixed(1)} ms, total ${w.take.durationMs.toFixed(0)} ms, stored ${w.take.storedBytes} B`);
    // 5 KiB/s: the disk's few non-zero 64 KiB blocks take about a minute to hydrate, far longer than
    // the checks below.
    const c = await lab.json<{ vm: string; snapshot: string; started: boolean }>(['clone', w.take.snapshot, 's3g-clone', '--hydrate', '0.005']);
    lab.adopt('s3g-clone');
    expect(c.started).toBe(true);
    await lab.rememberPids('s3g-clone');
    const clone = await lab.waitGuestTime('s3g-clone', 0, 2500);
    console.log(`clone from S3: ${clone.length} status lines, gen ${clone[0]!.gen}..${last(clone).gen}, disk_seq ${clone[0]!.diskSeq}..${last(clone).diskSeq}`);
    expect(clone.every((s) => s.errors === 0 && s.diskErrors === 0)).toBe(true);
    expect(last(clone).diskSeq).toBeGreaterThan(clone[0]!.diskSeq);
    expect(await lab.errorLines('s3g-clone')).toEqual([]);
    const st = await lab.json<{ status: { hydration: { done: number; total: number; finished: boolean } | null } }>(['vm', 'show', 's3g-clone']);
    console.log(`hydration while the clone ran: ${JSON.stringify(st.status.hydration)}`);
    expect(st.status.hydration).not.toBeNull();
    expect(st.status.hydration!.finished).toBe(false);
    expect(st.status.hydration!.total).toBeGreaterThan(0);
    expect(st.status.hydration!.done).toBeLessThan(st.status.hydration!.total);
  }, 300_000);
});
