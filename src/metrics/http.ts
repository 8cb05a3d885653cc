// The HTTP endpoint of --metrics (node:http):
//   GET /metrics  the registry in Prometheus' text format
//   GET /healthz  200 "ok" while the event loop answers in time, else 503
//   GET /readyz   200 "ready" once listening with every export open;
//                 503 "starting" before, "stopping" during a graceful stop
// HEAD works as GET without a body; other methods get 405, other paths 404.
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import type { Registry } from 'prom-client';
import type { Health } from './health.ts';

export interface MetricsEndpointOptions {
  host: string;
  port: number;
  registry: Registry;
  health: Health;
  /** A failure to produce /metrics (logged, answered with 500). */
  onError?: (err: unknown) => void;
}

export interface MetricsEndpoint {
  readonly address: AddressInfo;
  /** Stop listening and drop open keep-alive connections. */
  close(): Promise<void>;
}

export async function startMetricsEndpoint(opts: MetricsEndpointOptions): Promise<MetricsEndpoint> {
  const server = http.createServer((req, res) => {
    void handle(opts, req, res);
  });
  // Scrapers keep connections open; none of them may hold a stop back.
  server.keepAliveTimeout = 5_000;
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen({ host: opts.host, port: opts.port }, () => {
      server.off('error', reject);
      resolve();
    });
  });
  server.on('error', (err) => opts.onError?.(err));
  return {
    address: server.address() as AddressInfo,
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      }),
  };
}

async function handle(opts: MetricsEndpointOptions, req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
  const path = (req.url ?? '/').split('?')[0];
  const send = (status: number, body: string, type = 'text/plain; charset=utf-8') => {
    res.writeHead(status, { 'Content-Type': type, 'Content-Length': Buffer.byteLength(body), 'Cache-Control': 'no-store' });
    res.end(req.method === 'HEAD' ? undefined : body);
  };
  if (path !== '/metrics' && path !== '/healthz' && path !== '/readyz') return send(404, 'not found: try /metrics, /healthz or /readyz\n');
  if (req.method !== 'GET' && req.method !== 'HEAD') {
    res.setHeader('Allow', 'GET, HEAD');
    return send(405, 'method not allowed\n');
  }
  switch (path) {
    case '/metrics': {
      let text: string;
      try {
        text = await opts.registry.metrics();
      } catch (err) {
        opts.onError?.(err);
        return send(500, 'collecting metrics failed\n');
      }
      return send(200, text, opts.registry.contentType);
    }
    case '/healthz': {
      const { ok, lagMs } = opts.health.liveness();
      return ok ? send(200, 'ok\n') : send(503, `event loop lag ${(lagMs / 1000).toFixed(3)} s exceeds ${(opts.health.maxLagMs / 1000).toFixed(3)} s\n`);
    }
    default: {
      const state = opts.health.readiness;
      return state === 'ready' ? send(200, 'ready\n') : send(503, `${state}\n`);
    }
  }
}
