// Log names derived from constants.ts, so no name is typed twice.
import * as C from './constants.ts';

function namer(prefix: string, exclude: readonly string[] = []): (value: number) => string {
  const table = new Map<number, string>();
  for (const [key, value] of Object.entries(C)) {
    if (!key.startsWith(prefix) || typeof value !== 'number') continue;
    if (exclude.some((e) => key.startsWith(e))) continue;
    if (!table.has(value)) table.set(value, key);
  }
  return (value) => table.get(value) ?? `${prefix}${value}`;
}

export const optionName = namer('NBD_OPT_', ['NBD_OPT_REPLY_MAGIC']);
export const replyTypeName = namer('NBD_REP_');
export const commandName = namer('NBD_CMD_', ['NBD_CMD_FLAG_']);
export const errorName = namer('NBD_E');
export const infoName = namer('NBD_INFO_');
export const chunkTypeName = namer('NBD_REPLY_TYPE_');

/** Lower-case command name as used in metrics and logs: "write_zeroes". */
export function commandLabel(type: number): string {
  return commandName(type).replace(/^NBD_CMD_/, '').toLowerCase();
}

/** Errno name without the prefix: "EINVAL"; "ok" for 0. */
export function errorLabel(error: number): string {
  return error === 0 ? 'ok' : errorName(error).replace(/^NBD_/, '');
}
