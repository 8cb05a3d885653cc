import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describe, test } from 'node:test';
import { NBD_CMD_DISC, NBD_CMD_FLUSH, NBD_CMD_READ, NBD_CMD_WRITE, NBD_EINVAL, NBD_EIO, NBD_ENOSPC } from '../protocol/constants.ts';
import { channels, type RequestEvent } from '../server/events.ts';
import { Health } from './health.ts';
import { startMetricsEndpoint } from './http.ts';
import { DURATION_BUCKETS, NbdMetrics, type MetricsSource } from './metrics.ts';
import { serverSource } from './source.ts';
import { MemoryNode } from '../block/memory.ts';
import { openBlockNode } from '../block/open.ts';
import { stallNextWrite } from '../block/write-stall-testlib.ts';
import { Export, type BitmapStat } from '../exports/export.ts';
import { ExportRegistry } from '../exports/registry.ts';

/** Samples of the exposition text: 'name{labels}' -> value. */
function samples(text: string): Map<string, number> {
  const out = new Map<string, number>();
  for (const line of text.split('\n')) {
    if (line === '' || line.startsWith('#')) continue;
    const at = line.lastIndexOf(' ');
    out.set(line.slice(0, at), Number(line.slice(at + 1)));
  }
  return out;
}

function request(over: Partial<RequestEvent>): RequestEvent {
  return { conn: 1, export: 'disk', cookie: 1n, command: NBD_CMD_READ, flags: 0, offset: 0, length: 0, error: 0, bytes: 0, start: 1000, end: 1000, ...over };
}

function source(over: Partial<MetricsSource> = {}): MetricsSource {
  return {
    exports: () => [{ name: 'disk', size: 1 << 30 }],
    connections: () => [],
    waiting: () => 0,
    bitmaps: () => [],
    ...over,
  };
}

async function withMetrics(src: MetricsSource, body: (m: NbdMetrics) => Promise<void>): Promise<void> {
  const m = new NbdMetrics(src, { defaultMetrics: false }).start();
  try {
    await body(m);
  } finally {
    m.stop();
  }
}

