/**
 * `vmsnap copy` / `vmsnap sync` end to end with the compiled CLI and a real S3 server (s3rver):
 * local -> S3 -> local round trips are bit-identical (same keys and re-encrypted), only missing
 * chunks travel on an incremental copy, and the S3 secret key appears in no output of any command,
 * including failures.
 */
import { readFileSync, writeFileSync } from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ensureBuilt, mixedImage, removeDir, sha256, tempDir, vmsnap, type RunOptions, type RunResult } from '../helpers/cli.js';
import { startS3rver, type S3rverHandle } from '../helpers/s3rver.js';

let s3: S3rverHandle;
let dir: string;
const outputs: RunResult[] = [];

function env(extra: Record<string, string> = {}): Record<string, string> {
  return { AWS_ACCESS_KEY_ID: s3.accessKeyId, AWS_SECRET_ACCESS_KEY: s3.secretAccessKey, AWS_REGION: 'us-east-1', NODE_NO_WARNINGS: '1', ...extra };
}

async function run(repo: string | null, args: string[], opts: RunOptions = {}): Promise<RunResult> {
  const r = await vmsnap(repo, args, { ...opts, env: { ...env(), ...(opts.env as Record<string, string> | undefined) } });
  outputs.push(r);
  return r;
}
async function ok(repo: string | null, args: string[], opts: RunOptions = {}): Promise<RunResult> {
  const r = await run(repo, args, opts);
  if (r.code !== 0) throw new Error(`vmsnap ${args.join(' ')} exited ${r.code}: ${r.stderr}`);
  return r;
}

beforeAll(async () => {
  ensureBuilt();
  s3 = await startS3rver();
  dir = tempDir('vmsnap-copy-');
}, 120_000);
afterAll(async () => {
  await s3?.stop();
  removeDir(dir);
});

