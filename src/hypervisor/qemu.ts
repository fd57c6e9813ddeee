/**
 * Launching QEMU (qemu-system-x86_64) for vmsnap: version gate, accelerator choice, argv, process.
 *
 * Layout of a run directory (one per QEMU process, owned by the caller):
 *
 *   RUNDIR/qmp.sock     QMP control socket (QEMU is the server)
 *   RUNDIR/serial.log   guest COM1 (-chardev file)
 *   RUNDIR/qemu.log     QEMU's own stdout+stderr
 *
 * Supported QEMU: 10.x only (>= 10.0, < 11). The migration stream layout vmsnap parses and rebuilds
 * (see migstream/) was measured on 10.0.2; other majors are refused with UnsupportedQemuError rather
 * than risk writing snapshots that cannot be restored. The machine type defaults to
 * `pc-i440fx-10.0` and is recorded in the launch result, because a stream only loads into the same
 * machine type.
 */
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { childEnv } from '../util/process.js';
import { promises as fsp, constants as fsc } from 'node:fs';
import * as path from 'node:path';
import { readTail } from '../util/fs.js';
import { nativeHelper } from '../util/project.js';
import { promisify } from 'node:util';
import { QmpClient } from './qmp.js';
import { UserFacingError } from '../util/errors.js';

const execFileP = promisify(execFile);

export const DEFAULT_QEMU_BINARY = 'qemu-system-x86_64';
export const DEFAULT_MACHINE_TYPE = 'pc-i440fx-10.0';
/** Versions whose migration stream format vmsnap understands: major 10. */
export const SUPPORTED_QEMU = { minMajor: 10, maxMajorExclusive: 11 } as const;

export class UnsupportedQemuError extends UserFacingError {
  override readonly name = 'UnsupportedQemuError';
}

export class QemuDetectError extends UserFacingError {
  override readonly name = 'QemuDetectError';
}

export class QemuLaunchError extends UserFacingError {
  override readonly name = 'QemuLaunchError';
  constructor(
    message: string,
    readonly logTail: string,
  ) {
    super(logTail ? `${message}\n--- QEMU log tail ---\n${logTail}` : message);
  }
}

export interface QemuVersion {
  major: number;
  minor: number;
  micro: number;
  /** The full first line of `--version`. */
  text: string;
}

export interface QemuBinary {
  path: string;
  version: QemuVersion;
}

/** Parses `qemu-system-x86_64 --version` output. */
export function parseQemuVersion(out: string): QemuVersion {
  const m = /QEMU emulator version (\d+)\.(\d+)(?:\.(\d+))?/.exec(out);
  if (!m) throw new QemuDetectError(`cannot find a version in QEMU output: ${out.slice(0, 200)}`);
  return {
    major: Number(m[1]),
    minor: Number(m[2]),
    micro: Number(m[3] ?? 0),
    text: out.split('\n')[0]?.trim() ?? '',
  };
}

/** Throws UnsupportedQemuError unless `v` is a QEMU whose stream format vmsnap handles (10.x). */
export function assertSupportedQemu(v: QemuVersion): void {
  if (v.major < SUPPORTED_QEMU.minMajor || v.major >= SUPPORTED_QEMU.maxMajorExclusive) {
    throw new UnsupportedQemuError(
      `QEMU ${v.major}.${v.minor}.${v.micro} is not supported: vmsnap needs QEMU >= ` +
        `${SUPPORTED_QEMU.minMajor}.0 and < ${SUPPORTED_QEMU.maxMajorExclusive}.0 (its migration stream ` +
        `format was verified only there). On Debian 12 install qemu-system-x86 from bookworm-backports.`,
    );
  }
}

/** Finds the QEMU binary, reads its version and checks it is supported. */
export async function detectQemu(binary: string = DEFAULT_QEMU_BINARY): Promise<QemuBinary> {
  let out: string;
  try {
    ({ stdout: out } = await execFileP(binary, ['--version'], { timeout: 15_000 }));
  } catch (e) {
    throw new QemuDetectError(`cannot run ${binary} --version: ${(e as Error).message}`);
  }
  const version = parseQemuVersion(out);
  assertSupportedQemu(version);
  return { path: binary, version };
}

/** True when /dev/kvm exists and opens read-write (permission and presence). */
export async function kvmAvailable(dev = '/dev/kvm'): Promise<boolean> {
  try {
    const fh = await fsp.open(dev, fsc.O_RDWR);
    await fh.close();
    return true;
  } catch {
    return false;
  }
}

export type Accel = 'kvm' | 'tcg';

