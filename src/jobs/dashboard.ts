/**
 * The agent's dashboard (`vmsnap agent --dashboard HOST:PORT`): one server-rendered page with the
 * hosts and their VMs (state, last snapshot, next scheduled run), a snapshot timeline per VM, the
 * repository's size and dedup ratio and the recent jobs, plus the queue view of bull-board
 * (@bull-board/api with its Hono adapter) at /queues when the agent runs on Redis. /api/summary
 * serves the page's data as JSON.
 *
 * Access: bound to a loopback address it needs no token unless one is given; bound anywhere else
 * it refuses to start without one. A token is accepted as `Authorization: Bearer T`, or once as
 * `?token=T`, which sets an HttpOnly, SameSite=Strict cookie for the pages that follow (bull-board
 * calls its API from the browser). Anything else gets 401.
 */
import { timingSafeEqual } from 'node:crypto';
import { isIP } from 'node:net';
import { Hono, type Context, type Next } from 'hono';
import { serve, type ServerType } from '@hono/node-server';
import { serveStatic } from '@hono/node-server/serve-static';
import { createBullBoard } from '@bull-board/api';
import { BullMQAdapter } from '@bull-board/api/bullMQAdapter';
import { HonoAdapter } from '@bull-board/hono';
import type { Repository } from '../store/repository.js';
import { BadInputError } from '../util/errors.js';
import { repositoryStats, type RepositoryStats } from '../ops/maintenance.js';
import { Fleet, listHosts, type HostInfo, type HostVm } from './bull.js';
import { hostVms } from './local.js';
import { JobFileStore } from './store.js';
import { ScheduleFile, type ScheduleDef } from './schedule.js';
import type { JobRecord } from './model.js';

export class DashboardError extends BadInputError {
  override readonly name = 'DashboardError';
}

export interface DashboardOptions {
  /** HOST:PORT (port 0: any free port). */
  listen: string;
  token?: string;
  redisUrl?: string;
  dataDir: string;
  hostId: string;
  openRepo: () => Promise<Repository>;
}

export interface SnapshotPoint {
  id: string;
  time: string;
  tags: string[];
  bytes: number;
}

export interface DashboardSummary {
  generated: string;
  hosts: (Omit<HostInfo, 'vms'> & { vms: (HostVm & { nextRun: string | null; snapshots: SnapshotPoint[] })[] })[];
  repository: (RepositoryStats & { dedupRatio: number | null }) | { error: string };
  schedules: ScheduleDef[];
  jobs: JobRecord[];
}

function parseListen(listen: string): { host: string; port: number } {
  const m = /^(\[[^\]]+\]|[^:]+):(\d{1,5})$/.exec(listen);
  const port = m ? Number(m[2]) : NaN;
  if (!m || !(port >= 0 && port < 65536)) throw new DashboardError(`--dashboard takes HOST:PORT (e.g. 127.0.0.1:8080), got ${JSON.stringify(listen)}`);
  return { host: m[1]!.replace(/^\[|\]$/g, ''), port };
}

function isLoopback(host: string): boolean {
  if (host === 'localhost') return true;
  if (isIP(host) === 4) return host.startsWith('127.');
  return host === '::1';
}

function sameToken(given: string | undefined, token: string): boolean {
  if (given === undefined) return false;
  const a = Buffer.from(given);
  const b = Buffer.from(token);
  return a.length === b.length && timingSafeEqual(a, b);
}

const esc = (s: unknown) => String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
const short = (id: string | null) => (id ? id.slice(0, 12) : '-');

function human(n: number): string {
  const u = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) {
    n /= 1024;
    i++;
  }
  return `${i ? n.toFixed(1) : n} ${u[i]}`;
}

/** A row of dots along the time axis, one per snapshot (newest on the right). */
function timeline(points: SnapshotPoint[]): string {
  if (!points.length) return '<em>no snapshots</em>';
  const t = points.map((p) => Date.parse(p.time));
  const [lo, hi] = [Math.min(...t), Math.max(...t)];
  const x = (v: number) => (hi === lo ? 290 : 10 + ((v - lo) / (hi - lo)) * 560);
  const dots = points.map((p, i) => `<circle cx="${x(t[i]!).toFixed(1)}" cy="14" r="5"><title>${esc(short(p.id))} ${esc(p.time)} ${esc(p.tags.join(','))}</title></circle>`).join('');
  return `<svg class="timeline" width="580" height="28" role="img" aria-label="snapshot timeline"><line x1="10" y1="14" x2="570" y2="14"/>${dots}</svg>`;
}

