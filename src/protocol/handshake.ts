// Handshake-phase codecs ("Fixed newstyle negotiation", "Option types",
// "Option reply types"). Pure functions over Buffers.
import {
  EXPORT_NAME_ZEROES,
  GREETING_LENGTH,
  IHAVEOPT,
  NBDMAGIC,
  NBD_FLAG_C_FIXED_NEWSTYLE,
  NBD_FLAG_C_NO_ZEROES,
  NBD_FLAG_NO_ZEROES,
  NBD_INFO_BLOCK_SIZE,
  NBD_INFO_DESCRIPTION,
  NBD_INFO_EXPORT,
  NBD_INFO_NAME,
  NBD_OPT_REPLY_MAGIC,
  OPTION_HEADER_LENGTH,
  OPTION_REPLY_HEADER_LENGTH,
} from './constants.ts';

/**
 * Server greeting.
 *   0  u64 NBDMAGIC
 *   8  u64 IHAVEOPT
 *  16  u16 handshake flags
 */
export function encodeGreeting(handshakeFlags: number): Buffer {
  const b = Buffer.allocUnsafe(GREETING_LENGTH);
  b.writeBigUInt64BE(NBDMAGIC, 0);
  b.writeBigUInt64BE(IHAVEOPT, 8);
  b.writeUInt16BE(handshakeFlags, 16);
  return b;
}

export const CLIENT_FLAGS_LENGTH = 4;

export interface ClientFlags {
  fixedNewstyle: boolean;
  noZeroes: boolean;
}

/**
 * Client flags (u32). Unknown bits, or NO_ZEROES when the server did not
 * offer it, are a reason to drop the connection ("Client flags"): null.
 */
export function decodeClientFlags(buf: Buffer, serverFlags: number): ClientFlags | null {
  const flags = buf.readUInt32BE(0);
  const known = NBD_FLAG_C_FIXED_NEWSTYLE | ((serverFlags & NBD_FLAG_NO_ZEROES) !== 0 ? NBD_FLAG_C_NO_ZEROES : 0);
  if ((flags & ~known) !== 0) return null;
  return {
    fixedNewstyle: (flags & NBD_FLAG_C_FIXED_NEWSTYLE) !== 0,
    noZeroes: (flags & NBD_FLAG_C_NO_ZEROES) !== 0,
  };
}

export interface OptionHeader {
  option: number;
  length: number;
}

/**
 * Option request header; null when the magic is wrong.
 *   0  u64 IHAVEOPT
 *   8  u32 option
 *  12  u32 length of data that follows
 */
export function decodeOptionHeader(buf: Buffer): OptionHeader | null {
  if (buf.length < OPTION_HEADER_LENGTH) throw new RangeError('short option header');
  if (buf.readBigUInt64BE(0) !== IHAVEOPT) return null;
  return { option: buf.readUInt32BE(8), length: buf.readUInt32BE(12) };
}

/**
 * Option reply.
 *   0  u64 NBD_OPT_REPLY_MAGIC
 *   8  u32 option being answered
 *  12  u32 reply type
 *  16  u32 length of data
 *  20  data
 */
export function encodeOptionReply(option: number, type: number, data?: Buffer): Buffer {
  const length = data?.length ?? 0;
  const b = Buffer.allocUnsafe(OPTION_REPLY_HEADER_LENGTH + length);
  b.writeBigUInt64BE(NBD_OPT_REPLY_MAGIC, 0);
  b.writeUInt32BE(option >>> 0, 8);
  b.writeUInt32BE(type >>> 0, 12);
  b.writeUInt32BE(length, 16);
  data?.copy(b, OPTION_REPLY_HEADER_LENGTH);
  return b;
}

/** NBD_REP_SERVER data: u32 name length, name, description (rest). */
export function encodeServerEntry(name: string, description: string): Buffer {
  const n = Buffer.from(name, 'utf8');
  const d = Buffer.from(description, 'utf8');
  const b = Buffer.allocUnsafe(4 + n.length + d.length);
  b.writeUInt32BE(n.length, 0);
  n.copy(b, 4);
  d.copy(b, 4 + n.length);
  return b;
}

/**
 * NBD_INFO_EXPORT: u16 type, u64 size, u16 transmission flags (length 12).
 */
export function encodeInfoExport(size: number, transmissionFlags: number): Buffer {
  const b = Buffer.allocUnsafe(12);
  b.writeUInt16BE(NBD_INFO_EXPORT, 0);
  b.writeBigUInt64BE(BigInt(size), 2);
  b.writeUInt16BE(transmissionFlags, 10);
  return b;
}

/** NBD_INFO_NAME / NBD_INFO_DESCRIPTION: u16 type, string. */
export function encodeInfoString(type: typeof NBD_INFO_NAME | typeof NBD_INFO_DESCRIPTION, text: string): Buffer {
  const s = Buffer.from(text, 'utf8');
  const b = Buffer.allocUnsafe(2 + s.length);
  b.writeUInt16BE(type, 0);
  s.copy(b, 2);
  return b;
}

/** NBD_INFO_BLOCK_SIZE: u16 type, u32 minimum, u32 preferred, u32 maximum payload. */
export function encodeInfoBlockSize(minimum: number, preferred: number, maximum: number): Buffer {
  const b = Buffer.allocUnsafe(14);
  b.writeUInt16BE(NBD_INFO_BLOCK_SIZE, 0);
  b.writeUInt32BE(minimum, 2);
  b.writeUInt32BE(preferred, 6);
  b.writeUInt32BE(maximum, 10);
  return b;
}

/** NBD_REP_META_CONTEXT data: u32 context id, name. */
export function encodeMetaContextReply(id: number, name: string): Buffer {
  const s = Buffer.from(name, 'utf8');
  const b = Buffer.allocUnsafe(4 + s.length);
  b.writeUInt32BE(id, 0);
  s.copy(b, 4);
  return b;
}

/**
 * Reply to NBD_OPT_EXPORT_NAME: u64 size, u16 transmission flags, then 124
 * zero bytes unless the client set NBD_FLAG_C_NO_ZEROES.
 */
export function encodeExportNameReply(size: number, transmissionFlags: number, noZeroes: boolean): Buffer {
  const b = Buffer.alloc(10 + (noZeroes ? 0 : EXPORT_NAME_ZEROES));
  b.writeBigUInt64BE(BigInt(size), 0);
  b.writeUInt16BE(transmissionFlags, 8);
  return b;
}
