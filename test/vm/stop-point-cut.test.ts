/**
 * The two mechanisms the take's disk cut rests on (src/vm/stop-point-cut.ts), against a real QEMU:
 * QmpClient.readPendingSync handles what QEMU already wrote without the event loop running, and the
 * cut freezes exactly once, at the first RESUME after a STOP, from inside the NBD server's hook.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NbdServer } from '../../src/cow/nbd-server.js';
import type { QmpEvent } from '../../src/hypervisor/qmp.js';
import { StopPointCut } from '../../src/vm/stop-point-cut.js';
import { qemuHarness, type QemuHarness } from '../hypervisor/helpers.js';

/** Blocks this thread (and so the event loop): only a synchronous read can see QEMU's output now. */
function blockEventLoop(ms: number): void {
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);
}

describe('disk cut at QEMU stop point', () => {
  let h: QemuHarness;
  beforeAll(async () => {
    h = await qemuHarness();
  });
  afterAll(async () => {
    await h.cleanup();
  });

  it('readPendingSync handles events and replies QEMU already sent, with the event loop blocked', async () => {
    const q = await h.start('sync');
    expect(q.qmp.canReadPendingSync).toBe(true);
    const seen: string[] = [];
    q.qmp.events.on('event', (e: QmpEvent) => seen.push(e.event));
    let replied = false;
    const stopped = q.qmp.execute('stop').then(() => (replied = true));
    // The command went out synchronously (an idle socket is written at once); the loop is kept
    // from reading the answer.
    blockEventLoop(300);
    expect(seen).toEqual([]);
    q.qmp.readPendingSync();
    expect(seen).toEqual(['STOP']);
    await stopped;
    expect(replied).toBe(true);
    // Nothing pending: returns at once, and the connection keeps working.
    q.qmp.readPendingSync();
    expect((await q.qmp.execute<{ status: string }>('query-status')).status).toBe('paused');
  });

  it('freezes once, at the first RESUME after a STOP, when the NBD hook runs', async () => {
    const q = await h.start('cut');
    const nbd = new NbdServer();
    let freezes = 0;
    // A RESUME with no STOP before it (someone else's) is not the snapshot's.
    await q.qmp.execute('stop');
    const cut = StopPointCut.arm(q.qmp, nbd, () => freezes++)!;
    expect(cut).not.toBeNull();
    expect(nbd.beforeChange).not.toBeNull();
    expect(StopPointCut.arm(q.qmp, nbd, () => undefined), 'one cut per server at a time').toBeNull();
    await q.qmp.execute('cont');
    await new Promise((r) => setTimeout(r, 100));
    expect(cut.resume).toBeNull();
    expect(freezes).toBe(0);

    // STOP then RESUME sent by QEMU while our loop is blocked: the hook (as the NBD server calls it
    // before a write) must see them and cut before that write executes.
    const cmds = [q.qmp.execute('stop'), q.qmp.execute('cont')];
    blockEventLoop(300);
    expect(freezes).toBe(0);
    nbd.beforeChange!();
    expect(freezes).toBe(1);
    expect(cut.done).toBe(true);
    expect(cut.stop!.event).toBe('STOP');
    expect(cut.resume!.event).toBe('RESUME');
    expect(nbd.beforeChange, 'the hook is removed once the cut is made').toBeNull();
    await Promise.all(cmds);
    await q.qmp.execute('stop');
    await q.qmp.execute('cont');
    await new Promise((r) => setTimeout(r, 100));
    expect(freezes).toBe(1);
    cut.disarm();
    expect(q.qmp.events.listenerCount('RESUME')).toBe(0);
  });
});