export interface AccelChoice {
  /** Force an accelerator; 'auto' (default) picks KVM only when it opens and the guest can use it. */
  force?: Accel | 'auto';
  /**
   * Whether this guest is known to run under this host's KVM. Some hosts expose a /dev/kvm that
   * cannot run every guest (e.g. nested software hypervisors), so opening is not enough.
   */
  guestRunsUnderKvm: boolean;
}

export async function chooseAccel(c: AccelChoice, dev = '/dev/kvm'): Promise<Accel> {
  if (c.force === 'kvm' || c.force === 'tcg') return c.force;
  return c.guestRunsUnderKvm && (await kvmAvailable(dev)) ? 'kvm' : 'tcg';
}

export interface NbdDisk {
  /** unix socket of the NBD server */
  socketPath: string;
  exportName: string;
  readOnly?: boolean;
}

export interface QemuLaunchOptions {
  runDir: string;
  binary?: string;
  accel: Accel;
  memoryMiB: number;
  cpus?: number;
  machine?: string;
  kernel?: string;
  initrd?: string;
  append?: string;
  disks?: NbdDisk[];
  /** UEFI: OVMF's code image (read-only pflash 0) and this VM's own variables file (pflash 1). */
  firmware?: { code: string; vars: string };
  /**
   * An IDE CD-ROM drive (id `cdrom0`), with `medium` in it or empty (null). It boots after the
   * disks, so a blank disk falls through to the installer and an installed one boots itself.
   */
  cdrom?: { medium: string | null };
  /** A virtio NIC on QEMU's user-mode network (slirp: NAT, no root), with host port forwards. */
  net?: { mac: string; forwards: readonly QemuPortForward[] };
  /** A virtio-serial channel named org.qemu.guest_agent.0 on this unix socket (QEMU listens). */
  agentSocket?: string;
  /**
   * A screen: a VGA adapter and a USB tablet, shown by QEMU's own window (gtk) or served on a unix
   * socket (vnc, spice — with the spice-vdagent channel for clipboard and resize).
   */
  screen?: { kind: 'gtk' } | { kind: 'vnc' | 'spice'; socket: string };
  /** Start with `-incoming defer` (a restore target, loads via migrate-incoming). */
  incomingDefer?: boolean;
  /** Start paused (-S). */
  paused?: boolean;
  extraArgs?: string[];
}

export interface QemuPortForward {
  proto: 'tcp' | 'udp';
  hostAddr: string;
  hostPort: number;
  guestPort: number;
}

/** The QOM id of the CD-ROM drive (QMP eject / blockdev-change-medium name it). */
export const CDROM_ID = 'cdrom0';
/** The virtio-serial port name qemu-guest-agent opens in the guest. */
export const GUEST_AGENT_CHANNEL = 'org.qemu.guest_agent.0';

export interface QemuPaths {
  qmpSocket: string;
  serialLog: string;
  qemuLog: string;
}

export function qemuPaths(runDir: string): QemuPaths {
  return {
    qmpSocket: path.join(runDir, 'qmp.sock'),
    serialLog: path.join(runDir, 'serial.log'),
    qemuLog: path.join(runDir, 'qemu.log'),
  };
}

/** QEMU's option parser splits on ','; a literal comma in a value is written ',,'. */
function optVal(s: string): string {
  return s.replaceAll(',', ',,');
}

/** The QMP socket path as it appears in QEMU's argv (vm-processes.ts finds a VM's QEMUs by it). */
export const qmpChardevPath = optVal;

