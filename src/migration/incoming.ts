/**
 * The destination side of a live migration: one worker process per incoming connection (spawned
 * by `vmsnap receive`, receiver.ts), which becomes the VM's supervisor once the guest runs here —
 * the process that received the volumes and started QEMU keeps owning them, as a supervisor must.
 *
 * It follows the receiver state machine of protocol.ts. Until COMMIT, everything it creates is
 * provisional and removed on any failure: the VM directory carries an `incoming` marker (with this
 * process's pid) from its creation until the guest runs, so `vm start` refuses it and a marker
 * whose process is gone (kill -9) is swept by the next `receive`.
 */
import { promises as fsp, constants as fsc, existsSync } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { createHash } from 'node:crypto';
import { acceptServerChannel, FrameError, type SecureChannel } from './channel.js';
import { listPeers, type HostIdentity } from './identity.js';
import {
  BLOCK_HASH_BYTES,
  haveDiskMessages,
  assembleRamMix,
  readRamMix,
  jsonBody,
  MigrationError,
  MSG,
  PAGE_HASH_BYTES,
  parseJsonBody,
  readDiskMessage,
  receiverNext,
  type MigrationPhase,
  type MigrationRequest,
  type PreflightReply,
  type ReceiverState,
} from './protocol.js';
import { chooseHeldSnapshot, dropDepartureCache, loadHoldings, noHoldings, readHeldPages, releaseHoldings, type Holdings } from './holdings.js';
import { decode } from '../store/codec.js';
import { PAGE_SIZE } from '../migstream/index.js';
import type { Repository } from '../store/repository.js';
import { detectQemu } from '../hypervisor/qemu.js';
import { Volume } from '../cow/volume.js';
import { cloneVolume } from '../cow/snapshot.js';
import { releaseBasePin, readBasePin } from '../cow/base-pin.js';
import { repositoryPinner } from '../store/pins.js';
import { checkVmPathsFit, diskDir, parseDefinition, readDepartedMarker, saveDefinition, saveState, vmPaths, type VmDefinition, type VmPaths } from '../vm/config.js';
import { VmRuntime } from '../vm/runtime.js';
import { processAlive } from '../util/process.js';
import { COLD_VERSION, MIX_VERSION } from './version.js';

/** Silence from the source, once it sends, that ends the migration (overridable for tests). */
const IDLE_TIMEOUT_MS = Number(process.env.VMSNAP_MIGRATION_IDLE_MS) || 30_000;

/** Devices that cannot move with a guest, by the QEMU argument that adds them. */
const UNMIGRATABLE: ReadonlyArray<[RegExp, string, boolean]> = [
  [/vfio/i, 'a VFIO passthrough device (its state lives in the host hardware)', false],
  [/vhost-user-fs|virtiofs/i, 'a virtiofs share (its files are on the source host)', false],
  // The third field: a cold migration (no device state moves) has no objection of its own.
  [/virgl|gl=on/i, 'virgl 3D acceleration (GPU state cannot migrate)', true],
];

export interface IncomingOptions {
  dataDir: string;
  identity: HostIdentity;
  openRepo: () => Promise<Repository>;
  log: (msg: string) => void;
}

/**
 * What the worker hands back once the VM is this host's: the runtime to serve as its supervisor,
 * or, for a cold migration of a stopped VM, no runtime (the VM arrived stopped; the worker ends).
 */
export interface Received {
  runtime: VmRuntime | null;
  paths: VmPaths;
}

class Refusal extends Error {}

