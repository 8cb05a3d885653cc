// The command line: qemu-nbd's flags (same letters, same meanings) turned
// into one typed configuration. Every mistake is a UsageError: one line,
// exit status 1, no stack trace.
import yargs from 'yargs';
import { isRedisUrl, parseRedisUrl, type RedisTarget } from '../block/redis-url.ts';
import type { LogFormat, LogLevel } from '../server/log.ts';
import { parseInteger, parseSize, UsageError } from './size.ts';

export type CacheMode = 'none' | 'writeback' | 'writethrough' | 'directsync' | 'unsafe';
export type DiscardMode = 'ignore' | 'unmap';
export type DetectZeroes = 'off' | 'on' | 'unmap';

export type ImageSpec =
  | { kind: 'file'; path: string }
  | { kind: 'memory'; size: number }
  | { kind: 'redis'; target: RedisTarget; size: number | undefined };

export interface Config {
  image: ImageSpec;
  /** The name the user gave, for messages. */
  imageName: string;
  /** undefined: probe (qcow2 by its magic, else raw). */
  format: 'raw' | 'qcow2' | undefined;
  /** -s: serve through a temporary overlay, leaving the image unchanged. */
  snapshot: boolean;
  /** -A: offer the qemu:allocation-depth meta context. */
  allocationDepth: boolean;
  /** -B/--bitmap (repeatable): offer qemu:dirty-bitmap:NAME for each. */
  bitmaps: string[];
  socket: string | undefined;
  bind: string;
  port: number;
  shared: number;
  persistent: boolean;
  readOnly: boolean;
  exportName: string;
  description: string;
  offset: number;
  discard: DiscardMode;
  detectZeroes: DetectZeroes;
  cache: CacheMode;
  pidFile: string | undefined;
  handshakeLimitSeconds: number;
  /** --loopback-reno: see src/server/loopback-tcp.ts. */
  loopbackReno: boolean;
  shutdownTimeoutSeconds: number;
  printUri: boolean;
  logLevel: LogLevel;
  logFormat: LogFormat;
  /** -T: log every request and reply. */
  trace: boolean;
  /** --metrics: where the HTTP endpoint listens. */
  metrics: { host: string; port: number } | undefined;
}

/** --metrics without an address listens on every interface, as exporters do. */
export const DEFAULT_METRICS_HOST = '0.0.0.0';
const LOG_FORMATS: readonly LogFormat[] = ['text', 'json'];

export const DEFAULT_PORT = 10809;

const CACHE_MODES: readonly CacheMode[] = ['none', 'writeback', 'writethrough', 'directsync', 'unsafe'];
// qemu accepts on/off as aliases for unmap/ignore.
const DISCARD_MODES: Record<string, DiscardMode> = { ignore: 'ignore', off: 'ignore', unmap: 'unmap', on: 'unmap' };
const DETECT_ZEROES: readonly DetectZeroes[] = ['off', 'on', 'unmap'];

function choice<T extends string>(value: unknown, what: string, allowed: readonly T[]): T {
  const text = String(value);
  if (!(allowed as readonly string[]).includes(text)) throw new UsageError(`invalid ${what} '${text}' (expected ${allowed.join(', ')})`);
  return text as T;
}

