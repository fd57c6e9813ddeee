/**
 * What vmsnap asks of a guest's agent around its snapshots (hypervisor/guest-agent.ts is the
 * client). Both are best effort by contract: a VM without a running agent is snapshotted and
 * restored all the same, with a warning that says what was not done.
 *
 * `take --quiesce`: the guest's file systems are frozen (guest-fsfreeze-freeze: dirty data
 * written, journals committed, new writes held) before the disks' point in time, and thawed as
 * soon as the guest runs again after it. A freeze that does not answer in time is followed by a
 * thaw anyway (it may have been applied late); the snapshot is then only crash-consistent.
 *
 * After a restore (the guest resumes at the snapshot's moment, its clock that far in the past),
 * the guest's clock is set to the host's now; a guest restored from a quiesced snapshot resumes
 * with its file systems still frozen, so they are thawed too.
 */
import { GuestAgent, GuestAgentTimeoutError, withGuestAgent } from '../hypervisor/guest-agent.js';

/** What `take --quiesce` reports. */
export interface QuiesceReport {
  /** File systems the agent froze (null: not frozen). */
  frozen: number | null;
  /** File systems thawed after the snapshot point (null: no thaw answered). */
  thawed: number | null;
  warning?: string;
}

export interface Quiesce {
  report: QuiesceReport;
  /** Thaws (once; later calls return the first outcome). Never throws: failures become the warning. */
  thaw(): Promise<QuiesceReport>;
}

const SYNC_MS = 3000;
const FREEZE_MS = 20_000;
const THAW_MS = 10_000;

function describe(err: unknown, what: string): string {
  if (err instanceof GuestAgentTimeoutError) return `no guest agent answered (${what} skipped): is qemu-guest-agent installed and running in the guest?`;
  return `${what} failed: ${(err as Error).message}`;
}

/** Freezes the guest's file systems; the returned thaw must run once the guest runs again. */
export async function freezeGuest(agentSocket: string | null): Promise<Quiesce> {
  const report: QuiesceReport = { frozen: null, thawed: null };
  const none = { report, thaw: () => Promise.resolve(report) };
  if (!agentSocket) return { ...none, report: { ...report, warning: 'this VM has no guest agent channel (it was created before vmsnap VMs had one): the snapshot is crash-consistent only' } };
  let agent: GuestAgent;
  try {
    agent = await GuestAgent.connect(agentSocket, { syncTimeoutMs: SYNC_MS });
  } catch (err) {
    report.warning = `${describe(err, 'file-system freeze')}; the snapshot is crash-consistent only`;
    return none;
  }
  try {
    report.frozen = await agent.freeze(FREEZE_MS);
  } catch (err) {
    report.warning = `${describe(err, 'file-system freeze')}; the snapshot is crash-consistent only`;
  }
  let thawed: Promise<QuiesceReport> | null = null;
  return {
    report,
    thaw: () =>
      (thawed ??= (async () => {
        try {
          report.thawed = await agent.thaw(THAW_MS);
        } catch (err) {
          // Left frozen, the guest's writes would hang: say so loudly.
          const msg = `thawing the guest's file systems failed (${(err as Error).message}); if they stay frozen, run \`guest-fsfreeze-thaw\` through the agent or reboot the guest`;
          report.warning = report.warning ? `${report.warning}; ${msg}` : msg;
        } finally {
          agent.close();
        }
        return report;
      })()),
  };
}

/** What the guest's agent did after a restore. */
export interface GuestResync {
  clockSet: boolean;
  /** File systems thawed (a snapshot taken with --quiesce resumes frozen). */
  thawed: number;
  warning?: string;
}

/** Sets the restored guest's clock to now (and thaws it if it resumed frozen). Never throws. */
export async function resyncGuest(agentSocket: string | null): Promise<GuestResync> {
  if (!agentSocket) return { clockSet: false, thawed: 0, warning: 'this VM has no guest agent channel: its clock was not set and runs from the snapshot\'s time' };
  try {
    return await withGuestAgent(
      agentSocket,
      async (a) => {
        const thawed = (await a.freezeStatus()) === 'frozen' ? await a.thaw(THAW_MS) : 0;
        await a.setTime();
        return { clockSet: true, thawed };
      },
      { syncTimeoutMs: SYNC_MS },
    );
  } catch (err) {
    return { clockSet: false, thawed: 0, warning: `${describe(err, 'setting the guest clock')}; the guest clock runs from the snapshot's time until it syncs itself` };
  }
}
