/**
 * A fault-injecting wrapper for tests (kopia's internal/blobtesting/faulty.go is the model). A plan
 * of rules says, per method and optionally per kind/name, which fault to inject on which matching
 * call. Every firing is recorded so a test can prove each scripted fault actually happened
 * ({@link FaultyBackend.assertAllFired}) instead of passing because nothing was injected.
 */
import {
  BackendError,
  destination,
  type Backend,
  type BackendCapabilities,
  type ByteRange,
  type ObjectInfo,
  type ObjectKind,
  type Leftover,
} from './contract.js';

export type BackendMethod = 'put' | 'create' | 'get' | 'stat' | 'list' | 'delete';

export type Fault =
  /** The call rejects without touching the inner backend. */
  | { type: 'error'; retryable: boolean; message?: string }
  /** put/create: rejects with a permanent "no space left on device" error; nothing is stored. */
  | { type: 'enospc' }
  /** The operation happens on the inner backend, then the call rejects (a lost reply). */
  | { type: 'errorAfter'; retryable: boolean; message?: string }
  /** put/create: `stored` flips a bit in what is written; get: `returned` flips a bit in the result. */
  | { type: 'bitflip'; where: 'stored' | 'returned'; bit?: number }
  /** put/create: store only the first `length` bytes (default half); get: return them. */
  | { type: 'truncate'; where: 'stored' | 'returned'; length?: number }
  /** Wait `ms` before forwarding the call. */
  | { type: 'delay'; ms: number }
  /**
   * The operation never reaches the inner backend. `hang`: the call never settles until
   * {@link FaultyBackend.releaseHung} or close (then it rejects); `reject`: it rejects at once,
   * like a process that died mid-request.
   */
  | { type: 'crash'; mode: 'hang' | 'reject' };

export interface FaultRule {
  /** Label in the record; defaults to `rule<N>`. */
  id?: string;
  method: BackendMethod | BackendMethod[];
  kind?: ObjectKind;
  /** Object name, pattern or predicate; for `list` the name is ''. */
  name?: string | RegExp | ((name: string, kind: ObjectKind) => boolean);
  /** Let this many matching calls pass before the rule starts firing. */
  skip?: number;
  /** How many times the rule fires (default 1; Infinity for every matching call). */
  times?: number;
  fault: Fault;
}

export interface FiredFault {
  rule: string;
  method: BackendMethod;
  kind: ObjectKind;
  name: string;
  fault: Fault['type'];
}

interface RuleState {
  rule: FaultRule;
  id: string;
  seen: number;
  fired: number;
}

const STORED_FAULTS = new Set<BackendMethod>(['put', 'create']);

export class FaultInjectedError extends BackendError {
  override readonly name = 'FaultInjectedError';
  readonly code: string | undefined;
  constructor(message: string, retryable: boolean, code?: string) {
    super(message, retryable);
    this.code = code;
  }
}

export class FaultyBackend implements Backend {
  readonly fired: FiredFault[] = [];
  private readonly rules: RuleState[] = [];
  private readonly hung = new Set<(err: Error) => void>();

  constructor(
    readonly inner: Backend,
    plan: FaultRule[] = [],
  ) {
    for (const r of plan) this.addRule(r);
  }

  get location(): string {
    return this.inner.location;
  }

  get capabilities(): BackendCapabilities {
    return this.inner.capabilities;
  }

  /** Adds a rule to the plan; rules are tried in order and the first matching one fires. */
  addRule(rule: FaultRule): void {
    const methods = Array.isArray(rule.method) ? rule.method : [rule.method];
    const f = rule.fault;
    for (const m of methods) {
      const storedOnly = f.type === 'enospc' || ((f.type === 'bitflip' || f.type === 'truncate') && f.where === 'stored');
      if (storedOnly && !STORED_FAULTS.has(m)) throw new Error(`fault ${f.type} cannot apply to ${m}`);
      if ((f.type === 'bitflip' || f.type === 'truncate') && f.where === 'returned' && m !== 'get') {
        throw new Error(`fault ${f.type}/returned applies only to get, not ${m}`);
      }
    }
    this.rules.push({ rule, id: rule.id ?? `rule${this.rules.length}`, seen: 0, fired: 0 });
  }

  /** Rules that have not fired as often as scripted (rules with `times: Infinity` need one firing). */
  unfired(): Array<{ id: string; fired: number; expected: number }> {
    return this.rules
      .map((s) => {
        const times = s.rule.times ?? 1;
        return { id: s.id, fired: s.fired, expected: Number.isFinite(times) ? times : 1 };
      })
      .filter((u) => u.fired < u.expected);
  }

  assertAllFired(): void {
    const missing = this.unfired();
    if (missing.length > 0) {
      throw new Error(
        `scripted faults did not fire: ${missing.map((m) => `${m.id} (${m.fired}/${m.expected})`).join(', ')}`,
      );
    }
  }

  /** Number of calls currently hung by `crash: hang` faults. */
  get hungCount(): number {
    return this.hung.size;
  }

  /** Rejects every hung call (so tests can finish without dangling promises). */
  releaseHung(): void {
    for (const reject of [...this.hung]) reject(new FaultInjectedError('hung call released', true));
    this.hung.clear();
  }

