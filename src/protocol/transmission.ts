// Transmission-phase codecs ("Request message", "Simple reply message",
// "Structured reply chunk message", "Structured reply types") and the one
// pure function that validates a request ("Request types", "Error values").
import {
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_CACHE,
  NBD_CMD_DISC,
  NBD_CMD_FLAG_DF,
  NBD_CMD_FLAG_FAST_ZERO,
  NBD_CMD_FLAG_FUA,
  NBD_CMD_FLAG_NO_HOLE,
  NBD_CMD_FLAG_REQ_ONE,
  NBD_CMD_FLUSH,
  NBD_CMD_READ,
  NBD_CMD_TRIM,
  NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES,
  NBD_EINVAL,
  NBD_ENOSPC,
  NBD_EPERM,
  NBD_FLAG_READ_ONLY,
  NBD_FLAG_SEND_DF,
  NBD_FLAG_SEND_FAST_ZERO,
  NBD_FLAG_SEND_FUA,
  NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE_BLOCK_STATUS,
  NBD_REPLY_TYPE_ERROR,
  NBD_REPLY_TYPE_ERROR_OFFSET,
  NBD_REPLY_TYPE_NONE,
  NBD_REPLY_TYPE_OFFSET_DATA,
  NBD_REPLY_TYPE_OFFSET_HOLE,
  NBD_REQUEST_MAGIC,
  NBD_SIMPLE_REPLY_MAGIC,
  NBD_STRUCTURED_REPLY_MAGIC,
  NBD_MAX_STRING,
  OFFSET_DATA_HEADER_LENGTH,
  REQUEST_HEADER_LENGTH,
  SIMPLE_REPLY_HEADER_LENGTH,
  STRUCTURED_REPLY_HEADER_LENGTH,
} from './constants.ts';

export interface Request {
  flags: number;
  type: number;
  /** Opaque to the server; echoed in the reply. */
  cookie: bigint;
  /** Byte offset; Infinity when the wire value exceeds 2^53 (always out of range). */
  offset: number;
  length: number;
}

/**
 * Request header; null when the magic is wrong (the caller disconnects).
 *   0  u32 NBD_REQUEST_MAGIC
 *   4  u16 command flags
 *   6  u16 type
 *   8  u64 cookie
 *  16  u64 offset
 *  24  u32 length
 */
export function decodeRequest(buf: Buffer): Request | null {
  if (buf.length < REQUEST_HEADER_LENGTH) throw new RangeError('short request header');
  if (buf.readUInt32BE(0) !== NBD_REQUEST_MAGIC) return null;
  const high = buf.readUInt32BE(16);
  const low = buf.readUInt32BE(20);
  return {
    flags: buf.readUInt16BE(4),
    type: buf.readUInt16BE(6),
    cookie: buf.readBigUInt64BE(8),
    offset: high < 0x200000 ? high * 0x100000000 + low : Infinity,
    length: buf.readUInt32BE(24),
  };
}

/** Flags each command accepts, before negotiation narrows them. */
const COMMAND_FLAGS: ReadonlyMap<number, number> = new Map([
  [NBD_CMD_READ, NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_DF],
  [NBD_CMD_WRITE, NBD_CMD_FLAG_FUA],
  [NBD_CMD_DISC, NBD_CMD_FLAG_FUA],
  [NBD_CMD_FLUSH, NBD_CMD_FLAG_FUA],
  [NBD_CMD_TRIM, NBD_CMD_FLAG_FUA],
  [NBD_CMD_CACHE, NBD_CMD_FLAG_FUA],
  [NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO],
  [NBD_CMD_BLOCK_STATUS, NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_REQ_ONE],
]);

const MODIFYING = new Set([NBD_CMD_WRITE, NBD_CMD_TRIM, NBD_CMD_WRITE_ZEROES]);

export interface ValidationContext {
  size: number;
  /** Transmission flags sent to the client. */
  transmissionFlags: number;
  structuredReplies: boolean;
  /** At least one meta context was selected by SET_META_CONTEXT. */
  metaContexts: boolean;
  minimumBlock: number;
  maximumPayload: number;
}

/**
 * The one check every request passes before anything runs, in spec order:
 * command, flags, read-only, payload size, alignment, range, state.
 * Returns 0 or an NBD errno. Commands the server does not serve (DISC is
 * handled before this) also get EINVAL here.
 */
