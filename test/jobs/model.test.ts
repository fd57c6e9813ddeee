/**
 * The job model without Redis or VMs: payload checks, idempotency tags, the embedded runner's
 * retry/dedup/ordering policy, the agent's in-process locks, and the embedded scheduler's firing
 * rule under an injected clock (missed runs after a sleep caught up once).
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { idempotencyTag, JobPayloadError, parseJobSpec, type AnyJobSpec } from '../../src/jobs/model.js';
import { EmbeddedRunner, type Clock } from '../../src/jobs/embedded.js';
import { GuestLocks, RepoGate, waitWhileLocked } from '../../src/jobs/locks.js';
import { dueFirings, EmbeddedScheduler, parseInterval, ScheduleError, ScheduleFile, type Firing, type ScheduleDef } from '../../src/jobs/schedule.js';
import type { JobContext } from '../../src/jobs/handlers.js';
import { LockedError, OperationError } from '../../src/store/errors.js';
import { UserFacingError } from '../../src/util/errors.js';
import { JobFileStore } from '../../src/jobs/store.js';

const dirs: string[] = [];
afterAll(() => dirs.forEach((d) => rmSync(d, { recursive: true, force: true })));
const temp = () => {
  const d = mkdtempSync(path.join(tmpdir(), 'vmsnap-jobs-model-'));
  dirs.push(d);
  return d;
};

/** A clock whose time moves only when the test says so; sleeps resolve at once (time advances by them). */
function fakeClock(start: number): Clock & { set(t: number): void } {
  let t = start;
  return {
    now: () => t,
    sleep: async (ms) => {
      t += ms;
      await new Promise((r) => setImmediate(r));
    },
    set: (v) => (t = v),
  };
}

const ctx = { dataDir: '/nonexistent', hostId: 'h1' } as unknown as JobContext;

class Transient extends UserFacingError {
  readonly retryable = true;
}

describe('job payloads', () => {
  it('accepts each kind with typed args and refuses malformed ones naming the problem', () => {
    expect(parseJobSpec({ kind: 'take', args: { vm: 'a', tags: ['x'] }, key: 'k1' })).toEqual({ kind: 'take', args: { vm: 'a', tags: ['x'] }, key: 'k1' });
    expect(parseJobSpec({ kind: 'forget', args: { keep: { last: 2, daily: 7 }, vm: 'a', prune: true } }).args).toEqual({ keep: { last: 2, daily: 7 }, vm: 'a', prune: true });
    const bad: [unknown, RegExp][] = [
      [null, /not an object/],
      [{ kind: 'format-disk', args: {} }, /unknown job kind "format-disk"/],
      [{ kind: 'take', args: [] }, /"args" must be an object/],
      [{ kind: 'take', args: {} }, /"vm" must be a non-empty string/],
      [{ kind: 'take', args: { vm: 'a', tags: 'x' } }, /"tags" must be a list of strings/],
      [{ kind: 'copy', args: { refs: [], to: '/x' } }, /at least one snapshot/],
      [{ kind: 'forget', args: { keep: { last: -1 } } }, /"last" must be a non-negative number/],
      [{ kind: 'forget', args: { keep: { forever: 1 } } }, /unknown retention key "forever"/],
      [{ kind: 'import', args: { source: '-', vm: 'a' } }, /not stdin/],
      [{ kind: 'export', args: { ref: 'latest', target: '-' } }, /not stdout/],
      [{ kind: 'take', args: { vm: 'a' }, key: 5 }, /"key" must be a non-empty string/],
    ];
    for (const [payload, msg] of bad) {
      let err: unknown;
      try {
        parseJobSpec(payload);
      } catch (e) {
        err = e;
      }
      expect(err, JSON.stringify(payload)).toBeInstanceOf(JobPayloadError);
      expect((err as Error).message).toMatch(msg);
      expect((err as JobPayloadError).userFacing).toBe(true);
    }
  });

  it('idempotency tags are valid snapshot tags for any key', () => {
    expect(idempotencyTag('repeat:s1:1700000000000')).toBe('job:repeat:s1:1700000000000');
    expect(idempotencyTag('a b/c')).toBe('job:a-b-c');
    expect(idempotencyTag('x'.repeat(500))).toMatch(/^job:[0-9a-f]{40}$/);
  });
});

