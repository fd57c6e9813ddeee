/**
 * Two "hosts" on one machine, for migration tests and benches: two network namespaces joined by a
 * veth pair, each end with an address from a private test range, optionally shaped with `tc tbf`.
 *
 *   namespace vmsnap-t-<pid>-<rand>-a            namespace vmsnap-t-<pid>-<rand>-b
 *     lo up                                        lo up
 *     vm0  10.X.Y.1/24  <------ veth ------>       vm0  10.X.Y.2/24
 *     [tc tbf on the sending side]                 [tc tbf on the sending side]
 *
 * Contract:
 * - `NetnsPair.create()` needs root and iproute2 (`ip`, `tc`); it throws NetnsError naming the failed
 *   step and leaves nothing behind when a step fails.
 * - Names are unique per pair (the machine is shared: never fixed names). The creator's pid is part
 *   of each namespace's name, so `sweepStaleNamespaces()` (run by every create) can remove the pairs
 *   whose creator died without `destroy()`, together with any process still inside them.
 * - The veth is created directly inside the two namespaces (never in the root namespace), so the
 *   interface is `vm0` on both sides and its name cannot clash with anyone else's.
 * - `tc tbf` shapes what LEAVES an interface: shape the sender's side. `shape(side, null)` removes it.
 * - `spawn()`ed processes are remembered and killed (by pid) by `destroy()`, and so is anything else
 *   still running inside either namespace; after `destroy()` neither namespace exists.
 * - Unix sockets and files are not namespaced: a process inside a namespace shares the file system
 *   (and the QMP/serial sockets) with the test.
 */
import { execFile, spawn as spawnChild, type ChildProcess, type SpawnOptions } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { promisify } from 'node:util';

const execFileAsync = promisify(execFile);

export type Side = 'a' | 'b';
export const SIDES: readonly Side[] = ['a', 'b'];

/** Prefix of every namespace this helper creates (also what the sweep looks for). */
export const NETNS_PREFIX = 'vmsnap-t-';
const NAME_RE = /^vmsnap-t-(\d+)-([0-9a-f]+)-[ab]$/;
/** The veth end's name inside each namespace. */
export const VETH = 'vm0';

export class NetnsError extends Error {
  override readonly name = 'NetnsError';
  constructor(
    readonly step: string,
    detail: string,
  ) {
    super(`netns ${step}: ${detail}`);
  }
}

export interface Shaping {
  /** Rate in Mbit/s (tc's `mbit`). */
  rateMbit: number;
  /** Token bucket size in bytes; default max(4 KiB, 1 ms of the rate) (the relay reference used 32kbit at 100mbit). */
  burstBytes?: number;
  /** Longest a packet may wait in the bucket queue; default 50 ms. */
  latencyMs?: number;
}

export interface NetnsPairOptions {
  /** Shaping applied at creation, per sending side. */
  shape?: Partial<Record<Side, Shaping>>;
}

export interface ExecResult {
  code: number;
  stdout: string;
  stderr: string;
}

export interface LinkCounters {
  rxBytes: number;
  txBytes: number;
  rxPackets: number;
  txPackets: number;
}

async function run(cmd: string, args: readonly string[], step: string): Promise<string> {
  try {
    const { stdout } = await execFileAsync(cmd, args, { maxBuffer: 16 << 20 });
    return stdout;
  } catch (e) {
    const err = e as { stderr?: string; message: string };
    throw new NetnsError(step, `${cmd} ${args.join(' ')}: ${(err.stderr ?? '').trim() || err.message}`);
  }
}

function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

async function listNamespaces(): Promise<string[]> {
  const out = await run('ip', ['netns', 'list'], 'list namespaces');
  // `ip netns list` prints "NAME" or "NAME (id: N)".
  return out.split('\n').map((l) => l.trim().split(/\s+/)[0] ?? '').filter((n) => n.length > 0);
}

/** Kills (SIGKILL, by pid) every process inside namespace `ns`; returns how many. */
async function killInside(ns: string): Promise<number> {
  const out = await run('ip', ['netns', 'pids', ns], `list processes in ${ns}`).catch(() => '');
  let n = 0;
  for (const p of out.split('\n').map((l) => Number(l.trim())).filter((p) => p > 0)) {
    try {
      process.kill(p, 'SIGKILL');
      n++;
    } catch {
      /* already gone */
    }
  }
  return n;
}

