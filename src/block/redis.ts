// A disk kept in Redis (standalone, over TCP, TLS or a Unix socket, or a
// Redis Cluster), shared by any number of nbd-export processes.
//
// Keys of disk NAME (G = chunk index div chunks-per-group):
//
//   nbd:{NAME}:meta        hash: format, version, size, chunk, group
//   nbd:{NAME:G}:alloc     bitmap: bit i set when chunk G*group+i is allocated
//   nbd:{NAME:G}:INDEX     string: the bytes of chunk INDEX (absolute), possibly
//                          shorter than a chunk; what is missing reads as zeroes
//   nbd:{NAME:G}:sync      counter bumped by FLUSH/FUA before WAIT (only with wait=/waitaof=)
//   nbd:{NAME:G}:bm:ID     dirty bitmap bits, and nbd:{NAME}:marks (or a copy per
//                          cluster slot) the enabled bitmaps: see redis-bitmaps.ts
//
// The hash tag {NAME:G} puts a group's chunks and its allocation bitmap in
// one cluster slot, so every change to a chunk and its allocation bit is one
// Lua script, atomic on the Redis side: partial-chunk writes are SETRANGE,
// never a read-modify-write from here. A chunk key exists only while its
// bit is set (a set bit without a key is an allocated chunk of zeroes), so
// block status reads one small bitmap per group, never the chunk keys.
//
// Nothing is cached here: every read goes to Redis, so a write acknowledged
// by any process is seen by every later read through any process. Commands
// are pipelined (sent without waiting for earlier replies; on a standalone
// Redis also auto-pipelined, one write per event-loop tick).
//
// Faults: every call is bounded by the URL's timeout and fails with EIO
// (ENOSPC for Redis's OOM refusal); commands are never queued while the
// connection is down nor resent after it comes back (a request that failed
// may or may not have been applied, as with any disk: one that timed out
// while Redis had it may still land later); the client reconnects by itself
// and service resumes. Huge zeroing runs in steps, each bounded by the
// timeout, so a dead Redis fails it in time but a slow one does not.
import fs from 'node:fs';
import tls from 'node:tls';
import { Cluster, Redis } from 'ioredis';
import type { ClusterOptions, RedisOptions } from 'ioredis';
import { errnoMessage } from './errno.ts';
import { DATA, ExtentCollector, HOLE } from './extents.ts';
import { bitsPrefix, RedisBitmaps } from './redis-bitmaps.ts';
import { keySlot, runScript, script, type Arg, type Client } from './redis-lua.ts';
import { checkChunkSize, describeTarget, type RedisTarget } from './redis-url.ts';

export { keySlot };
import type { BlockCapabilities, BlockNode, Extent, WriteOptions, ZeroOptions } from './types.ts';
import { BlockError } from './types.ts';

export const REDIS_FORMAT = 'nbd-export-redis';
export const REDIS_FORMAT_VERSION = 1;
export const DEFAULT_REDIS_CHUNK = 64 * 1024;
export const DEFAULT_REDIS_GROUP = 256;
/** At most this many groups' bitmaps are read by one extents() call (16 GiB of disk at the defaults). */
const MAX_EXTENT_GROUPS = 1024;
/** Groups whose bitmaps extents() reads at once. */
const GROUP_BATCH = 128;
/**
 * Chunks in one step of whole-chunk zeroing (2 GiB at the default chunk
 * size): one round of bitmap reads, then the scripts dropping what is
 * allocated, all within one timeout.
 */
const SLICE_CHUNKS = 32768;
/** And at most this many groups (bitmap reads) per step, for disks with small groups. */
const SLICE_GROUPS = 1024;
/** Chunk keys per zeroing script call. */
const KEYS_PER_SCRIPT = 1024;
/** Bitmaps per MGET (standalone Redis): at most 8 MiB at the largest group. */
const MGET_KEYS = 1024;

export interface RedisNodeOptions {
  target: RedisTarget;
  /** Create the disk with this size when it does not exist (from --size or size=). */
  size?: number;
  readOnly?: boolean;
  /** Told about lost and restored connections (the CLI logs them). */
  warn?: (message: string) => void;
}

/** Create the metadata unless it exists; answer [created, HGETALL]. */
const META = script(`
if ARGV[1] ~= '' and redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'format', ARGV[4], 'version', ARGV[5], 'size', ARGV[1], 'chunk', ARGV[2], 'group', ARGV[3])
  return {1, redis.call('HGETALL', KEYS[1])}
end
return {0, redis.call('HGETALL', KEYS[1])}
`);

