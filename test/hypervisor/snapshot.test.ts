/**
 * Real QEMU 10 (TCG, 64 MiB, no guest kernel): background snapshots and live migrations parsed by
 * vmsnap, rebuilt in another page order, loaded into fresh `-incoming defer` QEMUs and compared.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildStream, type PageRecord, type RebuildPage, type StreamPrefix } from '../../src/migstream/index.js';
import {
  captureSnapshot,
  type CaptureOptions,
  restoreFromStream,
  SnapshotCaptureError,
  SnapshotRestoreError,
  type CaptureResult,
} from '../../src/hypervisor/snapshot.js';
import type { QmpClient } from '../../src/hypervisor/qmp.js';
import { pmem, qemuHarness, waitDirtying, waitStatus, type QemuHarness } from './helpers.js';

const MEM = 64 << 20;

/** Final contents per page (last record wins), plus how often each page was sent. */
interface Capture {
  res: CaptureResult;
  pages: Map<string, Buffer | 'zero'>;
  sends: Map<string, number>;
}

async function capture(qmp: QmpClient, mode: 'background' | 'precopy', extra: Partial<CaptureOptions> = {}): Promise<Capture> {
  const pages = new Map<string, Buffer | 'zero'>();
  const sends = new Map<string, number>();
  let prefixSeen: StreamPrefix | undefined;
  const res = await captureSnapshot(
    qmp,
    {
      onPrefix(p) {
        prefixSeen = p;
      },
      onPages(batch: readonly PageRecord[]) {
        for (const r of batch) {
          const k = `${r.block}:${r.offset}`;
          // data is a view valid only during this call: copy what we keep
          pages.set(k, r.kind === 'zero' ? 'zero' : Buffer.from(r.data as Buffer));
          sends.set(k, (sends.get(k) ?? 0) + 1);
        }
      },
    },
    { mode, ...extra },
  );
  expect(prefixSeen?.bytes.equals(res.prefix.bytes)).toBe(true);
  return { res, pages, sends };
}

function totalPages(p: StreamPrefix): number {
  return p.blocks.reduce((a, b) => a + b.usedLength / 4096, 0);
}

function* rebuildPages(c: Capture, order: 'reverse' | 'shuffle'): Generator<RebuildPage> {
  const keys = [...c.pages.keys()];
  if (order === 'reverse') keys.reverse();
  else {
    let s = 12345;
    for (let i = keys.length - 1; i > 0; i--) {
      s = (s * 1103515245 + 12345) & 0x7fffffff;
      const j = s % (i + 1);
      [keys[i], keys[j]] = [keys[j] as string, keys[i] as string];
    }
  }
  for (const k of keys) {
    const [b, o] = k.split(':').map(Number) as [number, number];
    const v = c.pages.get(k);
    yield v === 'zero' ? { block: b, offset: o, kind: 'zero' } : { block: b, offset: o, kind: 'page', data: v };
  }
}

function samePages(a: Capture, b: Capture): string[] {
  const diffs: string[] = [];
  for (const [k, v] of a.pages) {
    const w = b.pages.get(k);
    const same = v === 'zero' || w === 'zero' ? v === w || isZero(v) === isZero(w) : w !== undefined && v.equals(w);
    if (!same) diffs.push(k);
  }
  if (a.pages.size !== b.pages.size) diffs.push(`size ${a.pages.size} vs ${b.pages.size}`);
  return diffs;
}
function isZero(v: Buffer | 'zero' | undefined): boolean {
  return v === 'zero' || (v !== undefined && v.every((x) => x === 0));
}

