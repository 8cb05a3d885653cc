// The one place an errno from storage becomes an NBD error ("Error values").
// The caller logs the real error first; only the mapped value goes on the wire.
import {
  NBD_CMD_FLAG_DF,
  NBD_CMD_FLAG_FAST_ZERO,
  NBD_EINVAL,
  NBD_EIO,
  NBD_ENOMEM,
  NBD_ENOSPC,
  NBD_ENOTSUP,
  NBD_EOVERFLOW,
  NBD_EPERM,
  NBD_ESHUTDOWN,
} from '../protocol/constants.ts';

const ERRNO_TO_NBD: Readonly<Record<string, number>> = {
  EPERM: NBD_EPERM,
  EACCES: NBD_EPERM,
  EROFS: NBD_EPERM, // "Error values": a write to a read-only export is EPERM
  EIO: NBD_EIO,
  ENOMEM: NBD_ENOMEM,
  EINVAL: NBD_EINVAL,
  ENOSPC: NBD_ENOSPC,
  EDQUOT: NBD_ENOSPC, // "Error values": SHOULD map EDQUOT and EFBIG to ENOSPC
  EFBIG: NBD_ENOSPC,
  EOVERFLOW: NBD_EOVERFLOW,
  ENOTSUP: NBD_ENOTSUP,
  EOPNOTSUPP: NBD_ENOTSUP,
  ESHUTDOWN: NBD_ESHUTDOWN,
};

/**
 * errno name (from a BlockError or a Node system error) to NBD error; EIO
 * when unknown. The request's flags count ("Error values"): ENOTSUP is only
 * for a FAST_ZERO write-zeroes and EOVERFLOW only for a DF read; elsewhere
 * they become EINVAL.
 */
export function nbdErrorFromErrno(code: string | undefined, commandFlags = 0): number {
  const error = (code !== undefined ? ERRNO_TO_NBD[code] : undefined) ?? NBD_EIO;
  if (error === NBD_ENOTSUP && (commandFlags & NBD_CMD_FLAG_FAST_ZERO) === 0) return NBD_EINVAL;
  if (error === NBD_EOVERFLOW && (commandFlags & NBD_CMD_FLAG_DF) === 0) return NBD_EINVAL;
  return error;
}

export function errnoOf(err: unknown): string | undefined {
  if (typeof err === 'object' && err !== null && 'code' in err && typeof err.code === 'string') return err.code;
  return undefined;
}