/**
 * Dirty-bitmap marking, shared by every script that changes data: the
 * group's marks hash (KEYS[2]: bitmap id -> granularity, the enabled
 * bitmaps only) is read by the script itself, so enabling, disabling or a
 * checkpoint by any process applies to the very next write of every
 * process, and the bits are set in the same atomic step as the data (see
 * redis-bitmaps.ts). ARGV[1] is the prefix of the group's bit keys
 * (PREFIX..id), ARGV[2] the chunk size. Bit k of a group's key is the
 * k-th granule of the group (Redis's bit order); a granularity divides
 * the group's bytes, so no granule spans two groups.
 */
const MARK_LUA = `
local marks = {}
do
  local flat = redis.call('HGETALL', KEYS[2])
  for i = 1, #flat, 2 do marks[#marks + 1] = {ARGV[1] .. flat[i], tonumber(flat[i + 1])} end
end
local function mark(lo, hi)
  for _, m in ipairs(marks) do
    local b, last = math.floor(lo / m[2]), math.floor((hi - 1) / m[2])
    while b <= last and b % 8 ~= 0 do redis.call('SETBIT', m[1], b, 1); b = b + 1 end
    local bytes = math.floor((last + 1 - b) / 8)
    if bytes > 0 then
      redis.call('SETRANGE', m[1], math.floor(b / 8), string.rep('\\255', bytes))
      b = b + bytes * 8
    end
    while b <= last do redis.call('SETBIT', m[1], b, 1); b = b + 1 end
  end
end
local cs = tonumber(ARGV[2])
`;

/** KEYS[1] allocation bitmap, KEYS[2] marks, KEYS[3..] chunks; ARGV[3..] per chunk: bit, offset in chunk, bytes. */
const WRITE = script(`${MARK_LUA}
for i = 3, #KEYS do
  local j = (i - 3) * 3 + 2
  local bit, at, data = tonumber(ARGV[j + 1]), tonumber(ARGV[j + 2]), ARGV[j + 3]
  if #marks > 0 then mark(bit * cs + at, bit * cs + at + #data) end
  redis.call('SETRANGE', KEYS[i], at, data)
  redis.call('SETBIT', KEYS[1], bit, 1)
end
return 0
`);

/**
 * Zero part of chunks. KEYS as WRITE; ARGV[3] '1' keeps the allocation;
 * then per chunk: bit, offset in chunk, length. Without keep, a chunk left
 * all zeroes is dropped and its bit cleared.
 */
const ZERO_PART = script(`${MARK_LUA}
local keep = ARGV[3] == '1'
for i = 3, #KEYS do
  local j = (i - 3) * 3 + 3
  local key, bit, at, n = KEYS[i], tonumber(ARGV[j + 1]), tonumber(ARGV[j + 2]), tonumber(ARGV[j + 3])
  if #marks > 0 then mark(bit * cs + at, bit * cs + at + n) end
  local len = redis.call('STRLEN', key)
  if at < len then
    redis.call('SETRANGE', key, at, string.rep('\\0', math.min(n, len - at)))
  end
  if not keep and (len == 0 or (at < len and redis.call('BITCOUNT', key) == 0)) then
    redis.call('DEL', key)
    if redis.call('GETBIT', KEYS[1], bit) == 1 then redis.call('SETBIT', KEYS[1], bit, 0) end
  end
end
if redis.call('BITCOUNT', KEYS[1]) == 0 then redis.call('DEL', KEYS[1]) end
return 0
`);

/**
 * Drop whole chunks. KEYS as WRITE (possibly no chunk: marking only);
 * ARGV[3] '1' keeps the allocation bits (the chunks then read as zeroes
 * but stay allocated); ARGV[4], ARGV[5] the bytes of the group zeroed
 * (marked); then one bit per chunk.
 */
const ZERO_WHOLE = script(`${MARK_LUA}
local keep = ARGV[3] == '1'
if #marks > 0 then mark(tonumber(ARGV[4]), tonumber(ARGV[5])) end
for i = 3, #KEYS do
  redis.call('DEL', KEYS[i])
  if not keep then redis.call('SETBIT', KEYS[1], ARGV[i + 3], 0) end
end
if #KEYS > 2 and redis.call('BITCOUNT', KEYS[1]) == 0 then redis.call('DEL', KEYS[1]) end
return 0
`);

/** Bits [lo, hi) of group g's allocation bitmap. */
interface BitRange {
  g: number;
  lo: number;
  hi: number;
}

const EMPTY = Buffer.alloc(0);

