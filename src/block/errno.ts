// errno numbers, names and messages, and the one conversion of a thrown
// system error into a BlockError.
import os from 'node:os';
import util from 'node:util';
import { BlockError } from './types.ts';

let names: Map<number, string> | undefined;

/** The errno name for a positive errno number ('EIO' when unknown). */
export function errnoName(errno: number): string {
  if (names === undefined) {
    names = new Map();
    for (const [name, value] of Object.entries(os.constants.errno)) {
      // ENOTSUP and EOPNOTSUPP share a number on Linux; keep the POSIX name
      // for "operation not supported", the one callers test for.
      if (!names.has(value) || name === 'ENOTSUP') names.set(value, name);
    }
  }
  return names.get(errno) ?? 'EIO';
}

/** A strerror-like sentence for an errno name ("No such file or directory"). */
export function errnoMessage(name: string): string {
  // libuv words this one for sockets; strerror() does not.
  if (isNotSupported(name)) return 'Operation not supported';
  const value = (os.constants.errno as Record<string, number | undefined>)[name];
  const entry = value === undefined ? undefined : util.getSystemErrorMap().get(-value);
  const text = entry?.[1] ?? name;
  return text.charAt(0).toUpperCase() + text.slice(1);
}

/** True for both spellings of "operation not supported". */
export function isNotSupported(code: string): boolean {
  return code === 'ENOTSUP' || code === 'EOPNOTSUPP';
}

/**
 * Any thrown value as a BlockError: a BlockError as is, a Node system
 * error by its code, anything else as EIO. `what` prefixes the message.
 */
export function toBlockError(err: unknown, what?: string): BlockError {
  if (err instanceof BlockError) return err;
  const code = (err as NodeJS.ErrnoException | null)?.code;
  const name = typeof code === 'string' && /^E[A-Z0-9]+$/.test(code) ? code : 'EIO';
  const message = name === 'EIO' && typeof code !== 'string' && err instanceof Error ? err.message : errnoMessage(name);
  return new BlockError(name, what === undefined ? message : `${what}: ${message}`);
}
