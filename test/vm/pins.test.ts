/**
 * Acceptance (issue 12 item 2): a VM disk restored to a snapshot reads that snapshot's chunks
 * lazily, so the snapshot is pinned; `forget --prune` keeps it, says why, and the guest's disk
 * reads, the next take and `check --read-data` are all fine. The exact repro of the issue:
 *
 *   take vm1; take vm1; restore vm1 <first>; forget --keep-last 1 --vm vm1 --prune; take vm1
 *
 * The Linux fixture guest (TCG) checks its disk: right after the restore it re-reads and rewrites
 * records in the chunks the first snapshot holds, which only that snapshot still references, and
 * the test reads every block of the live disk through a second NBD client after the prune.
 */
import { execFile } from 'node:child_process';
import { promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { guestArtifacts } from '../../fixtures/guest/index.js';
import { VmLab, last } from '../helpers/vm.js';
import { vmsnap } from '../helpers/cli.js';
import { Volume } from '../../src/cow/volume.js';
import { diskDir, vmPaths } from '../../src/vm/config.js';

const DISK_RATE = 100;
const run = promisify(execFile);

interface ForgetJson {
  group: string;
  keep: { id: string; reasons: string[]; pins?: { id: string; snapshot: string; holder: string }[] }[];
  remove: string[];
}

describe('Linux guest (TCG): forget --prune after a restore keeps the pinned snapshot', () => {
  let lab: VmLab;

  beforeAll(async () => {
    lab = await VmLab.create('pins');
    await lab.createLinuxVm('p1', { rate: 200, diskRate: DISK_RATE });
    await lab.start('p1');
  });

  afterAll(async () => {
    await lab?.cleanup();
  });

  it('take, take, restore the first, forget --keep-last 1 --prune, take: disk, take and check are fine', async () => {
    await lab.waitFor('p1', (s) => s.length >= 2 && last(s).diskSeq > DISK_RATE / 2, 'boot and disk records');
    const first = (await lab.json<{ snapshot: string }>(['take', 'p1', '-m', 'first'])).snapshot;
    // Enough records after the first take that the second snapshot's disk differs in the chunks
    // the guest writes next: the first snapshot alone holds their older content.
    const after1 = last(await lab.statuses('p1')).diskSeq;
    await lab.waitFor('p1', (s) => last(s).diskSeq > after1 + DISK_RATE, 'disk records after the first take');
    const second = (await lab.json<{ snapshot: string }>(['take', 'p1', '-m', 'second'])).snapshot;
    expect(second).not.toBe(first);

    const r = await lab.json<{ runState: string }>(['restore', 'p1', first]);
    expect(r.runState).toBe('running');
    await lab.rememberPids('p1');
    await lab.waitGuestTime('p1', 0, 500);

    const forget = await lab.run(['forget', '--keep-last', '1', '--vm', 'p1', '--prune']);
    expect(forget.code, forget.stderr).toBe(0);
    // Whatever forget's prune left in packs it did not repack goes too: nothing unreferenced
    // survives by the luck of the pack layout.
    const prune = await lab.run(['prune', '--repack-below', '1']);
    expect(prune.code, prune.stderr).toBe(0);

    // Every block of the live disk still reads (a second NBD client beside the guest's QEMU).
    const sock = path.join(lab.runDir('p1'), 'nbd.sock');
    await run('nbdcopy', [`nbd+unix:///disk0?socket=${sock}`, 'null:']);

    // The guest keeps reading and writing the restored disk: zero disk errors over a few seconds
    // of its own time (its verify re-reads records of the first snapshot's chunks).
    const post = await lab.waitGuestTime('p1', 0, 4000);
    expect(last(post).diskSeq).toBeGreaterThan(post[0]!.diskSeq + DISK_RATE);
    for (const s of post) expect(s.diskErrors, 'guest disk errors after forget --prune').toBe(0);
    expect(await lab.errorLines('p1')).toEqual([]);

    const t = await lab.run(['--json', 'take', 'p1', '-m', 'after forget']);
    expect(t.code, `take after forget --prune: ${t.stderr}`).toBe(0);
    const check = await lab.run(['check', '--read-data']);
    expect(check.code, `check --read-data: ${check.stdout}${check.stderr}`).toBe(0);
    expect(check.stdout).toMatch(/1 pin\(s\)/);

    // forget said what it kept and why, naming the pin's holder.
    console.log(forget.stdout);
    const lines = forget.stdout.split('\n');
    const keptAt = lines.findIndex((l) => l.includes(`keep   ${first.slice(0, 12)}`));
    expect(keptAt, forget.stdout).toBeGreaterThanOrEqual(0);
    expect(lines[keptAt]).toContain('pinned');
    expect(lines[keptAt + 1]).toMatch(/pinned: pin [0-9a-f]{8} held by p1\/\S+ on /);
    expect(forget.stdout).toContain('removed 0');

    // The same in JSON (a dry run changes nothing and decides the same).
    const j = await lab.json<ForgetJson[]>(['forget', '--keep-last', '1', '--vm', 'p1', '--dry-run']);
    const k = j.flatMap((d) => d.keep).find((x) => x.id === first);
    expect(k, JSON.stringify(j)).toBeDefined();
    expect(k!.reasons).toEqual(['pinned']);
    expect(k!.pins?.map((p) => [p.snapshot, p.holder.startsWith('p1/')])).toEqual([[first, true]]);

    // Nothing else went: the second is the one --keep-last 1 keeps, the third is new.
    const ids = await lab.snapshotIds();
    expect(ids.sort()).toEqual([first, second, JSON.parse(t.stdout).snapshot].sort());
    await lab.waitGuestTime('p1', 0, 5000);
    expect(await lab.errorLines('p1')).toEqual([]);
  }, 300_000);
});

/**
 * Sibling: a disk's last snapshot (the parent its next snapshot diffs against) is not pinned. When
 * it is forgotten and pruned, the next take must not reuse the ids of its chunks that are gone.
 * A stopped VM, so every command reads the repository afresh.
 */
describe('stopped VMs: a pruned parent, pins released by take and left by an unreachable vm rm', () => {
  let lab: VmLab;

  beforeAll(async () => {
    lab = await VmLab.create('parent');
    await lab.ok(['vm', 'create', 's1', '--memory', '64M', '--disk', '1M', '--kernel', guestArtifacts().bmElf]);
  });

  afterAll(async () => {
    await lab?.cleanup();
  });

  /** Writes `fill` over the whole 64 KiB block `i` of a stopped VM's disk. */
  async function writeBlock(i: number, fill: number, vm = 's1'): Promise<void> {
    const v = await Volume.open(diskDir(vmPaths(lab.dataDir, vm), 'disk0'));
    try {
      await v.write(i * 65536, Buffer.alloc(65536, fill));
      await v.flush();
    } finally {
      await v.close();
    }
  }

  it('stores the missing blocks again: the take succeeds and check --read-data is clean', async () => {
    for (let i = 0; i < 4; i++) await writeBlock(i, 1);
    const s1 = (await lab.json<{ snapshot: string }>(['take', 's1', '--tag', 'keep'])).snapshot;
    await writeBlock(1, 2);
    const s2 = (await lab.json<{ snapshot: string }>(['take', 's1'])).snapshot;
    // The last snapshot goes; its one new chunk (block 1) with it.
    await lab.ok(['forget', '--vm', 's1', '--keep-tag', 'keep', '--prune']);
    expect(await lab.snapshotIds()).toEqual([s1]);

    await writeBlock(2, 3);
    const t = await lab.run(['--json', 'take', 's1']);
    expect(t.code, `take after its parent was pruned: ${t.stderr}`).toBe(0);
    const s3 = (JSON.parse(t.stdout) as { snapshot: string }).snapshot;
    expect(s3).not.toBe(s2);
    const check = await lab.run(['check', '--read-data']);
    expect(check.code, check.stdout + check.stderr).toBe(0);

    const out = path.join(lab.root, 's3.img');
    await lab.ok(['export', `${s3}:disk0`, out]);
    const img = await fsp.readFile(out);
    const want = Buffer.alloc(1 << 20);
    [1, 2, 3, 1].forEach((f, i) => want.fill(f, i * 65536, (i + 1) * 65536));
    expect(img.equals(want)).toBe(true);
  });

  interface PinsJson {
    pins: { id: string; snapshot: string; holder: string }[];
  }
  const pinsOf = async (holder: string) => (await lab.json<PinsJson>(['pins', 'ls'])).pins.filter((p) => p.holder === holder);

  it('a stopped take releases the pin of a disk that no longer reads its base, as a live take does', async () => {
    const [base] = await lab.snapshotIds();
    await lab.ok(['vm', 'create', 's2', '--memory', '64M', '--disk-from', `${base}:disk0`, '--kernel', guestArtifacts().bmElf]);
    expect((await pinsOf('s2/disk0')).map((p) => p.snapshot)).toEqual([base]);
    // Every block rewritten: nothing reads the base any more, and the take records that.
    for (let i = 0; i < 16; i++) await writeBlock(i, 7, 's2');
    const t = await lab.json<{ note?: string }>(['take', 's2']);
    expect(t.note).toMatch(/no longer depends on snapshot .*unpinned/);
    expect(await pinsOf('s2/disk0')).toEqual([]);
    const check = await lab.run(['check', '--read-data']);
    expect(check.code, check.stdout + check.stderr).toBe(0);
  });

  it('vm rm with an unreachable repository removes the VM, leaves its pin and names `vmsnap pins rm`', async () => {
    const [base] = await lab.snapshotIds();
    await lab.ok(['vm', 'create', 's3', '--memory', '64M', '--disk-from', `${base}:disk0`, '--kernel', guestArtifacts().bmElf]);
    const [pin] = await pinsOf('s3/disk0');
    expect(pin).toBeDefined();
    const r = await vmsnap(null, ['vm', 'rm', 's3'], { env: { ...lab.env, VMSNAP_REPO: path.join(lab.root, 'no-such-repo') } });
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr).toContain(`vmsnap pins rm ${pin!.id}`);
    expect((await lab.json<{ name: string }[]>(['vm', 'ls'])).map((v) => v.name)).not.toContain('s3');
    expect((await pinsOf('s3/disk0')).map((p) => p.id)).toEqual([pin!.id]);
    await lab.ok(['pins', 'rm', pin!.id]);
    expect(await pinsOf('s3/disk0')).toEqual([]);
  });
});