/** Bit lookup in bitmap bytes that start at byte `firstByte` of the bitmap (Redis's order: bit 0 is the top bit of byte 0). */
function lookup(buf: Buffer, firstByte: number): (bit: number) => boolean {
  return (bit: number) => {
    const byte = buf[(bit >> 3) - firstByte];
    return byte !== undefined && (byte & (0x80 >> (bit & 7))) !== 0;
  };
}

/** One piece of a request inside one chunk. */
interface Piece {
  index: number;
  /** Offset inside the chunk. */
  at: number;
  n: number;
  /** Offset inside the request. */
  done: number;
}

/** A Redis failure as a BlockError: OOM is ENOSPC, everything else EIO. */
function redisError(err: unknown, where?: string): BlockError {
  if (err instanceof BlockError) return err;
  const msg = err instanceof Error ? err.message : String(err);
  // ioredis's words for "not connected" (we neither queue nor resend).
  if (where !== undefined && /^(Stream isn't writeable|Connection is closed|Reached the max retries|Cluster isn't ready)/.test(msg)) {
    return new BlockError('EIO', `not connected to Redis at ${where}`);
  }
  return new BlockError(/^OOM\b/.test(msg) ? 'ENOSPC' : 'EIO', `redis: ${msg}`);
}

function reason(err: unknown): string {
  // A cluster that could not be reached says why for its last node.
  const nodeError = (err as { lastNodeError?: unknown } | null)?.lastNodeError;
  if (nodeError !== undefined) return reason(nodeError);
  const code = (err as NodeJS.ErrnoException | null)?.code;
  if (typeof code === 'string' && /^E[A-Z]+$/.test(code)) return errnoMessage(code);
  return err instanceof Error ? err.message : String(err);
}

export class RedisNode implements BlockNode {
  readonly size: number;
  readonly chunkSize: number;
  readonly groupChunks: number;
  readonly capabilities: BlockCapabilities;
  /** The disk's dirty bitmaps, kept in Redis (redis-bitmaps.ts); every write marks the enabled ones. */
  readonly bitmaps: RedisBitmaps;
  readonly #client: Client;
  readonly #target: RedisTarget;
  readonly #where: string;
  readonly #disk: string;
  #closed = false;
  /** Slot -> the first group of this disk hashing to it (for WAIT on every master that holds data). */
  #slotGroups: Map<number, number> | undefined;

