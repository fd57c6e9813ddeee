/**
 * The two-host helper on real namespaces: TCP crosses the veth, a cut link stops it, tc shaping
 * slows it to the asked rate, the counters see the bytes, and nothing is left behind — neither by
 * destroy() nor by a creator that died without it.
 */
import { execFileSync, spawn } from 'node:child_process';
import { afterEach, describe, expect, it } from 'vitest';
import { NetnsPair, NETNS_PREFIX, sweepStaleNamespaces, type Side } from './netns.js';

const pairs: NetnsPair[] = [];
afterEach(async () => {
  for (const p of pairs.splice(0)) await p.destroy();
});

async function newPair(): Promise<NetnsPair> {
  const p = await NetnsPair.create();
  pairs.push(p);
  return p;
}

function namespaces(): string[] {
  return execFileSync('ip', ['netns', 'list']).toString().split('\n').map((l) => l.split(' ')[0] ?? '').filter(Boolean);
}

/** A node TCP server inside `side`: echoes by default; with `sink`, counts bytes and answers the count at EOF. */
async function startServer(p: NetnsPair, side: Side, port: number, mode: 'echo' | 'sink'): Promise<void> {
  const script = `
    const net = require('net');
    net.createServer((s) => {
      if (${JSON.stringify(mode)} === 'echo') { s.pipe(s); return; }
      let n = 0; s.on('data', (b) => { n += b.length; }); s.on('end', () => s.end(String(n)));
    }).listen(${port}, ${JSON.stringify(p.addr[side])}, () => console.log('listening'));`;
  const child = p.spawn(side, process.execPath, ['-e', script], { stdio: ['ignore', 'pipe', 'inherit'] });
  await new Promise<void>((resolve, reject) => {
    child.stdout!.on('data', (b: Buffer) => b.toString().includes('listening') && resolve());
    child.on('exit', (c) => reject(new Error(`server exited ${c}`)));
  });
}

/** A node TCP client inside `side`: sends `bytes` bytes (or "hello"), half-closes, prints the reply and the elapsed ms. */
function client(p: NetnsPair, side: Side, port: number, bytes = 0, timeoutMs = 3000) {
  const peer = p.addr[NetnsPair.peer(side)];
  const script = `
    const net = require('net'); const t0 = Date.now();
    const s = net.connect({ host: ${JSON.stringify(peer)}, port: ${port} });
    s.setTimeout(${timeoutMs}, () => { console.error('timeout'); process.exit(3); });
    s.on('error', (e) => { console.error(e.message); process.exit(2); });
    let reply = '';
    s.on('data', (b) => { reply += b; });
    s.on('end', () => { console.log(JSON.stringify({ reply, ms: Date.now() - t0 })); process.exit(0); });
    s.on('connect', () => { s.end(${bytes} > 0 ? Buffer.alloc(${bytes}, 7) : 'hello'); });`;
  return p.exec(side, process.execPath, ['-e', script], { timeoutMs: timeoutMs + 30_000 });
}

describe('NetnsPair', () => {
  it('carries TCP between the two sides; a cut link stops it and a restored one carries it again', async () => {
    const p = await newPair();
    expect(p.ns.a.startsWith(NETNS_PREFIX)).toBe(true);
    expect(namespaces()).toEqual(expect.arrayContaining([p.ns.a, p.ns.b]));
    await startServer(p, 'b', 7001, 'echo');
    const ok = await client(p, 'a', 7001);
    expect(ok.code, ok.stderr).toBe(0);
    expect(JSON.parse(ok.stdout).reply).toBe('hello');

    await p.linkDown();
    const cut = await client(p, 'a', 7001, 0, 1500);
    expect(cut.code).not.toBe(0);

    await p.linkUp();
    // The carrier comes back at once, but give the stack a moment before declaring the link dead.
    let back = await client(p, 'a', 7001, 0, 3000);
    for (let i = 0; i < 5 && back.code !== 0; i++) back = await client(p, 'a', 7001, 0, 3000);
    expect(back.code, back.stderr).toBe(0);
  });

  it('shapes the sending side: 2 MB at 10 mbit takes over a second; the counters see the bytes', async () => {
    const p = await newPair();
    await startServer(p, 'b', 7002, 'sink');
    const before = await p.counters('a');
    const fast = await client(p, 'a', 7002, 2_000_000, 20_000);
    expect(fast.code, fast.stderr).toBe(0);
    expect(JSON.parse(fast.stdout).reply).toBe('2000000');

    await p.shape('a', 10);
    const slow = await client(p, 'a', 7002, 2_000_000, 20_000);
    expect(slow.code, slow.stderr).toBe(0);
    const r = JSON.parse(slow.stdout) as { reply: string; ms: number };
    expect(r.reply).toBe('2000000');
    // 16 Mbit at 10 Mbit/s is 1.6 s; generous for a loaded machine, but far above the unshaped time.
    expect(r.ms).toBeGreaterThanOrEqual(1200);

    const after = await p.counters('a');
    expect(after.txBytes - before.txBytes).toBeGreaterThanOrEqual(4_000_000);
    expect((await p.counters('b')).rxBytes).toBeGreaterThanOrEqual(after.txBytes - before.txBytes);

    await p.shape('a', null);
    const again = await client(p, 'a', 7002, 2_000_000, 20_000);
    expect(again.code, again.stderr).toBe(0);
    expect((JSON.parse(again.stdout) as { ms: number }).ms).toBeLessThan(r.ms);
  });

  it('destroy removes both namespaces and the processes inside; a dead creator\'s pair is swept', async () => {
    const p = await NetnsPair.create();
    await startServer(p, 'b', 7003, 'echo');
    const inside = p.spawn('a', 'sleep', ['600']);
    await p.destroy();
    expect(namespaces()).not.toContain(p.ns.a);
    expect(namespaces()).not.toContain(p.ns.b);
    await new Promise((r) => setTimeout(r, 100));
    expect(inside.exitCode !== null || inside.signalCode !== null).toBe(true);
    await p.destroy(); // idempotent

    // A pair whose creator is gone: a pid that surely died (a finished child of ours).
    const dead = spawn('true');
    await new Promise((r) => dead.on('exit', r));
    const stale = `${NETNS_PREFIX}${dead.pid}-deadbeef-a`;
    execFileSync('ip', ['netns', 'add', stale]);
    try {
      expect(await sweepStaleNamespaces()).toContain(stale);
      expect(namespaces()).not.toContain(stale);
    } finally {
      if (namespaces().includes(stale)) execFileSync('ip', ['netns', 'del', stale]);
    }
  });
});
