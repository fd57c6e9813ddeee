/**
 * A loopback HTTP proxy for fault tests: it sits in front of a real server (s3rver) and, following a
 * script, answers with error statuses, resets connections, stalls, or truncates request or response
 * bodies. Every firing is recorded, and `assertAllFired()` fails a test whose scripted faults did not
 * all happen (a fault test that injected nothing proves nothing).
 */
import * as http from 'node:http';
import type { AddressInfo, Socket } from 'node:net';

export type HttpFault =
  /** Answer with this status and an S3-style XML error without forwarding (the request has no effect). */
  | { type: 'status'; status: number; code?: string }
  /** Forward (the request takes effect), then answer with this status instead (a lost reply). */
  | { type: 'statusAfter'; status: number; code?: string }
  /** Destroy the client connection before forwarding, or after the upstream answered (lost reply). */
  | { type: 'reset'; when: 'before' | 'after' }
  /** Never answer; the connection stays open until the client gives up or the proxy stops. */
  | { type: 'stall' }
  /**
   * Forward, send the upstream headers (full Content-Length), then only `bytes` of the body, then
   * reset the connection, or with `stall` keep it open and silent (a body that stops arriving).
   */
  | { type: 'truncateResponse'; bytes?: number; stall?: boolean }
  /** Send upstream only `bytes` of the request body, then abort both connections (a torn upload). */
  | { type: 'truncateRequest'; bytes: number };

export interface HttpFaultRule {
  id?: string;
  method?: string;
  /** Matched against the request path including the query string. */
  path?: RegExp;
  skip?: number;
  /** Default 1. */
  times?: number;
  fault: HttpFault;
}

export interface FiredHttpFault {
  rule: string;
  method: string;
  path: string;
  fault: HttpFault['type'];
}

export interface FaultProxy {
  endpoint: string;
  port: number;
  fired: FiredHttpFault[];
  /** Requests seen, faulted or not. */
  requests: Array<{ method: string; path: string }>;
  /** Most requests that were in flight at once. */
  readonly maxInFlight: number;
  addRule(rule: HttpFaultRule): void;
  unfired(): Array<{ id: string; fired: number; expected: number }>;
  assertAllFired(): void;
  stop(): Promise<void>;
}

interface RuleState {
  rule: HttpFaultRule;
  id: string;
  seen: number;
  fired: number;
}

function xmlError(status: number, code: string | undefined): string {
  const c = code ?? (status === 503 ? 'SlowDown' : status === 403 ? 'AccessDenied' : status >= 500 ? 'InternalError' : 'Error');
  return `<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>${c}</Code><Message>injected ${status}</Message><RequestId>fault</RequestId></Error>`;
}