export function validateRequest(req: Request, ctx: ValidationContext): number {
  const allowedFlags = COMMAND_FLAGS.get(req.type);
  if (allowedFlags === undefined) return NBD_EINVAL;

  let allowed = allowedFlags;
  const tflags = ctx.transmissionFlags;
  // "Command flags": each flag is valid only once its transmission flag was sent.
  if ((tflags & NBD_FLAG_SEND_FUA) === 0) allowed &= ~NBD_CMD_FLAG_FUA;
  if ((tflags & NBD_FLAG_SEND_DF) === 0) allowed &= ~NBD_CMD_FLAG_DF;
  if ((tflags & NBD_FLAG_SEND_FAST_ZERO) === 0) allowed &= ~NBD_CMD_FLAG_FAST_ZERO;
  if ((req.flags & ~allowed) !== 0) return NBD_EINVAL;

  // "Error values": EPERM for a write or trim on a read-only export.
  if (MODIFYING.has(req.type) && (tflags & NBD_FLAG_READ_ONLY) !== 0) return NBD_EPERM;

  // "Size constraints": payloads are bounded (reads too: the server
  // answers them from memory it must allocate).
  if ((req.type === NBD_CMD_WRITE || req.type === NBD_CMD_READ) && req.length > ctx.maximumPayload) return NBD_EINVAL;

  if (req.type === NBD_CMD_FLUSH) {
    // "NBD_CMD_FLUSH": offset and length are reserved and MUST be zero.
    if (req.offset !== 0 || req.length !== 0) return NBD_EINVAL;
  } else if (req.type !== NBD_CMD_DISC) {
    if (ctx.minimumBlock > 1 && (req.offset % ctx.minimumBlock !== 0 || req.length % ctx.minimumBlock !== 0)) {
      return NBD_EINVAL;
    }
    if (req.offset + req.length > ctx.size) {
      // "Error values": ENOSPC for writes past the end, EINVAL otherwise.
      return req.type === NBD_CMD_WRITE || req.type === NBD_CMD_WRITE_ZEROES ? NBD_ENOSPC : NBD_EINVAL;
    }
  }

  if (req.type === NBD_CMD_BLOCK_STATUS && !(ctx.structuredReplies && ctx.metaContexts)) return NBD_EINVAL;
  return 0;
}

const cookieScratch = new DataView(new ArrayBuffer(8));

/**
 * The u64 cookie as two u32 halves through a DataView: half the cost of
 * Buffer.writeBigUInt64BE, which range-checks and shifts BigInts, in a
 * header written for every reply.
 */
function writeCookie(b: Buffer, cookie: bigint, at: number): void {
  cookieScratch.setBigUint64(0, cookie);
  b.writeUInt32BE(cookieScratch.getUint32(0), at);
  b.writeUInt32BE(cookieScratch.getUint32(4), at + 4);
}

/**
 * Simple reply header.
 *   0  u32 NBD_SIMPLE_REPLY_MAGIC
 *   4  u32 error
 *   8  u64 cookie
 */
/** `into` (optional): the SIMPLE_REPLY_HEADER_LENGTH bytes to write it in. */
export function encodeSimpleReply(cookie: bigint, error: number, into?: Buffer): Buffer {
  const b = into ?? Buffer.allocUnsafe(SIMPLE_REPLY_HEADER_LENGTH);
  b.writeUInt32BE(NBD_SIMPLE_REPLY_MAGIC, 0);
  b.writeUInt32BE(error, 4);
  writeCookie(b, cookie, 8);
  return b;
}

/**
 * Structured reply chunk header, written into `b` at `at`.
 *   0  u32 NBD_STRUCTURED_REPLY_MAGIC
 *   4  u16 flags
 *   6  u16 type
 *   8  u64 cookie
 *  16  u32 length of payload
 */
function writeChunkHeader(b: Buffer, at: number, cookie: bigint, flags: number, type: number, length: number): void {
  b.writeUInt32BE(NBD_STRUCTURED_REPLY_MAGIC, at);
  b.writeUInt16BE(flags, at + 4);
  b.writeUInt16BE(type, at + 6);
  writeCookie(b, cookie, at + 8);
  b.writeUInt32BE(length, at + 16);
}

const doneFlag = (done: boolean): number => (done ? NBD_REPLY_FLAG_DONE : 0);

/**
 * A u64 offset (below 2^53, as every offset we serve is) as two u32
 * halves: a third of the cost of a BigInt made and written per reply.
 */
function writeOffset(b: Buffer, offset: number, at: number): void {
  b.writeUInt32BE(Math.floor(offset / 0x100000000), at);
  b.writeUInt32BE(offset >>> 0, at + 4);
}

