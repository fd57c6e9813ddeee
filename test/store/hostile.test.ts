/**
 * Hostile input: manifests, pack descriptions/trailers, index files and configs that lie about
 * lengths, counts, versions or names are refused with a clear error by the real decoders, before
 * anything is allocated from the claimed sizes or written — and end to end through the CLI, with
 * hand-crafted objects in a local repository (unencrypted manifests named by the BLAKE3 of their
 * plaintext, so they pass the name check and reach the parser; misnamed ones fail the name check).
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import * as path from 'node:path';
import { decodeManifest, encodeManifest, MAX_MANIFEST_BYTES, type SnapshotData } from '../../src/store/manifest.js';
import { PACK_ENTRY_SIZE, PACK_MAGIC, PACK_TRAILER, PackWriter, parseDescription, parseTrailer } from '../../src/store/pack.js';
import { ChunkIndex, decodeIndexFile, encodeIndexFile } from '../../src/store/chunk-index.js';
import { FORMAT_VERSION, parseConfig } from '../../src/store/format.js';
import { contentHash } from '../../src/store/hash.js';
import { FormatError, IntegrityError } from '../../src/store/errors.js';
import { ensureBuiltAsync, removeDir, repoFiles, tempDir, vmsnap, vmsnapOk, tempLeftovers } from '../helpers/cli.js';

const ID = (n: number) => Buffer.alloc(32, n);
const snapshotData = (over: Partial<SnapshotData> = {}): SnapshotData => ({
  vm: 'vm1',
  time: '2026-11-25T12:00:00.000Z',
  host: 'h',
  tags: ['daily'],
  parent: null,
  meta: {},
  streams: [{ name: 'disk0', kind: 'disk', size: 3 * 4096 + 1, chunkSize: 4096, chunks: Buffer.concat([ID(1), ID(2), ID(3), ID(4)]) }],
  ...over,
});
const manifestJson = (over: Record<string, unknown> = {}, stream: Record<string, unknown> = {}) => {
  const base = JSON.parse(encodeManifest(snapshotData()).toString()) as Record<string, unknown> & { streams: Record<string, unknown>[] };
  return Buffer.from(JSON.stringify({ ...base, streams: [{ ...base.streams[0], ...stream }], ...over }));
};

describe('decodeManifest', () => {
  it('reads a well-formed manifest', () => {
    const s = decodeManifest(manifestJson(), 'x');
    expect(s.streams[0]!.chunks.length).toBe(4 * 32);
  });
  it('refuses unsupported versions', () => {
    for (const v of [2, 0, '1', null]) expect(() => decodeManifest(manifestJson({ version: v }), 'x')).toThrow(/manifest version .* is not supported/);
  });
  it('refuses unsafe VM, stream and tag names', () => {
    for (const bad of ['../x', '..', '.hidden', 'a/b', 'a\\b', '', '-rf', 'x'.repeat(129), 'a\u0000b', 'a..b']) {
      expect(() => decodeManifest(manifestJson({ vm: bad }), 'x'), bad).toThrow(/invalid VM name/);
      expect(() => decodeManifest(manifestJson({}, { name: bad }), 'x'), bad).toThrow(/invalid stream name/);
      expect(() => decodeManifest(manifestJson({ tags: ['ok', bad] }), 'x'), bad).toThrow(/invalid tag/);
    }
    expect(() => decodeManifest(manifestJson({ tags: Array.from({ length: 65 }, (_, i) => `t${i}`) }), 'x')).toThrow(/at most 64/);
  });
  it('refuses huge sizes and chunk lists of the wrong length before decoding them', () => {
    // A size of 1 PiB + 1 would imply 2^34 chunk ids: refused on the number alone.
    expect(() => decodeManifest(manifestJson({}, { size: 2 ** 50 + 1 }), 'x')).toThrow(/invalid size/);
    expect(() => decodeManifest(manifestJson({}, { size: 1e300 }), 'x')).toThrow(/invalid size/);
    expect(() => decodeManifest(manifestJson({}, { size: -1 }), 'x')).toThrow(/invalid size/);
    // A plausible huge size with a short list: length mismatch, checked on the base64 text.
    expect(() => decodeManifest(manifestJson({}, { size: 2 ** 40 }), 'x')).toThrow(/chunk list has the wrong length/);
    expect(() => decodeManifest(manifestJson({}, { size: 4096 }), 'x')).toThrow(/chunk list has the wrong length/);
    expect(() => decodeManifest(manifestJson({}, { chunks: Buffer.alloc(5 * 32).toString('base64') }), 'x')).toThrow(/wrong length/);
    expect(() => decodeManifest(manifestJson({}, { chunkSize: 1000 }), 'x')).toThrow(/invalid chunk size/);
    expect(() => decodeManifest(manifestJson({}, { chunkSize: 2 ** 30 }), 'x')).toThrow(/invalid chunk size/);
    expect(() => decodeManifest(manifestJson({}, { kind: 'exe' }), 'x')).toThrow(/unknown stream kind/);
    expect(() => decodeManifest(manifestJson({ streams: Array.from({ length: 1025 }, () => ({})) }), 'x')).toThrow(/bad stream list/);
    expect(() => decodeManifest(manifestJson({ time: 'yesterday' }), 'x')).toThrow(/invalid time/);
    expect(() => decodeManifest(manifestJson({ parent: '../../x' }), 'x')).toThrow(/invalid snapshot id/);
    expect(() => decodeManifest(manifestJson({ meta: { a: { nested: 1 } } }), 'x')).toThrow(/meta a/);
  });
  it('refuses duplicate stream names (they would export to the same file)', () => {
    const base = JSON.parse(manifestJson().toString()) as { streams: unknown[] };
    expect(() => decodeManifest(Buffer.from(JSON.stringify({ ...base, streams: [base.streams[0], base.streams[0]] })), 'x')).toThrow(/appears twice/);
  });
  it('refuses non-JSON and oversized manifests', () => {
    expect(() => decodeManifest(Buffer.from('{"version":1,'), 'x')).toThrow(FormatError);
    expect(() => decodeManifest(Buffer.from('[]'), 'x')).toThrow(FormatError);
    // A buffer that claims to be larger than the limit (no need to allocate 256 MiB to test it).
    const fake = Buffer.alloc(1);
    Object.defineProperty(fake, 'length', { value: MAX_MANIFEST_BYTES + 1 });
    expect(() => decodeManifest(fake, 'x')).toThrow(/too large/);
  });
});

function realPack(): { bytes: Buffer; d: number } {
  const w = new PackWriter();
  w.add(ID(1), 0, Buffer.alloc(100, 1), 100);
  w.add(ID(2), 0, Buffer.alloc(50, 2), 50);
  const { bytes } = w.finish(null);
  return { bytes, d: bytes.readUInt32BE(bytes.length - PACK_TRAILER) };
}

describe('pack trailer and description', () => {
  it('reads a real pack', () => {
    const { bytes, d } = realPack();
    expect(parseTrailer(bytes.subarray(-PACK_TRAILER), bytes.length, 'p')).toBe(d);
    const entries = parseDescription(bytes.subarray(bytes.length - PACK_TRAILER - d, bytes.length - PACK_TRAILER), bytes.length, null, 'p');
    expect(entries.map((e) => e.storedLength)).toEqual([100, 50]);
  });
  it('refuses a trailer with a huge or impossible description length, or no end marker', () => {
    const { bytes } = realPack();
    const t = Buffer.from(bytes.subarray(-PACK_TRAILER));
    t.writeUInt32BE(0xffffffff, 0);
    expect(() => parseTrailer(t, bytes.length, 'p')).toThrow(/description length 4294967295 does not fit/);
    t.writeUInt32BE(bytes.length, 0);
    expect(() => parseTrailer(t, bytes.length, 'p')).toThrow(IntegrityError);
    expect(() => parseTrailer(Buffer.from('xxxxVMSX'), 1000, 'p')).toThrow(/missing end marker/);
    expect(() => parseTrailer(Buffer.alloc(4), 1000, 'p')).toThrow(/missing end marker/);
  });
  it('refuses descriptions whose count, offsets or lengths lie', () => {
    const { bytes, d } = realPack();
    const desc = () => Buffer.from(bytes.subarray(bytes.length - PACK_TRAILER - d, bytes.length - PACK_TRAILER));
    let x = desc();
    x.writeUInt32BE(0xffffffff, 4); // huge count: refused by comparing with the real length, nothing allocated
    expect(() => parseDescription(x, bytes.length, null, 'p')).toThrow(/says 4294967295 entries but holds 90 bytes/);
    x = desc();
    x.writeUInt32BE(3, 4);
    expect(() => parseDescription(x, bytes.length, null, 'p')).toThrow(/says 3 entries/);
    x = desc();
    x.writeUInt32BE(0xfffffff0, 8 + 37); // storedLength of entry 0
    expect(() => parseDescription(x, bytes.length, null, 'p')).toThrow(/entry 0 .* lies outside the pack's blobs/);
    x = desc();
    x.writeUInt32BE(0, 8 + 33); // offset inside the magic
    expect(() => parseDescription(x, bytes.length, null, 'p')).toThrow(/lies outside/);
    x = desc();
    x.writeUInt32BE(0xffffffff, 8 + PACK_ENTRY_SIZE + 41); // rawLength of entry 1
    expect(() => parseDescription(x, bytes.length, null, 'p')).toThrow(/entry 1 claims 4294967295 bytes, over the/);
    x = desc();
    x.writeUInt8(200, 8 + 32);
    expect(() => parseDescription(x, bytes.length, null, 'p')).toThrow(/unknown codec 200/);
    x = desc();
    x.write('XXXX', 0);
    expect(() => parseDescription(x, bytes.length, null, 'p')).toThrow(/bad magic/);
    // An encrypted pack's description must authenticate before its count is even read.
    expect(() => parseDescription(desc(), bytes.length, Buffer.alloc(32), 'p')).toThrow(/authentication failed/);
  });
});

describe('index files', () => {
  const good = () => encodeIndexFile({ packs: [{ pack: 'ab'.repeat(32), entries: [{ id: ID(1), codec: 0, offset: 8, storedLength: 10, rawLength: 10 }] }], superseded: [] }, null);
  it('reads a real index file', () => {
    const into = new ChunkIndex();
    expect(decodeIndexFile(good(), null, 'i', into).entries).toBe(1);
    expect(into.size).toBe(1);
  });
  it('refuses huge counts and wrong versions before adding anything', () => {
    const cases: [(b: Buffer) => void, RegExp][] = [
      [(b) => b.writeUInt32BE(0xffffffff, 5), /truncated at byte 9/], // pack count
      [(b) => b.writeUInt32BE(0xffffffff, 9 + 32), /4294967295 entries is over the limit/], // entry count
      [(b) => b.writeUInt32BE(1 << 20, 9 + 32), /truncated/], // entry count under the limit but not present
      [(b) => b.writeUInt32BE(0xffffffff, b.length - 4), /truncated/], // superseded count
      [(b) => b.writeUInt8(2, 4), /unsupported index version 2/],
      [(b) => b.write('XXXX', 0), /bad magic/],
      [(b) => b.writeUInt32BE(7, 9 + 32 + 4 + 32), /entry 0 names pack #7 of 1/],
    ];
    for (const [mutate, re] of cases) {
      const b = good();
      mutate(b);
      const into = new ChunkIndex();
      expect(() => decodeIndexFile(b, null, 'i', into)).toThrow(re);
      expect(into.size).toBe(0);
    }
    // A later entry naming a pack that is not listed: the earlier, valid-looking entries are not added.
    const two = encodeIndexFile({ packs: [{ pack: 'ab'.repeat(32), entries: [1, 2, 3].map((n) => ({ id: ID(n), codec: 0, offset: 8, storedLength: 10, rawLength: 10 })) }], superseded: [] }, null);
    two.writeUInt32BE(9, 9 + 32 + 4 + 2 * 53 + 32);
    const into = new ChunkIndex();
    expect(() => decodeIndexFile(two, null, 'i', into)).toThrow(/entry 2 names pack #9 of 1/);
    expect(into.size).toBe(0);
    expect(() => decodeIndexFile(Buffer.concat([good(), Buffer.alloc(1)]), null, 'i', new ChunkIndex())).toThrow(/trailing bytes/);
    expect(() => decodeIndexFile(Buffer.alloc(3), null, 'i', new ChunkIndex())).toThrow(/truncated/);
  });
});

describe('config', () => {
  it('refuses a newer format version', () => {
    const c = { format: 'vmsnap-repository', version: FORMAT_VERSION + 1, id: 'a'.repeat(32), chunkSize: 65536, codec: 'zstd', created: '', encryption: null };
    expect(() => parseConfig(Buffer.from(JSON.stringify(c)))).toThrow(/upgrade vmsnap/);
  });
});

describe('hand-crafted objects through the CLI', () => {
  let dir: string;
  let repo: string;
  let good: string;
  beforeAll(async () => {
    await ensureBuiltAsync();
    dir = tempDir('vmsnap-hostile-');
    repo = path.join(dir, 'repo');
    await vmsnapOk(repo, ['init', '--chunk-size', '4096']);
    const img = path.join(dir, 'img');
    writeFileSync(img, Buffer.alloc(20_000, 3));
    good = (JSON.parse((await vmsnapOk(repo, ['--json', 'import', img, '--vm', 'vm1'])).stdout) as { snapshot: string }).snapshot;
  }, 120_000);
  afterAll(() => removeDir(dir));

  /** Stores a manifest under the BLAKE3 of its plaintext (passes the name check) and returns the id. */
  const plant = (json: Buffer, name = contentHash(json).toString('hex')) => {
    writeFileSync(path.join(repo, 'snapshots', name), json);
    return name;
  };
  const unplant = (name: string) => removeDir(path.join(repo, 'snapshots', name));
  const goodManifest = () => readFileSync(path.join(repo, 'snapshots', good));

  it('a correctly named manifest with a VM name ../x is refused by the parser', async () => {
    const m = JSON.parse(goodManifest().toString()) as Record<string, unknown>;
    const id = plant(Buffer.from(JSON.stringify({ ...m, vm: '../x' })));
    const r = await vmsnap(repo, ['show', id]);
    expect(r.code).toBe(1);
    expect(r.stderr).toBe(`vmsnap: invalid VM name "../x": use 1-128 letters, digits and . _ : @ + -, not starting with a dot or dash\n`);
    // ls lists it as damaged, with the reason, and goes on with the rest (issue 12).
    const ls = await vmsnap(repo, ['ls']);
    expect(ls.code).toBe(0);
    expect(ls.stdout).toContain(`${id.slice(0, 12)}  DAMAGED: invalid VM name "../x"`);
    // check names the bad manifest and still checks the rest.
    const c = await vmsnap(repo, ['check']);
    expect(c.code).toBe(3);
    expect(c.stdout).toContain(`snapshot ${id.slice(0, 12)}: manifest unreadable: invalid VM name "../x"`);
    unplant(id);
  });

  it('stream and tag names like ../x are refused; an export writes nothing', async () => {
    const m = JSON.parse(goodManifest().toString()) as Record<string, unknown> & { streams: Record<string, unknown>[] };
    for (const [what, json] of [
      ['stream name', { ...m, streams: [{ ...m.streams[0], name: '../x' }] }],
      ['tag', { ...m, tags: ['../x'] }],
    ] as const) {
      const id = plant(Buffer.from(JSON.stringify(json)));
      const out = path.join(dir, 'out.img');
      const r = await vmsnap(repo, ['export', id, out]);
      expect(r.code).toBe(1);
      expect(r.stderr).toMatch(new RegExp(`^vmsnap: invalid ${what} "\\.\\./x"`));
      expect(existsSync(out)).toBe(false);
      expect(tempLeftovers(out)).toEqual([]);
      expect(existsSync(path.join(dir, 'x'))).toBe(false);
      unplant(id);
    }
  });

  it('a chunk list of the wrong length or a huge size is refused before any byte is written', async () => {
    const m = JSON.parse(goodManifest().toString()) as Record<string, unknown> & { streams: Record<string, unknown>[] };
    for (const [stream, re] of [
      [{ size: 2 ** 40 }, /chunk list has the wrong length for 1099511627776 bytes/],
      [{ size: 2 ** 52 }, /invalid size/],
      [{ chunks: Buffer.alloc(32 * 1000).toString('base64') }, /chunk list has the wrong length/],
    ] as const) {
      const id = plant(Buffer.from(JSON.stringify({ ...m, streams: [{ ...m.streams[0], ...stream }] })));
      const out = path.join(dir, 'out2.img');
      const r = await vmsnap(repo, ['export', id, out]);
      expect(r.code).toBe(1);
      expect(r.stderr).toMatch(re);
      expect(existsSync(out)).toBe(false);
      expect(tempLeftovers(out)).toEqual([]);
      unplant(id);
    }
  });

  it('a manifest of a newer version is refused with its version named', async () => {
    const m = JSON.parse(goodManifest().toString()) as Record<string, unknown>;
    const id = plant(Buffer.from(JSON.stringify({ ...m, version: 2 })));
    const r = await vmsnap(repo, ['show', id]);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/manifest version 2 is not supported \(this vmsnap reads version 1\)/);
    unplant(id);
  });

  it('a manifest not named by its content is refused by the name check before parsing', async () => {
    const m = JSON.parse(goodManifest().toString()) as Record<string, unknown>;
    const wrongName = 'ee'.repeat(32);
    plant(Buffer.from(JSON.stringify({ ...m, vm: '../x' })), wrongName);
    const r = await vmsnap(repo, ['show', wrongName]);
    expect(r.code).toBe(1);
    expect(r.stderr).toBe(`vmsnap: snapshot ${wrongName}: manifest content does not match its id (corrupted)\n`);
    unplant(wrongName);
  });

  it('a pack whose trailer claims a huge description is reported by check --read-data and rebuild-index', async () => {
    const { bytes } = realPack();
    const evil = Buffer.from(bytes);
    evil.writeUInt32BE(0xfffffff0, evil.length - PACK_TRAILER);
    const name = contentHash(evil).toString('hex');
    mkdirSync(path.join(repo, 'packs', name.slice(0, 2)), { recursive: true });
    writeFileSync(path.join(repo, 'packs', name.slice(0, 2), name), evil);
    const c = await vmsnap(repo, ['check', '--read-data']);
    expect(c.stdout).toContain(`pack ${name.slice(0, 12)}: description unreadable: pack ${name}: description length 4294967280 does not fit in ${evil.length} bytes`);
    const r = await vmsnapOk(repo, ['rebuild-index']);
    expect(r.stdout).toContain(`unreadable pack ${name.slice(0, 12)}: pack ${name}: description length 4294967280 does not fit`);
    removeDir(path.join(repo, 'packs', name.slice(0, 2), name));
    // The good snapshot is unharmed by all of the above.
    const e = await vmsnapOk(repo, ['export', good, '-']);
    expect(e.stdoutBytes.equals(Buffer.alloc(20_000, 3))).toBe(true);
  });

  it('an index file with a huge entry count is reported as damaged, not loaded', async () => {
    const bytes = encodeIndexFile({ packs: [{ pack: 'cd'.repeat(32), entries: [] }], superseded: [] }, null);
    bytes.writeUInt32BE(0xffffffff, 9 + 32);
    const name = contentHash(bytes).toString('hex');
    writeFileSync(path.join(repo, 'index', name), bytes);
    const c = await vmsnap(repo, ['check']);
    expect(c.code).toBe(3);
    expect(c.stdout).toContain(`index file ${name.slice(0, 12)} is damaged: index ${name}: 4294967295 entries is over the limit`);
    const e = await vmsnapOk(repo, ['export', good, '-']);
    expect(e.stdoutBytes.length).toBe(20_000);
    removeDir(path.join(repo, 'index', name));
    expect(repoFiles(repo, 'index')).toHaveLength(1);
    expect(PACK_MAGIC.toString()).toBe('VMSPACK1');
  });
});
