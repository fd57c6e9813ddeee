/** VM verbs: vm create|start|stop|pause|resume|ls|show|console|rm, take, restore, clone. */
import { promises as fsp } from 'node:fs';
import { openDiskImage } from '../src/util/image-format.js';
import { assertInside } from '../src/util/fs.js';
import type { Command } from 'commander';
import { Volume } from '../src/cow/volume.js';
import { processAlive } from '../src/util/process.js';
import { cloneVolume } from '../src/cow/snapshot.js';
import type { BasePin } from '../src/cow/base-pin.js';
import { UsageError } from '../src/store/errors.js';
import type { Repository } from '../src/store/repository.js';
import { DEFAULT_CHUNK_SIZE } from '../src/store/format.js';
import { buildDefinition, checkIso, writeNewVm, type CreateRequest, type DiskSource } from '../src/vm/create.js';
import { planLibvirtImport } from '../src/vm/libvirt.js';
import { setMedium } from '../src/vm/media.js';
import { viewTarget } from '../src/vm/viewer.js';
import { spawn } from 'node:child_process';
import * as path from 'node:path';
import {
  diskDir,
  listVms,
  loadDefinition,
  loadState,
  checkVmPathsFit,
  VmConfigError,
  vmPaths,
  type VmDefinition,
} from '../src/vm/config.js';
import { callSupervisor, forceStop, isRunning, runSupervisor, spawnSupervisor, SupervisorError, vmStatus } from '../src/vm/supervisor.js';
import { vmProcesses } from '../src/vm/processes.js';
import { FROM_OTHER_VM_FLAG, resolveUnscoped } from '../src/vm/selectors.js';
import type { TakeResult } from '../src/vm/runtime.js';
import { dataDir, openRepository, supervisorEnv, vmOpsContext, type GlobalOptions } from './context.js';
import { removeMovedVm } from '../src/ops/migrate.js';
import { checkedRestoreTarget, cloneVm, diskPin as opsDiskPin, restoreVm, takeVm, unpinDisks as opsUnpinDisks } from '../src/ops/vm.js';
import { humanBytes, printJson, progressSink, shortId } from './output.js';
import { resolveStreamRef } from '../src/ops/export.js';

type Globals = () => GlobalOptions;
const collect = (v: string, prev: string[]) => [...prev, v];
/** `--hydrate [MiB/s]`: true (unlimited) or a rate; returned as bytes per second (0 = unlimited). */
function hydrateRate(v: boolean | string | undefined): number | undefined {
  if (v === undefined || v === false) return undefined;
  if (v === true) return 0;
  const n = Number(v);
  if (!(n > 0)) throw new UsageError(`--hydrate takes a rate in MiB/s greater than 0, got ${JSON.stringify(v)}`);
  return Math.round(n * 1024 * 1024);
}
const HYDRATE_HELP = 'copy the snapshot disks into local overlays in the background (optionally at most this many MiB/s)';


function printTake(r: TakeResult, json: boolean): void {
  if (json) return printJson(r);
  if (r.note) console.log(`note: ${r.note}`);
  if (r.quiesce?.warning) console.error(`vmsnap: warning: ${r.quiesce.warning}`);
  else if (r.quiesce) console.log(`guest file systems frozen (${r.quiesce.frozen}) for the snapshot and thawed (${r.quiesce.thawed})`);
  console.log(
    `snapshot ${shortId(r.snapshot)} taken in ${(r.durationMs / 1000).toFixed(2)} s` +
      (r.diskOnly ? ' (disk only)' : `; guest paused ${r.pauseMs.toFixed(1)} ms (${r.pauseSource === 'qemu-events' ? 'QEMU STOP→RESUME' : 'stop sent→cont answered'}; QEMU downtime ${r.qemuDowntimeMs ?? '?'} ms)`),
  );
  if (!r.diskOnly && r.setupMs !== null) {
    console.log(`  QEMU setup ${r.setupMs.toFixed(1)} ms ${r.setupInPause ? 'inside the pause' : 'with the guest running'}; background save ${r.saveMs === null ? '?' : (r.saveMs / 1000).toFixed(2)} s after the pause`);
  }
  console.log(`  new ${humanBytes(r.newBytes)}, stored ${humanBytes(r.storedBytes)} after compression${r.ramBytes ? `, RAM ${humanBytes(r.ramBytes)} (${humanBytes(r.dedupBytes)} deduplicated)` : ''}`);
  for (const [name, d] of Object.entries(r.disks)) console.log(`  ${name}: ${d.dirtyBlocks} dirty blocks, ${humanBytes(d.newBytes)} new (${d.mode})`);
}