/** Serves one incoming connection to its end: the guest running here, or nothing left behind. */
export async function receiveOne(sock: net.Socket, o: IncomingOptions): Promise<Received | null> {
  const peers = await listPeers(o.dataDir);
  let ch: SecureChannel;
  try {
    ch = await acceptServerChannel(sock, {
      identity: o.identity,
      authorize: (fp) => (peers.some((p) => p.fingerprint === fp) ? true : `host key ${fp} is not paired with this host (run \`vmsnap peer add\` here)`),
    });
  } catch (err) {
    o.log(`refused a connection from ${sock.remoteAddress ?? '?'}: ${(err as Error).message}`);
    sock.destroy();
    return null;
  }
  const peer = peers.find((p) => p.fingerprint === ch.peerFingerprint)!;
  o.log(`connection from ${peer.name} (${sock.remoteAddress ?? '?'})`);
  // An object, not a `let`: the state changes inside `next`, which TypeScript's narrowing cannot see.
  const sm: { state: ReceiverState } = { state: 'AwaitRequest' };
  let phase: MigrationPhase = 'preflight';
  let paths: VmPaths | null = null;
  let created = false;
  let rt: VmRuntime | null = null;
  let holdings: Holdings = noHoldings();
  let repo: Repository | null = null;
  let mode: 'live' | 'cold' = 'live';
  const next = async (): Promise<{ type: number; body: Buffer }> => {
    const m = await ch.receive();
    if (m === null) throw new MigrationError(phase, 'the source closed the connection', true);
    sm.state = receiverNext(sm.state, m.type, mode);
    if (sm.state === 'Discarded') throw new MigrationError(phase, `the source aborted: ${String(parseJsonBody<{ message?: string }>(m.body, 'ABORT').message)}`, true);
    return m;
  };
  try {
    const reqMsg = await next();
    const req = checkRequest(parseJsonBody<MigrationRequest>(reqMsg.body, 'REQUEST'), ch.version);
    mode = req.mode ?? 'live';
    paths = vmPaths(o.dataDir, req.vm);
    let pre: { reply: PreflightReply; def: VmDefinition };
    try {
      pre = await preflight(req, o.dataDir, paths);
    } catch (err) {
      if (!(err instanceof Refusal)) throw err;
      o.log(`refused ${req.vm} from ${peer.name}: ${err.message}`);
      await ch.send(MSG.REFUSE, jsonBody({ message: err.message }));
      await ch.close();
      return null;
    }
    if (req.probe) {
      o.log(`pre-flight check of ${req.vm} from ${peer.name}: accepted`);
      await ch.send(MSG.PREFLIGHT, jsonBody(pre.reply));
      await ch.close();
      return null;
    }
    // The VM's directory is ours from here: created exclusively, marked incoming.
    await fsp.mkdir(path.dirname(paths.dir), { recursive: true, mode: 0o700 });
    try {
      await fsp.mkdir(paths.dir, { mode: 0o700 });
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'EEXIST') throw new MigrationError('preflight', `a VM named ${req.vm} already exists on the destination`, false);
      throw err;
    }
    created = true;
    await fsp.writeFile(paths.incomingMarker, `${process.pid}\n`, { mode: 0o600 });
    await fsp.mkdir(paths.runDir, { recursive: true, mode: 0o700 });
    await fsp.writeFile(paths.supervisorPid, String(process.pid), { flag: 'wx', mode: 0o600 });

    repo = await o.openRepo();
    const held = req.wantHaves ? await chooseHeldSnapshot(repo, req.vm, req.disks, mode === 'live') : null;
    const usable = held && req.disks.every((d) => d.blockSize === repo!.chunkSize) ? held : null;
    await fsp.mkdir(paths.disksDir, { recursive: true, mode: 0o700 });
    for (const d of req.disks) {
      const dir = diskDir(paths, d.name);
      const base = usable?.streams.find((x) => x.kind === 'disk' && x.name === d.name);
      const v = base
        ? await cloneVolume(dir, base, { store: repo, pin: { pinner: repositoryPinner(repo, o.dataDir), snapshot: usable!.id, holder: `${req.vm}/${d.name}` } })
        : await Volume.create(dir, { size: d.size, blockSize: d.blockSize });
      await v.close();
    }
    const needFiles = req.files.map((f, i) => ({ f, i })).filter(({ f }) => f.role === 'nvram' || !pre.def[f.role] || pre.def[f.role] !== f.path).map(({ i }) => i);
    pre.reply.base = usable?.id ?? null;
    pre.reply.needFiles = needFiles;
    await saveDefinition(o.dataDir, pre.def);
    await saveState(o.dataDir, req.vm, { lastSnapshot: usable?.id ?? null });
    await ch.send(MSG.PREFLIGHT, jsonBody(pre.reply));

    phase = 'files';
    const files = new Map<number, FileHandle>();
    try {
      for (;;) {
        const m = await next();
        if (m.type === MSG.FILE_END) break;
        const idx = m.body[0]!;
        if (!needFiles.includes(idx)) throw new FrameError('record', `file #${idx} was not asked for`);
        let fh = files.get(idx);
        if (!fh) {
          const f = req.files[idx]!;
          const dest = f.role === 'nvram' ? paths.nvram : path.join(paths.dir, f.role);
          fh = await fsp.open(dest, fsc.O_CREAT | fsc.O_EXCL | fsc.O_WRONLY | fsc.O_NOFOLLOW, 0o600);
          files.set(idx, fh);
          if (f.role !== 'nvram') pre.def[f.role] = dest;
        }
        await fh.write(m.body.subarray(1));
      }
    } finally {
      for (const fh of files.values()) await fh.close();
    }
    for (const idx of needFiles) {
      const f = req.files[idx]!;
      const got = await sha256File(f.role === 'nvram' ? paths.nvram : pre.def[f.role]!);
      if (got !== f.sha256) throw new MigrationError('files', `${f.role} arrived damaged (sha256 ${got}, expected ${f.sha256})`, true);
    }
    if (needFiles.length) await saveDefinition(o.dataDir, pre.def);

    phase = 'haves';
    holdings = await loadHoldings(repo, usable, req.disks, paths.runDir, mode === 'live', { dataDir: o.dataDir, vm: req.vm });
    await sendHoldings(ch, holdings, req);
    o.log(`${req.vm}: holding ${holdings.pages.size} pages${holdings.pageFile && !holdings.pageFile.owned ? ' (from its departure cache)' : ''} and ${usable ? 'disks of ' + usable.id.slice(0, 12) : 'no disks'}`);

    // From here the source sends steadily until COMMIT; silence means a dead link or source, and a
    // cut link never errors on its own. Until COMMIT, a silent source means: discard.
    sock.setTimeout(IDLE_TIMEOUT_MS, () => sock.destroy(new Error(`nothing from the source for ${IDLE_TIMEOUT_MS / 1000} s`)));
    if (mode === 'cold') {
      const coldDone = await receiveCold(req, { paths, repo, holdings, next, o, phase: (p) => (phase = p), started: (r) => (rt = r) });
      await ch.send(MSG.READY);
      phase = 'commit';
      await next(); // COMMIT
      sock.setTimeout(0);
      if (coldDone) await coldDone.qemu!.qmp.execute('cont');
      else await fsp.rm(paths.supervisorPid, { force: true });
      await fsp.rm(paths.incomingMarker, { force: true });
      const state = coldDone ? (await coldDone.qemu!.qmp.execute<{ status: string }>('query-status')).status : 'shutoff';
      await ch.send(MSG.RUNNING, jsonBody({ state }));
      await ch.close();
      await releaseHoldings(holdings);
      await dropDepartureCache(o.dataDir, req.vm).catch(() => undefined);
      o.log(`${req.vm}: arrived by cold migration (${state})`);
      return { runtime: coldDone, paths };
    }
    // QEMU waits for the stream, paused (-S): it runs only on COMMIT.
    phase = 'ram';
    const runtime = await VmRuntime.startIncoming({ dataDir: o.dataDir, name: req.vm, openRepo: () => Promise.resolve(repo!), log: o.log });
    rt = runtime;
    const q = runtime.qemu!;
    const inSock = path.join(paths.runDir, 'mig-in.sock');
    await q.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'events', state: true }] });
    await q.qmp.execute('migrate-incoming', { uri: `unix:${inSock}`, 'exit-on-error': false });
    const qemuIn = await connectUnix(inSock);
    const volumes = req.disks.map((d) => runtime.volumes.get(d.name)!);

    phase = 'disk';
    let qemuBytes = 0;
    const writes = new WriteWindow(32);
    for (;;) {
      const m = await next();
      switch (m.type) {
        case MSG.DISK_DATA:
        case MSG.DISK_ZERO:
        case MSG.DISK_REF:
          phase = 'disk';
          await applyDiskMessage(m, volumes, writes, repo, holdings);
          break;
        case MSG.RAM_RAW: {
          phase = 'ram';
          if (m.body.length < 5) throw new FrameError('record', 'malformed RAM_RAW');
          const bytes = decode(m.body[0]!, m.body.subarray(5), m.body.readUInt32BE(1));
          qemuBytes += bytes.length;
          await writeAll(qemuIn, bytes);
          break;
        }
        case MSG.RAM_REF: {
          phase = 'ram';
          if (m.body.length % PAGE_HASH_BYTES) throw new FrameError('record', 'malformed RAM_REF');
          const pages = await readHeldPages(holdings, m.body);
          qemuBytes += pages.length;
          await writeAll(qemuIn, pages);
          break;
        }
        case MSG.RAM_MIX: {
          phase = 'ram';
          if (ch.version < MIX_VERSION) throw new FrameError('record', `RAM_MIX is not spoken in protocol version ${ch.version}`);
          const mix = readRamMix(m.body);
          const decoded = decode(mix.codec, mix.payload, mix.length);
          const stream = mix.at.length ? assembleRamMix(mix.at, decoded, await readHeldPages(holdings, mix.hashes), PAGE_SIZE) : decoded;
          qemuBytes += stream.length;
          await writeAll(qemuIn, stream);
          break;
        }
        case MSG.RAM_END:
          qemuIn.end();
          break;
        case MSG.SENT_ALL:
          break;
      }
      if (sm.state === 'AwaitCommit') break;
    }

    phase = 'switchover';
    await writes.drain();
    await waitLoaded(q.qmp);
    o.log(`${req.vm}: guest state loaded (${qemuBytes} stream bytes), waiting for COMMIT`);
    await ch.send(MSG.READY);

    phase = 'commit';
    await next(); // COMMIT (the state machine accepts nothing else)
    sock.setTimeout(0);
    const tCommit = performance.now();
    await q.qmp.execute('cont');
    const resumeMs = Math.round(performance.now() - tCommit);
    // The guest runs from the volumes' page cache; RUNNING, which lets the source delete its
    // copy, waits until what arrived is durable here. The fsync is outside the guest's pause.
    for (const v of volumes) await v.flush();
    const st = await q.qmp.execute<{ status: string }>('query-status');
    await fsp.rm(paths.incomingMarker, { force: true });
    await ch.send(MSG.RUNNING, jsonBody({ state: st.status, resumeMs }));
    await ch.close();
    await releaseHoldings(holdings);
    // The guest is here again: the image it left with is stale from now on.
    await dropDepartureCache(o.dataDir, req.vm).catch(() => undefined);
    o.log(`${req.vm}: running here (${st.status})`);
    return { runtime, paths };
  } catch (err) {
    const e = err as Error;
    o.log(`incoming migration failed in phase ${phase}: ${e.stack ?? e.message}`);
    if (sm.state !== 'Running') {
      await ch.send(MSG.ABORT, jsonBody({ phase, message: `destination: ${e.message}` })).catch(() => undefined);
      const closing = ch.lingerClose(2000);
      await discard(rt, paths, created, repo, o, holdings);
      await closing;
    }
    throw err;
  }
}

