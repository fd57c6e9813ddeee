/**
 * Host identity and paired peers for migration between hosts.
 *
 * Each host has one Ed25519 key pair, created on first use:
 *
 *   <dataDir>/host-key        PKCS#8 PEM private key, mode 0600 (the public key derives from it)
 *   <dataDir>/peers.json      { "version": 1, "peers": [ { "name", "address"?, "fingerprint", "added" } ] }
 *
 * A host is named to people by the fingerprint of its public key, `SHA256:` + unpadded base64 of
 * SHA-256(raw 32-byte public key) — the form `ssh-keygen -l` prints, so it reads familiar. Pairing is
 * pinning: `vmsnap receive` prints its fingerprint, the other host records it (`vmsnap peer add`),
 * and from then on a channel (channel.ts) is refused unless the peer proves it holds that key. Both
 * directions are pinned: the destination only accepts sources it was told about.
 *
 * Why not TLS: Node can speak TLS but cannot make an X.509 certificate, and a pinned raw key is all
 * that pairing needs; channel.ts builds the handshake from node:crypto primitives (X25519, Ed25519,
 * HKDF) the way SIGMA/Noise do.
 */
import { createHash, createPrivateKey, createPublicKey, generateKeyPairSync, type KeyObject } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { atomicWriteFile } from '../util/fs.js';
import { BadInputError, UserFacingError } from '../util/errors.js';

export class IdentityError extends UserFacingError {
  override readonly name = 'IdentityError';
}

/** A peer name or fingerprint given by the user that cannot be one (bad usage). */
export class PeerInputError extends BadInputError {
  override readonly name = 'PeerInputError';
}

export interface HostIdentity {
  privateKey: KeyObject;
  /** Raw 32-byte Ed25519 public key, as sent in the handshake. */
  publicKey: Buffer;
  fingerprint: string;
}

export interface Peer {
  name: string;
  address?: string;
  fingerprint: string;
  added: string;
}

const FINGERPRINT_RE = /^SHA256:[A-Za-z0-9+/]{43}$/;
const PEER_NAME_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$/;

export function fingerprintOf(rawPublicKey: Uint8Array): string {
  return 'SHA256:' + createHash('sha256').update(rawPublicKey).digest('base64').replace(/=+$/, '');
}

export function isFingerprint(s: string): boolean {
  return FINGERPRINT_RE.test(s);
}

/** The raw 32-byte public key of an Ed25519 KeyObject (the last 32 bytes of its SPKI DER). */
export function rawPublicKey(key: KeyObject): Buffer {
  const der = createPublicKey(key).export({ type: 'spki', format: 'der' });
  return Buffer.from(der.subarray(der.length - 32));
}

/** An Ed25519 public KeyObject from its raw 32 bytes. */
export function publicKeyFromRaw(raw: Uint8Array): KeyObject {
  if (raw.length !== 32) throw new IdentityError(`an Ed25519 public key has 32 bytes, not ${raw.length}`);
  // SPKI prefix for Ed25519 (RFC 8410): SEQUENCE { SEQUENCE { OID 1.3.101.112 } BIT STRING }.
  const prefix = Buffer.from('302a300506032b6570032100', 'hex');
  return createPublicKey({ key: Buffer.concat([prefix, raw]), format: 'der', type: 'spki' });
}

function identityFrom(privateKey: KeyObject): HostIdentity {
  if (privateKey.asymmetricKeyType !== 'ed25519') throw new IdentityError('the host key is not an Ed25519 key');
  const publicKey = rawPublicKey(privateKey);
  return { privateKey, publicKey, fingerprint: fingerprintOf(publicKey) };
}

/** A fresh identity that is never stored (tests, one-off tools). */
export function ephemeralIdentity(): HostIdentity {
  return identityFrom(generateKeyPairSync('ed25519').privateKey);
}