describe('NbdMetrics', () => {
  test('request events become requests, bytes and durations', async () => {
    await withMetrics(source(), async (m) => {
      for (let i = 0; i < 3; i++) channels.requestDone.publish(request({ length: 4096, bytes: 4096, start: 1000, end: 1000.03 })); // 30 µs
      channels.requestDone.publish(request({ length: 65536, bytes: 65536, start: 1000, end: 1002 })); // 2 ms
      channels.requestDone.publish(request({ error: NBD_EINVAL, start: 1000, end: 1000.01 }));
      channels.requestDone.publish(request({ command: NBD_CMD_WRITE, length: 512, bytes: 512, start: 1000, end: 1000.5 }));
      channels.requestDone.publish(request({ command: NBD_CMD_WRITE, length: 512, error: NBD_ENOSPC, start: 1000, end: 1000.5 }));
      channels.requestDone.publish(request({ command: NBD_CMD_FLUSH, start: 1000, end: 1020 }));
      channels.requestDone.publish(request({ command: NBD_CMD_DISC, start: 1000, end: 1000 }));
      channels.requestDone.publish(request({ export: 'other', command: NBD_CMD_FLUSH, error: NBD_EIO, start: 1000, end: 1000.1 }));
      const s = samples(await m.text());
      const pick = (prefix: string) => [...s].filter(([k]) => k.startsWith(prefix)).sort();
      assert.deepEqual(pick('nbd_requests_total'), [
        ['nbd_requests_total{export="disk",command="disc",result="ok"}', 1],
        ['nbd_requests_total{export="disk",command="flush",result="ok"}', 1],
        ['nbd_requests_total{export="disk",command="read",result="EINVAL"}', 1],
        ['nbd_requests_total{export="disk",command="read",result="ok"}', 4],
        ['nbd_requests_total{export="disk",command="write",result="ENOSPC"}', 1],
        ['nbd_requests_total{export="disk",command="write",result="ok"}', 1],
        ['nbd_requests_total{export="other",command="flush",result="EIO"}', 1],
      ]);
      assert.equal(s.get('nbd_read_bytes_total{export="disk"}'), 3 * 4096 + 65536);
      assert.equal(s.get('nbd_written_bytes_total{export="disk"}'), 512);
      assert.equal(s.get('nbd_read_bytes_total{export="other"}'), 0);
      // Cumulative buckets: three reads at 30 µs, the error at 10 µs, one at 2 ms.
      const read = (le: string) => s.get(`nbd_request_duration_seconds_bucket{export="disk",command="read",le="${le}"}`);
      assert.equal(read('0.000025'), 1);
      assert.equal(read('0.00005'), 4);
      assert.equal(read('0.001'), 4);
      assert.equal(read('0.0025'), 5);
      assert.equal(read('+Inf'), 5);
      assert.equal(s.get('nbd_request_duration_seconds_count{export="disk",command="read"}'), 5);
      assert.ok(Math.abs(s.get('nbd_request_duration_seconds_sum{export="disk",command="read"}')! - 0.00210) < 1e-9);
      assert.equal(s.get('nbd_request_duration_seconds_bucket{export="disk",command="flush",le="0.01"}'), 0);
      assert.equal(s.get('nbd_request_duration_seconds_bucket{export="disk",command="flush",le="0.025"}'), 1);
      assert.equal(pick('nbd_request_duration_seconds_bucket{export="disk",command="read"').length, DURATION_BUCKETS.length + 1);
    });
  });

  test('connection, negotiation and backend events are counted by label', async () => {
    await withMetrics(source(), async (m) => {
      channels.accepted.publish({ transport: 'unix' });
      channels.accepted.publish({ transport: 'unix' });
      channels.accepted.publish({ transport: 'tcp' });
      channels.refused.publish({ conn: undefined, reason: 'limit' });
      channels.refused.publish({ conn: 3, reason: 'protocol_error' });
      channels.negotiation.publish({ conn: 1, result: 'go', export: 'disk' });
      channels.negotiation.publish({ conn: 2, result: 'list_only', export: undefined });
      channels.negotiation.publish({ conn: 3, result: 'failed', export: undefined });
      channels.backendError.publish({ conn: 1, export: 'disk', command: NBD_CMD_WRITE, errno: 'ENOSPC', error: NBD_ENOSPC, message: 'full' });
      channels.backendError.publish({ conn: 1, export: 'disk', command: NBD_CMD_READ, errno: 'EIO', error: NBD_EIO, message: 'bad' });
      channels.backendError.publish({ conn: 1, export: 'disk', command: NBD_CMD_READ, errno: 'EIO', error: NBD_EIO, message: 'bad' });
      const s = samples(await m.text());
      assert.equal(s.get('nbd_connections_total{transport="unix"}'), 2);
      assert.equal(s.get('nbd_connections_total{transport="tcp"}'), 1);
      assert.equal(s.get('nbd_connections_refused_total{reason="limit"}'), 1);
      assert.equal(s.get('nbd_connections_refused_total{reason="protocol_error"}'), 1);
      assert.equal(s.get('nbd_connections_refused_total{reason="handshake_timeout"}'), 0, 'known reasons start at 0');
      assert.equal(s.get('nbd_negotiations_total{result="go"}'), 1);
      assert.equal(s.get('nbd_negotiations_total{result="list_only"}'), 1);
      assert.equal(s.get('nbd_negotiations_total{result="failed"}'), 1);
      assert.equal(s.get('nbd_negotiations_total{result="abort"}'), 0);
      assert.equal(s.get('nbd_backend_errors_total{export="disk",errno="ENOSPC"}'), 1);
      assert.equal(s.get('nbd_backend_errors_total{export="disk",errno="EIO"}'), 2);
    });
  });

  test('gauges are read from the source at each scrape', async () => {
    let conns: { export: string | undefined; inflight: number }[] = [];
    const src = source({
      exports: () => [
        { name: 'disk', size: 1 << 30 },
        { name: 'idle', size: 512 },
      ],
      connections: () => conns,
      waiting: () => conns.length,
    });
    await withMetrics(src, async (m) => {
      conns = [
        { export: 'disk', inflight: 3 },
        { export: 'disk', inflight: 1 },
        { export: undefined, inflight: 0 },
      ];
      let s = samples(await m.text());
      assert.equal(s.get('nbd_connections_active{export="disk"}'), 2);
      assert.equal(s.get('nbd_connections_active{export="idle"}'), 0);
      assert.equal(s.get('nbd_connections_negotiating'), 1);
      assert.equal(s.get('nbd_connections_waiting'), 3);
      assert.equal(s.get('nbd_requests_in_flight{export="disk"}'), 4);
      assert.equal(s.get('nbd_requests_in_flight{export="idle"}'), 0);
      assert.equal(s.get('nbd_export_size_bytes{export="disk"}'), 1 << 30);
      assert.equal(s.get('nbd_export_size_bytes{export="idle"}'), 512);
      conns = [];
      s = samples(await m.text());
      assert.equal(s.get('nbd_connections_active{export="disk"}'), 0);
      assert.equal(s.get('nbd_requests_in_flight{export="disk"}'), 0);
      // Declared, and empty until dirty bitmaps exist.
      assert.match(await m.text(), /# TYPE nbd_dirty_bitmap_dirty_bytes gauge\n/);
      assert.equal([...s.keys()].filter((k) => k.startsWith('nbd_dirty_bitmap')).length, 0);
    });
  });

  test('after stop() events are no longer counted; default metrics are there', async () => {
    const m = new NbdMetrics(source()).start();
    channels.accepted.publish({ transport: 'tcp' });
    m.stop();
    channels.accepted.publish({ transport: 'tcp' });
    assert.equal(channels.accepted.hasSubscribers, false);
    const text = await m.text();
    assert.equal(samples(text).get('nbd_connections_total{transport="tcp"}'), 1);
    assert.match(text, /^process_cpu_user_seconds_total /m);
    assert.match(text, /^nodejs_eventloop_lag_seconds /m);
  });

  test('JSON view of the histogram, as registry.getMetricsAsJSON gives it', async () => {
    await withMetrics(source(), async (m) => {
      channels.requestDone.publish(request({ start: 5, end: 5.2 }));
      const json = await m.registry.getMetricsAsJSON();
      const h = json.find((x) => x.name === 'nbd_request_duration_seconds');
      assert.equal(String(h?.type), 'histogram');
      const count = h?.values.find((v) => (v as { metricName?: string }).metricName === 'nbd_request_duration_seconds_count');
      assert.deepEqual(count?.labels, { export: 'disk', command: 'read' });
      assert.equal(count?.value, 1);
    });
  });
});

describe('serverSource: the export registry and the server, as scraped', () => {
  test("an export's dirty bitmaps become nbd_dirty_bitmap_dirty_bytes{export,bitmap}, read at each scrape", async () => {
    // A fake provider: the real bitmaps (src/meta/) satisfy BitmapStat too.
    let dirty = 0;
    const live: BitmapStat[] = [{ name: 'b0', dirtyBytes: () => dirty }];
    const exports = new ExportRegistry();
    exports.add(new Export({ name: 'disk', node: new MemoryNode(1 << 20), multiConn: true, bitmapStats: () => live }));
    exports.add(new Export({ name: 'plain', node: new MemoryNode(4096), multiConn: false }));
    const conns = [
      { session: { export: { name: 'disk' } }, inflight: 2 },
      { session: null, inflight: 0 },
    ];
    let server: { connections: typeof conns; waiting: number } | undefined;
    await withMetrics(serverSource(exports, () => server), async (m) => {
      let s = samples(await m.text());
      assert.equal(s.get('nbd_dirty_bitmap_dirty_bytes{export="disk",bitmap="b0"}'), 0);
      assert.equal(s.get('nbd_export_size_bytes{export="disk"}'), 1 << 20);
      assert.equal(s.get('nbd_export_size_bytes{export="plain"}'), 4096);
      assert.equal(s.get('nbd_connections_active{export="disk"}'), 0, 'no server yet');
      dirty = 3 * 65536;
      live.push({ name: 'b1', dirtyBytes: () => 512 });
      server = { connections: conns, waiting: 1 };
      s = samples(await m.text());
      assert.equal(s.get('nbd_dirty_bitmap_dirty_bytes{export="disk",bitmap="b0"}'), 3 * 65536);
      assert.equal(s.get('nbd_dirty_bitmap_dirty_bytes{export="disk",bitmap="b1"}'), 512);
      assert.equal([...s.keys()].filter((k) => k.includes('export="plain"') && k.startsWith('nbd_dirty_bitmap')).length, 0);
      assert.equal(s.get('nbd_connections_active{export="disk"}'), 1);
      assert.equal(s.get('nbd_connections_negotiating'), 1);
      assert.equal(s.get('nbd_connections_waiting'), 1);
      assert.equal(s.get('nbd_requests_in_flight{export="disk"}'), 2);
      // A bitmap removed is gone from the next scrape.
      live.shift();
      s = samples(await m.text());
      assert.equal(s.has('nbd_dirty_bitmap_dirty_bytes{export="disk",bitmap="b0"}'), false);
      assert.equal(s.get('nbd_dirty_bitmap_dirty_bytes{export="disk",bitmap="b1"}'), 512);
    });
  });
});

describe('serverSource: writes sent off the event loop', () => {
  test('a file export counts its spells in the thread pool as nbd_loop_write_spells_total{export}; a memory export has none', async (ctx) => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbd-export-metrics-'));
    const file = path.join(dir, 'disk.img');
    fs.writeFileSync(file, Buffer.alloc(65536));
    let unstall = (): void => {};
    const node = await openBlockNode({ kind: 'file', path: file, format: 'raw' });
    try {
      if (node.writeNow?.(0, Buffer.alloc(512, 1)) !== true) return ctx.skip('writes into this file are never timed (tmpfs)');
      const exports = new ExportRegistry();
      exports.add(new Export({ name: 'disk', node, multiConn: true }));
      exports.add(new Export({ name: 'ram', node: new MemoryNode(4096), multiConn: true }));
      await withMetrics(serverSource(exports, () => undefined), async (m) => {
        let s = samples(await m.text());
        assert.equal(s.get('nbd_loop_write_spells_total{export="disk"}'), 0);
        assert.equal(s.has('nbd_loop_write_spells_total{export="ram"}'), false);
        // One write the kernel holds for 60 ms.
        unstall = stallNextWrite(60);
        assert.equal(node.writeNow!(0, Buffer.alloc(512, 2)), true);
        s = samples(await m.text());
        assert.equal(s.get('nbd_loop_write_spells_total{export="disk"}'), 1);
      });
    } finally {
      unstall();
      await node.close();
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('layering', () => {
  test('only src/metrics/ imports prom-client (protocol, block, server and export code publish events)', () => {
    const src = path.join(import.meta.dirname, '..');
    const offenders: string[] = [];
    for (const dir of fs.readdirSync(src)) {
      if (dir === 'metrics' || !fs.statSync(path.join(src, dir)).isDirectory()) continue;
      for (const f of fs.readdirSync(path.join(src, dir), { recursive: true }) as string[]) {
        if (!f.endsWith('.ts')) continue;
        const text = fs.readFileSync(path.join(src, dir, f), 'utf8');
        if (/(?:from|import|require)\s*\(?\s*['"]prom-client['"]/.test(text)) offenders.push(`${dir}/${f}`);
      }
    }
    assert.deepEqual(offenders, []);
  });
});

describe('Health', () => {
  test('live while the loop keeps time; unhealthy after a long stall, healthy again later', () => {
    let now = 0;
    const h = new Health({ intervalMs: 100, maxLagMs: 1000, windowMs: 5000, now: () => now });
    h.start();
    try {
      now = 100;
      h.tick();
      assert.deepEqual(h.liveness(), { ok: true, lagMs: 0 });
      now = 1700; // this tick came 1.5 s late
      h.tick();
      assert.equal(h.liveness().ok, false);
      assert.equal(h.liveness().lagMs, 1500);
      for (now = 1800; now <= 7000; now += 100) h.tick();
      assert.deepEqual(h.liveness(), { ok: true, lagMs: 0 });
      now = 9000; // no tick for 2 s: the timer is starved right now
      assert.equal(h.liveness().ok, false);
    } finally {
      h.stop();
    }
  });

  test('readiness: starting, ready, stopping (and never ready again)', () => {
    const h = new Health();
    assert.equal(h.readiness, 'starting');
    h.setReady();
    assert.equal(h.readiness, 'ready');
    h.setStopping();
    h.setReady();
    assert.equal(h.readiness, 'stopping');
  });
});

describe('metrics endpoint', () => {
  test('/metrics, /healthz, /readyz, 404 and 405', async () => {
    const health = new Health().start();
    const metrics = new NbdMetrics(source(), { defaultMetrics: false }).start();
    const endpoint = await startMetricsEndpoint({ host: '127.0.0.1', port: 0, registry: metrics.registry, health });
    const base = `http://127.0.0.1:${endpoint.address.port}`;
    try {
      channels.accepted.publish({ transport: 'unix' });
      const r = await fetch(`${base}/metrics`);
      assert.equal(r.status, 200);
      assert.match(r.headers.get('content-type') ?? '', /^text\/plain; version=0\.0\.4/);
      assert.match(await r.text(), /^nbd_connections_total\{transport="unix"\} 1$/m);
      const ready1 = await fetch(`${base}/readyz`);
      assert.deepEqual([ready1.status, await ready1.text()], [503, 'starting\n']);
      health.setReady();
      const ready2 = await fetch(`${base}/readyz`);
      assert.deepEqual([ready2.status, await ready2.text()], [200, 'ready\n']);
      health.setStopping();
      const ready3 = await fetch(`${base}/readyz`);
      assert.deepEqual([ready3.status, await ready3.text()], [503, 'stopping\n']);
      const live = await fetch(`${base}/healthz`);
      assert.deepEqual([live.status, await live.text()], [200, 'ok\n']);
      assert.equal((await fetch(`${base}/metrics/x`)).status, 404);
      const post = await fetch(`${base}/metrics`, { method: 'POST', body: 'x' });
      assert.equal(post.status, 405);
      assert.equal(post.headers.get('allow'), 'GET, HEAD');
      const head = await fetch(`${base}/readyz`, { method: 'HEAD' });
      assert.equal(head.status, 503);
    } finally {
      await endpoint.close();
      metrics.stop();
      health.stop();
    }
  });
});