function renderPage(s: DashboardSummary, queues: boolean): string {
  const repo = 'error' in s.repository
    ? `<p class="bad">repository: ${esc(s.repository.error)}</p>`
    : `<p>${s.repository.snapshots} snapshots, ${human(s.repository.logicalBytes)} logical, <b>${human(s.repository.storedBytes)}</b> stored in ${s.repository.packs} packs; dedup ratio <b id="dedup">${s.repository.dedupRatio === null ? '-' : s.repository.dedupRatio.toFixed(2)}</b></p>`;
  const hosts = s.hosts
    .map(
      (h) =>
        `<section class="host"><h2>host ${esc(h.host)}</h2><p class="muted">heartbeat ${esc(h.heartbeat)}</p><table><tr><th>VM</th><th>state</th><th>last snapshot</th><th>next scheduled</th><th>timeline</th></tr>` +
        h.vms
          .map(
            (v) =>
              `<tr class="vm" data-vm="${esc(v.name)}"><td>${esc(v.name)}</td><td>${esc(v.state)}</td><td>${esc(short(v.lastSnapshot))}</td><td>${esc(v.nextRun ?? '-')}</td><td>${timeline(v.snapshots)}<br><span class="muted">${v.snapshots
                .slice(-5)
                .reverse()
                .map((p) => `${esc(short(p.id))} ${esc(p.time.slice(0, 19).replace('T', ' '))}`)
                .join(' · ')}</span></td></tr>`,
          )
          .join('') +
        `</table></section>`,
    )
    .join('');
  const jobs = s.jobs
    .slice(-30)
    .reverse()
    .map((j) => {
      const p = j.progress;
      const pct = p && p.total ? Math.floor((p.done / p.total) * 100) : null;
      return `<tr class="job" data-job="${esc(j.id)}"><td>${esc(j.id)}</td><td>${esc(j.host)}</td><td>${esc(j.kind)}</td><td>${esc(j.vm ?? '-')}</td><td class="${esc(j.state)}">${esc(j.state)}</td><td>${j.attempts}</td><td>${pct === null ? esc(j.phase ?? '') : `<progress max="100" value="${pct}"></progress> ${pct}%`}</td><td>${esc(j.error?.message ?? '')}</td></tr>`;
    })
    .join('');
  return `<!doctype html><html><head><meta charset="utf-8"><meta http-equiv="refresh" content="10"><title>vmsnap</title><style>
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;margin:.5em 0}td,th{border-bottom:1px solid #ddd;padding:.3em .6em;text-align:left;vertical-align:top}
.muted{color:#777;font-size:12px}.bad,.failed{color:#b00}.completed{color:#070}.active{color:#06c}svg.timeline line{stroke:#aaa}svg.timeline circle{fill:#06c}
</style></head><body><h1>vmsnap</h1><p class="muted">generated ${esc(s.generated)}${queues ? ' · <a href="queues">queues</a>' : ''}</p>
<h2>repository</h2>${repo}${hosts}<h2>jobs</h2><table><tr><th>id</th><th>host</th><th>kind</th><th>VM</th><th>state</th><th>tries</th><th>progress</th><th>error</th></tr>${jobs || '<tr><td colspan="8"><em>no jobs</em></td></tr>'}</table>
<h2>schedules</h2><ul>${s.schedules.map((x) => `<li>${esc(x.name)}: ${esc(x.vm)} every ${Math.round(x.everyMs / 1000)} s on ${esc(x.host)}</li>`).join('') || '<li><em>none</em></li>'}</ul></body></html>`;
}