async function createDisks(def: VmDefinition, sources: DiskSource[], g: GlobalOptions): Promise<void> {
  const paths = vmPaths(dataDir(), def.name);
  // Nothing is written through a symlink planted in the data folder (docs/security.md).
  await assertInside(dataDir(), paths.dir);
  let repo: Repository | null = null;
  try {
    for (const s of sources) {
      const dir = diskDir(paths, s.def.name);
      await fsp.mkdir(paths.disksDir, { recursive: true });
      if (s.from && !(await fsp.stat(s.from).catch(() => null))) {
        // Not a file: a snapshot reference (SNAP or SNAP:disk) cloned without copying.
        repo ??= await openRepository(g);
        // `latest:disk0` names no VM: refused while it could mean several VMs' latest.
        if (s.from === 'latest' || s.from.startsWith('latest:')) await resolveUnscoped(repo, 'latest');
        const { snap, stream } = await resolveStreamRef(repo, s.from);
        if (stream.kind !== 'disk') throw new UsageError(`${s.from} is a ${stream.kind} stream, not a disk`);
        s.def.size = stream.size;
        await (await cloneVolume(dir, stream, { store: repo, pin: diskPin(repo, snap.id, def.name, s.def.name) })).close();
        continue;
      }
      const blockSize = repo?.chunkSize ?? DEFAULT_CHUNK_SIZE;
      // The image's format is detected, not assumed (src/util/image-format.ts): a qcow2 is read as
      // the disk it holds, an odd size is padded with a notice.
      const image = s.from ? await openDiskImage(s.from, { blockSize, tempNear: `${dir}.import`, notice: (l) => console.error(l) }) : null;
      try {
        const size = image ? image.size : Math.ceil(s.def.size / blockSize) * blockSize;
        s.def.size = size;
        const v = await Volume.create(dir, { size, blockSize }).catch((err: NodeJS.ErrnoException) => {
          // A disk is a sparse file of its full size: a size past the file system's file size limit
          // (ext4: 16 TiB) fails here, and must say so rather than surface as an internal error.
          if (err.code === 'EFBIG' || err.code === 'EINVAL') throw new VmConfigError(`disk ${s.def.name}: ${humanBytes(size)} is larger than the file system under ${paths.disksDir} can hold in one file (${err.code})`, { cause: err });
          if (err.code === 'ENOSPC') throw new VmConfigError(`disk ${s.def.name}: no space left under ${paths.disksDir} to create it`, { cause: err });
          throw err;
        });
        try {
          if (image) {
            await image.copyTo((off, data) => v.write(off, data));
            await v.flush();
          }
        } finally {
          await v.close();
        }
      } finally {
        await image?.close();
      }
    }
  } finally {
    await repo?.close();
  }
}

async function refuseExisting(name: string): Promise<void> {
  if (await fsp.stat(vmPaths(dataDir(), name).config).catch(() => null)) throw new UsageError(`VM ${name} already exists`);
  checkVmPathsFit(dataDir(), name);
}

/**
 * `vm create` and `vm import`: the definition checked and built (src/vm/create.ts), disks created,
 * then the definition written; any failure removes the VM folder (no half-created VM).
 */