/**
 * Removes the namespaces (and kills the processes inside them) left by pairs whose creator process
 * is dead. Pairs of live creators — other tests running now on this shared machine — are untouched.
 */
export async function sweepStaleNamespaces(): Promise<string[]> {
  const removed: string[] = [];
  for (const ns of await listNamespaces()) {
    const m = NAME_RE.exec(ns);
    if (!m || pidAlive(Number(m[1]))) continue;
    await killInside(ns);
    await run('ip', ['netns', 'del', ns], `delete stale ${ns}`).catch(() => undefined);
    removed.push(ns);
  }
  return removed;
}

export class NetnsPair {
  /** Namespace names. */
  readonly ns: Readonly<Record<Side, string>>;
  /** Each side's address (no prefix length). */
  readonly addr: Readonly<Record<Side, string>>;
  private readonly children = new Set<ChildProcess>();
  private destroyed = false;

  private constructor(tag: string, subnet: string) {
    this.ns = { a: `${NETNS_PREFIX}${process.pid}-${tag}-a`, b: `${NETNS_PREFIX}${process.pid}-${tag}-b` };
    this.addr = { a: `${subnet}.1`, b: `${subnet}.2` };
  }

  /** Creates both namespaces, the veth pair, addresses and loopbacks (and the shaping asked for). */
  static async create(opts: NetnsPairOptions = {}): Promise<NetnsPair> {
    if (process.getuid?.() !== 0) throw new NetnsError('create', 'network namespaces need root');
    await sweepStaleNamespaces();
    const rnd = randomBytes(4);
    // 10.X.Y.0/24: both ends live only inside the pair's namespaces, so a clash with another pair
    // could not even route; the random subnet just keeps packet captures and logs unambiguous.
    const pair = new NetnsPair(rnd.toString('hex'), `10.${200 + (rnd[0]! % 50)}.${rnd[1]!}`);
    try {
      for (const s of SIDES) await run('ip', ['netns', 'add', pair.ns[s]], `add namespace ${s}`);
      await run('ip', ['link', 'add', VETH, 'netns', pair.ns.a, 'type', 'veth', 'peer', 'name', VETH, 'netns', pair.ns.b], 'add veth pair');
      for (const s of SIDES) {
        await run('ip', ['-n', pair.ns[s], 'addr', 'add', `${pair.addr[s]}/24`, 'dev', VETH], `address side ${s}`);
        await run('ip', ['-n', pair.ns[s], 'link', 'set', 'lo', 'up'], `loopback up side ${s}`);
        await run('ip', ['-n', pair.ns[s], 'link', 'set', VETH, 'up'], `veth up side ${s}`);
      }
      for (const s of SIDES) {
        const sh = opts.shape?.[s];
        if (sh) await pair.shape(s, sh);
      }
      return pair;
    } catch (e) {
      await pair.destroy().catch(() => undefined);
      throw e;
    }
  }

  /** The other side. */
  static peer(side: Side): Side {
    return side === 'a' ? 'b' : 'a';
  }

  /**
   * Shapes what leaves `side`'s veth with a token bucket (`tc qdisc replace … tbf`); a number is
   * the rate in Mbit/s with the default burst and latency; null removes the shaping.
   */
  async shape(side: Side, s: Shaping | number | null): Promise<void> {
    if (s === null) {
      // Deleting an absent root qdisc fails with "Cannot delete qdisc with handle of zero": fine.
      await run('tc', ['-n', this.ns[side], 'qdisc', 'del', 'dev', VETH, 'root'], `unshape side ${side}`).catch(() => undefined);
      return;
    }
    const sh: Shaping = typeof s === 'number' ? { rateMbit: s } : s;
    if (!(sh.rateMbit > 0)) throw new NetnsError(`shape side ${side}`, `rate must be > 0 Mbit/s, got ${sh.rateMbit}`);
    const burst = Math.round(sh.burstBytes ?? Math.max(4096, (sh.rateMbit * 1e6) / 8 / 1000));
    const latency = sh.latencyMs ?? 50;
    await run(
      'tc',
      ['-n', this.ns[side], 'qdisc', 'replace', 'dev', VETH, 'root', 'tbf', 'rate', `${sh.rateMbit}mbit`, 'burst', `${burst}b`, 'latency', `${latency}ms`],
      `shape side ${side}`,
    );
  }