/**
 * This host's identity under `dataDir`, created (0600, atomically, never replacing one that a
 * concurrent process created first) when there is none yet.
 */
export async function loadOrCreateIdentity(dataDir: string): Promise<HostIdentity> {
  const file = path.join(dataDir, 'host-key');
  for (let attempt = 0; attempt < 2; attempt++) {
    let pem: string | null = null;
    try {
      pem = await fsp.readFile(file, 'utf8');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw new IdentityError(`cannot read the host key ${file}: ${(err as Error).message}`);
    }
    if (pem !== null) {
      try {
        return identityFrom(createPrivateKey(pem));
      } catch (err) {
        throw new IdentityError(`the host key ${file} is damaged (${(err as Error).message}); move it away to make a new identity (peers must then pair again)`);
      }
    }
    await fsp.mkdir(dataDir, { recursive: true, mode: 0o700 });
    const { privateKey } = generateKeyPairSync('ed25519');
    try {
      await atomicWriteFile(file, privateKey.export({ type: 'pkcs8', format: 'pem' }) as string, { exclusive: true, mode: 0o600 });
      return identityFrom(privateKey);
    } catch (err) {
      // Another process made the key between our read and our write: use theirs.
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
    }
  }
  throw new IdentityError(`cannot create the host key ${file}`);
}

function peersFile(dataDir: string): string {
  return path.join(dataDir, 'peers.json');
}

export async function listPeers(dataDir: string): Promise<Peer[]> {
  const file = peersFile(dataDir);
  let text: string;
  try {
    text = await fsp.readFile(file, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw new IdentityError(`cannot read ${file}: ${(err as Error).message}`);
  }
  let doc: unknown;
  try {
    doc = JSON.parse(text);
  } catch {
    throw new IdentityError(`${file} is not valid JSON; fix or remove it`);
  }
  const d = doc as { version?: unknown; peers?: unknown };
  if (d.version !== 1 || !Array.isArray(d.peers)) throw new IdentityError(`${file} is not a version 1 peers file`);
  return d.peers.map((p, i) => {
    const q = p as Partial<Peer>;
    if (typeof q.name !== 'string' || typeof q.fingerprint !== 'string' || !isFingerprint(q.fingerprint)) {
      throw new IdentityError(`${file}: peer #${i + 1} lacks a valid name or fingerprint`);
    }
    return { name: q.name, fingerprint: q.fingerprint, added: String(q.added ?? ''), ...(typeof q.address === 'string' ? { address: q.address } : {}) };
  });
}

/** Adds (or replaces, by name) a paired peer. */
export async function addPeer(dataDir: string, peer: Omit<Peer, 'added'>): Promise<Peer> {
  if (!PEER_NAME_RE.test(peer.name)) throw new PeerInputError(`peer name ${JSON.stringify(peer.name)}: use 1-63 letters, digits, '.', '_' or '-'`);
  if (!isFingerprint(peer.fingerprint)) throw new PeerInputError(`${JSON.stringify(peer.fingerprint)} is not a fingerprint (SHA256: followed by 43 base64 characters, as 'vmsnap receive' prints it)`);
  const peers = (await listPeers(dataDir)).filter((p) => p.name !== peer.name);
  const added: Peer = { ...peer, added: new Date().toISOString() };
  peers.push(added);
  await fsp.mkdir(dataDir, { recursive: true, mode: 0o700 });
  await atomicWriteFile(peersFile(dataDir), JSON.stringify({ version: 1, peers }, null, 2) + '\n', { mode: 0o600 });
  return added;
}

export async function removePeer(dataDir: string, name: string): Promise<boolean> {
  const peers = await listPeers(dataDir);
  const kept = peers.filter((p) => p.name !== name);
  if (kept.length === peers.length) return false;
  await atomicWriteFile(peersFile(dataDir), JSON.stringify({ version: 1, peers: kept }, null, 2) + '\n', { mode: 0o600 });
  return true;
}