async function createVm(g: GlobalOptions, req: CreateRequest, extra: { mac?: string; nvram?: Buffer; notMapped?: string[] } = {}): Promise<void> {
  await refuseExisting(req.name);
  const paths = vmPaths(dataDir(), req.name);
  const { def, disks } = await buildDefinition(req);
  if (extra.mac && def.net) def.net.mac = extra.mac;
  await fsp.mkdir(paths.dir, { recursive: true, mode: 0o700 });
  try {
    await createDisks(def, disks, g);
    await writeNewVm(dataDir(), def, extra.nvram);
  } catch (err) {
    await withRepoIfPinned(g, (open) => unpinDisks(def.name, open)).catch(() => undefined); // a stale pin is safe: `pins rm`
    await fsp.rm(paths.dir, { recursive: true, force: true });
    throw err;
  }
  if (g.json) printJson(extra.notMapped ? { ...def, notMapped: extra.notMapped } : def);
  else console.log(`created VM ${def.name}: ${def.memoryMiB} MiB, ${def.cpus} vCPU, ${def.disks.map((d) => `${d.name} ${humanBytes(d.size)}`).join(', ') || 'no disks'}${def.cdrom ? `, CD-ROM ${def.cdrom}` : ''}, ${def.firmware}, network ${def.net?.mode ?? 'none'}`);
}

/** Pin options for a VM disk cloned from a snapshot (held as "<vm>/<disk>"). */
function diskPin(repo: Repository, snapshot: string, vm: string, disk: string) {
  return opsDiskPin(repo, dataDir(), snapshot, vm, disk);
}

/** Releases the pins of a VM's disks (src/ops/vm.ts), in this CLI's data folder. */
function unpinDisks(vmName: string, open: () => Promise<Repository>, unreachable?: (disk: string, pin: BasePin, err: Error) => void): Promise<void> {
  return opsUnpinDisks(dataDir(), vmName, open, unreachable);
}

/** Runs `fn` with a repository opened only if some disk of `def` holds a pin (and closed after, if it opened). */
async function withRepoIfPinned(g: GlobalOptions, fn: (open: () => Promise<Repository>) => Promise<void>): Promise<void> {
  let repo: Promise<Repository> | null = null;
  try {
    await fn(() => (repo ??= openRepository(g)));
  } finally {
    const opened = repo ? await (repo as Promise<Repository>).catch(() => null) : null;
    if (opened) await opened.close();
  }
}

/** Deletes a VM that is not running and its disks, releasing their pins (`vm rm`, a finished `migrate`). */
export async function removeStoppedVm(g: GlobalOptions, name: string): Promise<void> {
  const paths = vmPaths(dataDir(), name);
  // A VM whose vm.json is damaged can still be removed: only its folder must exist.
  if (!(await fsp.stat(paths.dir).catch(() => null))) await loadDefinition(dataDir(), name);
  const procs = await vmProcesses(paths, name);
  if ((await isRunning(paths)) || procs.supervisor || procs.qemus.length) throw new UsageError(`VM ${name} is running: stop it first (\`vmsnap vm stop ${name}\`)`);
  // Its disks' pins go first: a VM removed while they stay would keep its snapshots until
  // `pins rm`. An unreachable repository must not keep the VM, so those pins stay, named.
  await withRepoIfPinned(g, (open) =>
    unpinDisks(name, open, (disk, pin, err) =>
      console.error(
        `vmsnap: warning: disk ${disk} of VM ${name} pins snapshot ${shortId(pin.snapshot)} and the repository could not be reached to release it (${err.message}); the pin stays and keeps that snapshot: remove it with \`vmsnap pins rm ${pin.pin}\``,
      ),
    ),
  );
  await fsp.rm(paths.dir, { recursive: true, force: true });
}

