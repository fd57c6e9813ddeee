/**
 * Which processes of a VM are alive, found from the processes themselves rather than from what a
 * supervisor says about itself: a supervisor killed with SIGKILL says nothing, and pid files it
 * leaves behind may name a pid the kernel has since given to a stranger.
 *
 *   supervisor   the pid in run/supervisor.pid, counted only while that process really is this
 *                VM's supervisor (its command line is `… __supervise <name> …`, or the `receive`
 *                worker `… __receive-one` that received the VM)
 *   qemus        every live process whose command line names this VM's QMP socket — the QEMU of
 *                the running VM, and any QEMU a dead supervisor left behind
 *
 * QEMU is launched through native/die-with-parent, so it dies with its supervisor; this census is
 * the second line of defence (the helper not built, or QEMUs left by an older vmsnap), and is what
 * `vm start` refuses on and `vm ls`/`vm show` report.
 */
import { promises as fsp, readFileSync } from 'node:fs';
import { processAlive } from '../util/process.js';
import { qemuPaths, qmpChardevPath } from '../hypervisor/qemu.js';
import type { VmPaths } from './config.js';

export interface VmProcesses {
  /** The live supervisor's pid, or null. */
  supervisor: number | null;
  /** Live QEMU processes of this VM (normally zero or one, the supervisor's child). */
  qemus: number[];
  /** run/supervisor.pid names no live supervisor of this VM (it died without cleaning up). */
  stalePidFile: boolean;
}

function cmdline(pid: number): string[] | null {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');
  } catch {
    return null;
  }
}

/** Whether `pid` is alive and is the supervisor of VM `name`. */
export function isSupervisorOf(pid: number, name: string): boolean {
  const argv = cmdline(pid);
  if (!argv) return false;
  const i = argv.indexOf('__supervise');
  // A `receive` worker becomes the supervisor of the VM it received (migration/incoming.ts); it
  // cannot name the VM on its command line (unknown when it started), so the pid file naming it —
  // written by that worker, exclusively — is the claim.
  return (i >= 0 && argv[i + 1] === name) || argv.includes('__receive-one');
}

/** Live processes whose command line names `runDir`'s QMP socket (QEMU, or its wrapper before exec). */
export async function qemusOf(runDir: string): Promise<number[]> {
  const needle = `path=${qmpChardevPath(qemuPaths(runDir).qmpSocket)},`;
  const out: number[] = [];
  for (const e of await fsp.readdir('/proc')) {
    const pid = Number(e);
    if (!Number.isInteger(pid) || pid <= 0 || pid === process.pid) continue;
    const argv = cmdline(pid);
    if (argv?.some((a) => a.includes(needle)) && processAlive(pid)) out.push(pid);
  }
  return out.sort((a, b) => a - b);
}

export async function vmProcesses(paths: VmPaths, name: string): Promise<VmProcesses> {
  const text = await fsp.readFile(paths.supervisorPid, 'utf8').catch(() => null);
  const pid = text === null ? NaN : Number(text.trim());
  const supervisor = Number.isInteger(pid) && pid > 0 && isSupervisorOf(pid, name) ? pid : null;
  return { supervisor, qemus: await qemusOf(paths.runDir), stalePidFile: text !== null && supervisor === null };
}

/** Waits up to `ms` for every pid in `pids` to exit; returns those still alive. */
export async function waitExited(pids: number[], ms: number): Promise<number[]> {
  const deadline = Date.now() + ms;
  let left = pids.filter(processAlive);
  while (left.length && Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 50));
    left = left.filter(processAlive);
  }
  return left;
}
