import { readFileSync } from 'node:fs';

/** Whether a process with this pid exists (EPERM: it exists but belongs to someone else). */
export function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** The kernel's id of this boot ('' where /proc does not say). */
function bootId(): string {
  try {
    return readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim();
  } catch {
    return '';
  }
}

/** A process's start time in clock ticks since boot (field 22 of /proc/PID/stat), '' if unknown. */
function startTicks(pid: number): string {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    // The command name (field 2) may hold spaces and parentheses: count fields after the last ')'.
    return stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19] ?? '';
  } catch {
    return '';
  }
}

/**
 * This process as the owner of a lock file: "PID START BOOT". A bare pid can be reused, by a later
 * process or after a reboot, and then a dead owner's lock looks alive for as long as the stranger
 * runs; the start time and boot id tell them apart.
 */
export function ownerToken(pid = process.pid): string {
  return `${pid} ${startTicks(pid) || '-'} ${bootId() || '-'}`;
}

/**
 * Whether the owner a token names (see ownerToken; a bare pid, as older lock files hold, is
 * accepted) still runs. null: the text is no token at all.
 */
export function ownerAlive(token: string): { pid: number; alive: boolean } | null {
  const [p, start, boot, ...rest] = token.trim().split(' ');
  const pid = Number(p);
  if (!Number.isInteger(pid) || pid <= 0 || rest.length) return null;
  if (!processAlive(pid)) return { pid, alive: false };
  if (start === undefined) return { pid, alive: true }; // a bare pid: nothing more to compare
  const bootNow = bootId();
  if (boot && boot !== '-' && bootNow && boot !== bootNow) return { pid, alive: false };
  const startNow = startTicks(pid);
  if (start !== '-' && startNow && start !== startNow) return { pid, alive: false };
  return { pid, alive: true };
}

/**
 * Secrets of vmsnap's own that a child which is not vmsnap (QEMU, qemu-img, helpers) must never
 * see: the repository password (and the file naming it) and object-store credentials. Another
 * process of the same user can read a process's environment in /proc/PID/environ for as long as
 * it runs, and a guest-facing process like QEMU should hold nothing it does not need.
 */
const SECRET_ENV = /^(VMSNAP_PASSWORD(_FILE)?|VMSNAP_TO_PASSWORD|AWS_SECRET_ACCESS_KEY|AWS_SESSION_TOKEN|AWS_ACCESS_KEY_ID)$/;

/** This process's environment without vmsnap's secrets (see SECRET_ENV), for spawning non-vmsnap children. */
export function childEnv(env: NodeJS.ProcessEnv = process.env): NodeJS.ProcessEnv {
  return Object.fromEntries(Object.entries(env).filter(([k]) => !SECRET_ENV.test(k)));
}
