/**
 * An interrupted `vmsnap copy` resumes without re-sending data. The copy to S3 goes through an HTTP
 * fault proxy that lets the first pack PUT through and stalls every later one; once the first pack
 * is in the bucket the test SIGKILLs the CLI (no timing involved: the process is stuck on a stalled
 * PUT). A second run must adopt the orphaned pack (its index was never written), send only the
 * rest, and the target must end up with exactly the source's stored bytes (no duplicate pack).
 */
import { spawn } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openBackend } from '../../src/store/backend/open.js';
import type { Backend } from '../../src/store/backend/contract.js';
import { cliEntry, ensureBuilt, packBytes, randomData, removeDir, repoFiles, ROOT, sha256, tempDir, vmsnapOk } from '../helpers/cli.js';
import { startS3rver, type S3rverHandle } from '../helpers/s3rver.js';
import { startFaultProxy, type FaultProxy } from '../helpers/http-fault-proxy.js';

let s3: S3rverHandle;
let proxy: FaultProxy;
let dir: string;
let direct: Backend;

const env = () => ({ AWS_ACCESS_KEY_ID: s3.accessKeyId, AWS_SECRET_ACCESS_KEY: s3.secretAccessKey, AWS_REGION: 'us-east-1', NODE_NO_WARNINGS: '1' });

beforeAll(async () => {
  ensureBuilt();
  s3 = await startS3rver();
  dir = tempDir('vmsnap-copy-resume-');
}, 120_000);
afterAll(async () => {
  await direct?.close();
  await proxy?.stop();
  await s3?.stop();
  removeDir(dir);
});

async function packsIn(b: Backend): Promise<{ count: number; bytes: number }> {
  let count = 0;
  let bytes = 0;
  for await (const o of b.list('packs')) {
    count++;
    bytes += o.size;
  }
  return { count, bytes };
}

describe('interrupted copy', () => {
  it('resumes after SIGKILL and completes without duplicating data', async () => {
    const local = path.join(dir, 'src');
    const img = randomData(100 << 20, 7); // incompressible: 4 packs of <= 32 MiB
    writeFileSync(path.join(dir, 'img'), img);
    await vmsnapOk(local, ['init', '--codec', 'none']);
    await vmsnapOk(local, ['import', path.join(dir, 'img'), '--vm', 'big', '-q']);
    const srcPacks = repoFiles(local, 'packs').length;
    const srcBytes = packBytes(local);
    expect(srcPacks).toBeGreaterThanOrEqual(4);

    const prefix = 'resume';
    direct = openBackend(`${s3.url}/${prefix}`, { s3: { credentials: { accessKeyId: s3.accessKeyId, secretAccessKey: s3.secretAccessKey } } });
    await vmsnapOk(`${s3.url}/${prefix}`, ['init', '--codec', 'none'], { env: env() });

    // Run 1: through the proxy; the second and later pack PUTs hang forever.
    proxy = await startFaultProxy(s3.endpoint, [{ id: 'stall-packs', method: 'PUT', path: /\/packs\//, skip: 1, times: 1000, fault: { type: 'stall' } }]);
    const child = spawn(process.execPath, [cliEntry(), '--repo', local, 'copy', 'big:latest', '--to', `s3:${proxy.endpoint}/${s3.bucket}/${prefix}`], {
      cwd: ROOT,
      env: { ...process.env, ...env() },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stderr = '';
    child.stderr.on('data', (b: Buffer) => (stderr += b.toString()));
    const exited = new Promise<NodeJS.Signals | null>((resolve) => child.on('close', (_c, sig) => resolve(sig)));
    // Wait (event-driven polling, no timing assertion) until one pack landed and a later one stalls.
    for (;;) {
      if (child.exitCode !== null) throw new Error(`copy ended before it could be interrupted: ${stderr}`);
      if (proxy.fired.length > 0 && (await packsIn(direct)).count >= 1) break;
      await new Promise((r) => setTimeout(r, 100));
    }
    child.kill('SIGKILL');
    expect(await exited).toBe('SIGKILL');
    const afterKill = await packsIn(direct);
    expect(afterKill.count).toBe(1);
    let snapshots = 0;
    for await (const o of direct.list('snapshots')) if (o) snapshots++;
    expect(snapshots).toBe(0); // the manifest is written last

    // Run 2: straight to the server.
    const r = JSON.parse(
      (await vmsnapOk(local, ['--json', 'copy', 'big:latest', '--to', `${s3.url}/${prefix}`], { env: env() })).stdout,
    ) as { adoptedPacks: number; snapshots: { chunks: number; present: number; sent: number; bytesSent: number }[] };
    expect(r.adoptedPacks).toBe(1);
    const s = r.snapshots[0]!;
    expect(s.present).toBeGreaterThan(0); // what arrived in run 1 is not sent again
    expect(s.present + s.sent).toBe(s.chunks);
    expect(s.bytesSent).toBeLessThanOrEqual(srcBytes - afterKill.bytes);

    // No duplicates: the target holds exactly as many stored bytes as the source (same blobs,
    // pack framing differs by a few bytes at most per pack).
    const final = await packsIn(direct);
    expect(Math.abs(final.bytes - srcBytes)).toBeLessThan(64 << 10);
    expect(final.count).toBeLessThanOrEqual(srcPacks + 1);

    const out = path.join(dir, 'out');
    await vmsnapOk(`${s3.url}/${prefix}`, ['export', 'big:latest', out, '-q'], { env: env() });
    expect(sha256(readFileSync(out))).toBe(sha256(img));
    const check = await vmsnapOk(`${s3.url}/${prefix}`, ['check'], { env: env() });
    expect(check.stdout).toContain('no errors');
    expect(check.stdout).not.toContain('not indexed');
  }, 120_000);
});