function checkRequest(r: MigrationRequest, version: number): MigrationRequest {
  if (r.mode !== undefined && r.mode !== 'live' && !(r.mode === 'cold' && version >= COLD_VERSION)) throw new FrameError('record', `REQUEST mode ${JSON.stringify(r.mode)} is not spoken in protocol version ${version}`);
  if (r.start !== undefined && typeof r.start !== 'boolean') throw new FrameError('record', 'malformed REQUEST message (start)');
  if (r.probe !== undefined && !(r.probe === true && version >= COLD_VERSION)) throw new FrameError('record', 'malformed REQUEST message (probe)');
  const ok =
    typeof r.vm === 'string' &&
    typeof r.definition === 'object' &&
    r.definition !== null &&
    Array.isArray(r.disks) &&
    r.disks.every((d) => typeof d.name === 'string' && Number.isSafeInteger(d.size) && Number.isSafeInteger(d.blockSize) && d.size > 0 && d.blockSize > 0) &&
    Array.isArray(r.files) &&
    r.files.length <= 8 &&
    r.files.every((f) => (f.role === 'kernel' || f.role === 'initrd' || f.role === 'nvram') && typeof f.path === 'string' && Number.isSafeInteger(f.size) && typeof f.sha256 === 'string') &&
    typeof r.memoryMiB === 'number' &&
    typeof r.qemu === 'object';
  if (!ok) throw new FrameError('record', 'malformed REQUEST message');
  return r;
}

