// A small leveled logger to stderr. Levels: error < warn < info < debug;
// trace lines (-T: every request and reply) are on or off by themselves.
// The CLI picks the level (-v / -q) and the format; protocol code never
// logs by itself.
//
// Text: "nbd-export: [LEVEL: ][conn N: ]message", fields other than conn
// are left out (the message says what matters). JSON: one object per line,
// {"time","level","msg", ...fields}, e.g. {"conn":3,"export":"","errno":"EIO"}.

export type LogLevel = 'error' | 'warn' | 'info' | 'debug';
export type LogFormat = 'text' | 'json';
const ORDER: Record<LogLevel, number> = { error: 0, warn: 1, info: 2, debug: 3 };

/** Structured details of a line; `conn` is the connection id. */
export type LogFields = Record<string, unknown>;

export interface Logger {
  error(message: string, fields?: LogFields): void;
  warn(message: string, fields?: LogFields): void;
  info(message: string, fields?: LogFields): void;
  debug(message: string, fields?: LogFields): void;
  /** -T lines; ignored unless tracing is on. */
  trace(message: string, fields?: LogFields): void;
  /** True when info lines are written (to skip building per-connection lines). */
  readonly infoEnabled: boolean;
  /** True when debug lines are written (to skip building them). */
  readonly debugEnabled: boolean;
  readonly traceEnabled: boolean;
}

export interface LoggerOptions {
  prefix?: string;
  format?: LogFormat;
  trace?: boolean;
  write?: (line: string) => void;
  /** For tests: the time written in JSON lines. */
  now?: () => Date;
}

export function createLogger(level: LogLevel, opts: LoggerOptions = {}): Logger {
  const { prefix = 'nbd-export', format = 'text', trace = false } = opts;
  const write = opts.write ?? ((l: string) => process.stderr.write(l));
  const now = opts.now ?? (() => new Date());
  const at = ORDER[level];
  const line =
    format === 'json'
      ? (lvl: string, message: string, fields?: LogFields) =>
          `${JSON.stringify({ time: now().toISOString(), level: lvl, msg: message, ...fields }, jsonValue)}\n`
      : (lvl: string, message: string, fields?: LogFields) => {
          const conn = fields?.conn;
          return `${prefix}: ${lvl === 'info' ? '' : `${lvl}: `}${conn !== undefined ? `conn ${String(conn)}: ` : ''}${message}\n`;
        };
  const emit = (lvl: LogLevel) => (message: string, fields?: LogFields) => {
    if (ORDER[lvl] <= at) write(line(lvl, message, fields));
  };
  return {
    error: emit('error'),
    warn: emit('warn'),
    info: emit('info'),
    debug: emit('debug'),
    trace: trace ? (message, fields) => write(line('trace', message, fields)) : () => {},
    infoEnabled: at >= ORDER.info,
    debugEnabled: at >= ORDER.debug,
    traceEnabled: trace,
  };
}

/** JSON has no bigint: cookies and the like are written as decimal strings. */
function jsonValue(_key: string, value: unknown): unknown {
  return typeof value === 'bigint' ? value.toString() : value;
}

export const silentLogger: Logger = {
  error() {},
  warn() {},
  info() {},
  debug() {},
  trace() {},
  infoEnabled: false,
  debugEnabled: false,
  traceEnabled: false,
};