  /** Cuts the link: side a's veth goes down (the peer sees carrier loss), nothing crosses either way. */
  async linkDown(): Promise<void> {
    await run('ip', ['-n', this.ns.a, 'link', 'set', VETH, 'down'], 'link down');
  }

  async linkUp(): Promise<void> {
    await run('ip', ['-n', this.ns.a, 'link', 'set', VETH, 'up'], 'link up');
  }

  /** argv that runs `cmd args` inside `side`'s namespace (`ip netns exec` execs it: same pid). */
  argv(side: Side, cmd: string, args: readonly string[] = []): [string, string[]] {
    return ['ip', ['netns', 'exec', this.ns[side], cmd, ...args]];
  }

  /** Runs `cmd args` inside `side`'s namespace to completion; never throws on a non-zero exit. */
  exec(side: Side, cmd: string, args: readonly string[] = [], opts: { timeoutMs?: number; input?: string } = {}): Promise<ExecResult> {
    const [bin, argv] = this.argv(side, cmd, args);
    return new Promise((resolve, reject) => {
      const child = spawnChild(bin, argv, { stdio: ['pipe', 'pipe', 'pipe'] });
      const out: Buffer[] = [];
      const err: Buffer[] = [];
      child.stdout.on('data', (b: Buffer) => out.push(b));
      child.stderr.on('data', (b: Buffer) => err.push(b));
      const timer = opts.timeoutMs ? setTimeout(() => child.kill('SIGKILL'), opts.timeoutMs) : undefined;
      child.on('error', reject);
      child.on('close', (code, signal) => {
        if (timer) clearTimeout(timer);
        resolve({ code: code ?? (signal ? 128 : 1), stdout: Buffer.concat(out).toString(), stderr: Buffer.concat(err).toString() });
      });
      child.stdin.on('error', () => undefined);
      child.stdin.end(opts.input ?? '');
    });
  }

  /** Starts `cmd args` inside `side`'s namespace; `destroy()` kills it if it still runs. */
  spawn(side: Side, cmd: string, args: readonly string[] = [], opts: SpawnOptions = {}): ChildProcess {
    if (this.destroyed) throw new NetnsError('spawn', 'the pair was destroyed');
    const [bin, argv] = this.argv(side, cmd, args);
    const child = spawnChild(bin, argv, opts);
    this.children.add(child);
    child.on('exit', () => this.children.delete(child));
    return child;
  }

  /** Byte and packet counters of `side`'s veth (cumulative since creation). */
  async counters(side: Side): Promise<LinkCounters> {
    const out = await run('ip', ['-n', this.ns[side], '-s', '-j', 'link', 'show', 'dev', VETH], `counters side ${side}`);
    const j = JSON.parse(out) as Array<{ stats64?: { rx: { bytes: number; packets: number }; tx: { bytes: number; packets: number } } }>;
    const st = j[0]?.stats64;
    if (!st) throw new NetnsError(`counters side ${side}`, `no stats64 in ${out.slice(0, 200)}`);
    return { rxBytes: st.rx.bytes, txBytes: st.tx.bytes, rxPackets: st.rx.packets, txPackets: st.tx.packets };
  }

  /** Kills what runs inside and removes both namespaces (the veth goes with them). Idempotent. */
  async destroy(): Promise<void> {
    this.destroyed = true;
    for (const c of this.children) if (c.pid && c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
    const present = new Set(await listNamespaces().catch(() => [] as string[]));
    const failures: string[] = [];
    for (const s of SIDES) {
      if (!present.has(this.ns[s])) continue;
      await killInside(this.ns[s]);
      await run('ip', ['netns', 'del', this.ns[s]], `delete side ${s}`).catch((e: Error) => failures.push(e.message));
    }
    if (failures.length) throw new NetnsError('destroy', failures.join('; '));
  }
}
