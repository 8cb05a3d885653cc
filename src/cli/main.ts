// Wires the layers: configuration -> block node -> export -> server ->
// listeners, then runs until a signal, or until the last client leaves
// when not persistent (as qemu-nbd does).
import fs from 'node:fs';
import { fixMmapThreshold } from '../block/ffi.ts';
import { openBlockNode } from '../block/open.ts';
import type { BlockNode } from '../block/types.ts';
import { Export } from '../exports/export.ts';
import { ExportRegistry } from '../exports/registry.ts';
import { AllocationDepthContext } from '../meta/allocation-depth.ts';
import { AUTOCLEAR_BITMAPS } from '../meta/qcow2-bitmaps.ts';
import type { Health } from '../metrics/health.ts';
import type { MetricsEndpoint } from '../metrics/http.ts';
import type { MetricsSource, NbdMetrics } from '../metrics/metrics.ts';
import { serverSource } from '../metrics/source.ts';
import { createLogger, type Logger } from '../server/log.ts';
import { NbdServer } from '../server/server.ts';
import { parseArgs, type Config } from './args.ts';
import { openServed } from './bitmap-serve.ts';
import { systemdNotifier } from './notify.ts';
import { formatSize, UsageError } from './size.ts';
import { startTrace } from './trace.ts';

/** A failure to start, reported as one line without a stack trace. */
/** Allocations from this size up get their own mmap (a 256 KiB read buffer and up). */
const MMAP_THRESHOLD = 256 * 1024;

class StartError extends Error {
  override name = 'StartError';
}

export async function main(argv: string[]): Promise<number> {
  // `nbd-export bitmap ...` manages bitmaps instead of serving (a file named bitmap is ./bitmap).
  if (argv[0] === 'bitmap') return (await import('./bitmap-command.ts')).bitmapCommand(argv.slice(1));
  let config: Config | null;
  try {
    config = parseArgs(argv);
  } catch (err) {
    return fail(err);
  }
  if (config === null) return 0;
  // Large request buffers go back to the system when freed (see ffi.ts).
  fixMmapThreshold(MMAP_THRESHOLD);
  const log = createLogger(config.logLevel, { format: config.logFormat, trace: config.trace });
  const stopTrace = config.trace ? startTrace(log) : undefined;
  try {
    await run(config, log);
    return 0;
  } catch (err) {
    return fail(err);
  } finally {
    stopTrace?.();
  }
}

function fail(err: unknown): number {
  if (err instanceof UsageError) {
    process.stderr.write(`nbd-export: ${err.message}\nTry 'nbd-export --help' for more information.\n`);
  } else if (err instanceof StartError) {
    process.stderr.write(`nbd-export: ${err.message}\n`);
  } else {
    process.stderr.write(`nbd-export: ${err instanceof Error ? err.message : String(err)}\n`);
  }
  return 1;
}

async function openImage(config: Config, log?: Logger): Promise<BlockNode> {
  const common = {
    readOnly: config.readOnly,
    cache: config.cache,
    discard: config.discard,
    detectZeroes: config.detectZeroes,
    warn: (m: string) => log?.warn(m),
  };
  if (config.image.kind === 'memory') {
    return openBlockNode({ kind: 'memory', size: config.image.size, ...common });
  }
  if (config.image.kind === 'redis') {
    const { target, size } = config.image;
    try {
      return await openBlockNode({ kind: 'redis', target, size, ...common });
    } catch (err) {
      throw new StartError(`cannot open '${config.imageName}': ${err instanceof Error ? err.message : String(err)}`);
    }
  }
  const path = config.image.path;
  try {
    // openServed keeps the qcow2 bitmaps (and their auto-clear bit) up to date while we write.
    return await openBlockNode({ kind: 'file', path, offset: config.offset, format: config.format, snapshot: config.snapshot, keepAutoclear: AUTOCLEAR_BITMAPS, ...common });
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    const reason = err instanceof Error ? err.message : String(err);
    const hint = !config.readOnly && (code === 'EACCES' || code === 'EROFS' || code === 'EPERM') ? ' (use -r/--read-only to serve it read-only)' : '';
    throw new StartError(`cannot open '${path}': ${reason}${hint}`);
  }
}

function uriFor(config: Config, port: number): string {
  const name = encodeURIComponent(config.exportName);
  if (config.socket !== undefined) return `nbd+unix:///${name}?socket=${encodeURIComponent(config.socket)}`;
  const wildcard = config.bind === '0.0.0.0' || config.bind === '::';
  const host = wildcard ? 'localhost' : config.bind.includes(':') ? `[${config.bind}]` : config.bind;
  return `nbd://${host}:${port}/${name}`;
}

/** --metrics: the registry and its HTTP endpoint, started before the image opens (so /readyz says "starting"). */
interface Observability {
  health: Health;
  metrics: NbdMetrics;
  endpoint: MetricsEndpoint;
  close(): Promise<void>;
}