  private pick(method: BackendMethod, kind: ObjectKind, name: string): RuleState | undefined {
    for (const s of this.rules) {
      const r = s.rule;
      const methods = Array.isArray(r.method) ? r.method : [r.method];
      if (!methods.includes(method)) continue;
      if (r.kind !== undefined && r.kind !== kind) continue;
      if (r.name !== undefined) {
        const ok =
          typeof r.name === 'string' ? r.name === name : r.name instanceof RegExp ? r.name.test(name) : r.name(name, kind);
        if (!ok) continue;
      }
      if (s.fired >= (r.times ?? 1)) continue;
      s.seen++;
      if (s.seen <= (r.skip ?? 0)) continue;
      s.fired++;
      this.fired.push({ rule: s.id, method, kind, name, fault: r.fault.type });
      return s;
    }
    return undefined;
  }

  private hang(): Promise<never> {
    return new Promise<never>((_resolve, reject) => {
      const r = (err: Error): void => {
        this.hung.delete(r);
        reject(err);
      };
      this.hung.add(r);
    });
  }

  /** Faults that act before (or instead of) the inner call; returns the rule for after-call faults. */
  private async before(method: BackendMethod, kind: ObjectKind, name: string): Promise<Fault | undefined> {
    const s = this.pick(method, kind, name);
    if (!s) return undefined;
    const f = s.rule.fault;
    const what = `${method} ${kind}/${name}`;
    switch (f.type) {
      case 'error':
        throw new FaultInjectedError(f.message ?? `injected ${f.retryable ? 'retryable' : 'permanent'} fault on ${what}`, f.retryable);
      case 'enospc':
        throw new FaultInjectedError(`${what} failed: no space left on device (injected)`, false, 'ENOSPC');
      case 'crash':
        if (f.mode === 'hang') return this.hang();
        throw new FaultInjectedError(`${what} crashed (injected)`, true);
      case 'delay':
        await new Promise((r) => setTimeout(r, f.ms));
        return undefined;
      default:
        return f;
    }
  }

  private static afterError(f: Fault | undefined, method: BackendMethod, kind: ObjectKind, name: string): void {
    if (f?.type === 'errorAfter') {
      throw new FaultInjectedError(
        f.message ?? `reply to ${method} ${kind}/${name} lost after it took effect (injected)`,
        f.retryable,
      );
    }
  }

  private static mangle(f: Fault | undefined, data: Uint8Array): Uint8Array {
    if (f?.type === 'bitflip') {
      const copy = Buffer.from(data);
      if (copy.length > 0) {
        const bit = (f.bit ?? Math.floor(copy.length * 4)) % (copy.length * 8);
        copy[bit >> 3] = (copy[bit >> 3] ?? 0) ^ (1 << (bit & 7));
      }
      return copy;
    }
    if (f?.type === 'truncate') {
      return Buffer.from(data.subarray(0, Math.min(data.length, f.length ?? Math.floor(data.length / 2))));
    }
    return data;
  }

  async put(kind: ObjectKind, name: string, data: Uint8Array): Promise<void> {
    const f = await this.before('put', kind, name);
    await this.inner.put(kind, name, FaultyBackend.mangle(f, data));
    FaultyBackend.afterError(f, 'put', kind, name);
  }

  async create(kind: ObjectKind, name: string, data: Uint8Array): Promise<boolean> {
    const f = await this.before('create', kind, name);
    const created = await this.inner.create(kind, name, FaultyBackend.mangle(f, data));
    FaultyBackend.afterError(f, 'create', kind, name);
    return created;
  }

  async get(kind: ObjectKind, name: string, range?: ByteRange, into?: Uint8Array): Promise<Buffer> {
    const f = await this.before('get', kind, name);
    const data = await this.inner.get(kind, name, range, into);
    FaultyBackend.afterError(f, 'get', kind, name);
    const mangled = FaultyBackend.mangle(f, data);
    if (mangled === data) return data;
    // Hand the damage back where the caller asked for it, as a real backend reading bad bytes would.
    if (!into) return Buffer.from(mangled);
    const out = destination(kind, name, mangled.length, into);
    out.set(mangled);
    return out;
  }

  async stat(kind: ObjectKind, name: string): Promise<ObjectInfo> {
    const f = await this.before('stat', kind, name);
    const info = await this.inner.stat(kind, name);
    FaultyBackend.afterError(f, 'stat', kind, name);
    return info;
  }

  async *list(kind: ObjectKind): AsyncIterable<ObjectInfo> {
    const f = await this.before('list', kind, '');
    for await (const info of this.inner.list(kind)) yield info;
    FaultyBackend.afterError(f, 'list', kind, '');
  }

  async delete(kind: ObjectKind, name: string): Promise<void> {
    const f = await this.before('delete', kind, name);
    await this.inner.delete(kind, name);
    FaultyBackend.afterError(f, 'delete', kind, name);
  }

  removeLeftovers(olderThanMs: number): Promise<number> {
    return this.inner.removeLeftovers(olderThanMs);
  }

  leftovers(): Promise<Leftover[]> {
    return this.inner.leftovers();
  }

  async close(): Promise<void> {
    this.releaseHung();
    await this.inner.close();
  }
}
