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
