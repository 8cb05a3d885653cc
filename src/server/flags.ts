// Transmission flags are computed here and nowhere else ("Transmission flags").
import {
  NBD_FLAG_CAN_MULTI_CONN,
  NBD_FLAG_HAS_FLAGS,
  NBD_FLAG_READ_ONLY,
  NBD_FLAG_SEND_CACHE,
  NBD_FLAG_SEND_DF,
  NBD_FLAG_SEND_FAST_ZERO,
  NBD_FLAG_SEND_FLUSH,
  NBD_FLAG_SEND_FUA,
  NBD_FLAG_SEND_TRIM,
  NBD_FLAG_SEND_WRITE_ZEROES,
} from '../protocol/constants.ts';
import * as C from '../protocol/constants.ts';
import type { Export } from '../exports/export.ts';

export interface FlagInputs {
  readOnly: boolean;
  multiConn: boolean;
  structuredReplies: boolean;
}

export function transmissionFlags({ readOnly, multiConn, structuredReplies }: FlagInputs): number {
  let flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_CACHE;
  if (readOnly) {
    flags |= NBD_FLAG_READ_ONLY;
  } else {
    flags |= NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_FAST_ZERO;
  }
  // "NBD_FLAG_SEND_DF": only when structured replies were negotiated.
  if (structuredReplies) flags |= NBD_FLAG_SEND_DF;
  // DESIGN invariant 2: one shared node and no per-client cache, so
  // multi-conn is honest whenever more than one client may connect.
  if (multiConn) flags |= NBD_FLAG_CAN_MULTI_CONN;
  return flags;
}

export function exportFlags(exp: Export, structuredReplies: boolean): number {
  return transmissionFlags({ readOnly: exp.readOnly, multiConn: exp.multiConn, structuredReplies });
}

/** The handshake flags share the transmission flags' low bits; checked against constants.ts by tsc. */
const HANDSHAKE_FLAG_KEYS: ReadonlySet<keyof typeof C> = new Set<keyof typeof C>(['NBD_FLAG_FIXED_NEWSTYLE', 'NBD_FLAG_NO_ZEROES']);

/** Transmission flag names by value, derived from constants.ts (not NBD_FLAG_C_*, not handshake flags). */
const TRANSMISSION_FLAG_NAMES: ReadonlyMap<number, string> = (() => {
  const names = new Map<number, string>();
  for (const [key, value] of Object.entries(C)) {
    if (!key.startsWith('NBD_FLAG_') || key.startsWith('NBD_FLAG_C_') || typeof value !== 'number') continue;
    if (HANDSHAKE_FLAG_KEYS.has(key as keyof typeof C)) continue;
    names.set(value, key.slice('NBD_FLAG_'.length));
  }
  return names;
})();

/** Names of the transmission flags set in `flags`, for the log: "HAS_FLAGS", "SEND_FLUSH"... */
export function transmissionFlagNames(flags: number): string[] {
  const out: string[] = [];
  for (let bit = 0; bit < 16; bit++) {
    const value = 1 << bit;
    if ((flags & value) !== 0) out.push(TRANSMISSION_FLAG_NAMES.get(value) ?? `bit${bit}`);
  }
  return out;
}