describe('vmsnap copy / sync', () => {
  const img1 = mixedImage(6 << 20, 11);
  const img2 = Buffer.from(img1);
  // Second version: 1 MiB rewritten in the middle.
  mixedImage(1 << 20, 99).copy(img2, 2 << 20);

  it('local -> S3 -> local (same keys) gives bit-identical exports and sends only missing chunks', async () => {
    const local = path.join(dir, 'a');
    const back = path.join(dir, 'a-back');
    const remote = `${s3.url}/same`;
    writeFileSync(path.join(dir, 'img1'), img1);
    writeFileSync(path.join(dir, 'img2'), img2);
    await ok(local, ['init']);
    await ok(local, ['import', path.join(dir, 'img1'), '--vm', 'pc', '-q']);
    const first = JSON.parse((await ok(local, ['--json', 'copy', 'pc:latest', '--to', remote, '--init'])).stdout) as { mode: string; snapshots: { sent: number; chunks: number; target: string; source: string }[] };
    expect(first.mode).toBe('same-keys');
    expect(first.snapshots[0]!.sent).toBe(first.snapshots[0]!.chunks);
    expect(first.snapshots[0]!.target).toBe(first.snapshots[0]!.source);

    await ok(local, ['import', path.join(dir, 'img2'), '--vm', 'pc', '-q']);
    const second = JSON.parse((await ok(local, ['--json', 'copy', 'pc:latest', '--to', remote])).stdout) as { snapshots: { sent: number; chunks: number; present: number }[] };
    const s = second.snapshots[0]!;
    // Only the rewritten MiB (16 chunks of 64 KiB, fewer if some of it is zeros) travels.
    expect(s.sent).toBeGreaterThan(0);
    expect(s.sent).toBeLessThanOrEqual(16);
    expect(s.present).toBe(s.chunks - s.sent);

    // Again: nothing to do.
    const again = JSON.parse((await ok(local, ['--json', 'copy', 'pc:latest', '--to', remote])).stdout) as { snapshots: { alreadyPresent: boolean }[] };
    expect(again.snapshots[0]!.alreadyPresent).toBe(true);

    // And back with sync into a fresh local repository.
    await ok(null, ['sync', '--from', remote, '--to', back, '--init', '-q']);
    const ls = JSON.parse((await ok(back, ['--json', 'ls'])).stdout) as { id: string }[];
    expect(ls).toHaveLength(2);
    for (const [i, img] of [img1, img2].entries()) {
      const out = path.join(dir, `back-${i}`);
      await ok(back, ['export', ls[i]!.id, out, '-q']);
      expect(sha256(readFileSync(out))).toBe(sha256(img));
    }
    expect((await ok(back, ['check'])).stdout).toContain('no errors');
  }, 60_000);

  it('re-encrypts when keys differ: plain local -> encrypted S3 -> encrypted local, bit-identical', async () => {
    const local = path.join(dir, 'b');
    const back = path.join(dir, 'b-back');
    const remote = `${s3.url}/enc`;
    writeFileSync(path.join(dir, 'img1'), img1);
    writeFileSync(path.join(dir, 'img2'), img2);
    await ok(local, ['init']);
    await ok(local, ['import', path.join(dir, 'img1'), '--vm', 'pc', '-q']);
    await ok(local, ['import', path.join(dir, 'img2'), '--vm', 'pc', '-q']);
    const toS3 = JSON.parse((await ok(local, ['--json', 'sync', '--to', remote, '--init'], { env: { VMSNAP_TO_PASSWORD: 's3-pass' } })).stdout) as {
      mode: string;
      snapshots: { source: string; target: string; sent: number; present: number; chunks: number }[];
    };
    expect(toS3.mode).toBe('re-encrypt');
    expect(toS3.snapshots[0]!.target).not.toBe(toS3.snapshots[0]!.source);
    // The second snapshot shares most chunks with the first: the parent's mapping is reused.
    expect(toS3.snapshots[1]!.sent).toBeLessThanOrEqual(16);

    const pwFile = path.join(dir, 'to-pass');
    writeFileSync(pwFile, 'local-pass\n');
    await ok(null, ['sync', '--from', remote, '--to', back, '--init', '--to-password-file', pwFile, '-q'], { env: { VMSNAP_PASSWORD: 's3-pass' } });
    // Resyncing finds both already there (recognised by meta.copyOf).
    const re = JSON.parse((await ok(null, ['--json', 'sync', '--from', remote, '--to', back, '--to-password-file', pwFile], { env: { VMSNAP_PASSWORD: 's3-pass' } })).stdout) as { snapshots: { alreadyPresent: boolean }[] };
    expect(re.snapshots.every((x) => x.alreadyPresent)).toBe(true);

    const ls = JSON.parse((await ok(back, ['--json', 'ls'], { env: { VMSNAP_PASSWORD: 'local-pass' } })).stdout) as { id: string; parent: string | null }[];
    expect(ls).toHaveLength(2);
    expect(ls[1]!.parent).toBe(ls[0]!.id);
    for (const [i, img] of [img1, img2].entries()) {
      const out = path.join(dir, `enc-back-${i}`);
      await ok(back, ['export', ls[i]!.id, out, '-q'], { env: { VMSNAP_PASSWORD: 'local-pass' } });
      expect(sha256(readFileSync(out))).toBe(sha256(img));
    }
    // Wrong target password: refused, nothing written.
    const bad = await run(null, ['sync', '--from', remote, '--to', back], { env: { VMSNAP_PASSWORD: 's3-pass', VMSNAP_TO_PASSWORD: 'nope' } });
    expect(bad.code).toBe(1);
    expect(bad.stderr).toMatch(/wrong password/);
  }, 60_000);

  it('the S3 secret key appears in no output, log or error message', async () => {
    const remote = `${s3.url}/secret`;
    await ok(remote, ['init']);
    writeFileSync(path.join(dir, 'small'), img1.subarray(0, 1 << 20));
    await ok(remote, ['--stats', 'import', path.join(dir, 'small'), '--vm', 'x']);
    await ok(remote, ['--stats', '--json', 'check']);
    await ok(remote, ['--stats', 'prune']);
    // Failures: missing bucket, missing repository, unreachable server, a stalled S3 error body.
    const failures = [
      await run(`s3:${s3.endpoint}/no-such-bucket/x`, ['ls']),
      await run(`${s3.url}/nothing-here`, ['--stats', 'ls']),
      await run(`s3:http://127.0.0.1:1/${s3.bucket}/x`, ['ls']),
      await run(`s3:http://user:${s3.secretAccessKey}@127.0.0.1:${s3.port}/${s3.bucket}/x`, ['ls']),
    ];
    for (const f of failures) expect(f.code).not.toBe(0);
    expect(outputs.length).toBeGreaterThan(20);
    for (const r of outputs) {
      expect(r.stdout).not.toContain(s3.secretAccessKey);
      expect(r.stderr).not.toContain(s3.secretAccessKey);
    }
  }, 60_000);
});
