import { mkdtempSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { addPeer, IdentityError, isFingerprint, listPeers, loadOrCreateIdentity, removePeer } from '../../src/migration/identity.js';

const dirs: string[] = [];
function tmp(): string {
  const d = mkdtempSync(path.join(tmpdir(), 'vmsnap-identity-'));
  dirs.push(d);
  return d;
}
afterEach(() => {
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

describe('host identity', () => {
  it('is created once, private (0600 whatever the umask), and the same on every load', async () => {
    const dir = path.join(tmp(), 'data');
    const old = process.umask(0);
    try {
      const a = await loadOrCreateIdentity(dir);
      expect(isFingerprint(a.fingerprint)).toBe(true);
      expect(statSync(path.join(dir, 'host-key')).mode & 0o777).toBe(0o600);
      expect(statSync(dir).mode & 0o777).toBe(0o700);
      const b = await loadOrCreateIdentity(dir);
      expect(b.fingerprint).toBe(a.fingerprint);
    } finally {
      process.umask(old);
    }
  });

  it('concurrent first uses agree on one key', async () => {
    const dir = tmp();
    const ids = await Promise.all(Array.from({ length: 8 }, () => loadOrCreateIdentity(dir)));
    expect(new Set(ids.map((i) => i.fingerprint)).size).toBe(1);
  });

  it('a damaged key file is named, never replaced', async () => {
    const dir = tmp();
    writeFileSync(path.join(dir, 'host-key'), 'not a key');
    const err = await loadOrCreateIdentity(dir).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(IdentityError);
    expect((err as Error).message).toMatch(/host-key is damaged/);
  });
});

describe('peers', () => {
  it('are added, replaced by name, listed and removed', async () => {
    const dir = tmp();
    const fp = (await loadOrCreateIdentity(tmp())).fingerprint;
    const fp2 = (await loadOrCreateIdentity(tmp())).fingerprint;
    await addPeer(dir, { name: 'desktop', address: '10.0.0.2:7450', fingerprint: fp });
    await addPeer(dir, { name: 'desktop', fingerprint: fp2 });
    const peers = await listPeers(dir);
    expect(peers).toHaveLength(1);
    expect(peers[0]).toMatchObject({ name: 'desktop', fingerprint: fp2 });
    expect(statSync(path.join(dir, 'peers.json')).mode & 0o777).toBe(0o600);
    expect(await removePeer(dir, 'desktop')).toBe(true);
    expect(await removePeer(dir, 'desktop')).toBe(false);
    expect(await listPeers(dir)).toEqual([]);
  });

  it('bad names, bad fingerprints and a damaged peers file get clear errors', async () => {
    const dir = tmp();
    await expect(addPeer(dir, { name: '../x', fingerprint: 'SHA256:' + 'A'.repeat(43) })).rejects.toThrow(/peer name/);
    await expect(addPeer(dir, { name: 'x', fingerprint: 'abc' })).rejects.toThrow(/is not a fingerprint/);
    writeFileSync(path.join(dir, 'peers.json'), '{');
    await expect(listPeers(dir)).rejects.toThrow(/peers.json is not valid JSON/);
  });
});