/** NBD_REPLY_TYPE_NONE: the final chunk with no payload. */
export function encodeChunkNone(cookie: bigint): Buffer {
  const b = Buffer.allocUnsafe(STRUCTURED_REPLY_HEADER_LENGTH);
  writeChunkHeader(b, 0, cookie, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, 0);
  return b;
}

/**
 * NBD_REPLY_TYPE_OFFSET_DATA header: chunk header, then u64 offset; the
 * `dataLength` bytes of data follow in a separate buffer (no copy).
 */
/** `into` (optional): the OFFSET_DATA_HEADER_LENGTH bytes to write it in. */
export function encodeChunkOffsetDataHeader(cookie: bigint, done: boolean, offset: number, dataLength: number, into?: Buffer): Buffer {
  const b = into ?? Buffer.allocUnsafe(OFFSET_DATA_HEADER_LENGTH);
  writeChunkHeader(b, 0, cookie, doneFlag(done), NBD_REPLY_TYPE_OFFSET_DATA, 8 + dataLength);
  writeOffset(b, offset, STRUCTURED_REPLY_HEADER_LENGTH);
  return b;
}

/** NBD_REPLY_TYPE_OFFSET_HOLE: u64 offset, u32 hole size. */
export function encodeChunkOffsetHole(cookie: bigint, done: boolean, offset: number, length: number): Buffer {
  const b = Buffer.allocUnsafe(STRUCTURED_REPLY_HEADER_LENGTH + 12);
  writeChunkHeader(b, 0, cookie, doneFlag(done), NBD_REPLY_TYPE_OFFSET_HOLE, 12);
  writeOffset(b, offset, STRUCTURED_REPLY_HEADER_LENGTH);
  b.writeUInt32BE(length, STRUCTURED_REPLY_HEADER_LENGTH + 8);
  return b;
}

export interface Descriptor {
  length: number;
  flags: number;
}

/**
 * NBD_REPLY_TYPE_BLOCK_STATUS: u32 context id, then per descriptor u32
 * length and u32 status flags.
 */
export function encodeChunkBlockStatus(cookie: bigint, done: boolean, contextId: number, descriptors: readonly Descriptor[]): Buffer {
  const payload = 4 + 8 * descriptors.length;
  const b = Buffer.allocUnsafe(STRUCTURED_REPLY_HEADER_LENGTH + payload);
  writeChunkHeader(b, 0, cookie, doneFlag(done), NBD_REPLY_TYPE_BLOCK_STATUS, payload);
  let at = STRUCTURED_REPLY_HEADER_LENGTH;
  b.writeUInt32BE(contextId, at);
  at += 4;
  for (const d of descriptors) {
    b.writeUInt32BE(d.length, at);
    b.writeUInt32BE(d.flags, at + 4);
    at += 8;
  }
  return b;
}

/**
 * NBD_REPLY_TYPE_ERROR: u32 error, u16 message length, message.
 * NBD_REPLY_TYPE_ERROR_OFFSET adds u64 offset after the message.
 */
export function encodeChunkError(cookie: bigint, done: boolean, error: number, message = '', offset?: number): Buffer {
  const text = truncateUtf8(message, NBD_MAX_STRING);
  const payload = 6 + text.length + (offset === undefined ? 0 : 8);
  const b = Buffer.allocUnsafe(STRUCTURED_REPLY_HEADER_LENGTH + payload);
  const type = offset === undefined ? NBD_REPLY_TYPE_ERROR : NBD_REPLY_TYPE_ERROR_OFFSET;
  writeChunkHeader(b, 0, cookie, doneFlag(done), type, payload);
  let at = STRUCTURED_REPLY_HEADER_LENGTH;
  b.writeUInt32BE(error, at);
  b.writeUInt16BE(text.length, at + 4);
  text.copy(b, at + 6);
  at += 6 + text.length;
  if (offset !== undefined) writeOffset(b, offset, at);
  return b;
}

/**
 * The UTF-8 bytes of `text`, cut to at most `max` bytes on a character
 * boundary: a string on the wire is valid UTF-8 of at most 4096 bytes
 * ("Conventions").
 */
export function truncateUtf8(text: string, max: number): Buffer {
  const bytes = Buffer.from(text, 'utf8');
  if (bytes.length <= max) return bytes;
  let end = max;
  while (end > 0 && (bytes[end]! & 0xc0) === 0x80) end--; // a continuation byte
  return bytes.subarray(0, end);
}