export function registerVmCommands(program: Command, globals: Globals): void {
  const vm = program.command('vm').description('define, run and inspect VMs');

  vm.command('create <name>')
    .description('define a VM (disks are vmsnap copy-on-write volumes)')
    .option('--memory <size>', 'guest memory (e.g. 256M, 4G)', '256M')
    .option('--cpus <n>', 'vCPUs', '1')
    .option('--disk <size>', 'add an empty disk of this size (repeatable)', collect, [] as string[])
    .option('--disk-from <file|snap>', 'add a disk with the contents of an image file (raw, qcow2, vmdk, vdi, vhdx, ...) or a snapshot disk (repeatable)', collect, [] as string[])
    .option('--cdrom <iso>', 'an ISO in the CD-ROM drive (boots when the disks do not: install from it, then `vm eject`)')
    .option('--firmware <f>', 'bios or uefi (OVMF, with the VM\'s own variables)', 'bios')
    .option('--net <mode>', 'user (NAT through QEMU, no root) or none', 'user')
    .option('--forward <[proto:]host:guest>', 'forward a host port (on 127.0.0.1 unless an address is given) to a guest port, e.g. tcp:8080:80 (repeatable)', collect, [] as string[])
    .option('--kernel <file>', 'boot this kernel (or multiboot ELF) directly')
    .option('--initrd <file>', 'initial ramdisk')
    .option('--append <cmdline>', 'kernel command line')
    .option('--display <d>', 'none, spice, vnc (both on a unix socket: `vm view`) or gtk (a window); with a VGA adapter and a USB tablet', 'none')
    .option('--accel <a>', 'auto, kvm or tcg', 'auto')
    .option('--qemu-arg <arg>', 'extra QEMU argument (repeatable)', collect, [] as string[])
    .action(async (name: string, o: { memory: string; cpus: string; disk: string[]; diskFrom: string[]; cdrom?: string; firmware: string; net: string; forward: string[]; kernel?: string; initrd?: string; append?: string; display: string; accel: string; qemuArg: string[] }) => {
      await createVm(globals(), {
        name,
        memory: o.memory,
        cpus: o.cpus,
        disks: o.disk,
        diskFrom: o.diskFrom,
        ...(o.kernel !== undefined ? { kernel: o.kernel } : {}),
        ...(o.initrd !== undefined ? { initrd: o.initrd } : {}),
        ...(o.append !== undefined ? { append: o.append } : {}),
        ...(o.cdrom !== undefined ? { cdrom: o.cdrom } : {}),
        firmware: o.firmware,
        net: o.net,
        forwards: o.forward,
        display: o.display,
        accel: o.accel,
        qemuArgs: o.qemuArg,
      });
    });

  vm.command('import <name>')
    .description('define a VM from an existing one: --libvirt DOMAIN.xml (the output of `virsh dumpxml`); its disk images are copied in')
    .requiredOption('--libvirt <xml>', 'a libvirt domain XML file')
    .action(async (name: string, o: { libvirt: string }) => {
      const g = globals();
      await refuseExisting(name);
      const plan = await planLibvirtImport(name, o.libvirt);
      // What was left out or changed is said before the (possibly long) disk copies.
      for (const l of plan.notMapped) console.error(`vmsnap: not mapped: ${l}`);
      await createVm(g, plan.request, { ...(plan.mac ? { mac: plan.mac } : {}), ...(plan.nvram ? { nvram: plan.nvram } : {}), notMapped: plan.notMapped });
    });

  /** `vm eject` / `vm insert`: a running VM's drive changes through its supervisor, which also updates the definition. */
  const setCdrom = async (name: string, medium: string | null) => {
    const paths = vmPaths(dataDir(), name);
    await loadDefinition(dataDir(), name);
    if (await isRunning(paths)) await callSupervisor(paths, { op: 'media', medium });
    else await setMedium(dataDir(), name, medium);
    if (!globals().json) console.log(medium === null ? `VM ${name}: CD-ROM drive empty` : `VM ${name}: ${medium} in the CD-ROM drive`);
  };
  vm.command('eject <name>')
    .description('empty the CD-ROM drive (at once if the VM runs)')
    .action((name: string) => setCdrom(name, null));
  vm.command('insert <name> <iso>')
    .description('put an ISO in the CD-ROM drive (at once if the VM runs)')
    .action(async (name: string, iso: string) => setCdrom(name, await checkIso(iso)));

  vm.command('view <name>')
    .description('open the screen of a running VM with remote-viewer (virt-viewer), or print its address')
    .option('--print', 'only print the address')
    .action(async (name: string, o: { print?: boolean }) => {
      const def = await loadDefinition(dataDir(), name);
      const paths = vmPaths(dataDir(), name);
      const t = await viewTarget(def, paths);
      if (!(await isRunning(paths))) throw new SupervisorError(`VM ${name} is not running`);
      if (globals().json) return printJson(t);
      if (o.print || !t.viewer) {
        console.log(t.address);
        if (!o.print) console.error('vmsnap: note: remote-viewer not found (Debian package virt-viewer); open the address above with a VNC/SPICE viewer');
        return;
      }
      spawn(t.viewer, [t.address], { detached: true, stdio: 'ignore' }).unref();
      console.log(`opened ${t.address} with ${t.viewer}`);
    });

  vm.command('screendump <name> <file>')
    .description("save a running VM's screen as a PNG file")
    .action(async (name: string, file: string) => {
      await loadDefinition(dataDir(), name);
      const out = path.resolve(file);
      await callSupervisor(vmPaths(dataDir(), name), { op: 'screendump', file: out });
      if (!globals().json) console.log(`screen of VM ${name} saved to ${out}`);
    });

  vm.command('start <name>')
    .description('start a VM (its supervisor keeps disks served while it runs)')
    .option('--restore <snapshot>', "start from this snapshot (latest: this VM's latest)")
    .option(FROM_OTHER_VM_FLAG, "allow --restore to name a snapshot of another VM (its RAM, devices and disks replace this VM's)")
    .option('--hydrate [mibps]', HYDRATE_HELP)
    .action(async (name: string, o: { restore?: string; fromOtherVm?: boolean; hydrate?: boolean | string }) => {
      const g = globals();
      await loadDefinition(dataDir(), name);
      const hydrate = hydrateRate(o.hydrate);
      const restore = o.restore !== undefined ? await checkedRestoreTarget(vmOpsContext(g), name, o.restore, !!o.fromOtherVm) : undefined;
      await spawnSupervisor(dataDir(), name, {
        env: await supervisorEnv(g),
        ...(restore ? { restore, restoreFromOtherVm: !!o.fromOtherVm } : {}),
        ...(hydrate !== undefined ? { hydrate } : {}),
      });
      const st = await callSupervisor(vmPaths(dataDir(), name), { op: 'status' });
      if (g.json) printJson(st);
      else console.log(`VM ${name} ${st.state} (QEMU pid ${st.pid}, ${st.accel})`);
    });

  for (const [verb, op, desc] of [
    ['stop', 'stop', 'stop a VM (QEMU quits; disks are checkpointed)'],
    ['pause', 'pause', 'pause the guest'],
    ['resume', 'resume', 'resume the guest'],
  ] as const) {
    vm.command(`${verb} <name>`)
      .description(desc)
      .action(async (name: string) => {
        const paths = vmPaths(dataDir(), name);
        await loadDefinition(dataDir(), name);
        if (op === 'stop' && !(await isRunning(paths))) {
          // No supervisor answers: end whatever of this VM still lives (a hung supervisor, a QEMU
          // a killed supervisor left behind) rather than report a VM stopped that is not.
          const ended = await forceStop(paths, name);
          if (!ended.length) throw new SupervisorError(`VM ${name} is not running`);
          if (!globals().json) console.log(`VM ${name}: stop done (killed process(es) ${ended.join(', ')} left without a working supervisor)`);
          return;
        }
        await callSupervisor(paths, { op });
        if (op === 'stop') {
          for (let i = 0; i < 200 && (await isRunning(paths)); i++) await new Promise((r) => setTimeout(r, 50));
          // The socket stops answering first; QEMU quits and the volumes close after: wait for the
          // supervisor process itself, so a `vm start` right after finds the volumes free.
          const pid = Number(await fsp.readFile(paths.supervisorPid, 'utf8').catch(() => ''));
          for (let i = 0; i < 400 && pid > 0 && processAlive(pid); i++) await new Promise((r) => setTimeout(r, 50));
        }
        if (!globals().json) console.log(`VM ${name}: ${verb} done`);
      });
  }

  vm.command('ls')
    .description('list VMs')
    .action(async () => {
      const g = globals();
      const rows = [];
      for (const name of await listVms(dataDir())) {
        const paths = vmPaths(dataDir(), name);
        const st = await vmStatus(paths, name);
        // One VM's unreadable definition must not hide the others: it is listed as broken.
        const def = await loadDefinition(dataDir(), name).catch((err: Error) => err);
        const lastSnapshot = (await loadState(dataDir(), name)).lastSnapshot;
        if (def instanceof Error) rows.push({ name, state: st.state === 'shutoff' ? 'broken' : st.state, problem: def.message, memoryMiB: null, cpus: null, disks: [], lastSnapshot });
        else rows.push({ name, state: st.state, ...(st.problem ? { problem: st.problem } : {}), memoryMiB: def.memoryMiB, cpus: def.cpus, disks: def.disks, lastSnapshot });
      }
      if (g.json) return printJson(rows);
      if (!rows.length) return console.log('no VMs');
      for (const r of rows) {
        console.log(`${r.name.padEnd(16)} ${r.state.padEnd(12)} ${String(r.memoryMiB ?? '-').padStart(6)} MiB  ${r.disks.length} disk(s)  last snapshot ${r.lastSnapshot ? shortId(r.lastSnapshot) : '-'}`);
        if (r.problem) console.log(`  ${r.problem}`);
      }
    });

  vm.command('show <name>')
    .description('show a VM definition and state')
    .action(async (name: string) => {
      const g = globals();
      const def = await loadDefinition(dataDir(), name);
      const paths = vmPaths(dataDir(), name);
      const st = await vmStatus(paths, name);
      const state = await loadState(dataDir(), name);
      if (g.json) return printJson({ ...def, status: st, lastSnapshot: state.lastSnapshot, serialLog: paths.serialLog });
      console.log(JSON.stringify({ ...def, status: st, lastSnapshot: state.lastSnapshot, serialLog: paths.serialLog }, null, 2));
    });

  vm.command('console <name>')
    .description('print the serial console log (follows it while the VM runs)')
    .option('--no-follow', 'print what is there and exit')
    .action(async (name: string, o: { follow: boolean }) => {
      await loadDefinition(dataDir(), name);
      const paths = vmPaths(dataDir(), name);
      let pos = 0;
      for (;;) {
        const fh = await fsp.open(paths.serialLog, 'r').catch(() => null);
        if (fh) {
          const { size } = await fh.stat();
          if (size < pos) pos = 0;
          if (size > pos) {
            const b = Buffer.alloc(size - pos);
            await fh.read(b, 0, b.length, pos);
            process.stdout.write(b);
            pos = size;
          }
          await fh.close();
        }
        if (!o.follow || !(await isRunning(paths))) return;
        await new Promise((r) => setTimeout(r, 250));
      }
    });

  vm.command('rm <name>')
    .description('delete a VM and its disks (its snapshots stay in the repository)')
    .action(async (name: string) => {
      await removeStoppedVm(globals(), name);
      if (!globals().json) console.log(`removed VM ${name}`);
    });

  program
    .command('take <vm>')
    .description('snapshot a VM: RAM, devices and disks while it runs (paused for milliseconds)')
    .option('-m, --message <text>', 'a note stored with the snapshot')
    .option('--tag <tag>', 'tag (repeatable)', collect, [] as string[])
    .option('--disk-only', 'crash-consistent disks only, no RAM')
    .option('--quiesce', "freeze the guest's file systems through qemu-guest-agent for the snapshot (a warning if no agent answers)")
    .action(async (name: string, o: { message?: string; tag: string[]; diskOnly?: boolean; quiesce?: boolean }) => {
      const g = globals();
      const sink = progressSink('take', { bar: false, info: !g.quiet });
      const r = await takeVm(vmOpsContext(g), name, { ...(o.message !== undefined ? { message: o.message } : {}), tags: o.tag, diskOnly: !!o.diskOnly, quiesce: !!o.quiesce }, sink);
      printTake(r, !!g.json);
    });

  program
    .command('restore <vm> <snapshot>')
    .description("put a VM back to a snapshot: RAM, devices and disks; it resumes at that moment (latest: this VM's latest)")
    .option(FROM_OTHER_VM_FLAG, "allow <snapshot> to be another VM's (by id): its RAM, devices and disks replace this VM's")
    .action(async (name: string, ref: string, o: { fromOtherVm?: boolean }) => {
      const g = globals();
      const r = await restoreVm(vmOpsContext(g), name, { snapshot: ref, fromOtherVm: !!o.fromOtherVm }, progressSink('restore', { bar: false, info: !g.quiet }));
      if (g.json) printJson(r);
      else console.log(`VM ${name} restored to ${shortId(r.snapshot)}: ${r.runState}${r.loadMs !== undefined ? ` (loaded in ${r.loadMs.toFixed(0)} ms)` : ''}`);
    });

  program
    .command('clone <snapshot> <newvm>')
    .description('a new VM from a snapshot: disks cloned copy-on-write, RAM restored; runs beside the original')
    .option('--no-start', 'define the clone but do not start it')
    .option('--hydrate [mibps]', HYDRATE_HELP)
    .option('--qemu-arg <arg>', "the clone's own extra QEMU argument (repeatable), instead of the source VM's", collect, [] as string[])
    .option('--keep-qemu-args', "copy the source VM's --qemu-arg flags as they are (they may name sockets, files or ports the source VM uses)")
    .action(async (ref: string, newName: string, o: { start: boolean; hydrate?: boolean | string; qemuArg: string[]; keepQemuArgs?: boolean }) => {
      const g = globals();
      const hydrate = hydrateRate(o.hydrate);
      const { snapshot: snapId } = await cloneVm(
        vmOpsContext(g),
        { snapshot: ref, newVm: newName, start: o.start, qemuArgs: o.qemuArg, keepQemuArgs: !!o.keepQemuArgs, ...(hydrate !== undefined ? { hydrate } : {}) },
        progressSink('clone', { bar: false, info: !g.quiet }),
      );
      if (g.json) printJson({ vm: newName, snapshot: snapId, started: o.start });
      else console.log(`VM ${newName} cloned from ${shortId(snapId)}${o.start ? ' and running' : ''}`);
    });

  program
    .command('__supervise <vm>', { hidden: true })
    .option('--restore <snapshot>')
    .option(FROM_OTHER_VM_FLAG)
    .option('--hydrate <bytesPerSecond>')
    .action(async (name: string, o: { restore?: string; fromOtherVm?: boolean; hydrate?: string }) => {
      const g = globals();
      await runSupervisor({
        dataDir: dataDir(),
        name,
        ...(o.restore ? { restore: o.restore, restoreFromOtherVm: !!o.fromOtherVm } : {}),
        ...(o.hydrate !== undefined ? { hydrate: Number(o.hydrate) } : {}),
        openRepo: () => openRepository(g),
        removeMoved: (vm, warn) => removeMovedVm({ dataDir: dataDir(), openRepo: () => openRepository(g) }, vm, warn),
      });
    });
}

export { SupervisorError };