  private constructor(client: Client, target: RedisTarget, size: number, chunkSize: number, groupChunks: number, readOnly: boolean) {
    this.#client = client;
    this.#target = target;
    this.#where = describeTarget(target);
    this.#disk = target.disk;
    this.size = size;
    this.chunkSize = chunkSize;
    this.groupChunks = groupChunks;
    this.bitmaps = new RedisBitmaps({ client, disk: target.disk, size, chunkSize, groupChunks, op: (fn) => this.#op(() => fn()) });
    this.capabilities = Object.freeze({
      writable: !readOnly,
      canFlush: true,
      canTrim: true,
      canFastZero: true,
      canExtents: true,
      canCache: false,
    });
  }

  /**
   * Connect, create the disk's metadata when asked and missing, check it.
   * Fails with a BlockError whose message is one line: EIO when Redis
   * cannot be reached, ENOENT for a missing disk, EINVAL for a mismatch.
   */
  static async open(opts: RedisNodeOptions): Promise<RedisNode> {
    const t = opts.target;
    const where = describeTarget(t);
    const client = makeClient(t);
    let lastError: unknown;
    let wasReady = false;
    let lost = false;
    let closing = false;
    const systemError = (err: unknown) => typeof (err as NodeJS.ErrnoException | null)?.code === 'string';
    const onError = (err: unknown) => {
      // Keep a system error (ECONNREFUSED...) rather than a later summary of it.
      if (systemError(err) || !systemError(lastError)) lastError = err;
    };
    client.on('error', onError);
    client.on('node error', onError);
    client.on('close', () => {
      if (!wasReady || closing || lost || opts.warn === undefined) return;
      lost = true;
      opts.warn(`lost the connection to Redis at ${where}${lastError === undefined ? '' : ` (${reason(lastError)})`}; requests fail with EIO until it is back`);
    });
    client.on('ready', () => {
      wasReady = true;
      lastError = undefined;
      if (!lost) return;
      lost = false;
      opts.warn?.(`the connection to Redis at ${where} is back`);
    });
    const abandon = () => {
      closing = true;
      client.disconnect();
    };

    try {
      await withTimeout(client.connect(), t.timeoutMs, () => new BlockError('EIO', `no answer within ${t.timeoutMs} ms`));
    } catch (err) {
      abandon();
      const why = lastError ?? err;
      throw new BlockError('EIO', `cannot connect to Redis at ${where}: ${reason(why)}`);
    }

    try {
      if (t.waitAof > 0) await checkWaitAof(client, where, t.timeoutMs);
      const node = await RedisNode.#openDisk(client, t, opts);
      node.#onClose = () => {
        closing = true;
      };
      return node;
    } catch (err) {
      abandon();
      throw err instanceof BlockError ? err : new BlockError('EIO', `Redis at ${where}: ${reason(err)}`);
    }
  }

  #onClose: () => void = () => {};

  static async #openDisk(client: Client, t: RedisTarget, opts: RedisNodeOptions): Promise<RedisNode> {
    const where = describeTarget(t);
    const name = t.disk;
    const asked = opts.size ?? t.size;
    const create = asked !== undefined && opts.readOnly !== true;
    const chunk = t.chunkSize ?? DEFAULT_REDIS_CHUNK;
    const group = t.groupChunks ?? DEFAULT_REDIS_GROUP;
    const metaKey = `nbd:{${name}}:meta`;
    const reply = await withTimeout(
      runScript(client, META, [metaKey], [create ? String(asked) : '', String(chunk), String(group), REDIS_FORMAT, String(REDIS_FORMAT_VERSION)]),
      t.timeoutMs,
      () => new BlockError('EIO', `Redis at ${where} did not answer within ${t.timeoutMs} ms`),
    );
    const [, flat] = reply as [number, Buffer[] | string[]];
    const meta = new Map<string, string>();
    for (let i = 0; i + 1 < flat.length; i += 2) meta.set(String(flat[i]), String(flat[i + 1]));
    if (meta.size === 0) {
      const hint = opts.readOnly === true && asked !== undefined ? ' (a read-only export does not create it)' : ' (give --size SIZE to create it)';
      throw new BlockError('ENOENT', `Redis disk '${name}' does not exist at ${where}${hint}`);
    }
    if (meta.get('format') !== REDIS_FORMAT) throw new BlockError('EINVAL', `key '${metaKey}' at ${where} is not an nbd-export disk`);
    const version = Number(meta.get('version'));
    if (version !== REDIS_FORMAT_VERSION) {
      throw new BlockError('EINVAL', `Redis disk '${name}' has format version ${meta.get('version')}; this nbd-export knows version ${REDIS_FORMAT_VERSION}`);
    }
    const size = Number(meta.get('size'));
    const chunkSize = Number(meta.get('chunk'));
    const groupChunks = Number(meta.get('group'));
    if (!Number.isSafeInteger(size) || size < 0 || !Number.isSafeInteger(groupChunks) || groupChunks < 1 || groupChunks > 65536) {
      throw new BlockError('EINVAL', `Redis disk '${name}' has damaged metadata (${metaKey})`);
    }
    try {
      checkChunkSize(chunkSize);
    } catch {
      throw new BlockError('EINVAL', `Redis disk '${name}' has damaged metadata (${metaKey})`);
    }
    if (asked !== undefined && asked !== size) {
      throw new BlockError('EINVAL', `Redis disk '${name}' has size ${size} bytes, not ${asked} as asked (leave out the size to serve it as it is)`);
    }
    if (t.chunkSize !== undefined && t.chunkSize !== chunkSize) {
      throw new BlockError('EINVAL', `Redis disk '${name}' has chunk size ${chunkSize}, not ${t.chunkSize} as asked (chunking is fixed when a disk is created)`);
    }
    if (t.groupChunks !== undefined && t.groupChunks !== groupChunks) {
      throw new BlockError('EINVAL', `Redis disk '${name}' has ${groupChunks} chunks per group, not ${t.groupChunks} as asked (grouping is fixed when a disk is created)`);
    }
    return new RedisNode(client, t, size, chunkSize, groupChunks, opts.readOnly === true);
  }

