import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { QmpClient, QmpClosedError, QmpError, QmpTimeoutError } from '../../src/hypervisor/qmp.js';
import { qemuHarness, type QemuHarness } from './helpers.js';

describe('QMP client against QEMU 10', () => {
  let h: QemuHarness;
  beforeAll(async () => {
    h = await qemuHarness();
  });
  afterAll(async () => {
    await h.cleanup();
  });

  it('negotiates, runs commands (concurrently, ids matched) and reports the version', async () => {
    const q = await h.start('cmds');
    expect(q.qmp.version.major).toBe(10);
    const v = await q.qmp.execute<{ qemu: { major: number } }>('query-version');
    expect(v.qemu.major).toBe(10);
    const many = await Promise.all(
      Array.from({ length: 20 }, (_, i) =>
        i % 2 ? q.qmp.execute<{ status: string }>('query-status') : q.qmp.execute<{ name?: string }>('query-name'),
      ),
    );
    expect(many.filter((x) => 'status' in x)).toHaveLength(10);
  });

  it('turns error replies into QmpError with class, description and command', async () => {
    const q = await h.start('errors');
    const e1 = await q.qmp.execute('no-such-command').catch((e: unknown) => e);
    expect(e1).toBeInstanceOf(QmpError);
    expect((e1 as QmpError).errorClass).toBe('CommandNotFound');
    expect((e1 as QmpError).command).toBe('no-such-command');
    const e2 = await q.qmp.execute('migrate-set-parameters', { 'max-bandwidth': 'lots' }).catch((e: unknown) => e);
    expect(e2).toBeInstanceOf(QmpError);
    expect((e2 as QmpError).desc).toMatch(/max-bandwidth/);
    // the connection is still usable
    expect(await q.qmp.execute<{ status: string }>('query-status')).toHaveProperty('status');
  });

  it('delivers events interleaved with replies (STOP, RESUME)', async () => {
    const q = await h.start('events');
    const stop = q.qmp.waitEvent('STOP', () => true, 10_000);
    await q.qmp.execute('stop');
    expect((await stop).event).toBe('STOP');
    const resume = q.qmp.waitEvent('RESUME', () => true, 10_000);
    const seen: string[] = [];
    q.qmp.events.on('event', (e: { event: string }) => seen.push(e.event));
    await q.qmp.execute('cont');
    const ev = await resume;
    expect(ev.timestamp.seconds).toBeGreaterThan(0);
    expect(seen).toContain('RESUME');
    await expect(q.qmp.waitEvent('SHUTDOWN', () => true, 100)).rejects.toBeInstanceOf(QmpTimeoutError);
  });

  it('times out a command QEMU does not answer, then recovers', async () => {
    const q = await h.start('timeout');
    process.kill(q.pid, 'SIGSTOP');
    try {
      await expect(q.qmp.execute('query-status', undefined, { timeoutMs: 200 })).rejects.toBeInstanceOf(QmpTimeoutError);
    } finally {
      process.kill(q.pid, 'SIGCONT');
    }
    expect(await q.qmp.execute<{ status: string }>('query-status')).toHaveProperty('status');
  });

  it('rejects pending commands and event waiters at once with QmpClosedError when QEMU dies', async () => {
    const q = await h.start('killed');
    process.kill(q.pid, 'SIGSTOP'); // QEMU cannot answer: the command stays pending
    const pending = q.qmp.execute('query-status', undefined, { timeoutMs: 60_000 });
    const waiter = q.qmp.waitEvent('STOP', () => true, 60_000);
    const t0 = Date.now();
    process.kill(q.pid, 'SIGKILL');
    await expect(pending).rejects.toBeInstanceOf(QmpClosedError);
    await expect(waiter).rejects.toBeInstanceOf(QmpClosedError);
    expect(Date.now() - t0).toBeLessThan(30_000); // long before the 60 s timeouts
    await expect(q.qmp.execute('query-status')).rejects.toBeInstanceOf(QmpClosedError);
    const exit = await q.exited;
    expect(exit.signal).toBe('SIGKILL');
  });

  it('gives up connecting to a socket that never appears', async () => {
    await expect(QmpClient.connect(path.join(h.dir, 'nothing.sock'), { timeoutMs: 200 })).rejects.toBeInstanceOf(QmpTimeoutError);
  });
});