/** Builds the full argv (without the binary). Pure: easy to test and to record in a snapshot. */
export function buildQemuArgv(o: QemuLaunchOptions): string[] {
  if (!Number.isInteger(o.memoryMiB) || o.memoryMiB < 16) {
    throw new QemuLaunchError(`memory must be an integer number of MiB >= 16, got ${o.memoryMiB}`, '');
  }
  const cpus = o.cpus ?? 1;
  if (!Number.isInteger(cpus) || cpus < 1) throw new QemuLaunchError(`cpus must be a positive integer, got ${cpus}`, '');
  const p = qemuPaths(o.runDir);
  const argv = [
    '-machine', optVal(o.machine ?? DEFAULT_MACHINE_TYPE),
    '-accel', o.accel,
    '-m', `${o.memoryMiB}M`,
    '-smp', String(cpus),
    '-nodefaults',
    '-no-user-config',
    '-display', 'none',
    '-chardev', `socket,id=qmp,path=${optVal(p.qmpSocket)},server=on,wait=off`,
    '-mon', 'chardev=qmp,mode=control',
    '-chardev', `file,id=serial0,path=${optVal(p.serialLog)}`,
    '-serial', 'chardev:serial0',
  ];
  if (o.kernel) argv.push('-kernel', o.kernel);
  if (o.initrd) argv.push('-initrd', o.initrd);
  if (o.append !== undefined) argv.push('-append', o.append);
  (o.disks ?? []).forEach((d, i) => {
    // JSON syntax for -blockdev needs no comma escaping of paths/export names.
    const node = `disk${i}`;
    argv.push(
      '-blockdev',
      JSON.stringify({
        driver: 'nbd',
        'node-name': node,
        server: { type: 'unix', path: d.socketPath },
        export: d.exportName,
        'read-only': d.readOnly ?? false,
        // The NBD server owns caching; flushes must reach it so guest fsync means durable.
        cache: { direct: false, 'no-flush': false },
      }),
      '-device',
      // A VM without -kernel boots from its disks first, in order (with -kernel, QEMU's linuxboot
      // ROM has boot index 0 and the disks keep the argv they always had).
      `virtio-blk-pci,drive=${node},id=vblk${i}${o.kernel ? '' : `,bootindex=${i}`}`,
    );
  });
  argv.push(...desktopArgs(o));
  if (o.paused) argv.push('-S');
  if (o.incomingDefer) argv.push('-incoming', 'defer');
  argv.push(...(o.extraArgs ?? []));
  return argv;
}

/** Firmware, CD-ROM, network and guest agent devices (each only when asked for). */
function desktopArgs(o: QemuLaunchOptions): string[] {
  const argv: string[] = [];
  if (o.firmware) {
    argv.push(
      '-drive', `if=pflash,format=raw,unit=0,readonly=on,file=${optVal(o.firmware.code)}`,
      '-drive', `if=pflash,format=raw,unit=1,file=${optVal(o.firmware.vars)}`,
    );
  }
  if (o.cdrom) {
    const boot = o.kernel ? '' : `,bootindex=${(o.disks ?? []).length}`;
    if (o.cdrom.medium === null) argv.push('-device', `ide-cd,id=${CDROM_ID},bus=ide.1${boot}`);
    else {
      argv.push(
        '-blockdev',
        JSON.stringify({ driver: 'raw', 'node-name': 'cd0', 'read-only': true, file: { driver: 'file', filename: o.cdrom.medium, 'read-only': true } }),
        '-device', `ide-cd,drive=cd0,id=${CDROM_ID},bus=ide.1${boot}`,
      );
    }
  }
  if (o.net) {
    // Numbers and an IPv4 address: nothing to escape.
    const fwd = o.net.forwards.map((f) => `,hostfwd=${f.proto}:${f.hostAddr}:${f.hostPort}-:${f.guestPort}`).join('');
    // romfile= : no iPXE option ROM, so a VM with nothing to boot does not sit in a network boot.
    argv.push('-netdev', `user,id=net0${fwd}`, '-device', `virtio-net-pci,netdev=net0,id=nic0,mac=${o.net.mac},romfile=`);
  }
  if (o.agentSocket || o.screen?.kind === 'spice') argv.push('-device', 'virtio-serial-pci,id=vser0');
  if (o.agentSocket) {
    argv.push(
      '-chardev', `socket,id=qga0,path=${optVal(o.agentSocket)},server=on,wait=off`,
      '-device', `virtserialport,bus=vser0.0,chardev=qga0,name=${GUEST_AGENT_CHANNEL}`,
    );
  }
  if (o.screen) {
    argv.push('-device', 'VGA,id=video0', '-device', 'qemu-xhci,id=xhci0', '-device', 'usb-tablet,bus=xhci0.0,id=tablet0');
    if (o.screen.kind === 'gtk') argv.push('-display', 'gtk');
    else if (o.screen.kind === 'vnc') argv.push('-vnc', `unix:${optVal(o.screen.socket)}`);
    else {
      argv.push(
        '-spice', `unix=on,addr=${optVal(o.screen.socket)},disable-ticketing=on`,
        '-chardev', 'spicevmc,id=vdagent0,name=vdagent',
        '-device', 'virtserialport,bus=vser0.0,chardev=vdagent0,name=com.redhat.spice.0',
      );
    }
  }
  return argv;
}

export interface QemuExit {
  code: number | null;
  signal: NodeJS.Signals | null;
}

export class QemuProcess {
  readonly pid: number;
  readonly exited: Promise<QemuExit>;
  private exitInfo: QemuExit | undefined;