/** How long a return trip waits here for the VM's earlier departure to finish (its snapshot, its removal). */
const DEPARTED_WAIT_MS = 300_000;

/**
 * A VM of this name must not exist here. One that just moved away is still being removed (its
 * supervisor stores the departure snapshot first, then deletes it): a return trip waits for that,
 * and then holds the departure snapshot.
 */
async function waitDepartedGone(paths: VmPaths, vm: string): Promise<void> {
  const deadline = Date.now() + DEPARTED_WAIT_MS;
  while (existsSync(paths.dir)) {
    const d = await readDepartedMarker(paths);
    if (!d) {
      if (!existsSync(paths.dir)) return;
      throw new Refusal(`a VM named ${vm} already exists on this host`);
    }
    if (!d.alive) throw new Refusal(`VM ${vm} moved from this host to ${d.to} earlier and its removal here did not finish; \`vmsnap vm rm ${vm}\` on this host removes what is left`);
    if (Date.now() > deadline) throw new Refusal(`VM ${vm} is still being removed from this host after its move to ${d.to} (its departure state is being stored); try again once it is gone`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** Whether this host can run the guest; a Refusal names why not, before anything is created. */
async function preflight(req: MigrationRequest, dataDir: string, paths: VmPaths): Promise<{ reply: PreflightReply; def: VmDefinition }> {
  try {
    checkVmPathsFit(dataDir, req.vm);
  } catch (err) {
    throw new Refusal((err as Error).message);
  }
  await waitDepartedGone(paths, req.vm);
  let def: VmDefinition;
  try {
    def = parseDefinition(JSON.stringify(req.definition), 'the migration request');
  } catch (err) {
    throw new Refusal(`the VM definition is not usable here: ${(err as Error).message}`);
  }
  if (def.name !== req.vm) throw new Refusal('the VM definition names another VM');
  // A cold migration carries no device or CPU state: only what names the source host's own
  // resources (a passthrough device, a shared folder, files named in extra arguments) still refuses.
  const cold = req.mode === 'cold';
  for (const a of def.qemuArgs) {
    for (const [re, what, coldOk] of UNMIGRATABLE) {
      if (re.test(a) && !(cold && coldOk)) throw new Refusal(cold ? `the guest has ${what}, which belongs to the source host` : `the guest has ${what}; it cannot be migrated live (stop it and use \`migrate --cold\`)`);
    }
  }
  if (def.qemuArgs.length) throw new Refusal(`the VM has extra QEMU arguments (${def.qemuArgs.join(' ')}), which may name host resources of the source; migration refuses them`);
  if (def.firmware === 'uefi' && def.firmwareCode && !existsSync(def.firmwareCode)) {
    throw new Refusal(`the guest boots UEFI from ${def.firmwareCode}, which this host does not have (install ovmf)`);
  }
  // A gtk display is a window on this host's desktop: QEMU cannot start without one.
  if (def.display === 'gtk' && (!cold || req.start) && !process.env.DISPLAY && !process.env.WAYLAND_DISPLAY) {
    throw new Refusal('the guest shows its screen in a local window (--display gtk) and `vmsnap receive` here runs outside a desktop session (no DISPLAY or WAYLAND_DISPLAY); run it from one');
  }
  if (def.cdrom && !existsSync(def.cdrom)) throw new Refusal(`the guest's CD-ROM holds ${def.cdrom}, which this host does not have; eject it first (\`vmsnap vm eject ${def.name}\`)`);
  if (def.net?.forwards?.length) throw new Refusal('the guest forwards host ports to itself; those belong to the source host (remove the forwards, or use a bridge)');
  const qemu = await detectQemu().catch((err: Error) => {
    throw new Refusal(`no usable QEMU here: ${err.message}`);
  });
  const [srcMajor, srcMinor] = req.qemu.version.split('.').map(Number);
  // Cold: the guest boots afresh here, so neither QEMU's stream format nor the CPU must match.
  if (!cold && (qemu.version.major !== srcMajor || qemu.version.minor !== srcMinor)) {
    throw new Refusal(`the source runs QEMU ${req.qemu.version}, this host has ${qemu.version.major}.${qemu.version.minor}.${qemu.version.micro}: the migration stream is only checked between equal QEMU versions`);
  }
  if (!cold && req.cpu.model === 'host') {
    const here = await fsp.readFile('/proc/cpuinfo', 'utf8').catch(() => '');
    const flags = /^flags\s*:\s*(.*)$/m.exec(here)?.[1] ?? '';
    if (createHash('sha256').update(flags).digest('hex').slice(0, 16) !== req.cpu.flagsDigest) {
      throw new Refusal(`the guest uses the source's CPU as is (host-passthrough, ${req.cpu.hostModel}) and this host's CPU differs; it cannot resume here`);
    }
  }
  const memAvail = await availableMemory();
  if ((!cold || req.start) && memAvail !== null && memAvail < req.memoryMiB * 1024 * 1024 + (256 << 20)) {
    throw new Refusal(`the guest needs ${req.memoryMiB} MiB of memory and this host has ${Math.floor(memAvail / 1048576)} MiB available`);
  }
  const fs = await fsp.statfs(dataDir).catch(() => null);
  if (fs) {
    const free = fs.bavail * fs.bsize;
    const need = req.allocatedBytes + req.files.reduce((a, f) => a + f.size, 0) + (64 << 20);
    if (free < need) throw new Refusal(`the disks need up to ${Math.ceil(need / 1048576)} MiB and ${dataDir} has ${Math.floor(free / 1048576)} MiB free`);
  }
  // Kernel/initrd: reused when this host has the same file at the same path, else sent.
  for (const f of req.files) {
    if (f.role !== 'kernel' && f.role !== 'initrd') continue;
    const same = existsSync(f.path) && (await sha256File(f.path).catch(() => '')) === f.sha256;
    if (!same) def[f.role] = undefined;
  }
  return { reply: { base: null, needFiles: [], qemuVersion: `${qemu.version.major}.${qemu.version.minor}.${qemu.version.micro}`, accel: 'auto' }, def: { ...def, created: def.created } };
}

async function availableMemory(): Promise<number | null> {
  const m = /^MemAvailable:\s+(\d+) kB/m.exec(await fsp.readFile('/proc/meminfo', 'utf8').catch(() => ''));
  return m ? Number(m[1]) * 1024 : os.freemem();
}

async function sha256File(p: string): Promise<string> {
  const h = createHash('sha256');
  const fh = await fsp.open(p, fsc.O_RDONLY | fsc.O_NOFOLLOW);
  try {
    for await (const c of fh.createReadStream()) h.update(c as Buffer);
  } finally {
    await fh.close().catch(() => undefined);
  }
  return h.digest('hex');
}

async function sendHoldings(ch: SecureChannel, h: Holdings, req: MigrationRequest): Promise<void> {
  if (h.pages.size) {
    const per = (1 << 20) / PAGE_HASH_BYTES;
    let batch: Buffer[] = [];
    for (const key of h.pages.keys()) {
      batch.push(Buffer.from(key, 'latin1'));
      if (batch.length === per) {
        await ch.send(MSG.HAVE_RAM, Buffer.concat(batch));
        batch = [];
      }
    }
    if (batch.length) await ch.send(MSG.HAVE_RAM, Buffer.concat(batch));
  }
  if (h.plainBlockIds) {
    for (let di = 0; di < req.disks.length; di++) {
      const s = h.disks.get(req.disks[di]!.name);
      if (!s) continue;
      for (const [head, hashes] of haveDiskMessages(di, s.chunks)) await ch.send(MSG.HAVE_DISK, head, hashes);
    }
  }
  await ch.send(MSG.HAVE_END);
}

/** A referenced block's chunk id: the hash itself (plain ids), after checking it is one we advertised. */
function heldChunkId(h: Holdings, hash: Buffer): Buffer {
  if (!h.plainBlockIds) throw new FrameError('record', 'a disk reference, but this host advertised no disk blocks');
  if (!h.blockSet) {
    h.blockSet = new Set();
    for (const s of h.disks.values()) for (let i = 0; i < s.chunks.length; i += BLOCK_HASH_BYTES) h.blockSet.add(s.chunks.toString('latin1', i, i + BLOCK_HASH_BYTES));
  }
  if (!h.blockSet.has(hash.toString('latin1'))) throw new FrameError('record', 'a disk reference to a block this host did not advertise');
  return hash;
}


/** Writes one DISK_DATA / DISK_ZERO / DISK_REF into its volume (checked against the volume's size). */
async function applyDiskMessage(m: { type: number; body: Buffer }, volumes: Volume[], writes: WriteWindow, repo: Repository, holdings: Holdings): Promise<void> {
  const d = readDiskMessage(m.type, m.body);
  const v = volumes[d.disk];
  if (!v) throw new FrameError('record', `disk #${d.disk} does not exist`);
  const bs = v.blockSize;
  if (d.kind === 'zero') {
    if (d.block + d.count > Math.ceil(v.size / bs)) throw new FrameError('record', 'zero run beyond the disk');
    await writes.drain();
    await v.writeZeroes(d.block * bs, Math.min(d.count * bs, v.size - d.block * bs));
  } else {
    if (d.block >= Math.ceil(v.size / bs)) throw new FrameError('record', 'block beyond the disk');
    const len = v.blockLen(d.block);
    const data = d.kind === 'data' ? decode(d.codec, d.payload, len) : await repo.getChunk(heldChunkId(holdings, d.hash), len);
    await writes.submit(`${d.disk}:${d.block}`, () => v.write(d.block * bs, data));
  }
}

/**
 * The cold part of an incoming migration: the disk round into the volumes (opened here, no QEMU),
 * up to SENT_ALL; then, when the VM is to run here, its QEMU booted paused — so a guest that cannot
 * start here fails before COMMIT, while the source can still take it back. Returns that runtime
 * (null: the VM arrives stopped).
 */
async function receiveCold(
  req: MigrationRequest,
  c: {
    paths: VmPaths;
    repo: Repository;
    holdings: Holdings;
    next: () => Promise<{ type: number; body: Buffer }>;
    o: IncomingOptions;
    phase: (p: MigrationPhase) => void;
    started: (rt: VmRuntime) => void;
  },
): Promise<VmRuntime | null> {
  c.phase('disk');
  const volumes: Volume[] = [];
  try {
    for (const d of req.disks) volumes.push(await Volume.open(diskDir(c.paths, d.name), { store: c.repo }));
    const writes = new WriteWindow(32);
    for (;;) {
      const m = await c.next();
      if (m.type === MSG.SENT_ALL) break;
      await applyDiskMessage(m, volumes, writes, c.repo, c.holdings);
    }
    c.phase('switchover');
    await writes.drain();
    for (const v of volumes) await v.flush();
  } finally {
    for (const v of volumes) await v.close().catch(() => undefined);
  }
  if (!req.start) return null;
  const rt = await VmRuntime.start({ dataDir: c.o.dataDir, name: req.vm, openRepo: () => Promise.resolve(c.repo), log: c.o.log, paused: true });
  c.started(rt);
  return rt;
}

/**
 * Disk writes kept in flight while the next records are read (one at a time, each awaited, the
 * receiver was latency-bound). Writes to one block stay in arrival order — a later round's copy
 * must land last — and a failed write fails the next submit or drain.
 */
class WriteWindow {
  private readonly byBlock = new Map<string, Promise<void>>();
  private readonly window: Promise<void>[] = [];
  private failure: Error | null = null;

  constructor(private readonly depth: number) {}

  async submit(key: string, write: () => Promise<void>): Promise<void> {
    if (this.failure) throw this.failure;
    const prev = this.byBlock.get(key);
    const p = prev ? prev.then(write) : write();
    this.byBlock.set(key, p);
    p.then(
      () => {
        if (this.byBlock.get(key) === p) this.byBlock.delete(key);
      },
      (err: Error) => (this.failure ??= err),
    );
    this.window.push(p.catch(() => undefined));
    if (this.window.length >= this.depth) await this.window.shift();
    if (this.failure) throw this.failure;
  }

  async drain(): Promise<void> {
    await Promise.all(this.window.splice(0));
    await Promise.all([...this.byBlock.values()].map((p) => p.catch(() => undefined)));
    if (this.failure) throw this.failure;
  }
}

function connectUnix(p: string): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const s = net.connect(p);
    s.once('connect', () => resolve(s));
    s.once('error', reject);
  });
}

