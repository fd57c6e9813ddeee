/**
 * Issue 12 item 11 (durability across guest resets), with a real file system: the report was a
 * Debian guest (ext4) that `sync`ed a counter file, was reset from inside in the same command, and
 * came back with an older value. Here the Linux fixture guest runs its file-system counter mode
 * (`vmsnap.fs_counter`, fixtures/guest/init.sh) on ext4 with its journal (formatted on the host,
 * given to `vm create --disk-from`), on a vmsnap volume: write the counter, `sync`, print
 * `synced=<v>`, again, while a process spins beside it. It is reset
 *   - from inside right after a sync, every FS_EVERY-th value (alternately the kernel's emergency
 *     restart, `echo b > /proc/sysrq-trigger`, and `reboot -f`), as in the report;
 *   - from outside (QMP `system_reset` on a second monitor) as soon as the test sees a synced line;
 *   - from outside right after a live `vmsnap take` returns.
 * QEMU keeps running and keeps its NBD connection across each reset; the guest's journal replay,
 * its flushes (sync → FLUSH) and the writes in flight at the reset all go through the volume.
 * Every boot prints the value it finds: it must be at least the last value printed as synced
 * before that boot (and at most one more: the unsynced next write may or may not have landed).
 */
import { execFileSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parseErrorLines } from '../../fixtures/guest/index.js';
import { QmpClient } from '../../src/hypervisor/qmp.js';
import { VmLab, sleep } from '../helpers/vm.js';

const BOOTS = 24; // boots to reach: BOOTS - 1 resets at least
const FS_EVERY = 3;

interface FsEvent {
  kind: 'boot' | 'synced';
  value: number;
}

const FS_LINE = /VMSNAP-FSCOUNTER (boot|synced)=(\d+)/g;

function fsEvents(log: string): FsEvent[] {
  return [...log.matchAll(FS_LINE)].map((m) => ({ kind: m[1] as FsEvent['kind'], value: Number(m[2]) }));
}

const boots = (ev: FsEvent[]): number => ev.filter((e) => e.kind === 'boot').length;

describe('Linux guest (TCG) on ext4: resets right after sync, from inside and outside', () => {
  let lab: VmLab;
  let qmpPath: string;

  beforeAll(async () => {
    lab = await VmLab.create('fsreset');
    qmpPath = path.join(lab.root, 'test-qmp.sock');
    const img = path.join(lab.root, 'ext4.img');
    writeFileSync(img, '');
    execFileSync('truncate', ['-s', '64M', img]);
    // ext4 as Debian makes it (journal, metadata checksums): the guest's busybox can only make ext2.
    execFileSync('mkfs.ext4', ['-q', '-F', img]);
    await lab.createLinuxVm('f1', {
      diskFrom: img,
      diskWorkload: false,
      memMiB: 8,
      rate: 0,
      extra: { fs_counter: '/dev/vda', fs_reboot_every: FS_EVERY },
      qemuArgs: ['-qmp', `unix:${qmpPath},server=on,wait=off`],
    });
    await lab.start('f1');
  });

  afterAll(async () => {
    await lab?.cleanup();
  });

  it(`${BOOTS - 1}+ resets right after sync (inside, QMP, after a live take): every boot finds the last synced value`, async () => {
    const qmp = await QmpClient.connect(qmpPath);
    let qmpResets = 0;
    let takes = 0;
    const events = async (): Promise<FsEvent[]> => fsEvents(await lab.serial('f1'));
    const waitEvents = async (done: (ev: FsEvent[]) => boolean, what: string): Promise<FsEvent[]> => {
      const deadline = Date.now() + 90_000;
      for (;;) {
        const ev = await events();
        if (done(ev)) return ev;
        if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}; console tail:\n${(await lab.serial('f1')).slice(-1500)}`);
        await sleep(30);
      }
    };
    try {
      for (let r = 0; boots(await events()) < BOOTS; r++) {
        const n = boots(await events());
        if (r % 4 === 1 || r % 4 === 3) {
          // Reset from outside as soon as this boot reports a synced value (after a take on some rounds).
          await waitEvents((ev) => boots(ev) > n || (boots(ev) === n && ev[ev.length - 1]!.kind === 'synced'), `a synced line of boot ${n}`);
          if (r % 4 === 3) {
            await lab.json(['take', 'f1', '-m', `before reset round ${r}`]);
            takes++;
          }
          if (boots(await events()) === n) {
            const reset = qmp.waitEvent('RESET', () => true, 30_000);
            await qmp.execute('system_reset');
            await reset;
            qmpResets++;
          }
        }
        // Rounds 0 and 2: the guest resets itself after its next FS_EVERY-th synced value.
        await waitEvents((ev) => boots(ev) > n, `boot ${n + 1}`);
      }
      // The last boot's first synced values: the file system still works after all that.
      const n = boots(await events());
      await waitEvents((ev) => boots(ev) > n || ev[ev.length - 1]!.kind === 'synced', 'a synced line of the last boot');
    } finally {
      qmp.close();
    }

    const log = await lab.serial('f1');
    const ev = fsEvents(log);
    let lastSynced = 0;
    const found: string[] = [];
    const verdicts: { boot: number; found: number; synced: number }[] = [];
    for (const e of ev) {
      if (e.kind === 'synced') lastSynced = e.value;
      else {
        verdicts.push({ boot: verdicts.length, found: e.value, synced: lastSynced });
        found.push(`${lastSynced}→${e.value}`);
      }
    }
    const resets = verdicts.length - 1;
    console.log(`fs counter: ${resets} resets (${qmpResets} by QMP, ${takes} of them right after a live take, ${resets - qmpResets} from inside); last synced → found at boot: ${found.join(' ')}`);
    expect(verdicts[0]!.found, 'first boot: a fresh file system').toBe(0);
    expect(resets).toBeGreaterThanOrEqual(BOOTS - 1);
    expect(qmpResets).toBeGreaterThanOrEqual(Math.floor(BOOTS / 4));
    expect(resets - qmpResets).toBeGreaterThanOrEqual(Math.floor(BOOTS / 4));
    for (const v of verdicts.slice(1)) {
      expect(v.found, `boot ${v.boot}: value synced before its reset`).toBeGreaterThanOrEqual(v.synced);
      expect(v.found, `boot ${v.boot}: no value never written`).toBeLessThanOrEqual(v.synced + 1);
    }
    expect(parseErrorLines(log), 'guest error lines').toEqual([]);
    await lab.ok(['vm', 'stop', 'f1']);
    const check = await lab.run(['check', '--read-data']);
    expect(check.code, check.stdout + check.stderr).toBe(0);
  }, 400_000);
});