describe('embedded runner', () => {
  it('retries a retryable failure with backoff, fails a permanent one at once', async () => {
    const clock = fakeClock(1_000_000);
    const calls = new Map<string, number>();
    const runner = new EmbeddedRunner({
      ctx,
      clock,
      retry: { attempts: 4, backoffMs: 1000 },
      handler: async (spec) => {
        const vm = (spec.args as { vm: string }).vm;
        const n = (calls.get(vm) ?? 0) + 1;
        calls.set(vm, n);
        if (vm === 'flaky' && n < 3) throw new Transient('backend timed out');
        if (vm === 'wrapped' && n < 2) throw new OperationError('take', 'writing pack', new LockedError('locked by prune'));
        if (vm === 'broken') throw new UserFacingError('VM broken does not exist');
        return { ok: vm };
      },
    });
    const t0 = clock.now();
    const flaky = await runner.wait(runner.submit({ kind: 'take', args: { vm: 'flaky' } }).id);
    expect(flaky).toMatchObject({ state: 'completed', attempts: 3, result: { ok: 'flaky' }, error: null });
    // 1 s then 2 s of backoff, on the injected clock.
    expect(clock.now() - t0).toBe(3000);
    expect((await runner.wait(runner.submit({ kind: 'take', args: { vm: 'wrapped' } }).id)).attempts).toBe(2);
    const broken = await runner.wait(runner.submit({ kind: 'take', args: { vm: 'broken' } }).id);
    expect(broken).toMatchObject({ state: 'failed', attempts: 1, error: { message: 'VM broken does not exist', retryable: false, userFacing: true } });
    expect(calls.get('broken')).toBe(1);
    await runner.close();
  });

  it('gives up a retryable failure after the last attempt', async () => {
    const runner = new EmbeddedRunner({ ctx, clock: fakeClock(0), retry: { attempts: 2, backoffMs: 10 }, handler: () => Promise.reject(new Transient('still down')) });
    expect(await runner.wait(runner.submit({ kind: 'check', args: {} }).id)).toMatchObject({ state: 'failed', attempts: 2, error: { retryable: true } });
    await runner.close();
  });

  it('a job submitted again with the same idempotency key is the same job: it runs once', async () => {
    let runs = 0;
    const runner = new EmbeddedRunner({ ctx, handler: async () => ({ run: ++runs }) });
    const a = runner.submit({ kind: 'take', args: { vm: 'a' }, key: 'K' });
    const b = runner.submit({ kind: 'take', args: { vm: 'a' }, key: 'K' });
    expect(b.id).toBe(a.id);
    await runner.wait(a.id);
    expect(runner.submit({ kind: 'take', args: { vm: 'a' }, key: 'K' }).id).toBe(a.id);
    expect(runs).toBe(1);
    await runner.close();
  });

  it('refuses a malformed payload before queueing anything', () => {
    const runner = new EmbeddedRunner({ ctx, handler: async () => null });
    expect(() => runner.submit({ kind: 'take', args: {} })).toThrow(JobPayloadError);
    expect(runner.list()).toEqual([]);
  });

  it('records each job in its store for `vmsnap jobs`', async () => {
    const dir = temp();
    const store = new JobFileStore(dir, { progressEveryMs: 0 });
    const runner = new EmbeddedRunner({
      ctx,
      store,
      handler: async (_spec, run) => {
        run.sink.emit({ type: 'phase', phase: 'reading' });
        run.sink.emit({ type: 'progress', phase: 'reading', done: 5, total: 10, unit: 'bytes' });
        return { snapshot: 'f'.repeat(64) };
      },
    });
    const rec = await runner.wait(runner.submit({ kind: 'import', args: { source: '/x', vm: 'a' } }).id);
    await runner.close();
    const [stored] = await new JobFileStore(dir).list();
    expect(stored).toMatchObject({ id: rec.id, state: 'completed', kind: 'import', phase: 'reading', progress: { done: 5, total: 10 }, result: { snapshot: 'f'.repeat(64) } });
  });
});

