// The Prometheus metrics of nbd-export: a prom-client registry fed by the
// server's diagnostics channels (src/server/events.ts) and, at scrape time,
// by a small view of the server's state (MetricsSource).
//
// Cost: events that happen once per connection go straight into
// prom-client counters. The per-request event adds to plain numbers here
// (a few map look-ups and additions) and prom-client reads them only when
// /metrics is scraped; gauges (connections, requests in flight, sizes) are
// read from the source then too, so they cannot drift.
import { collectDefaultMetrics, Counter, Gauge, Registry } from 'prom-client';
import { NBD_CMD_READ, NBD_CMD_WRITE } from '../protocol/constants.ts';
import { commandLabel, errorLabel } from '../protocol/names.ts';
import { subscribe, type NegotiationResult, type RefusalReason, type RequestEvent, type Transport } from '../server/events.ts';
import { CollectedHistogram, type HistogramSeries } from './histogram.ts';

/** What the metrics read from the server when scraped. */
export interface MetricsSource {
  /** `loopWriteSpells`: see BlockNode.loopWriteSpells; absent where the backend does not time its writes. */
  exports(): Iterable<{ name: string; size: number; loopWriteSpells?: number | undefined }>;
  /** Every connection; `export` is undefined while it negotiates. */
  connections(): Iterable<{ export: string | undefined; inflight: number }>;
  /** Clients waiting for a connection slot. */
  waiting(): number;
  /** Dirty bitmaps of every export (Export.bitmapStats). */
  bitmaps(): Iterable<{ export: string; bitmap: string; dirtyBytes: number }>;
}

export const emptySource: MetricsSource = {
  exports: () => [],
  connections: () => [],
  waiting: () => 0,
  bitmaps: () => [],
};

/**
 * Upper bounds of nbd_request_duration_seconds: from 25 µs (a read from
 * memory or the page cache) to 10 s (Redis timeouts are 5 s).
 */
export const DURATION_BUCKETS: readonly number[] = [
  0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
];

const TRANSPORTS: readonly Transport[] = ['unix', 'tcp'];
const REFUSALS: readonly RefusalReason[] = ['limit', 'handshake_timeout', 'protocol_error', 'tls', 'shutdown'];
const RESULTS: readonly NegotiationResult[] = ['go', 'export_name', 'abort', 'list_only', 'failed'];

/** Requests of one command on one export. */
class CommandStats {
  readonly label: string;
  ok = 0;
  /** NBD error -> count, for the rest */
  readonly errors = new Map<number, number>();
  /** Non-cumulative; the last is +Inf. */
  readonly counts = new Float64Array(DURATION_BUCKETS.length + 1);
  sum = 0;
  count = 0;
  constructor(command: number) {
    this.label = commandLabel(command);
  }
}

class ExportStats {
  readonly name: string;
  readonly commands = new Map<number, CommandStats>();
  readBytes = 0;
  writtenBytes = 0;
  constructor(name: string) {
    this.name = name;
  }
}

export interface MetricsOptions {
  /** prom-client's process and Node.js metrics (default true). */
  defaultMetrics?: boolean;
}

export class NbdMetrics {
  readonly registry = new Registry();
  readonly #source: MetricsSource;
  readonly #stats = new Map<string, ExportStats>();
  /** The export of the last request: almost always the next one's too. */
  #last: ExportStats | undefined;
  #unsubscribe: (() => void)[] = [];
  readonly #connectionsTotal: Counter<'transport'>;
  readonly #refused: Counter<'reason'>;
  readonly #negotiations: Counter<'result'>;
  readonly #backendErrors: Counter<'export' | 'errno'>;