function writeAll(s: net.Socket, b: Buffer): Promise<void> {
  if (s.destroyed) return Promise.reject(new Error('QEMU closed its incoming migration socket'));
  if (s.write(b)) return Promise.resolve();
  return new Promise((resolve, reject) => {
    const done = (err?: Error) => {
      s.off('drain', ok);
      s.off('close', closed);
      if (err) reject(err);
      else resolve();
    };
    const ok = () => done();
    const closed = () => done(new Error('QEMU closed its incoming migration socket'));
    s.once('drain', ok);
    s.once('close', closed);
  });
}

interface IncomingInfo {
  status?: string;
  'error-desc'?: string;
}

/** Waits until QEMU has loaded the whole stream (paused, -S); its own error if it failed. */
async function waitLoaded(qmp: { execute<T>(cmd: string, args?: Record<string, unknown>): Promise<T> }): Promise<void> {
  const deadline = Date.now() + 120_000;
  for (;;) {
    const m = await qmp.execute<IncomingInfo>('query-migrate');
    if (m.status === 'completed') return;
    if (m.status === 'failed' || m.status === 'cancelled') throw new Error(`QEMU could not load the guest state: ${m['error-desc'] ?? m.status}`);
    if (Date.now() > deadline) throw new Error(`QEMU did not finish loading the guest state within 120 s (status ${m.status ?? '?'})`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

/** Removes everything an unfinished incoming migration created here. */
async function discard(rt: VmRuntime | null, paths: VmPaths | null, created: boolean, repo: Repository | null, o: IncomingOptions, h: Holdings): Promise<void> {
  await releaseHoldings(h).catch(() => undefined);
  if (rt) await rt.shutdown().catch(() => undefined);
  if (!paths || !created) return;
  if (repo) {
    for (const disk of await fsp.readdir(paths.disksDir).catch(() => [] as string[])) {
      const dir = diskDir(paths, disk);
      if (await readBasePin(dir).catch(() => null)) await releaseBasePin(dir, repositoryPinner(repo, o.dataDir)).catch(() => undefined);
    }
  }
  await fsp.rm(paths.dir, { recursive: true, force: true });
}

/**
 * Removes VM directories left by incoming migrations whose worker died (kill -9, power loss): the
 * marker names a pid that is no longer alive. Returns the VMs removed.
 */
export async function sweepAbandonedIncoming(dataDir: string, repo: Repository | null, log: (m: string) => void): Promise<string[]> {
  const removed: string[] = [];
  const vmsDir = path.join(dataDir, 'vms');
  for (const name of await fsp.readdir(vmsDir).catch(() => [] as string[])) {
    let marker: string;
    try {
      marker = vmPaths(dataDir, name).incomingMarker;
    } catch {
      continue; // not a VM name vmsnap would create: not ours to remove
    }
    const pid = Number((await fsp.readFile(marker, 'utf8').catch(() => '')).trim());
    if (!pid || processAlive(pid)) continue;
    const paths = vmPaths(dataDir, name);
    await discard(null, paths, true, repo, { dataDir, identity: null as unknown as HostIdentity, openRepo: () => Promise.reject(new Error('unused')), log }, noHoldings());
    log(`removed ${name}: an incoming migration into it was interrupted (worker pid ${pid} is gone)`);
    removed.push(name);
  }
  return removed;
}