  constructor(
    private readonly child: ChildProcess,
    readonly qmp: QmpClient,
    readonly paths: QemuPaths,
    readonly argv: readonly string[],
    readonly machine: string,
    readonly accel: Accel,
    readonly version: QemuVersion,
    exited: Promise<QemuExit>,
  ) {
    if (child.pid === undefined) throw new QemuLaunchError('QEMU has no pid', '');
    this.pid = child.pid;
    this.exited = exited.then((x) => (this.exitInfo = x));
  }

  get hasExited(): boolean {
    return this.exitInfo !== undefined;
  }

  /** Sends a signal (default SIGKILL) and waits for the process to exit. */
  async kill(signal: NodeJS.Signals = 'SIGKILL'): Promise<QemuExit> {
    if (!this.exitInfo) this.child.kill(signal);
    const r = await this.exited;
    this.qmp.close();
    return r;
  }

  /** Asks QEMU to quit over QMP; kills it if it has not exited within `timeoutMs`. */
  async quit(timeoutMs = 10_000): Promise<QemuExit> {
    if (!this.exitInfo) {
      // The reply may lose the race with the socket closing; either outcome means QEMU is quitting.
      await this.qmp.execute('quit', undefined, { timeoutMs }).catch(() => undefined);
      const t = new Promise<'timeout'>((r) => setTimeout(() => r('timeout'), timeoutMs).unref());
      if ((await Promise.race([this.exited, t])) === 'timeout') return this.kill('SIGKILL');
    }
    this.qmp.close();
    return this.exited;
  }

  async logTail(bytes = 4000): Promise<string> {
    return readTail(this.paths.qemuLog, bytes);
  }
}

let warnedNoWrapper = false;

/**
 * The command that runs `bin argv` so that the kernel kills it when this process dies
 * (native/die-with-parent.c): a QEMU must never outlive the process that owns its disks. The
 * spawned pid stays the program's pid (the wrapper execs). Without the helper (scripts/setup.sh
 * not run) the program runs unwrapped, with a warning: vm-processes.ts still keeps `vm start`
 * from starting a second QEMU beside an orphan.
 */
export function dieWithParent(bin: string, argv: readonly string[]): [string, string[]] {
  const helper = nativeHelper('die-with-parent');
  if (helper) return [helper, [String(process.pid), bin, ...argv]];
  if (!warnedNoWrapper) {
    warnedNoWrapper = true;
    process.emitWarning(`native helper die-with-parent is not built (run scripts/setup.sh): ${bin} may outlive this process if it is killed`);
  }
  return [bin, [...argv]];
}

/**
 * Starts QEMU and connects QMP. Fails with QemuLaunchError (including QEMU's log tail) if QEMU
 * exits before its QMP socket answers.
 */
export async function launchQemu(o: QemuLaunchOptions & { qemu?: QemuBinary; qmpTimeoutMs?: number }): Promise<QemuProcess> {
  const qemu = o.qemu ?? (await detectQemu(o.binary));
  await fsp.mkdir(o.runDir, { recursive: true, mode: 0o700 });
  const paths = qemuPaths(o.runDir);
  await fsp.rm(paths.qmpSocket, { force: true });
  const argv = buildQemuArgv(o);
  const log = await fsp.open(paths.qemuLog, 'a');
  let child: ChildProcess;
  try {
    const [cmd, args] = dieWithParent(qemu.path, argv);
    // childEnv: QEMU must not carry the repository password (docs/security.md).
    child = spawn(cmd, args, { stdio: ['ignore', log.fd, log.fd], detached: false, env: childEnv() });
  } finally {
    // The child holds its own copy of the descriptor.
    await log.close();
  }
  const exited = new Promise<QemuExit>((resolve) => {
    child.once('exit', (code, signal) => resolve({ code, signal }));
  });
  const spawnErr = new Promise<Error>((resolve) => child.once('error', resolve));
  const abort = new AbortController();
  void exited.then((x) => abort.abort(`QEMU exited (code ${x.code}, signal ${x.signal})`));
  let qmp: QmpClient;
  try {
    qmp = await Promise.race([
      QmpClient.connect(paths.qmpSocket, { timeoutMs: o.qmpTimeoutMs ?? 30_000, signal: abort.signal }),
      spawnErr.then((e) => Promise.reject(e)),
    ]);
  } catch (e) {
    child.kill('SIGKILL');
    await Promise.race([exited, new Promise((r) => setTimeout(r, 2000).unref())]);
    throw new QemuLaunchError(`QEMU did not start: ${(e as Error).message}`, await readTail(paths.qemuLog, 4000));
  }
  return new QemuProcess(child, qmp, paths, argv, o.machine ?? DEFAULT_MACHINE_TYPE, o.accel, qemu.version, exited);
}