async function startObservability(config: Config, source: MetricsSource, log: Logger): Promise<Observability | undefined> {
  if (config.metrics === undefined) return undefined;
  const { host, port } = config.metrics;
  // Loaded only with --metrics: prom-client costs ~13 MiB of memory once imported.
  const [{ Health }, { startMetricsEndpoint }, { NbdMetrics }] = await Promise.all([
    import('../metrics/health.ts'),
    import('../metrics/http.ts'),
    import('../metrics/metrics.ts'),
  ]);
  const health = new Health().start();
  const metrics = new NbdMetrics(source).start();
  let endpoint: MetricsEndpoint;
  try {
    endpoint = await startMetricsEndpoint({
      host,
      port,
      registry: metrics.registry,
      health,
      onError: (err) => log.error(`metrics endpoint: ${err instanceof Error ? err.message : String(err)}`),
    });
  } catch (err) {
    health.stop();
    metrics.stop();
    const code = (err as NodeJS.ErrnoException).code;
    const reason = code === 'EADDRINUSE' ? 'address already in use' : err instanceof Error ? err.message : String(err);
    throw new StartError(`cannot listen for metrics on ${host.includes(':') ? `[${host}]` : host}:${port}: ${reason}`);
  }
  const { address, port: bound } = endpoint.address;
  log.info(`metrics at http://${address.includes(':') ? `[${address}]` : address}:${bound}/metrics`, { metrics_port: bound });
  return {
    health,
    metrics,
    endpoint,
    async close() {
      await endpoint.close();
      metrics.stop();
      health.stop();
    },
  };
}

async function run(config: Config, log: Logger): Promise<void> {
  const exports = new ExportRegistry();
  const current: { server?: NbdServer } = {};
  const source = serverSource(exports, () => current.server);
  const observability = await startObservability(config, source, log);
  try {
    await serve(config, log, exports, current, observability);
  } finally {
    await observability?.close();
  }
}

/** Open, listen, and serve until stopped; resolves once stopped. */
async function serve(
  config: Config,
  log: Logger,
  exports: ExportRegistry,
  current: { server?: NbdServer },
  observability: Observability | undefined,
): Promise<void> {
  // The image lock, the bitmaps and the marking wrapper come with the node (bitmap-serve.ts).
  const served = await openServed(config, () => openImage(config, log));
  const node = served.node;
  exports.add(
    new Export({
      name: config.exportName,
      description: config.description,
      node,
      readOnly: config.readOnly,
      // DESIGN invariant 2: multi-conn exactly when more than one client may connect.
      multiConn: config.shared !== 1,
      // Context id 1, as qemu-nbd numbers it.
      metaContexts: config.allocationDepth ? [new AllocationDepthContext(node)] : [],
      bitmapContexts: served.contexts,
      bitmapStats: () => served.contexts.map((c) => c.bitmap),
    }),
  );
  const server = new NbdServer({
    exports,
    maxConnections: config.shared,
    persistent: config.persistent,
    handshakeLimitMs: config.handshakeLimitSeconds * 1000,
    loopbackReno: config.loopbackReno,
    log,
    // NBD_EXPORT_NET_SOCKETS=1 keeps net.Socket for every client (see src/server/wire.ts).
    rawSockets: process.env.NBD_EXPORT_NET_SOCKETS !== '1',
  });
  current.server = server;

  let port = config.port;
  try {
    if (config.socket !== undefined) {
      await server.listenUnix(config.socket);
    } else {
      port = (await server.listenTcp(config.bind, config.port)).port;
    }
  } catch (err) {
    await node.close();
    served.release();
    const where = config.socket ?? `${config.bind}:${config.port}`;
    const code = (err as NodeJS.ErrnoException).code;
    const reason = code === 'EADDRINUSE' ? 'address already in use' : err instanceof Error ? err.message : String(err);
    throw new StartError(`cannot listen on ${where}: ${reason}`);
  }

  if (config.pidFile !== undefined) fs.writeFileSync(config.pidFile, `${process.pid}\n`);
  const uri = uriFor(config, port);
  log.info(`serving '${config.imageName}' (${formatSize(node.size)}${config.readOnly ? ', read-only' : ''}) at ${uri}`);
  if (config.printUri) {
    process.stdout.write(`${uri}\n`);
    process.stderr.write(`nbd-export: serving '${config.imageName}' (${formatSize(node.size)}); try: nbdinfo ${uri}\n`);
  }
  // Every listener is bound and every export open.
  observability?.health.setReady();
  const notifier = systemdNotifier(log);
  await notifier?.notify(`READY=1\nSTATUS=serving ${uri}\nMAINPID=${process.pid}`);

  await new Promise<void>((resolve) => {
    let stopping = false;
    const stop = async (why: string) => {
      if (stopping) {
        // A second signal: leave now.
        process.exit(1);
      }
      stopping = true;
      log.info(`stopping: ${why}`);
      observability?.health.setStopping();
      await notifier?.notify(`STOPPING=1\nSTATUS=stopping: ${why}`);
      await server.close(config.shutdownTimeoutSeconds * 1000);
      try {
        await node.close();
      } catch (err) {
        log.error(`closing the image failed: ${err instanceof Error ? err.message : String(err)}`);
      }
      served.release();
      if (config.pidFile !== undefined) fs.rmSync(config.pidFile, { force: true });
      resolve();
    };
    server.on('idle', () => void stop('last client disconnected'));
    process.on('SIGTERM', () => void stop('SIGTERM'));
    process.on('SIGINT', () => void stop('SIGINT'));
  });
}
