// A small leveled logger to stderr. Levels: error < warn < info < debug.
// The CLI picks the level (-v / -q); protocol code never logs by itself.

export type LogLevel = 'error' | 'warn' | 'info' | 'debug';
const ORDER: Record<LogLevel, number> = { error: 0, warn: 1, info: 2, debug: 3 };

export interface Logger {
  error(message: string): void;
  warn(message: string): void;
  info(message: string): void;
  debug(message: string): void;
}

export function createLogger(level: LogLevel, prefix = 'nbd-export', write: (line: string) => void = (l) => process.stderr.write(l)): Logger {
  const at = ORDER[level];
  const emit = (lvl: LogLevel) => (message: string) => {
    if (ORDER[lvl] <= at) write(`${prefix}: ${lvl === 'info' ? '' : `${lvl}: `}${message}\n`);
  };
  return { error: emit('error'), warn: emit('warn'), info: emit('info'), debug: emit('debug') };
}

export const silentLogger: Logger = { error() {}, warn() {}, info() {}, debug() {} };