function parser(argv: string[]) {
  return yargs(argv)
    .scriptName('nbd-export')
    .usage('Usage: $0 [OPTIONS] FILENAME\n\nServe FILENAME (a raw or qcow2 disk image or block device, or memory:SIZE for a sparse\nin-memory disk) over NBD. Flags follow qemu-nbd.\nA Redis disk: redis://HOST:PORT/DB?disk=NAME, rediss://,\nredis+unix:///PATH?disk=NAME, redis+cluster://H:P,H:P?disk=NAME\n\nManage dirty bitmaps: $0 bitmap --help')
    .option('bind', { alias: 'b', type: 'string', default: '0.0.0.0', describe: 'address to listen on (IPv4 or IPv6)' })
    .option('port', { alias: 'p', type: 'string', default: String(DEFAULT_PORT), describe: 'TCP port to listen on (0 picks a free one)' })
    .option('socket', { alias: 'k', type: 'string', describe: 'listen on this Unix socket instead of TCP' })
    .option('shared', { alias: 'e', type: 'string', default: '1', describe: 'clients served at once (0 = unlimited); more than 1 advertises multi-conn' })
    .option('persistent', { alias: 't', type: 'boolean', default: false, describe: "don't exit when the last client disconnects" })
    .option('read-only', { alias: 'r', type: 'boolean', default: false, describe: 'export read-only' })
    .option('export-name', { alias: 'x', type: 'string', default: '', describe: 'export name' })
    .option('description', { alias: 'D', type: 'string', default: '', describe: 'export description' })
    .option('format', { alias: 'f', type: 'string', describe: 'image format: raw or qcow2 (default: probe)' })
    .option('snapshot', { alias: 's', type: 'boolean', default: false, describe: 'serve through a temporary overlay; the image is not changed' })
    .option('allocation-depth', { alias: 'A', type: 'boolean', default: false, describe: 'offer the qemu:allocation-depth meta context' })
    // nargs 1: each -B takes one name and never swallows FILENAME.
    .option('bitmap', { alias: 'B', type: 'string', array: true, nargs: 1, describe: 'offer the dirty bitmap NAME as qemu:dirty-bitmap:NAME (repeatable)' })
    .option('offset', { alias: 'o', type: 'string', default: '0', describe: 'bytes to skip at the start of the image' })
    .option('size', { type: 'string', describe: 'create the Redis disk (redis://...?disk=NAME) with SIZE bytes if it does not exist yet' })
    .option('discard', { type: 'string', default: 'ignore', describe: 'trim requests: ignore|unmap' })
    .option('detect-zeroes', { type: 'string', default: 'off', describe: 'turn writes of zeroes into zero requests: off|on|unmap' })
    .option('cache', { type: 'string', default: 'writeback', describe: 'none|writeback|writethrough|directsync|unsafe' })
    .option('nocache', { alias: 'n', type: 'boolean', default: false, describe: 'same as --cache=none' })
    .option('handshake-limit', { type: 'string', default: '10', describe: 'drop clients that have not finished negotiating after SECONDS (0 = never)' })
    .option('loopback-reno', { type: 'boolean', default: true, describe: 'TCP clients on this machine use reno instead of a pacing congestion control (bbr); --no-loopback-reno keeps the system\'s' })
    .option('shutdown-timeout', { type: 'string', default: '5', describe: 'on SIGTERM/SIGINT, wait at most SECONDS for requests in flight' })
    .option('pid-file', { type: 'string', describe: 'write the server pid here; removed at exit' })
    .option('print-uri', { type: 'boolean', default: false, describe: 'print the NBD URI on stdout once listening' })
    .option('verbose', { alias: 'v', type: 'count', describe: 'more log output (-v info, -vv debug)' })
    .option('quiet', { alias: 'q', type: 'boolean', default: false, describe: 'errors only' })
    .option('log-format', { type: 'string', default: 'text', describe: 'log lines as text or json (one object per line)' })
    .option('trace', { alias: 'T', type: 'boolean', default: false, describe: 'log every request and reply' })
    .option('metrics', { type: 'string', describe: 'serve /metrics, /healthz and /readyz over HTTP on [ADDR:]PORT' })
    .strictOptions()
    .parserConfiguration({ 'duplicate-arguments-array': false })
    .version(false)
    .help(false)
    .option('help', { alias: 'h', type: 'boolean', default: false, describe: 'show this help' })
    // No wrapping: yargs (cliui) re-wraps the multi-line usage text across its
    // line breaks and split it mid-word ("Mana" / "ge dirty bitmaps") at 100 and 120 columns.
    .wrap(null)
    .exitProcess(false)
    .fail((msg, err) => {
      throw err ?? new UsageError(msg);
    });
}

/** A Redis disk URL and --size as an image; a mistake in either is a UsageError. */
function redisImage(url: string, sizeFlag: string | undefined): ImageSpec {
  let target: RedisTarget;
  try {
    target = parseRedisUrl(url);
  } catch (err) {
    throw new UsageError(err instanceof Error ? err.message : String(err));
  }
  const size = sizeFlag === undefined ? undefined : parseSize(sizeFlag, '--size');
  if (size !== undefined && target.size !== undefined && size !== target.size) {
    throw new UsageError(`--size ${sizeFlag} and size= in the URL disagree`);
  }
  return { kind: 'redis', target, size: size ?? target.size };
}

/** "[ADDR:]PORT" as --metrics takes it: "9100", "127.0.0.1:9100", "[::1]:9100". */
export function parseListenAddress(text: string, what: string): { host: string; port: number } {
  const m = /^(?:\[([^\]]+)\]:|([^:\[\]]*):)?(\d+)$/.exec(text.trim());
  if (m === null) throw new UsageError(`invalid ${what} '${text}' (expected [ADDR:]PORT, e.g. 9100 or 127.0.0.1:9100 or [::1]:9100)`);
  const host = m[1] ?? (m[2] !== undefined && m[2] !== '' ? m[2] : DEFAULT_METRICS_HOST);
  return { host, port: parseInteger(m[3], `${what} port`, 0, 65535) };
}