  constructor(source: MetricsSource, opts: MetricsOptions = {}) {
    this.#source = source;
    const registers = [this.registry];
    if (opts.defaultMetrics ?? true) collectDefaultMetrics({ register: this.registry });

    const exportNames = (): string[] => [...source.exports()].map((e) => e.name);

    new Gauge({
      name: 'nbd_connections_active',
      help: 'Connections in the transmission phase, by the export they use',
      labelNames: ['export'],
      registers,
      collect() {
        this.reset();
        for (const name of exportNames()) this.set({ export: name }, 0);
        for (const c of source.connections()) if (c.export !== undefined) this.inc({ export: c.export });
      },
    });
    new Gauge({
      name: 'nbd_connections_negotiating',
      help: 'Connections still negotiating',
      registers,
      collect() {
        let n = 0;
        for (const c of source.connections()) if (c.export === undefined) n++;
        this.set(n);
      },
    });
    new Gauge({
      name: 'nbd_connections_waiting',
      help: 'Clients accepted but waiting for a connection slot (-e), not yet greeted',
      registers,
      collect() {
        this.set(source.waiting());
      },
    });
    this.#connectionsTotal = new Counter({
      name: 'nbd_connections_total',
      help: 'Connections accepted, by transport',
      labelNames: ['transport'],
      registers,
    });
    this.#refused = new Counter({
      name: 'nbd_connections_refused_total',
      help: 'Connections refused or cut short, by reason',
      labelNames: ['reason'],
      registers,
    });
    this.#negotiations = new Counter({
      name: 'nbd_negotiations_total',
      help: 'Negotiations, by how they ended',
      labelNames: ['result'],
      registers,
    });
    for (const transport of TRANSPORTS) this.#connectionsTotal.inc({ transport }, 0);
    for (const reason of REFUSALS) this.#refused.inc({ reason }, 0);
    for (const result of RESULTS) this.#negotiations.inc({ result }, 0);

    const stats = (): ExportStats[] => {
      for (const name of exportNames()) this.#statsFor(name);
      return [...this.#stats.values()];
    };
    new Counter({
      name: 'nbd_requests_total',
      help: 'Requests answered, by export, command and result (ok or the NBD error)',
      labelNames: ['export', 'command', 'result'],
      registers,
      collect() {
        this.reset();
        for (const s of stats()) {
          for (const [, c] of s.commands) {
            if (c.ok > 0) this.inc({ export: s.name, command: c.label, result: 'ok' }, c.ok);
            for (const [error, n] of c.errors) this.inc({ export: s.name, command: c.label, result: errorLabel(error) }, n);
          }
        }
      },
    });
    new Counter({
      name: 'nbd_read_bytes_total',
      help: 'Bytes read by successful READ requests',
      labelNames: ['export'],
      registers,
      collect() {
        this.reset();
        for (const s of stats()) this.inc({ export: s.name }, s.readBytes);
      },
    });
    new Counter({
      name: 'nbd_written_bytes_total',
      help: 'Bytes written by successful WRITE requests',
      labelNames: ['export'],
      registers,
      collect() {
        this.reset();
        for (const s of stats()) this.inc({ export: s.name }, s.writtenBytes);
      },
    });
    this.registry.registerMetric(
      new CollectedHistogram({
        name: 'nbd_request_duration_seconds',
        help: 'Time from a request header being parsed to its reply being ready',
        labelNames: ['export', 'command'],
        buckets: DURATION_BUCKETS,
        series: function* (): Generator<HistogramSeries> {
          for (const s of stats()) {
            for (const [, c] of s.commands) {
              if (c.count > 0) yield { labels: { export: s.name, command: c.label }, counts: c.counts, sum: c.sum, count: c.count };
            }
          }
        },
      }),
    );
    new Gauge({
      name: 'nbd_requests_in_flight',
      help: 'Requests being served by the storage, by export',
      labelNames: ['export'],
      registers,
      collect() {
        this.reset();
        for (const name of exportNames()) this.set({ export: name }, 0);
        for (const c of source.connections()) if (c.export !== undefined && c.inflight > 0) this.inc({ export: c.export }, c.inflight);
      },
    });
    new Gauge({
      name: 'nbd_export_size_bytes',
      help: 'Size of each export',
      labelNames: ['export'],
      registers,
      collect() {
        this.reset();
        for (const e of source.exports()) this.set({ export: e.name }, e.size);
      },
    });
    new Counter({
      name: 'nbd_loop_write_spells_total',
      help: 'Times buffered writes into an export\'s file went to the thread pool for a while because the kernel held one on the event loop (dirty-page throttling, a journal commit)',
      labelNames: ['export'],
      registers,
      collect() {
        this.reset();
        for (const e of source.exports()) if (e.loopWriteSpells !== undefined) this.inc({ export: e.name }, e.loopWriteSpells);
      },
    });
    new Gauge({
      name: 'nbd_dirty_bitmap_dirty_bytes',
      help: 'Bytes marked dirty in each dirty bitmap',
      labelNames: ['export', 'bitmap'],
      registers,
      collect() {
        this.reset();
        for (const b of source.bitmaps()) this.set({ export: b.export, bitmap: b.bitmap }, b.dirtyBytes);
      },
    });
    this.#backendErrors = new Counter({
      name: 'nbd_backend_errors_total',
      help: 'Storage operations that failed, by export and errno',
      labelNames: ['export', 'errno'],
      registers,
    });
  }

  /** Subscribe to the server's events. */
  start(): this {
    if (this.#unsubscribe.length > 0) return this;
    this.#unsubscribe = [
      subscribe('accepted', (m) => this.#connectionsTotal.inc({ transport: m.transport })),
      subscribe('refused', (m) => this.#refused.inc({ reason: m.reason })),
      subscribe('negotiation', (m) => this.#negotiations.inc({ result: m.result })),
      subscribe('requestDone', this.recordRequest),
      subscribe('backendError', (m) => this.#backendErrors.inc({ export: m.export, errno: m.errno })),
    ];
    return this;
  }

  stop(): void {
    for (const u of this.#unsubscribe) u();
    this.#unsubscribe = [];
  }

  /** The per-request path: plain additions only. */
  readonly recordRequest = (e: RequestEvent): void => {
    let s = this.#last;
    if (s === undefined || s.name !== e.export) s = this.#last = this.#statsFor(e.export);
    let c = s.commands.get(e.command);
    if (c === undefined) {
      c = new CommandStats(e.command);
      s.commands.set(e.command, c);
    }
    if (e.error === 0) c.ok++;
    else c.errors.set(e.error, (c.errors.get(e.error) ?? 0) + 1);
    if (e.start !== 0) {
      const seconds = (e.end - e.start) / 1000;
      let i = 0;
      while (i < DURATION_BUCKETS.length && seconds > DURATION_BUCKETS[i]!) i++;
      c.counts[i]!++;
      c.sum += seconds;
      c.count++;
    }
    if (e.command === NBD_CMD_READ) s.readBytes += e.bytes;
    else if (e.command === NBD_CMD_WRITE) s.writtenBytes += e.bytes;
  };

  #statsFor(name: string): ExportStats {
    let s = this.#stats.get(name);
    if (s === undefined) {
      s = new ExportStats(name);
      this.#stats.set(name, s);
    }
    return s;
  }

  /** The exposition text, as /metrics serves it. */
  text(): Promise<string> {
    return this.registry.metrics();
  }
}