  #allocKey(group: number): string {
    return `nbd:{${this.#disk}:${group}}:alloc`;
  }

  /** The marks hash a script of group `group` reads (see redis-bitmaps.ts). */
  #marksKey(group: number): string {
    return this.bitmaps.marksKey(group);
  }

  /** The prefix of group `group`'s dirty-bitmap bit keys (PREFIX + bitmap id). */
  #bitsPrefix(group: number): string {
    return bitsPrefix(this.#disk, group);
  }

  #chunkKey(index: number): string {
    return `nbd:{${this.#disk}:${Math.floor(index / this.groupChunks)}}:${index}`;
  }

  #chunkLength(index: number): number {
    return Math.min(this.chunkSize, this.size - index * this.chunkSize);
  }

  /** The chunk pieces of [offset, offset+length), grouped by group, in order. */
  #pieces(offset: number, length: number): Map<number, Piece[]> {
    const groups = new Map<number, Piece[]>();
    const cs = this.chunkSize;
    let done = 0;
    while (done < length) {
      const pos = offset + done;
      const index = Math.floor(pos / cs);
      const at = pos - index * cs;
      const n = Math.min(cs - at, length - done);
      const g = Math.floor(index / this.groupChunks);
      let list = groups.get(g);
      if (list === undefined) groups.set(g, (list = []));
      list.push({ index, at, n, done });
      done += n;
    }
    return groups;
  }

  /**
   * Run one request against Redis, bounded by the timeout; whatever fails
   * comes out as a BlockError. `live()` turns false once the request has
   * failed, so late answers do not touch the caller's buffer.
   */
  async #op<T>(fn: (live: () => boolean) => Promise<T>): Promise<T> {
    if (this.#closed) throw new BlockError('ESHUTDOWN', 'the Redis disk is closed');
    let alive = true;
    const inner = fn(() => alive);
    try {
      return await withTimeout(inner, this.#target.timeoutMs, () => new BlockError('EIO', `Redis at ${this.#where} did not answer within ${this.#target.timeoutMs} ms`));
    } catch (err) {
      alive = false;
      throw redisError(err, this.#where);
    } finally {
      inner.catch(() => {});
    }
  }

  async read(offset: number, length: number, into?: Buffer): Promise<Buffer> {
    const out = into === undefined ? Buffer.allocUnsafe(length) : into.subarray(0, length);
    await this.#op(async (live) => {
      const reads: Promise<void>[] = [];
      for (const pieces of this.#pieces(offset, length).values()) {
        for (const p of pieces) {
          reads.push(
            this.#client.getrangeBuffer(this.#chunkKey(p.index), p.at, p.at + p.n - 1).then((b) => {
              if (!live()) return;
              const got = Math.min(b.length, p.n);
              b.copy(out, p.done, 0, got);
              if (got < p.n) out.fill(0, p.done + got, p.done + p.n);
            }),
          );
        }
      }
      await Promise.all(reads);
    });
    return out;
  }

  async write(offset: number, data: Buffer, opts?: WriteOptions): Promise<void> {
    await this.#op(async () => {
      const calls: Promise<unknown>[] = [];
      for (const [g, pieces] of this.#pieces(offset, data.length)) {
        const keys = [this.#allocKey(g), this.#marksKey(g)];
        const args: Arg[] = [this.#bitsPrefix(g), this.chunkSize];
        for (const p of pieces) {
          keys.push(this.#chunkKey(p.index));
          args.push(p.index - g * this.groupChunks, p.at, data.subarray(p.done, p.done + p.n));
        }
        calls.push(runScript(this.#client, WRITE, keys, args));
      }
      await Promise.all(calls);
    });
    if (opts?.fua === true && this.#waits) await this.#durable();
  }

  async flush(): Promise<void> {
    await this.#durable();
  }

  /** FLUSH and FUA wait for replicas or the AOF (wait= or waitaof= in the URL); without, FUA adds nothing to a write. */
  get #waits(): boolean {
    return this.#target.wait > 0 || this.#target.waitAof > 0;
  }

  async trim(offset: number, length: number, opts?: WriteOptions): Promise<void> {
    await this.#zero(offset, length, false);
    if (opts?.fua === true && this.#waits) await this.#durable();
  }

  async writeZeroes(offset: number, length: number, opts: ZeroOptions = {}): Promise<void> {
    // Always fast: no data is sent, whole chunks are dropped.
    await this.#zero(offset, length, opts.noHole === true);
    if (opts.fua === true && this.#waits) await this.#durable();
  }

  /**
   * Zero a range: partial chunks in place (atomically), whole chunks dropped
   * (their bits kept when `keep`). A huge range (a whole disk, with 64-bit
   * lengths or small chunks) is worked through in steps of SLICE_CHUNKS
   * chunks or SLICE_GROUPS groups: the timeout bounds every step (so a dead
   * Redis is still EIO within it), not the whole zeroing, which takes time
   * in proportion to the groups it covers. No Redis command grows with the
   * range: at most MGET_KEYS bitmaps per MGET, KEYS_PER_SCRIPT chunks per
   * script.
   */
  async #zero(offset: number, length: number, keep: boolean): Promise<void> {
    if (length === 0) return;
    const cs = this.chunkSize;
    const end = offset + length;
    let wholeFirst = Math.ceil(offset / cs);
    // The last chunk may be short: it is whole when the range reaches the end of the disk.
    let wholeEnd = end === this.size ? Math.ceil(end / cs) : Math.floor(end / cs);
    const parts: Piece[] = [];
    if (wholeFirst >= wholeEnd) {
      // Inside one or two chunks, none of them whole.
      for (const list of this.#pieces(offset, length).values()) parts.push(...list);
      wholeFirst = wholeEnd = 0;
    } else {
      if (offset < wholeFirst * cs) parts.push(...[...this.#pieces(offset, wholeFirst * cs - offset).values()].flat());
      const wholeEndByte = Math.min(wholeEnd * cs, this.size);
      if (wholeEndByte < end) parts.push(...[...this.#pieces(wholeEndByte, end - wholeEndByte).values()].flat());
    }
    const keepArg = keep ? '1' : '0';
    if (parts.length > 0) {
      await this.#op(async () => {
        const calls: Promise<unknown>[] = [];
        const byGroup = new Map<number, Piece[]>();
        for (const p of parts) {
          const g = Math.floor(p.index / this.groupChunks);
          byGroup.set(g, [...(byGroup.get(g) ?? []), p]);
        }
        for (const [g, pieces] of byGroup) {
          const keys = [this.#allocKey(g), this.#marksKey(g), ...pieces.map((p) => this.#chunkKey(p.index))];
          const args: Arg[] = [this.#bitsPrefix(g), this.chunkSize, keepArg];
          for (const p of pieces) args.push(p.index - g * this.groupChunks, p.at, p.n);
          calls.push(runScript(this.#client, ZERO_PART, keys, args));
        }
        await Promise.all(calls);
      });
    }
    const step = Math.max(1, Math.min(SLICE_CHUNKS, SLICE_GROUPS * this.groupChunks));
    for (let c = wholeFirst; c < wholeEnd; c += step) {
      const first = c;
      await this.#op(() => this.#dropWhole(first, Math.min(wholeEnd, first + step), keep));
    }
  }

  /** Drop chunks [first, end): read each group's bitmap, drop the allocated ones. */
  async #dropWhole(first: number, end: number, keep: boolean): Promise<void> {
    const G = this.groupChunks;
    const keepArg = keep ? '1' : '0';
    const ranges: BitRange[] = [];
    for (let g = Math.floor(first / G); g * G < end; g++) {
      ranges.push({ g, lo: Math.max(first, g * G) - g * G, hi: Math.min(end, (g + 1) * G) - g * G });
    }
    // Unallocated chunks read as zeroes before and after: marking them is
    // for parity with files only (no data changes there, so a checkpoint
    // racing with it loses nothing), and skipped without enabled bitmaps.
    const [lookups, marking] = await Promise.all([this.#bitmaps(ranges), this.#client.exists(this.#marksKey(ranges[0]!.g)).then((n) => n > 0)]);
    const calls: Promise<unknown>[] = [];
    ranges.forEach(({ g, lo, hi }, i) => {
      const bits = lookups[i]!;
      let keys: string[] = [];
      let args: Arg[] = [];
      let sent = !marking;
      // Every call marks the group's whole zeroed range (with its data
      // change, atomically); a group with nothing allocated gets one call
      // that only marks.
      const send = () => {
        if (keys.length > 0 || !sent) {
          const head = [this.#bitsPrefix(g), this.chunkSize, keepArg, lo * this.chunkSize, Math.min(hi * this.chunkSize, this.size - g * G * this.chunkSize)];
          calls.push(runScript(this.#client, ZERO_WHOLE, [this.#allocKey(g), this.#marksKey(g), ...keys], [...head, ...args]));
        }
        sent = true;
        keys = [];
        args = [];
      };
      for (let b = lo; b < hi; b++) {
        if (!bits(b)) continue;
        keys.push(this.#chunkKey(g * G + b));
        args.push(b);
        if (keys.length >= KEYS_PER_SCRIPT) send();
      }
      send();
    });
    await Promise.all(calls);
  }

  /**
   * Bits [lo, hi) of each group's allocation bitmap, as lookup functions.
   * A standalone Redis answers up to MGET_KEYS bitmaps with one MGET (they
   * are small: group/8 bytes); in a cluster each group is in its own slot,
   * so each is one GETRANGE of just the bytes needed (pipelined).
   */
  async #bitmaps(ranges: readonly BitRange[]): Promise<((bit: number) => boolean)[]> {
    const client = this.#client;
    if (client instanceof Cluster) {
      return Promise.all(
        ranges.map(async ({ g, lo, hi }) => lookup(await client.getrangeBuffer(this.#allocKey(g), lo >> 3, (hi - 1) >> 3), lo >> 3)),
      );
    }
    const batches: Promise<((bit: number) => boolean)[]>[] = [];
    for (let i = 0; i < ranges.length; i += MGET_KEYS) {
      const keys = ranges.slice(i, i + MGET_KEYS).map((r) => this.#allocKey(r.g));
      batches.push(client.mgetBuffer(...keys).then((bufs) => bufs.map((b) => lookup(b ?? EMPTY, 0))));
    }
    return (await Promise.all(batches)).flat();
  }

  async cache(_offset: number, _length: number): Promise<void> {}

  async extents(offset: number, length: number, maxExtents?: number): Promise<Extent[]> {
    const c = new ExtentCollector(offset, length, maxExtents);
    if (length === 0) return c.finish();
    const cs = this.chunkSize;
    const G = this.groupChunks;
    const first = Math.floor(offset / cs);
    const last = Math.floor((offset + length - 1) / cs);
    const lastGroup = Math.min(Math.floor(last / G), Math.floor(first / G) + MAX_EXTENT_GROUPS - 1);
    await this.#op(async () => {
      for (let g0 = Math.floor(first / G); g0 <= lastGroup && !c.done; g0 += GROUP_BATCH) {
        const groups: BitRange[] = [];
        for (let g = g0; g < g0 + GROUP_BATCH && g <= lastGroup; g++) {
          groups.push({ g, lo: Math.max(first, g * G) - g * G, hi: Math.min(last + 1, (g + 1) * G) - g * G });
        }
        const lookups = await this.#bitmaps(groups);
        for (const [i, { g, lo, hi }] of groups.entries()) {
          const bit = lookups[i]!;
          let runStart = lo;
          let runData = bit(lo);
          for (let b = lo + 1; b <= hi; b++) {
            const d = b < hi ? bit(b) : !runData;
            if (d === runData) continue;
            if (!c.add((g * G + runStart) * cs, (b - runStart) * cs, runData ? DATA : HOLE)) return;
            runStart = b;
            runData = d;
          }
        }
      }
    });
    return c.finish();
  }

  /**
   * FLUSH and FUA. Every acknowledged write is already in Redis; how durable
   * that is depends on Redis's persistence settings (appendonly with
   * appendfsync always: on disk). With wait=N or waitaof=1 in the URL, each
   * master holding this disk gets a write (so WAIT covers writes made by
   * other processes too) and then WAIT N / WAITAOF; fewer acknowledgements
   * than asked within waittimeout is EIO. Without them, a PING to each
   * master: a flush fails when Redis cannot be reached.
   */
  async #durable(): Promise<void> {
    const t = this.#target;
    await this.#op(async () => {
      const masters = this.#masters();
      // A read-only export writes nothing, not even the counter WAIT needs.
      if ((t.wait === 0 && t.waitAof === 0) || !this.capabilities.writable) {
        await Promise.all(masters.map(([client]) => client.ping()));
        return;
      }
      await Promise.all(
        masters.map(async ([client, syncKey]) => {
          await client.incr(syncKey);
          if (t.waitAof > 0) {
            const r = (await client.call('WAITAOF', t.waitAof, t.wait, t.waitTimeoutMs)) as [number, number];
            if (r[0] < t.waitAof || r[1] < t.wait) {
              throw new BlockError('EIO', `WAITAOF: ${r[0]} local and ${r[1]} replica fsyncs within ${t.waitTimeoutMs} ms, not ${t.waitAof} and ${t.wait}`);
            }
          } else {
            const n = await client.wait(t.wait, t.waitTimeoutMs);
            if (n < t.wait) throw new BlockError('EIO', `WAIT: ${n} of ${t.wait} replicas acknowledged within ${t.waitTimeoutMs} ms`);
          }
        }),
      );
    });
  }

  /** The master connections holding this disk, each with a key of this disk that lives there. */
  #masters(): [Redis, string][] {
    const client = this.#client;
    if (!(client instanceof Cluster)) return [[client, `nbd:{${this.#disk}}:sync`]];
    if (this.#slotGroups === undefined) {
      const groups = Math.ceil(Math.ceil(this.size / this.chunkSize) / this.groupChunks);
      const map = new Map<number, number>();
      for (let g = 0; g < Math.min(groups, 1 << 18) && map.size < 16384; g++) {
        const slot = keySlot(`{${this.#disk}:${g}}`);
        if (!map.has(slot)) map.set(slot, g);
      }
      this.#slotGroups = map;
    }
    const byNode = new Map<string, Redis>();
    for (const n of client.nodes('master')) byNode.set(`${n.options.host}:${n.options.port}`, n);
    const out = new Map<string, [Redis, string]>();
    for (const [slot, g] of this.#slotGroups) {
      const key = client.slots[slot]?.[0];
      const node = key === undefined ? undefined : byNode.get(key);
      if (key === undefined || node === undefined) throw new BlockError('EIO', `no Redis cluster master serves slot ${slot}`);
      if (!out.has(key)) out.set(key, [node, `nbd:{${this.#disk}:${g}}:sync`]);
    }
    return [...out.values()];
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    let failure: unknown;
    try {
      if (this.capabilities.writable && this.#waits) await this.#durable();
    } catch (err) {
      failure = err;
    }
    this.#closed = true;
    this.#onClose();
    try {
      await withTimeout(this.#client.quit(), 1000, () => new Error('quit timed out'));
    } catch {
      // Leaving anyway.
    }
    this.#client.disconnect();
    if (failure !== undefined) throw redisError(failure);
  }
}

/** Resolve or reject as `p` does, or reject with `onTimeout()` after `ms`. */
function withTimeout<T>(p: Promise<T>, ms: number, onTimeout: () => Error): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const t = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(onTimeout()), ms);
  });
  return Promise.race([p, t]).finally(() => clearTimeout(timer));
}

function makeClient(t: RedisTarget): Client {
  let tlsOptions: tls.ConnectionOptions | undefined;
  if (t.tls) {
    tlsOptions = {};
    if (t.ca !== undefined) {
      let pem: string;
      try {
        pem = fs.readFileSync(t.ca, 'utf8');
      } catch (err) {
        throw new BlockError('EINVAL', `cannot read the CA file '${t.ca}': ${reason(err)}`);
      }
      tlsOptions.ca = [...tls.rootCertificates, pem];
    }
  }
  const node: RedisOptions = {
    username: t.username,
    password: t.password,
    tls: tlsOptions,
    connectTimeout: t.timeoutMs,
    commandTimeout: t.timeoutMs,
    // Fail at once while disconnected, never replay a command after a
    // reconnect: a request that failed with EIO must not land later.
    enableOfflineQueue: false,
    autoResendUnfulfilledCommands: false,
    maxRetriesPerRequest: 0,
    retryStrategy: (attempt: number) => Math.min(100 * attempt, 1000),
    enableAutoPipelining: true,
    connectionName: `nbd-export:${t.disk}`,
    lazyConnect: true,
  };
  if (!t.cluster) {
    if (t.path !== undefined) return new Redis({ ...node, path: t.path, db: t.db });
    const h = t.hosts[0]!;
    return new Redis({ ...node, host: h.host, port: h.port, db: t.db });
  }
  const options: ClusterOptions = {
    // No auto-pipelining here: ioredis retries a batch after a MOVED or ASK
    // redirection only when every command in it failed the same way, so a
    // batch spanning slots that moved in a reshard would fail, and keep
    // failing, as its slot table is not refreshed then. Sent one by one,
    // each command follows its redirection (it was not run where it was
    // refused, so sending it again is safe) and the slot table is updated.
    // Commands still go out without waiting for earlier replies.
    redisOptions: { ...node, enableAutoPipelining: false },
    enableOfflineQueue: false,
    enableAutoPipelining: false,
    lazyConnect: true,
    scaleReads: 'master',
    slotsRefreshTimeout: t.timeoutMs,
    clusterRetryStrategy: (attempt: number) => Math.min(100 * attempt, 1000),
    // Addresses as the cluster announces them (a TLS name check needs the name given).
    dnsLookup: (address, callback) => callback(null, address),
  };
  return new Cluster(t.hosts, options);
}

/** waitaof=1 needs Redis 7.2 (WAITAOF) with appendonly on. */
async function checkWaitAof(client: Client, where: string, timeoutMs: number): Promise<void> {
  const info = await withTimeout(client.info('server'), timeoutMs, () => new Error('INFO timed out'));
  const version = /redis_version:(\d+)\.(\d+)/.exec(info);
  const major = Number(version?.[1] ?? 0);
  const minor = Number(version?.[2] ?? 0);
  if (major < 7 || (major === 7 && minor < 2)) {
    throw new BlockError('EINVAL', `waitaof needs Redis 7.2 or later (WAITAOF); Redis at ${where} is ${version === null ? 'older' : `${major}.${minor}`}`);
  }
  const persistence = await withTimeout(client.info('persistence'), timeoutMs, () => new Error('INFO timed out'));
  if (!/aof_enabled:1/.test(persistence)) throw new BlockError('EINVAL', `waitaof=1 needs appendonly yes on Redis at ${where}`);
}
