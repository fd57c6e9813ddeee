/**
 * The supervisor's socket protocol: requests are checked before they reach the VM, results come
 * back typed, and an error crosses with its class name, operation, step and its user-facing and
 * retryable verdicts — so an internal bug in the supervisor is reported as a bug, not as the user's
 * mistake (issue 9: "typed and lossless").
 */
import { mkdtempSync, mkdirSync, rmSync } from 'node:fs';
import * as net from 'node:net';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { callSupervisor, parseRequest, SupervisorError } from '../../src/vm/supervisor.js';
import { vmPaths } from '../../src/vm/config.js';
import { VmOperationError } from '../../src/vm/runtime.js';
import { errorRecord, isUserFacing, RemoteError } from '../../src/util/errors.js';
import { BackendError } from '../../src/store/backend/contract.js';
import { UsageError } from '../../src/store/errors.js';

const cleanups: (() => void)[] = [];
afterEach(() => {
  for (const c of cleanups.splice(0)) c();
});

/** A stand-in supervisor on the VM's real socket path that answers every request with `reply`. */
async function fakeSupervisor(reply: unknown): Promise<{ paths: ReturnType<typeof vmPaths>; seen: unknown[] }> {
  const data = mkdtempSync(path.join(tmpdir(), 'vmsnap-sup-'));
  const paths = vmPaths(data, 'v');
  mkdirSync(path.dirname(paths.supervisorSocket), { recursive: true });
  const seen: unknown[] = [];
  const server = net.createServer((sock) => {
    let buf = '';
    sock.on('data', (d) => {
      buf += String(d);
      if (!buf.includes('\n')) return;
      seen.push(JSON.parse(buf));
      sock.end(typeof reply === 'string' ? reply : JSON.stringify(reply) + '\n');
    });
  });
  await new Promise<void>((r) => server.listen(paths.supervisorSocket, r));
  cleanups.push(() => {
    server.close();
    rmSync(data, { recursive: true, force: true });
  });
  return { paths, seen };
}

describe('supervisor protocol', () => {
  it('an error crosses with its name, operation, step and verdicts', async () => {
    const user = errorRecord(new VmOperationError('restore', 'verifying the snapshot data', 'chunk 3fa2 is damaged'));
    const { paths } = await fakeSupervisor({ ok: false, error: user });
    const err = await callSupervisor(paths, { op: 'restore', snapshot: 'abc' }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(RemoteError);
    expect(err).toMatchObject({ name: 'VmOperationError', operation: 'restore', step: 'verifying the snapshot data', userFacing: true, retryable: false });
    expect((err as Error).message).toBe('restore: verifying the snapshot data: chunk 3fa2 is damaged');
    expect(isUserFacing(err)).toBe(true);
  });

  it('an internal bug stays a bug on the CLI side, and a retryable failure stays retryable', async () => {
    const bug = await fakeSupervisor({ ok: false, error: errorRecord(new TypeError("Cannot read properties of undefined (reading 'x')")) });
    const e1 = await callSupervisor(bug.paths, { op: 'status' }).catch((e: unknown) => e);
    expect(e1).toMatchObject({ name: 'TypeError', userFacing: false });
    expect(isUserFacing(e1)).toBe(false);
    const transient = await fakeSupervisor({ ok: false, error: errorRecord(new BackendError('s3: timeout', true)) });
    const e2 = await callSupervisor(transient.paths, { op: 'take', options: {} }).catch((e: unknown) => e);
    expect(e2).toMatchObject({ name: 'BackendError', userFacing: true, retryable: true });
    const usage = errorRecord(new UsageError('no snapshot matches x'));
    expect(usage.usage).toBe(true);
  });

  it('results come back as sent; an answer of the wrong shape is refused clearly', async () => {
    const ok = await fakeSupervisor({ ok: true, result: { name: 'v', state: 'running', pid: 7, accel: 'tcg', qemuVersion: '10.0.2', hydration: null } });
    const st = await callSupervisor(ok.paths, { op: 'status' });
    expect(st.state).toBe('running');
    expect(ok.seen).toEqual([{ op: 'status' }]);
    const odd = await fakeSupervisor({ ok: false, error: 'a bare message' });
    const err = await callSupervisor(odd.paths, { op: 'status' }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(SupervisorError);
    expect((err as Error).message).toMatch(/does not understand/);
  });

  it('requests are checked before they reach the VM', () => {
    expect(parseRequest('{"op":"take","options":{"diskOnly":true}}')).toEqual({ op: 'take', options: { diskOnly: true } });
    expect(() => parseRequest('not json')).toThrow(/malformed request/);
    expect(() => parseRequest('{"op":"format-disk"}')).toThrow(/unknown request "format-disk"/);
    expect(() => parseRequest('{"op":"restore"}')).toThrow(/restore: snapshot missing/);
    expect(() => parseRequest('{"op":"take"}')).toThrow(/take: options missing/);
    expect(() => parseRequest('[1]')).toThrow(/unknown request/);
  });
});