export async function startDashboard(o: DashboardOptions): Promise<{ url: string; close(): Promise<void>; summary(): Promise<DashboardSummary> }> {
  const { host, port } = parseListen(o.listen);
  if (!isLoopback(host) && !o.token) throw new DashboardError(`the dashboard binds to ${host}, which is not a loopback address: give it a token (--dashboard-token-file FILE)`);
  const fleet = o.redisUrl ? await Fleet.connect(o.redisUrl) : null;
  const local = { store: JobFileStore.forDataDir(o.dataDir), schedules: new ScheduleFile(o.dataDir) };

  // The repository figures walk every manifest: computed at most every 30 s.
  let stats: { at: number; value: DashboardSummary['repository']; snaps: Map<string, SnapshotPoint[]> } | null = null;
  const repoFigures = async () => {
    if (stats && Date.now() - stats.at < 30_000) return stats;
    const snaps = new Map<string, SnapshotPoint[]>();
    let value: DashboardSummary['repository'];
    try {
      const repo = await o.openRepo();
      try {
        for (const s of await repo.listSnapshotSummaries(() => undefined)) {
          const l = snaps.get(s.vm) ?? [];
          l.push({ id: s.id, time: s.time, tags: s.tags, bytes: s.streams.reduce((a, st) => a + st.size, 0) });
          snaps.set(s.vm, l);
        }
        const r = await repositoryStats(repo);
        value = { ...r, dedupRatio: r.storedBytes > 0 ? r.logicalBytes / r.storedBytes : null };
      } finally {
        await repo.close();
      }
    } catch (err) {
      value = { error: (err as Error).message };
    }
    stats = { at: Date.now(), value, snaps };
    return stats;
  };

  const summary = async (): Promise<DashboardSummary> => {
    const figures = await repoFigures();
    const hosts = fleet ? await listHosts(fleet.redis) : [{ host: o.hostId, vms: await hostVms(o.dataDir), heartbeat: new Date().toISOString() }];
    const schedules = fleet ? await fleet.schedules() : await local.schedules.list();
    const next: Record<string, number> = fleet ? await fleet.nextRuns() : {};
    if (!fleet) {
      const last = await local.schedules.lastFired();
      for (const s of schedules) next[s.name] = (last[s.name] ?? Date.now()) + (last[s.name] !== undefined ? s.everyMs : 0);
    }
    const nextFor = (vm: string, h: string) => {
      const t = schedules.filter((s) => s.vm === vm && s.host === h).map((s) => next[s.name]).filter((v): v is number => v !== undefined);
      return t.length ? new Date(Math.min(...t)).toISOString() : null;
    };
    return {
      generated: new Date().toISOString(),
      hosts: hosts.map((h) => ({ ...h, vms: h.vms.map((v) => ({ ...v, nextRun: nextFor(v.name, h.host), snapshots: (figures.snaps.get(v.name) ?? []).sort((a, b) => a.time.localeCompare(b.time)) })) })),
      repository: figures.value,
      schedules,
      jobs: fleet ? await fleet.jobs(30) : await local.store.list(),
    };
  };

  const app = new Hono();
  if (o.token) {
    const token = o.token;
    app.use('*', async (c: Context, next: Next) => {
      const bearer = c.req.header('authorization')?.replace(/^Bearer /, '');
      const cookie = /(?:^|;\s*)vmsnap_token=([^;]+)/.exec(c.req.header('cookie') ?? '')?.[1];
      const query = c.req.query('token');
      if (sameToken(bearer, token) || sameToken(cookie !== undefined ? decodeURIComponent(cookie) : undefined, token)) return next();
      if (sameToken(query, token)) {
        c.header('Set-Cookie', `vmsnap_token=${encodeURIComponent(token)}; HttpOnly; SameSite=Strict; Path=/`);
        return next();
      }
      return c.text('vmsnap dashboard: a token is required (Authorization: Bearer TOKEN, or ?token=TOKEN once)', 401);
    });
  }
  app.get('/api/summary', async (c) => c.json(await summary()));
  app.get('/', async (c) => c.html(renderPage(await summary(), fleet !== null)));

  let refresh: NodeJS.Timeout | null = null;
  if (fleet) {
    const adapter = new HonoAdapter(serveStatic);
    const board = createBullBoard({ queues: [], serverAdapter: adapter });
    const syncQueues = async () => board.replaceQueues((await fleet.hostIds()).map((h) => new BullMQAdapter(fleet.queue(h), { readOnlyMode: false })));
    await syncQueues();
    // Hosts that join later get their queue shown too.
    refresh = setInterval(() => void syncQueues().catch(() => undefined), 10_000);
    adapter.setBasePath('/queues');
    app.route('/queues', adapter.registerPlugin());
  }

  const server: ServerType = await new Promise((resolve, reject) => {
    const s = serve({ fetch: app.fetch, hostname: host, port }, () => resolve(s));
    s.once('error', (err: NodeJS.ErrnoException) => reject(new DashboardError(`cannot serve the dashboard at ${o.listen}: ${err.code ?? err.message}`)));
  });
  const addr = server.address();
  const bound = typeof addr === 'object' && addr ? addr.port : port;
  return {
    url: `http://${host.includes(':') ? `[${host}]` : host}:${bound}/`,
    summary,
    close: async () => {
      if (refresh) clearInterval(refresh);
      await new Promise<void>((r) => server.close(() => r()));
      await fleet?.close();
    },
  };
}
