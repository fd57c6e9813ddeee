/**
 * Where the embedded runner keeps its job records so `vmsnap jobs` (another process) can read them:
 * one JSON file per job under `<dataDir>/agent/jobs/`, each replaced atomically (a reader never
 * sees half a record). Progress updates are written at most every `progressEveryMs` per job; state
 * changes at once. The newest `keep` finished records are kept, older ones removed.
 */
import { promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { atomicWriteFile, mkdirPrivate } from '../util/fs.js';
import type { JobRecord } from './model.js';

export class JobFileStore {
  private readonly lastWrite = new Map<string, number>();
  private readonly pending = new Map<string, NodeJS.Timeout>();
  /** The last write of each record: writes of one record are chained, so an older one never lands last. */
  private readonly chains = new Map<string, Promise<void>>();

  constructor(
    readonly dir: string,
    private readonly opts: { progressEveryMs?: number; keep?: number } = {},
  ) {}

  static forDataDir(dataDir: string): JobFileStore {
    return new JobFileStore(path.join(dataDir, 'agent', 'jobs'));
  }

  /** Saves `rec` now (`urgent`: a state change) or soon (a progress update). */
  save(rec: JobRecord, urgent: boolean): void {
    const every = this.opts.progressEveryMs ?? 500;
    const since = Date.now() - (this.lastWrite.get(rec.id) ?? 0);
    const timer = this.pending.get(rec.id);
    if (urgent || since >= every) {
      if (timer) clearTimeout(timer);
      this.pending.delete(rec.id);
      this.write(rec);
    } else if (!timer) {
      this.pending.set(
        rec.id,
        setTimeout(() => {
          this.pending.delete(rec.id);
          this.write(rec);
        }, every - since),
      );
    }
  }

  private write(rec: JobRecord): void {
    this.lastWrite.set(rec.id, Date.now());
    const snapshot = JSON.stringify(rec);
    const prev = this.chains.get(rec.id) ?? Promise.resolve();
    const p = prev
      .then(async () => {
        await mkdirPrivate(this.dir);
        await atomicWriteFile(path.join(this.dir, `${rec.id}.json`), snapshot);
      })
      .catch(() => undefined); // a record is informational: a full disk must not fail the job
    this.chains.set(rec.id, p);
    void p.then(() => {
      if (this.chains.get(rec.id) === p) this.chains.delete(rec.id);
    });
  }

  /** Every readable record, oldest first. */
  async list(): Promise<JobRecord[]> {
    const names = await fsp.readdir(this.dir).catch(() => [] as string[]);
    const out: JobRecord[] = [];
    for (const n of names) {
      if (!n.endsWith('.json')) continue;
      const text = await fsp.readFile(path.join(this.dir, n), 'utf8').catch(() => null);
      if (text === null) continue;
      try {
        out.push(JSON.parse(text) as JobRecord);
      } catch {
        // A damaged record is skipped: it describes a job, it is not the job.
      }
    }
    return out.sort((a, b) => a.created.localeCompare(b.created) || a.id.localeCompare(b.id));
  }

  /** Removes finished records beyond the newest `keep` (default 200). */
  async trim(): Promise<void> {
    const done = (await this.list()).filter((r) => r.state === 'completed' || r.state === 'failed');
    const excess = done.length - (this.opts.keep ?? 200);
    for (const r of done.slice(0, Math.max(0, excess))) await fsp.rm(path.join(this.dir, `${r.id}.json`), { force: true });
  }

  async close(): Promise<void> {
    for (const t of this.pending.values()) clearTimeout(t);
    this.pending.clear();
    await Promise.all([...this.chains.values()]);
  }
}