/** Parse argv; returns null when --help was printed. */
export function parseArgs(argv: string[]): Config | null {
  const y = parser(argv);
  const args = y.parseSync();
  if (args.help) {
    y.showHelp((s) => process.stdout.write(`${s}\n`));
    return null;
  }

  const positional = args._.map(String);
  if (positional.length === 0) throw new UsageError('missing FILENAME (a raw image, a block device, or memory:SIZE)');
  if (positional.length > 1) throw new UsageError(`unexpected argument '${positional[1]}' (one FILENAME only)`);
  const imageName = positional[0]!;
  const image: ImageSpec = imageName.startsWith('memory:')
    ? { kind: 'memory', size: parseSize(imageName.slice('memory:'.length), 'memory disk size') }
    : isRedisUrl(imageName)
      ? redisImage(imageName, args.size)
      : { kind: 'file', path: imageName };
  if (args.size !== undefined && image.kind !== 'redis') throw new UsageError('--size applies to Redis disks (redis://...?disk=NAME)');

  let format: Config['format'];
  if (args.format !== undefined) {
    if (args.format !== 'raw' && args.format !== 'qcow2') throw new UsageError(`format '${args.format}' is not supported (raw or qcow2)`);
    format = args.format;
  }

  const discard = DISCARD_MODES[String(args.discard)];
  if (discard === undefined) throw new UsageError(`invalid --discard '${args.discard}' (expected ignore or unmap)`);
  const detectZeroes = choice(args['detect-zeroes'], '--detect-zeroes', DETECT_ZEROES);
  // qemu-nbd refuses this combination too: unmapping needs discard.
  if (detectZeroes === 'unmap' && discard !== 'unmap') throw new UsageError('--detect-zeroes=unmap requires --discard=unmap');
  const cache = args.nocache ? 'none' : choice(args.cache, '--cache', CACHE_MODES);

  const socket = args.socket;
  const explicit = (name: string) => argv.some((a) => a === name || a.startsWith(`${name}=`));
  if (socket !== undefined && (explicit('--port') || explicit('-p') || explicit('--bind') || explicit('-b'))) {
    throw new UsageError('--socket cannot be combined with --port or --bind');
  }

  const offset = parseSize(String(args.offset), '--offset');
  if (image.kind === 'memory' && offset !== 0) throw new UsageError('--offset applies to files, not memory disks');
  if (image.kind === 'memory' && args.snapshot) throw new UsageError('--snapshot applies to files, not memory disks');
  if (image.kind === 'redis' && (offset !== 0 || args.snapshot || format === 'qcow2')) {
    throw new UsageError('--offset, --snapshot and -f qcow2 apply to files, not Redis disks');
  }

  return {
    image,
    imageName: image.kind === 'redis' ? image.target.display : imageName,
    format,
    snapshot: args.snapshot,
    allocationDepth: args['allocation-depth'],
    // With duplicate-arguments-array off, yargs keeps every -B/--bitmap under the alias key only.
    bitmaps: ((args as { B?: unknown }).B as string[] | undefined ?? []).map(String),
    socket,
    bind: args.bind,
    port: parseInteger(args.port, '--port', 0, 65535),
    shared: parseInteger(args.shared, '--shared', 0, 2 ** 31 - 1),
    persistent: args.persistent,
    readOnly: args['read-only'],
    exportName: args['export-name'],
    description: args.description,
    offset,
    discard,
    detectZeroes,
    cache,
    pidFile: args['pid-file'],
    handshakeLimitSeconds: parseInteger(args['handshake-limit'], '--handshake-limit', 0, 86400),
    loopbackReno: args['loopback-reno'],
    shutdownTimeoutSeconds: parseInteger(args['shutdown-timeout'], '--shutdown-timeout', 0, 86400),
    printUri: args['print-uri'],
    logLevel: args.quiet ? 'error' : args.verbose >= 2 ? 'debug' : args.verbose === 1 ? 'info' : 'warn',
    logFormat: choice(args['log-format'], '--log-format', LOG_FORMATS),
    trace: args.trace,
    metrics: args.metrics === undefined ? undefined : parseListenAddress(args.metrics, '--metrics'),
  };
}
