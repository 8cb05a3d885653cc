// Test-only helpers for codec tests (STYLE habit 13): hex literals, and
// feeding bytes through a ByteQueue split at every possible boundary.
// Not imported by production code.
import { ByteQueue } from './byte-queue.ts';

/** Bytes from hex written with spaces, newlines and `|` for readability. */
export function hex(text: string): Buffer {
  const clean = text.replace(/[\s|]/g, '');
  if (!/^(?:[0-9a-fA-F]{2})*$/.test(clean)) throw new Error(`bad hex literal: ${text}`);
  return Buffer.from(clean, 'hex');
}

/** The buffer as lower-case hex, for assertions that print readably. */
export function toHex(buf: Buffer): string {
  return buf.toString('hex');
}

/**
 * Every way to cut `bytes` into two or three chunks (and one chunk per
 * byte, and the whole in one chunk): each split as its list of chunks.
 * Chunks are fresh copies, so a decoder cannot rely on sharing one buffer.
 */
export function* splits(bytes: Buffer): Generator<Buffer[]> {
  const n = bytes.length;
  const copy = (a: number, b: number): Buffer => Buffer.from(bytes.subarray(a, b));
  yield [copy(0, n)];
  for (let i = 1; i < n; i++) {
    yield [copy(0, i), copy(i, n)];
    for (let j = i + 1; j < n; j++) yield [copy(0, i), copy(i, j), copy(j, n)];
  }
  if (n > 1) yield Array.from({ length: n }, (_, k) => copy(k, k + 1));
}

/** A ByteQueue holding `chunks`, pushed one by one. */
export function queueOf(chunks: readonly Buffer[]): ByteQueue {
  const q = new ByteQueue();
  for (const c of chunks) q.push(c);
  return q;
}

/**
 * Run `decode` on `bytes` after pushing them through a ByteQueue under
 * every split, taking the whole message back out; returns each result.
 */
export function decodeAtEverySplit<T>(bytes: Buffer, decode: (buf: Buffer) => T): T[] {
  const out: T[] = [];
  for (const chunks of splits(bytes)) {
    const q = queueOf(chunks);
    const whole = q.take(bytes.length);
    if (q.length !== 0) throw new Error('queue not emptied');
    out.push(decode(whole));
  }
  return out;
}

/**
 * Request header encoded by hand ("Request message"), independent of the
 * code under test.
 *   0  u32 NBD_REQUEST_MAGIC 0x25609513
 *   4  u16 flags
 *   6  u16 type
 *   8  u64 cookie
 *  16  u64 offset
 *  24  u32 length
 */
export function requestBytes(r: { flags?: number; type: number; cookie: bigint; offset: bigint | number; length: number }): Buffer {
  const b = Buffer.alloc(28);
  b.writeUInt32BE(0x25609513, 0);
  b.writeUInt16BE(r.flags ?? 0, 4);
  b.writeUInt16BE(r.type, 6);
  b.writeBigUInt64BE(r.cookie, 8);
  b.writeBigUInt64BE(BigInt(r.offset), 16);
  b.writeUInt32BE(r.length, 24);
  return b;
}

/** u32 big-endian. */
export function u32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n >>> 0, 0);
  return b;
}

/** u16 big-endian. */
export function u16(n: number): Buffer {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(n, 0);
  return b;
}

/** A length-prefixed (u32) string field. */
export function lstr(text: string | Buffer): Buffer {
  const s = typeof text === 'string' ? Buffer.from(text, 'utf8') : text;
  return Buffer.concat([u32(s.length), s]);
}