describe('QEMU 10 migration streams through vmsnap', () => {
  let h: QemuHarness;
  beforeAll(async () => {
    h = await qemuHarness();
  });
  afterAll(async () => {
    await h.cleanup();
  });

  it('background snapshot of a stopped guest: every page once; rebuilt in reverse it restores byte-exact', async () => {
    const src = await h.start('bg-src', { extraArgs: ['-bios', h.firmware] });
    await src.qmp.execute('stop');
    const c = await capture(src.qmp, 'background');
    const n = totalPages(c.res.prefix);
    expect(c.res.prefix.machine).toBe('pc-i440fx-10.0');
    expect(c.res.prefix.bytes.length).toBe(197);
    expect(c.res.stats.pageRecords + c.res.stats.zeroRecords).toBe(n);
    expect(c.pages.size).toBe(n);
    expect([...c.sends.values()].every((x) => x === 1)).toBe(true);
    expect(c.res.stats.endSections).toBe(0);
    expect(c.res.tail.trailer).toBe('vmdesc');
    expect(c.res.qemu.status).toBe('completed');
    const srcRam = await pmem(src.qmp, h.dir, 'bg-src', MEM);

    const dst = await h.start('bg-dst', { extraArgs: ['-bios', h.firmware], incomingDefer: true });
    const r = await restoreFromStream(dst.qmp, buildStream(c.res.prefix.bytes, rebuildPages(c, 'reverse'), c.res.tail.suffix, { commands: c.res.tail.commands, pagesPerSection: 1000 }));
    expect(r.runState).toBe('paused'); // a stopped source restores paused
    const dstRam = await pmem(dst.qmp, h.dir, 'bg-dst', MEM);
    expect(dstRam.equals(srcRam)).toBe(true);

    // Every block (ROMs, ACPI tables too), not only what pmemsave sees: capture the destination.
    const c2 = await capture(dst.qmp, 'background');
    expect(c2.res.prefix.bytes.equals(c.res.prefix.bytes)).toBe(true);
    expect(samePages(c, c2)).toEqual([]);
  });

  // Point-in-time is not checked here (this firmware's RAM says nothing about when it was saved):
  // the self-checking guests check it end to end — test/vm/bm.test.ts and linux.test.ts
  // (checkResumed: the restored generation lies in the take's window, no stale page).
  it('background snapshot of a running guest: every page sent exactly once, the guest keeps running, the stream restores', async () => {
    const src = await h.start('bgrun-src', { extraArgs: ['-bios', h.firmware] });
    const c = await capture(src.qmp, 'background');
    expect(c.pages.size).toBe(totalPages(c.res.prefix));
    expect([...c.sends.values()].every((x) => x === 1)).toBe(true);
    expect((await src.qmp.execute<{ status: string }>('query-status')).status).toBe('running');
    expect(typeof c.res.qemu.downtimeMs).toBe('number');
    expect(typeof c.res.qemu.totalTimeMs).toBe('number');
    console.log(`background snapshot (64 MiB, TCG): downtime ${c.res.qemu.downtimeMs} ms, total ${c.res.qemu.totalTimeMs} ms, wall ${c.res.wallMs.toFixed(0)} ms`);

    // Shuffled rebuild restores, and the restored guest runs on by itself.
    const dst = await h.start('bgrun-dst', { extraArgs: ['-bios', h.firmware], incomingDefer: true });
    const r = await restoreFromStream(dst.qmp, buildStream(c.res.prefix.bytes, rebuildPages(c, 'shuffle'), c.res.tail.suffix, { commands: c.res.tail.commands }));
    expect(r.runState).toBe('running');

    // A capability that changes the format is refused before anything is sent.
    await src.qmp.execute('migrate-set-capabilities', {
      capabilities: [
        { capability: 'background-snapshot', state: false },
        { capability: 'xbzrle', state: true },
      ],
    });
    const err = await captureSnapshot(src.qmp, { onPages() {} }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(SnapshotCaptureError);
    expect((err as SnapshotCaptureError).step).toBe('check-capabilities');
    expect((err as Error).message).toContain('xbzrle');
  });

  it('live (precopy) migration of a guest dirtying RAM: pages resent, last wins, destination equals source', async () => {
    const src = await h.start('live-src', { extraArgs: ['-bios', h.firmware] });
    // Resends need a guest that dirties RAM while the migration runs: wait until its loop runs, and
    // cap the bandwidth (64 MiB at 32 MiB/s: ~2 s) so a briefly starved vCPU still dirties pages
    // after they were sent (a CI run once migrated everything before the guest ran at all).
    await waitDirtying(src.qmp, h.dir, 'live-src');
    const c = await capture(src.qmp, 'precopy', { maxBandwidth: 32 << 20 });
    const resent = [...c.sends.values()].filter((x) => x > 1).length;
    expect(resent).toBeGreaterThan(0); // the firmware keeps 144 pages dirty
    expect(c.pages.size).toBe(totalPages(c.res.prefix));
    expect(c.res.stats.endSections).toBe(1);
    expect(c.res.tail.commands.map((x) => x.toString('hex'))).toEqual(['08000b0000']); // switchover-start
    await waitStatus(src.qmp, 'postmigrate');
    const srcRam = await pmem(src.qmp, h.dir, 'live-src', MEM);

    const dst = await h.start('live-dst', { extraArgs: ['-bios', h.firmware], incomingDefer: true, paused: true });
    const r = await restoreFromStream(dst.qmp, buildStream(c.res.prefix.bytes, rebuildPages(c, 'shuffle'), c.res.tail.suffix, { commands: c.res.tail.commands, pagesPerSection: 7 }));
    expect(r.runState).toBe('paused'); // -S keeps it paused so RAM can be compared
    const dstRam = await pmem(dst.qmp, h.dir, 'live-dst', MEM);
    expect(dstRam.equals(srcRam)).toBe(true);
  });

  it('a failing sink cancels the migration; the guest keeps running and the next capture works', async () => {
    const src = await h.start('cancel-src', { extraArgs: ['-bios', h.firmware] });
    const err = await captureSnapshot(src.qmp, {
      onPages() {
        throw new Error('store is full');
      },
    }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(SnapshotCaptureError);
    expect((err as SnapshotCaptureError).step).toBe('stream');
    expect((err as Error).message).toContain('store is full');
    const deadline = Date.now() + 30_000;
    let st = await src.qmp.execute<{ status: string }>('query-migrate');
    while (st.status !== 'cancelled' && st.status !== 'failed' && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 20));
      st = await src.qmp.execute<{ status: string }>('query-migrate');
    }
    expect(['cancelled', 'failed']).toContain(st.status);
    await waitStatus(src.qmp, 'running');
    // The next capture's status poll runs while beforeMigrate works (a disk flush, a pause), when
    // query-migrate still reports the cancelled migration: that must not fail the new one.
    const c = await capture(src.qmp, 'background', { pollMs: 10, beforeMigrate: () => new Promise((r) => setTimeout(r, 200)) });
    expect(c.pages.size).toBe(totalPages(c.res.prefix));
  });

  it('a corrupted rebuilt stream is rejected by QEMU (exit-on-error false) and reported', async () => {
    const src = await h.start('bad-src', { extraArgs: ['-bios', h.firmware] });
    await src.qmp.execute('stop');
    const c = await capture(src.qmp, 'background');
    const chunks: Buffer[] = [];
    for await (const x of buildStream(c.res.prefix.bytes, rebuildPages(c, 'reverse'), c.res.tail.suffix)) chunks.push(x as Buffer);
    const good = Buffer.concat(chunks);
    // The first record names a block; rename it to one QEMU does not have (same length).
    const p = c.res.prefix.bytes.length + 5 + 8;
    const nameLen = good[p] as number;
    const bad = Buffer.from(good);
    bad.fill('x'.charCodeAt(0), p + 1, p + 1 + nameLen);

    const dst = await h.start('bad-dst', { extraArgs: ['-bios', h.firmware], incomingDefer: true });
    const err = await restoreFromStream(dst.qmp, [bad], { qemuLog: dst.paths.qemuLog }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(SnapshotRestoreError);
    expect((err as SnapshotRestoreError).step).toBe('load');
    expect((err as Error).message).toMatch(/Can't find block xxx/);
    // QEMU stayed up and says the migration failed.
    const mig = await dst.qmp.execute<{ status: string }>('query-migrate');
    expect(mig.status).toBe('failed');
    expect(dst.hasExited).toBe(false);

    // Restoring into a QEMU that is not waiting for a stream is refused up front.
    const err2 = await restoreFromStream(src.qmp, [good]).catch((e: unknown) => e);
    expect(err2).toBeInstanceOf(SnapshotRestoreError);
    expect((err2 as SnapshotRestoreError).step).toBe('check-state');
  });
});
