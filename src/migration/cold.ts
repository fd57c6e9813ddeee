/**
 * The source side of a cold migration (protocol.ts, version 2): the VM is stopped, so its disks
 * no longer change and one disk round moves them. It speaks the live migration's opening
 * (pre-flight, files, haves: `negotiate`) and sends its blocks the same way (`sendBlocks`: zero
 * runs, blocks the destination's base already has skipped, references, compressed data), so only
 * what the destination lacks crosses. No RAM, no QEMU here: the caller owns the stopped VM's
 * volumes for the duration.
 *
 * Failure before COMMIT → ABORT to the destination (which discards everything) and the error,
 * naming its phase; the VM here is untouched (its volumes were only read). After COMMIT without
 * RUNNING the destination may hold the VM: the error says so and nothing is removed here.
 */
import type { Volume } from '../cow/volume.js';
import { CODECS } from '../store/codec.js';
import type { VmDefinition } from '../vm/config.js';
import type { SecureChannel } from './channel.js';
import type { HostIdentity } from './identity.js';
import { connectToPeer, fileOffers, Inbox, migrationFailed, migrationRequest, negotiate, noSwitchover, pickCodec, requestPreflight, sendBlocks, type DiskShape, type MigrateResult, type MigrateTarget, type MigrationEvent } from './outgoing.js';
import { jsonBody, MigrationError, MigrationRefusedError, MSG, parseJsonBody, type MigrationPhase } from './protocol.js';

export interface ColdSource {
  definition: VmDefinition;
  /** The stopped VM's volumes, opened (and so held) by the caller. */
  volumes: ReadonlyMap<string, Volume>;
  /** This host's QEMU version (the destination does not need it equal: the guest boots afresh). */
  qemuVersion: string;
  /** A UEFI VM's variables file. */
  nvramPath?: string;
  /** Boot the VM on the destination at COMMIT (it ran here); otherwise it arrives stopped. */
  start: boolean;
}

export interface ColdOptions {
  identity: HostIdentity;
  compress?: 'auto' | 'zstd' | 'lz4' | 'none';
  signal?: AbortSignal;
  onEvent?: (e: MigrationEvent) => void;
}

/** What a cold REQUEST says of QEMU: only informative (the guest boots afresh there). */
const coldQemu = (src: Pick<ColdSource, 'qemuVersion' | 'definition'>) => ({ version: src.qemuVersion, machine: src.definition.machine, accel: 'none' });

/**
 * Asks the destination whether it would take this VM (pre-flight only: it creates nothing), before
 * a running VM is stopped for the move — a refusal or a wrong key then costs the guest nothing.
 * The disks are described from `Volume.inspect` (the running VM's supervisor holds them).
 */
export async function preflightCold(src: Omit<ColdSource, 'volumes'> & { disks: ReadonlyMap<string, DiskShape> }, target: MigrateTarget, o: Pick<ColdOptions, 'identity'>): Promise<void> {
  let phase: MigrationPhase = 'connect';
  let ch: SecureChannel | null = null;
  try {
    const files = await fileOffers(src.definition, src.nvramPath);
    ch = await connectToPeer(target, o.identity);
    phase = 'preflight';
    const req = await migrationRequest(src.definition, coldQemu(src), src.disks, files, 'cold', src.start);
    await requestPreflight(ch, { ...req, probe: true });
  } catch (err) {
    if (err instanceof MigrationError || err instanceof MigrationRefusedError) throw err;
    throw new MigrationError(phase, (err as Error).message, (err as { retryable?: boolean }).retryable ?? true, 'source', { cause: err });
  } finally {
    ch?.destroy();
  }
}