describe('locks inside an agent', () => {
  it('jobs of one guest run one at a time, other guests alongside', async () => {
    const locks = new GuestLocks();
    const log: string[] = [];
    const job = (g: string, n: string) =>
      locks.with(g, async () => {
        log.push(`start ${n}`);
        await new Promise((r) => setTimeout(r, 20));
        log.push(`end ${n}`);
      });
    await Promise.all([job('a', 'a1'), job('a', 'a2'), job('b', 'b1')]);
    expect(log.indexOf('end a1')).toBeLessThan(log.indexOf('start a2'));
    expect(log.indexOf('start b1')).toBeLessThan(log.indexOf('end a1'));
  });

  it('a prune waits for the takes in progress and takes that come later wait for it', async () => {
    const gate = new RepoGate();
    const log: string[] = [];
    const step = (name: string, ms: number) => async () => {
      log.push(`+${name}`);
      await new Promise((r) => setTimeout(r, ms));
      log.push(`-${name}`);
    };
    const t1 = gate.shared(step('take1', 30));
    await new Promise((r) => setTimeout(r, 5));
    const p = gate.exclusive(step('prune', 10));
    const t2 = gate.shared(step('take2', 5));
    await Promise.all([t1, p, t2]);
    expect(log).toEqual(['+take1', '-take1', '+prune', '-prune', '+take2', '-take2']);
  });

  it("waits out another process's repository lock instead of failing", async () => {
    const clock = fakeClock(0);
    let n = 0;
    const waits: string[] = [];
    const r = await waitWhileLocked(
      async () => {
        if (++n < 4) throw new LockedError('repository is locked by prune (pid 1 on h)');
        return 'done';
      },
      { sleep: clock.sleep, now: clock.now, onWait: (m) => waits.push(m) },
    );
    expect(r).toBe('done');
    expect(waits).toHaveLength(3);
    // Past the limit the LockedError is the attempt's failure (retryable: the queue tries later).
    await expect(waitWhileLocked(() => Promise.reject(new LockedError('held')), { maxWaitMs: 1000, sleep: clock.sleep, now: clock.now })).rejects.toThrow(LockedError);
  });
});

describe('schedules', () => {
  const def = (over: Partial<ScheduleDef> = {}): ScheduleDef => ({ name: 's1', vm: 'a', everyMs: 3_600_000, keep: { hourly: 24 }, host: 'h1', created: '2026-01-01T00:00:00Z', ...over });

  it('parses intervals and refuses bad ones', () => {
    expect(parseInterval('--every', '1h')).toBe(3_600_000);
    expect(parseInterval('--every', '90s')).toBe(90_000);
    expect(parseInterval('--check', 'weekly')).toBe(7 * 86_400_000);
    for (const bad of ['', '0s', '1', 'h', '500ms', 'soon']) expect(() => parseInterval('--every', bad)).toThrow(ScheduleError);
  });

  it('fires a missed schedule once after a long sleep, not once per missed interval', () => {
    const h = 3_600_000;
    const s = [def({ checkEveryMs: 7 * 24 * h })];
    const first = dueFirings(s, {}, 0);
    expect(first.firings.map((f) => f.timer)).toEqual(['run', 'check']);
    expect(dueFirings(s, first.state, h / 2).firings).toEqual([]);
    // Asleep for five hours: one run when the clock shows it, and the next an hour after that.
    const late = dueFirings(s, first.state, 5 * h + 123);
    expect(late.firings.map((f) => f.timer)).toEqual(['run']);
    expect(late.firings[0]!.key).toBe(`sched:s1:${5 * h + 123}`);
    expect(dueFirings(s, late.state, 5 * h + 124).firings).toEqual([]);
    expect(dueFirings(s, late.state, 6 * h + 123).firings).toHaveLength(1);
  });

  it('the embedded scheduler reads the schedules file and records its firings (injected clock)', async () => {
    const dir = temp();
    const file = new ScheduleFile(dir);
    await file.add(def());
    await expect(file.add(def())).rejects.toThrow(/exists/);
    const clock = fakeClock(Date.UTC(2026, 0, 1));
    const fired: Firing[] = [];
    const sched = new EmbeddedScheduler(file, (f) => fired.push(f), { clock });
    await sched.tick();
    clock.set(clock.now() + 30 * 60_000);
    await sched.tick();
    expect(fired).toHaveLength(1);
    // A laptop that slept 10 hours: a new scheduler (process restarted) reads the recorded firing.
    clock.set(clock.now() + 10 * 3_600_000);
    const again = new EmbeddedScheduler(file, (f) => fired.push(f), { clock });
    await again.tick();
    await again.tick();
    expect(fired).toHaveLength(2);
    const spec: AnyJobSpec = fired[1]!.spec;
    expect(spec).toMatchObject({ kind: 'schedule-run', args: { schedule: 's1', vm: 'a', keep: { hourly: 24 } } });
    await file.remove('s1');
    await again.tick();
    expect(await file.lastFired()).toEqual({});
  });
});
