/**
 * Crash safety of LocalBackend: a child process putting objects is SIGKILLed mid-stream, several
 * times; afterwards every listed object is complete, every acknowledged put is there, and the
 * overwritten config is exactly one complete version.
 */
import { spawn } from 'node:child_process';
import { mkdtemp, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';
import { LocalBackend } from '../../src/store/backend/local.js';
import { listAll } from './backend-conformance.js';
import { expectedContent } from './backend-crash-child.js';

const here = path.dirname(fileURLToPath(import.meta.url));
const child = path.join(here, 'backend-crash-child.ts');
const dirs: string[] = [];
afterAll(async () => {
  for (const d of dirs) await rm(d, { recursive: true, force: true });
});

/**
 * Runs the child until it starts its `starts`-th put, then SIGKILLs it (or, with `selfKillAtPublish`,
 * lets it kill itself at that publish); returns the acknowledged puts.
 */
function runAndKill(root: string, round: number, starts: number, selfKillAtPublish = 0): Promise<string[]> {
  return new Promise((resolve, reject) => {
    const p = spawn(process.execPath, ['--import', 'tsx', child, root, String(round)], {
      env: { ...process.env, VMSNAP_CRASH_CHILD: '1', VMSNAP_CRASH_AT_PUBLISH: String(selfKillAtPublish) },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    const done: string[] = [];
    let started = 0;
    let buf = '';
    let stderr = '';
    let killed = false;
    p.stdout.setEncoding('utf8');
    p.stdout.on('data', (chunk: string) => {
      buf += chunk;
      let nl: number;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        if (line.startsWith('done ')) done.push(line.slice(5));
        if (line.startsWith('start ')) started++;
      }
      if (!killed && selfKillAtPublish === 0 && started >= starts) {
        killed = true;
        p.kill('SIGKILL');
      }
    });
    p.stderr.on('data', (c: Buffer) => (stderr += c.toString()));
    p.on('error', reject);
    p.on('exit', (code, signal) => {
      if (signal === 'SIGKILL' && (killed || selfKillAtPublish > 0)) resolve(done);
      else reject(new Error(`crash child exited early (code ${code}, signal ${signal}): ${stderr}`));
    });
  });
}

describe('LocalBackend crash safety', () => {
  it('shows only complete objects after SIGKILL in the middle of puts', async () => {
    const root = await mkdtemp(path.join(tmpdir(), 'vmsnap-crash-'));
    dirs.push(root);
    const acknowledged: string[] = [];
    // Different ack counts put the kill at different points of the put cycle.
    // External kills land wherever the child happens to be; self-kills at a publish guarantee torn
    // temp files (a pack, an index, and a config overwrite) exist on disk.
    const rounds: Array<[number, number, number]> = [[1, 7, 0], [2, 11, 0], [3, 0, 4], [4, 0, 5], [5, 0, 6], [6, 15, 0]];
    for (const [round, starts, selfKill] of rounds) {
      acknowledged.push(...(await runAndKill(root, round, starts, selfKill)));
    }
    const b = new LocalBackend(root);
    const packs = await listAll(b, 'packs');
    const index = await listAll(b, 'index');
    for (const o of packs) {
      const want = expectedContent(o.name);
      expect(o.size, `packs/${o.name}`).toBe(want.length);
      expect(Buffer.compare(await b.get('packs', o.name), want), `packs/${o.name}`).toBe(0);
    }
    for (const o of index) {
      const want = expectedContent(`idx${o.name}`);
      expect(o.size, `index/${o.name}`).toBe(want.length);
      expect(Buffer.compare(await b.get('index', o.name), want), `index/${o.name}`).toBe(0);
    }
    const packNames = new Set(packs.map((o) => o.name));
    const indexNames = new Set(index.map((o) => o.name));
    const configVersions: string[] = [];
    for (const a of acknowledged) {
      const [kind, name] = a.split(' ') as [string, string];
      if (kind === 'packs') expect(packNames.has(name), a).toBe(true);
      else if (kind === 'index') expect(indexNames.has(name), a).toBe(true);
      else configVersions.push(name);
    }
    // The config is one complete version: the last acknowledged one or a later one not yet acknowledged.
    const config = await b.get('config', 'config');
    const candidates = [...packNames].map((n) => `config${n}`);
    expect(candidates.some((c) => Buffer.compare(expectedContent(c), config) === 0)).toBe(true);
    expect(configVersions.length).toBeGreaterThan(0);
    // Partial writes may remain as temp files; they must never be listed, and cleanup removes them.
    const tmpCount = async (): Promise<number> => {
      let n = 0;
      for (const d of [path.join(root, 'index'), path.join(root, 'config')]) {
        n += (await readdir(d)).filter((f) => f.startsWith('.tmp-')).length;
      }
      for (const sub of await readdir(path.join(root, 'packs'))) {
        n += (await readdir(path.join(root, 'packs', sub))).filter((f) => f.startsWith('.tmp-')).length;
      }
      return n;
    };
    const before = await tmpCount();
    expect(before).toBeGreaterThanOrEqual(3);
    console.info(`crash test: ${acknowledged.length} puts acknowledged, ${packs.length} packs listed, ${before} torn temp files left`);
    expect(await b.removeLeftovers(0)).toBe(before);
    expect(await tmpCount()).toBe(0);
    expect((await listAll(b, 'packs')).length).toBe(packs.length);
  });
});