/** Moves a stopped VM's disks (and files) to the destination; resolves once it holds the VM. */
export async function migrateColdOut(src: ColdSource, target: MigrateTarget, o: ColdOptions): Promise<MigrateResult & { destinationState: string }> {
  const t0 = performance.now();
  let phase: MigrationPhase = 'connect';
  let ch: SecureChannel | null = null;
  let inbox: Inbox | null = null;
  let committed = false;
  const stats = { bytesSaved: 0, diskSent: 0, diskSkipped: 0 };
  const abort = new AbortController();
  const onCancel = () => abort.abort(new MigrationError(phase, 'cancelled', false));
  o.signal?.addEventListener('abort', onCancel, { once: true });
  const aborted = (): void => {
    if (abort.signal.aborted) throw abort.signal.reason as Error;
  };
  const phaseAt: MigrateResult['phases'] = {};
  const emit = (p: MigrationPhase | 'done'): void => {
    phaseAt[p] ??= Math.round(performance.now() - t0);
    o.onEvent?.({
      phase: p,
      round: 0,
      diskRound: p === 'disk' ? 1 : 0,
      ramTransferred: 0,
      ramRemaining: 0,
      dirtyRate: 0,
      linkRate: 0,
      bytesSent: ch?.bytesSent ?? 0,
      bytesSaved: stats.bytesSaved,
      etaMs: null,
      downtimeLimitMs: 0,
    });
  };
  try {
    const files = await fileOffers(src.definition, src.nvramPath);
    ch = await connectToPeer(target, o.identity);
    const chan = ch;
    abort.signal.addEventListener('abort', () => chan.destroy(), { once: true });
    const req = await migrationRequest(src.definition, coldQemu(src), src.volumes, files, 'cold', src.start);
    const { pre, heldBlocks, heldBlockSet } = await negotiate(chan, req, files, aborted, (p) => {
      phase = p;
      emit(p);
    });
    inbox = new Inbox(chan);
    inbox.run((e) => abort.abort(e));

    phase = 'disk';
    emit(phase);
    // The link is not measured here (no rounds to pace): zstd unless told otherwise — a disk is
    // sent once, and on a home network its bytes cost more than the CPU.
    const codec = o.compress && o.compress !== 'auto' ? pickCodec(o.compress, 0, true) : CODECS.zstd;
    let di = 0;
    for (const v of src.volumes.values()) {
      const n = Math.ceil(v.size / v.blockSize);
      const all = new Uint32Array(n);
      for (let b = 0; b < n; b++) all[b] = b;
      await sendBlocks(chan, di, v, all, heldBlocks.get(di) ?? null, heldBlockSet, new Uint8Array(n), () => codec, stats, aborted);
      emit('disk');
      di++;
    }

    phase = 'switchover';
    emit(phase);
    await chan.send(MSG.SENT_ALL, jsonBody({ qemuBytes: 0, ramRefs: 0, diskBlocks: stats.diskSent }));
    // The destination flushes the disks and, to run the VM, boots it paused first.
    await inbox.expect(MSG.READY, 'READY', 300_000);
    aborted();
    phase = 'commit';
    committed = true;
    await chan.send(MSG.COMMIT);
    const running = await inbox.expect(MSG.RUNNING, 'RUNNING', 60_000);
    inbox.stop();
    await chan.close();
    emit('done');
    return {
      totalMs: performance.now() - t0,
      qemuDowntimeMs: null,
      pauseMs: null,
      bytesSent: chan.bytesSent,
      bytesSaved: stats.bytesSaved,
      qemuBytes: 0,
      ramRefs: 0,
      diskBlocksSent: stats.diskSent,
      diskBlocksSkipped: stats.diskSkipped,
      rounds: 1,
      base: pre.base,
      phases: phaseAt,
      // No guest pause to account for: the VM was stopped before the move.
      switchover: noSwitchover(),
      destinationState: String(parseJsonBody<{ state?: string }>(running.body, 'RUNNING').state ?? 'unknown'),
    };
  } catch (err) {
    throw await migrationFailed(err, {
      abort: abort.signal,
      inbox,
      ch,
      committed,
      phase,
      afterCommit:
        `the destination was told to take the VM but did not confirm ($ERR); the VM stays here, stopped. ` +
        `Check the destination: if the VM is there, remove it here; if not, start it here again.`,
    });
  } finally {
    o.signal?.removeEventListener('abort', onCancel);
  }
}