export async function startFaultProxy(upstream: string, rules: HttpFaultRule[] = []): Promise<FaultProxy> {
  const up = new URL(upstream);
  const states: RuleState[] = [];
  const fired: FiredHttpFault[] = [];
  const requests: Array<{ method: string; path: string }> = [];
  const sockets = new Set<Socket>();
  const upstreamAgent = new http.Agent({ keepAlive: false });

  const addRule = (rule: HttpFaultRule): void => {
    states.push({ rule, id: rule.id ?? `rule${states.length}`, seen: 0, fired: 0 });
  };
  rules.forEach(addRule);

  const pick = (method: string, path: string): HttpFault | undefined => {
    for (const s of states) {
      const r = s.rule;
      if (r.method !== undefined && r.method !== method) continue;
      if (r.path !== undefined && !r.path.test(path)) continue;
      if (s.fired >= (r.times ?? 1)) continue;
      s.seen++;
      if (s.seen <= (r.skip ?? 0)) continue;
      s.fired++;
      fired.push({ rule: s.id, method, path, fault: r.fault.type });
      return r.fault;
    }
    return undefined;
  };

  const forward = (
    req: http.IncomingMessage,
    onResponse: (res: http.IncomingMessage) => void,
    truncateRequestAt?: number,
  ): http.ClientRequest => {
    const out = http.request({
      host: up.hostname,
      port: up.port,
      method: req.method,
      path: req.url,
      headers: req.headers,
      agent: upstreamAgent,
    });
    out.on('response', onResponse);
    out.on('error', () => req.socket.destroy());
    if (truncateRequestAt === undefined) {
      req.pipe(out);
    } else {
      let sent = 0;
      req.on('data', (chunk: Buffer) => {
        if (sent >= truncateRequestAt) return;
        const part = chunk.subarray(0, truncateRequestAt - sent);
        sent += part.length;
        out.write(part);
        if (sent >= truncateRequestAt) {
          // Give the upstream the torn body, then cut both sides as a dropped connection would.
          out.destroy();
          req.socket.destroy();
        }
      });
      req.on('end', () => {
        if (sent < truncateRequestAt) out.end();
      });
    }
    return out;
  };

  let inFlight = 0;
  let maxInFlight = 0;
  const server = http.createServer((req, res) => {
    const method = req.method ?? 'GET';
    const path = req.url ?? '/';
    requests.push({ method, path });
    inFlight++;
    maxInFlight = Math.max(maxInFlight, inFlight);
    res.on('close', () => inFlight--);
    const fault = pick(method, path);
    if (!fault) {
      forward(req, (upRes) => {
        res.writeHead(upRes.statusCode ?? 502, upRes.headers);
        upRes.pipe(res);
      });
      return;
    }
    switch (fault.type) {
      case 'status': {
        req.resume();
        req.on('end', () => {
          const body = xmlError(fault.status, fault.code);
          res.writeHead(fault.status, { 'content-type': 'application/xml', 'content-length': Buffer.byteLength(body) });
          res.end(body);
        });
        return;
      }
      case 'statusAfter':
        forward(req, (upRes) => {
          upRes.resume();
          upRes.on('end', () => {
            const body = xmlError(fault.status, fault.code);
            res.writeHead(fault.status, { 'content-type': 'application/xml', 'content-length': Buffer.byteLength(body) });
            res.end(body);
          });
        });
        return;
      case 'reset':
        if (fault.when === 'before') {
          req.socket.destroy();
          return;
        }
        forward(req, (upRes) => {
          upRes.resume();
          upRes.on('end', () => req.socket.destroy());
        });
        return;
      case 'stall':
        req.resume();
        return;
      case 'truncateResponse':
        forward(req, (upRes) => {
          res.writeHead(upRes.statusCode ?? 502, upRes.headers);
          const limit = fault.bytes ?? Math.floor(Number(upRes.headers['content-length'] ?? 0) / 2);
          let sent = 0;
          upRes.on('data', (chunk: Buffer) => {
            if (sent >= limit) return;
            const part = chunk.subarray(0, limit - sent);
            sent += part.length;
            res.write(part);
            if (sent >= limit) {
              upRes.destroy();
              if (fault.stall) return;
              // Flush what was written, then drop the connection mid-body.
              res.socket?.end(() => res.socket?.destroy());
              setImmediate(() => req.socket.destroy());
            }
          });
          upRes.on('end', () => {
            if (sent < limit || !fault.stall) res.end();
          });
        });
        return;
      case 'truncateRequest':
        forward(req, () => undefined, fault.bytes);
        return;
    }
  });
  server.on('connection', (s: Socket) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve());
  });
  const port = (server.address() as AddressInfo).port;

  const unfired = (): Array<{ id: string; fired: number; expected: number }> =>
    states
      .map((s) => ({ id: s.id, fired: s.fired, expected: s.rule.times ?? 1 }))
      .filter((u) => u.fired < (Number.isFinite(u.expected) ? u.expected : 1));

  return {
    endpoint: `http://127.0.0.1:${port}`,
    port,
    fired,
    requests,
    get maxInFlight() {
      return maxInFlight;
    },
    addRule,
    unfired,
    assertAllFired() {
      const missing = unfired();
      if (missing.length > 0) {
        throw new Error(`scripted HTTP faults did not fire: ${missing.map((m) => `${m.id} (${m.fired}/${m.expected})`).join(', ')}`);
      }
    },
    async stop() {
      for (const s of sockets) s.destroy();
      upstreamAgent.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}
