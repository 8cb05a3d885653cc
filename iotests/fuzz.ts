// Protocol fuzzer: mutates valid handshake, option and transmission streams
// (bit flips, truncation, huge lengths, reordered phases, garbage magic)
// and sends them to a live server, one fresh connection per case. After
// every batch of cases a well-behaved client must still write and read
// correctly, the server must be alive and its RSS bounded; at the end it
// must stop cleanly on SIGTERM. Everything derives from one printed seed:
// `--seed N` replays a run, `--seed N --replay I` (or `I-J`) one case.
//
//   npm run fuzz -- [--seconds N] [--cases N] [--from I] [--seed N] [--replay I[-J]]
//                   [--parallel N] [--check-every N] [--max-rss-mib N]
//                   [--image memory|raw] [--transport unix|tcp]
//                   [--probe-every N] [--probe KIND,...|all]
//                   [--server-cmd 'qemu-nbd -f raw -k $SOCK -t -e 0 $IMAGE']
//                   [--save DIR] [-v]
//
// Oracles, besides liveness: everything the server sends must parse as the
// greeting, well-formed option replies and (structured or simple) replies;
// for a case that is an unmutated, well-framed conversation every option
// gets exactly one final reply, every reply answers a request sent and
// no request twice, when all requests are valid each gets its reply, and after
// NBD_CMD_DISC / NBD_OPT_ABORT the server closes.
import { spawn, type ChildProcess } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { ByteQueue } from '../src/protocol/byte-queue.ts';
import {
  GREETING_LENGTH,
  IHAVEOPT,
  NBDMAGIC,
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
  NBD_CMD_RESIZE,
  NBD_CMD_TRIM,
  NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES,
  NBD_EINVAL,
  NBD_EIO,
  NBD_ENOMEM,
  NBD_ENOSPC,
  NBD_ENOTSUP,
  NBD_EOVERFLOW,
  NBD_EPERM,
  NBD_ESHUTDOWN,
  NBD_FLAG_C_FIXED_NEWSTYLE,
  NBD_FLAG_C_NO_ZEROES,
  NBD_FLAG_FIXED_NEWSTYLE,
  NBD_FLAG_HAS_FLAGS,
  NBD_FLAG_SEND_FLUSH,
  NBD_FLAG_SEND_FUA,
  NBD_INFO_BLOCK_SIZE,
  NBD_INFO_DESCRIPTION,
  NBD_INFO_EXPORT,
  NBD_INFO_NAME,
  NBD_OPT_ABORT,
  NBD_OPT_EXPORT_NAME,
  NBD_OPT_EXTENDED_HEADERS,
  NBD_OPT_GO,
  NBD_OPT_INFO,
  NBD_OPT_LIST,
  NBD_OPT_LIST_META_CONTEXT,
  NBD_OPT_PEEK_EXPORT,
  NBD_OPT_REPLY_MAGIC,
  NBD_OPT_SET_META_CONTEXT,
  NBD_OPT_STARTTLS,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE_BLOCK_STATUS,
  NBD_REPLY_TYPE_ERROR,
  NBD_REPLY_TYPE_ERROR_OFFSET,
  NBD_REPLY_TYPE_NONE,
  NBD_REPLY_TYPE_OFFSET_DATA,
  NBD_REPLY_TYPE_OFFSET_HOLE,
  NBD_REP_ACK,
  NBD_REP_ERR_BLOCK_SIZE_REQD,
  NBD_REP_ERR_EXT_HEADER_REQD,
  NBD_REP_ERR_INVALID,
  NBD_REP_ERR_PLATFORM,
  NBD_REP_ERR_POLICY,
  NBD_REP_ERR_SHUTDOWN,
  NBD_REP_ERR_TLS_REQD,
  NBD_REP_ERR_TOO_BIG,
  NBD_REP_ERR_UNKNOWN,
  NBD_REP_ERR_UNSUP,
  NBD_REP_INFO,
  NBD_REP_META_CONTEXT,
  NBD_REP_SERVER,
  NBD_REQUEST_MAGIC,
  NBD_SIMPLE_REPLY_MAGIC,
  NBD_STRUCTURED_REPLY_MAGIC,
  OPTION_HEADER_LENGTH,
  OPTION_REPLY_HEADER_LENGTH,
  REQUEST_HEADER_LENGTH,
  SIMPLE_REPLY_HEADER_LENGTH,
  STRUCTURED_REPLY_HEADER_LENGTH,
} from '../src/protocol/constants.ts';
import { chunkTypeName, optionName, replyTypeName } from '../src/protocol/names.ts';
import { lstr, requestBytes, u16, u32 } from '../src/protocol/test-helpers.ts';

const KiB = 1024;
const MiB = 1024 * KiB;
const here = path.dirname(fileURLToPath(import.meta.url));
const SERVER_BIN = path.join(here, '..', 'bin', 'nbd-export');
/** The default server's handshake limit (seconds); an idle client must be dropped after it. */
const HANDSHAKE_LIMIT = 2;

// ---------------------------------------------------------------- PRNG

/** splitmix32 step: a well-mixed u32 from any u32. */
function mix32(x: number): number {
  let z = (x + 0x9e3779b9) | 0;
  z = Math.imul(z ^ (z >>> 16), 0x85ebca6b);
  z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35);
  return (z ^ (z >>> 16)) >>> 0;
}

/** sfc32, seeded through splitmix32: small, fast, good enough to fuzz with. */
export class Rng {
  #a: number;
  #b: number;
  #c: number;
  #d: number;

  constructor(seed: number) {
    let s = seed >>> 0;
    const next = (): number => (s = mix32(s));
    this.#a = next();
    this.#b = next();
    this.#c = next();
    this.#d = next() | 1;
    for (let i = 0; i < 12; i++) this.u32();
  }

  u32(): number {
    const t = (((this.#a + this.#b) | 0) + this.#d) | 0;
    this.#d = (this.#d + 1) | 0;
    this.#a = this.#b ^ (this.#b >>> 9);
    this.#b = (this.#c + (this.#c << 3)) | 0;
    this.#c = (this.#c << 21) | (this.#c >>> 11);
    this.#c = (this.#c + t) | 0;
    return t >>> 0;
  }

  u16(): number {
    return this.u32() & 0xffff;
  }

  /** 0 <= n < bound (bound up to 2^53). */
  below(bound: number): number {
    return Math.floor((this.u32() * 2 ** 32 + this.u32()) / 2 ** 64 * bound);
  }

  /** lo <= n <= hi. */
  int(lo: number, hi: number): number {
    return lo + this.below(hi - lo + 1);
  }

  chance(p: number): boolean {
    return this.u32() / 2 ** 32 < p;
  }

  pick<T>(items: readonly T[]): T {
    return items[this.below(items.length)]!;
  }

  /** One value by weight: [[weight, value], ...]. */
  weighted<T>(items: readonly (readonly [number, T])[]): T {
    let total = 0;
    for (const [w] of items) total += w;
    let r = this.below(total);
    for (const [w, v] of items) {
      if (r < w) return v;
      r -= w;
    }
    return items[items.length - 1]![1];
  }

  bytes(n: number): Buffer {
    const b = Buffer.allocUnsafe(n);
    for (let i = 0; i < n; i += 4) {
      const v = this.u32();
      for (let k = 0; k < 4 && i + k < n; k++) b[i + k] = (v >>> (8 * k)) & 0xff;
    }
    return b;
  }
}

/** The seed of case `index` of a run with `seed`: each case replays alone. */
export function caseSeed(seed: number, index: number): number {
  return mix32(mix32(seed >>> 0) ^ mix32(index + 0x51ed27));
}

// ---------------------------------------------------------------- cases

type SegmentKind = 'flags' | 'option' | 'request' | 'garbage';

interface Segment {
  kind: SegmentKind;
  bytes: Buffer;
  note: string;
}

interface GenRequest {
  cookie: bigint;
  type: number;
  length: number;
  /** Valid by the spec whatever was negotiated: the server must carry it out and reply. */
  strict: boolean;
}

export interface Case {
  index: number;
  /** What was generated, before mutation (for the replay printout). */
  notes: string[];
  mutations: string[];
  stream: Buffer;
  /** Unmutated and well framed: the strict oracles apply. */
  clean: boolean;
  /** Clean and ends in DISC or ABORT: the server must close. */
  expectClose: boolean;
  /** Clean: options that must each get exactly one final reply. */
  options: number;
  /** Clean: cookies that must each get a reply before the server closes. */
  cookies: bigint[];
  /** Every READ generated (cookie -> length), to skip simple-reply data. */
  reads: Map<bigint, number>;
  /** Cookies of every request generated. */
  known: Set<bigint>;
  pieces: number[];
  pauses: boolean[];
  waitGreeting: boolean;
  halfClose: boolean;
}

interface GenContext {
  rng: Rng;
  size: number;
  index: number;
  clean: boolean;
  options: number;
  requests: GenRequest[];
  cookies: bigint[];
  nextCookie: number;
  streamBytes: number;
  readBytes: number;
  /** The conversation ends in DISC or ABORT. */
  closes: boolean;
}

const STREAM_CAP = 48 * MiB;
const READ_CAP = 40 * MiB;
const INFO_TYPES = [NBD_INFO_EXPORT, NBD_INFO_NAME, NBD_INFO_DESCRIPTION, NBD_INFO_BLOCK_SIZE];
const QUERIES = [
  'base:allocation',
  'base:',
  'base:allocation:x',
  'qemu:',
  'qemu:allocation-depth',
  'qemu:dirty-bitmap:',
  'qemu:dirty-bitmap:bm0',
  '',
  'x',
  ':',
];

/** Option request: IHAVEOPT, option, length, data ("Option types"). */
function optionBytes(option: number, data: Buffer, declaredLength = data.length): Buffer {
  const b = Buffer.allocUnsafe(OPTION_HEADER_LENGTH + data.length);
  b.writeBigUInt64BE(IHAVEOPT, 0);
  b.writeUInt32BE(option >>> 0, 8);
  b.writeUInt32BE(declaredLength >>> 0, 12);
  data.copy(b, OPTION_HEADER_LENGTH);
  return b;
}

/** An export name: the real one ('') mostly, else unknown or malformed. */
function genName(rng: Rng): { name: Buffer; ok: boolean } {
  const kind = rng.weighted([
    [80, 'good'],
    [6, 'unknown'],
    [3, 'max'],
    [3, 'too-long'],
    [4, 'bad-utf8'],
    [4, 'nul'],
  ] as const);
  switch (kind) {
    case 'good':
      return { name: Buffer.alloc(0), ok: true };
    case 'unknown':
      return { name: Buffer.from(rng.pick(['nope', 'a', 'ü', ' '])), ok: false };
    case 'max':
      return { name: Buffer.alloc(4096, 0x61), ok: false };
    case 'too-long':
      return { name: Buffer.alloc(4097, 0x61), ok: false };
    case 'bad-utf8':
      return { name: Buffer.from([0xff, 0xfe, 0xc3]), ok: false };
    case 'nul':
      return { name: Buffer.from('a\0b'), ok: false };
  }
}

/** INFO/GO data: name, u16 count, info types; sometimes internally inconsistent. */
function infoData(rng: Rng, name: Buffer): { data: Buffer; wellFormed: boolean } {
  const count = rng.weighted([
    [35, 0],
    [45, rng.int(1, 4)],
    [15, rng.int(5, 20)],
    [5, rng.int(100, 2000)],
  ]);
  const types = Array.from({ length: count }, () => (rng.chance(0.85) ? rng.pick(INFO_TYPES) : rng.u16()));
  let declared = count;
  let nameLength = name.length;
  let wellFormed = true;
  if (rng.chance(0.06)) {
    declared = (count + rng.pick([1, -1, 0x7fff, 0xffff])) & 0xffff;
    wellFormed = declared === count;
  }
  if (rng.chance(0.04)) {
    nameLength = rng.pick([name.length + 1, 0xffffffff, 0x7fffffff, name.length + 6]);
    wellFormed = false;
  }
  const data = Buffer.concat([u32(nameLength), name, u16(declared), ...types.map(u16)]);
  return { data, wellFormed };
}

/** LIST/SET_META_CONTEXT data: name, u32 count, queries. */
function metaData(rng: Rng, name: Buffer): Buffer {
  const count = rng.weighted([
    [20, 0],
    [60, rng.int(1, 3)],
    [12, rng.int(4, 12)],
    [8, 129],
  ]);
  const queries: Buffer[] = [];
  for (let i = 0; i < count; i++) {
    const q = rng.weighted<Buffer>([
      [85, Buffer.from(rng.pick(QUERIES))],
      [5, Buffer.from([0xff, 0x80])],
      [5, Buffer.from('base:\0allocation')],
      [5, Buffer.alloc(rng.pick([4096, 4097]), 0x71)],
    ]);
    queries.push(rng.chance(0.04) ? Buffer.concat([u32(q.length + rng.pick([1, 1000, 0xffffffff])), q]) : lstr(q));
  }
  let declared = count;
  if (rng.chance(0.05)) declared = rng.pick([count + 1, 0xffffffff, 0x40000000]);
  const trailing = rng.chance(0.03) ? rng.bytes(rng.int(1, 3)) : Buffer.alloc(0);
  return Buffer.concat([lstr(name), u32(declared), ...queries, trailing]);
}

/** One option that the server must answer (with an ACK or an error) and stay in negotiation. */
function genOption(g: GenContext): Segment {
  const rng = g.rng;
  const kind = rng.weighted([
    [12, 'list'],
    [12, 'info'],
    [14, 'structured'],
    [10, 'list_meta'],
    [14, 'set_meta'],
    [4, 'starttls'],
    [10, 'unknown'],
    [3, 'big'],
    [5, 'go-unknown'],
  ] as const);
  g.options++;
  switch (kind) {
    case 'list':
    case 'structured':
    case 'starttls': {
      const option = { list: NBD_OPT_LIST, structured: NBD_OPT_STRUCTURED_REPLY, starttls: NBD_OPT_STARTTLS }[kind];
      const data = rng.chance(0.1) ? rng.bytes(rng.int(1, 64)) : Buffer.alloc(0);
      return { kind: 'option', bytes: optionBytes(option, data), note: `${optionName(option)} data ${data.length}` };
    }
    case 'info': {
      const { data } = infoData(rng, genName(rng).name);
      return { kind: 'option', bytes: optionBytes(NBD_OPT_INFO, data), note: `NBD_OPT_INFO data ${data.length}` };
    }
    case 'go-unknown': {
      // A GO the server refuses keeps the client in negotiation.
      const { data } = infoData(rng, Buffer.from('no-such-export'));
      return { kind: 'option', bytes: optionBytes(NBD_OPT_GO, data), note: `NBD_OPT_GO unknown export` };
    }
    case 'list_meta':
    case 'set_meta': {
      const option = kind === 'list_meta' ? NBD_OPT_LIST_META_CONTEXT : NBD_OPT_SET_META_CONTEXT;
      const data = metaData(rng, genName(rng).name);
      return { kind: 'option', bytes: optionBytes(option, data), note: `${optionName(option)} data ${data.length}` };
    }
    case 'unknown': {
      const option = rng.pick([NBD_OPT_PEEK_EXPORT, 12, 0, 0x7fffffff, 0xffffffff, rng.u32(), rng.int(13, 64)]);
      const data = rng.bytes(rng.weighted([
        [70, rng.int(0, 64)],
        [30, rng.int(65, 8192)],
      ]));
      return { kind: 'option', bytes: optionBytes(option, data), note: `option ${option >>> 0} data ${data.length}` };
    }
    case 'big': {
      // Longer than any option data the server keeps: drained and refused.
      const option = rng.pick([NBD_OPT_INFO, NBD_OPT_LIST, NBD_OPT_SET_META_CONTEXT, 99]);
      const length = rng.pick([64 * KiB + 1, 256 * KiB, 1 * MiB + 3]);
      g.streamBytes += length;
      return { kind: 'option', bytes: optionBytes(option, Buffer.alloc(length, 0x5a)), note: `${optionName(option)} big data ${length}` };
    }
  }
}

const VALID_FLAGS: ReadonlyMap<number, number> = new Map([
  [NBD_CMD_READ, NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_DF],
  [NBD_CMD_WRITE, NBD_CMD_FLAG_FUA],
  [NBD_CMD_FLUSH, 0],
  [NBD_CMD_TRIM, NBD_CMD_FLAG_FUA],
  [NBD_CMD_CACHE, 0],
  [NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO],
  [NBD_CMD_BLOCK_STATUS, NBD_CMD_FLAG_REQ_ONE],
]);

/** A payload of `n` bytes: random when small, a cheap pattern when large. */
function payload(rng: Rng, n: number): Buffer {
  if (n <= 64 * KiB) return rng.chance(0.2) ? Buffer.alloc(n, rng.pick([0, 0xff])) : rng.bytes(n);
  const b = Buffer.alloc(n, rng.u32() & 0xff);
  for (let i = 0; i < 16; i++) b[rng.below(n)] = rng.u32() & 0xff;
  return b;
}

/**
 * One transmission request. `framed` is false when the bytes sent do not
 * match what the header announces (a huge write whose payload is cut).
 */
function genRequest(g: GenContext, forceType?: number): { seg: Segment; framed: boolean } {
  const rng = g.rng;
  const size = g.size;
  const type =
    forceType ??
    rng.weighted([
      [25, NBD_CMD_READ],
      [25, NBD_CMD_WRITE],
      [6, NBD_CMD_FLUSH],
      [8, NBD_CMD_TRIM],
      [5, NBD_CMD_CACHE],
      [10, NBD_CMD_WRITE_ZEROES],
      [10, NBD_CMD_BLOCK_STATUS],
      [2, NBD_CMD_RESIZE],
      [2, rng.pick([9, 10, 0x7fff, 0xffff])],
    ]);
  const flags = rng.weighted([
    [60, rng.u16() & (VALID_FLAGS.get(type) ?? 0)],
    [30, 0],
    [10, rng.u16()],
  ]);
  let offset: number | bigint;
  let length: number;
  const shape = rng.weighted([
    [55, 'small'],
    [14, 'unaligned'],
    [12, 'edge'],
    [11, 'large'],
    [8, 'huge'],
  ] as const);
  switch (shape) {
    case 'small':
      offset = 4096 * rng.below(Math.max(1, size / 4096 - 16));
      length = 512 * rng.int(0, 16);
      break;
    case 'unaligned':
      offset = rng.below(Math.max(1, size - 70000));
      length = rng.int(0, 70000);
      break;
    case 'edge':
      offset = Math.max(0, size - rng.int(0, 8192));
      length = rng.int(0, 8192);
      break;
    case 'large':
      offset = 4096 * rng.below(Math.max(1, size / 4096 / 2));
      length = rng.pick([1 * MiB, 4 * MiB, 32 * MiB, 32 * MiB + 1, 33 * MiB]);
      break;
    case 'huge':
      offset = rng.pick<number | bigint>([2n ** 63n, 2n ** 64n - 1n, size, 2 ** 53, 2n ** 53n + 1n, size * 2, 0]);
      length = rng.pick([0xffffffff, 0x80000000, 0x7fffffff, size, size + 1, 1]);
      break;
  }
  if (type === NBD_CMD_FLUSH && rng.chance(0.85)) {
    offset = 0;
    length = 0;
  }
  let framed = true;
  let body: Buffer = Buffer.alloc(0);
  if (type === NBD_CMD_WRITE) {
    // Writes of 32 MiB and more cost real time: keep them rare.
    if (length > 1 * MiB && length <= 33 * MiB && !rng.chance(0.05)) length = rng.int(1, 1 * MiB);
    if (length > 33 * MiB || g.streamBytes + length > STREAM_CAP) {
      body = payload(rng, rng.int(0, 64 * KiB));
      framed = body.length === length;
    } else {
      body = payload(rng, length);
    }
  }
  if (type === NBD_CMD_READ && length <= 33 * MiB) {
    if (g.readBytes + length > READ_CAP) length = rng.int(0, 4096);
    g.readBytes += length;
  }
  g.streamBytes += body.length;
  const cookie = (BigInt(g.index) << 24n) | BigInt(g.nextCookie++);
  const strictFlags = new Map([
    [NBD_CMD_READ, 0],
    [NBD_CMD_WRITE, NBD_CMD_FLAG_FUA],
    [NBD_CMD_FLUSH, 0],
    [NBD_CMD_TRIM, NBD_CMD_FLAG_FUA],
    [NBD_CMD_CACHE, 0],
    [NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE],
  ]).get(type);
  const strict =
    strictFlags !== undefined &&
    (flags & ~strictFlags) === 0 &&
    (type === NBD_CMD_FLUSH
      ? offset === 0 && length === 0
      : length > 0 && length <= 32 * MiB && BigInt(offset) + BigInt(length) <= BigInt(size)) &&
    framed;
  g.requests.push({ cookie, type, length, strict });
  const header = requestBytes({ flags, type, cookie, offset, length });
  return {
    seg: { kind: 'request', bytes: body.length === 0 ? header : Buffer.concat([header, body]), note: `cmd ${type} flags 0x${flags.toString(16)} offset ${offset} length ${length}${framed ? '' : ` payload ${body.length}`}` },
    framed,
  };
}

/**
 * Requests the server must answer before it closes: all of them when all
 * are valid; none otherwise (an invalid request may end the connection,
 * and with it requests still in flight).
 */
function mustAnswer(requests: readonly GenRequest[]): bigint[] {
  return requests.every((r) => r.strict) ? requests.map((r) => r.cookie) : [];
}

function discSegment(g: GenContext): Segment {
  const flags = g.rng.chance(0.9) ? 0 : g.rng.u16();
  const cookie = (BigInt(g.index) << 24n) | BigInt(g.nextCookie++);
  return { kind: 'request', bytes: requestBytes({ flags, type: NBD_CMD_DISC, cookie, offset: 0, length: 0 }), note: `NBD_CMD_DISC flags 0x${flags.toString(16)}` };
}

/** A valid conversation (mostly), as segments. */
function generate(g: GenContext): Segment[] {
  const rng = g.rng;
  const segs: Segment[] = [];
  const flagKind = rng.weighted([
    [80, NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES],
    [14, NBD_FLAG_C_FIXED_NEWSTYLE],
    [3, 0],
    [3, -1],
  ]);
  const clientFlags = flagKind === -1 ? rng.u32() : flagKind;
  if ((clientFlags & ~(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)) !== 0 || clientFlags === 0) g.clean = false;
  segs.push({ kind: 'flags', bytes: u32(clientFlags), note: `client flags 0x${(clientFlags >>> 0).toString(16)}` });

  // A common well-behaved prefix: structured replies and base:allocation.
  if (rng.chance(0.5)) {
    segs.push({ kind: 'option', bytes: optionBytes(NBD_OPT_STRUCTURED_REPLY, Buffer.alloc(0)), note: 'NBD_OPT_STRUCTURED_REPLY' });
    const q = rng.chance(0.8) ? ['base:allocation'] : ['base:allocation', 'qemu:allocation-depth'];
    const data = Buffer.concat([lstr(''), u32(q.length), ...q.map((s) => lstr(s))]);
    segs.push({ kind: 'option', bytes: optionBytes(NBD_OPT_SET_META_CONTEXT, data), note: `NBD_OPT_SET_META_CONTEXT ${q.join(',')}` });
    g.options += 2;
  }
  const nopt = rng.weighted([
    [35, 0],
    [30, 1],
    [15, 2],
    [10, 3],
    [10, rng.int(4, 12)],
  ]);
  for (let i = 0; i < nopt; i++) segs.push(genOption(g));

  const end = rng.weighted([
    [72, 'go'],
    [13, 'export_name'],
    [5, 'abort'],
    [10, 'none'],
  ] as const);
  let transmission = false;
  let closes = false;
  if (end === 'go') {
    const { name, ok } = genName(rng);
    const { data, wellFormed } = infoData(rng, name);
    segs.push({ kind: 'option', bytes: optionBytes(NBD_OPT_GO, data), note: `NBD_OPT_GO data ${data.length}` });
    g.options++;
    transmission = ok && wellFormed;
    if (!transmission) g.clean = false;
  } else if (end === 'export_name') {
    const { name, ok } = genName(rng);
    segs.push({ kind: 'option', bytes: optionBytes(NBD_OPT_EXPORT_NAME, name), note: `NBD_OPT_EXPORT_NAME length ${name.length}` });
    g.options++;
    transmission = ok;
    if (!ok) g.clean = false;
  } else if (end === 'abort') {
    const data = rng.chance(0.1) ? rng.bytes(rng.int(1, 16)) : Buffer.alloc(0);
    segs.push({ kind: 'option', bytes: optionBytes(NBD_OPT_ABORT, data), note: `NBD_OPT_ABORT data ${data.length}` });
    g.options++;
    closes = true;
  }

  if (transmission) {
    const nreq = rng.weighted([
      [10, 0],
      [50, rng.int(1, 4)],
      [30, rng.int(5, 16)],
      [10, rng.int(17, 80)],
    ]);
    for (let i = 0; i < nreq && g.streamBytes < STREAM_CAP; i++) {
      const { seg, framed } = genRequest(g);
      segs.push(seg);
      if (!framed) {
        g.clean = false;
        break;
      }
    }
    if (g.clean) g.cookies = mustAnswer(g.requests);
    if (rng.chance(0.8)) {
      segs.push(discSegment(g));
      closes = true;
      if (rng.chance(0.08)) {
        // The client MUST NOT send anything after DISC.
        segs.push(genRequest(g).seg);
        g.clean = false;
      }
    }
  } else if (end === 'none' && rng.chance(0.3)) {
    // Requests while the server still expects options.
    for (let i = rng.int(1, 3); i > 0; i--) segs.push(genRequest(g).seg);
    g.clean = false;
  } else if (end === 'abort' && rng.chance(0.05)) {
    segs.push(genRequest(g).seg);
    g.clean = false;
  }
  if (!closes) g.cookies = g.clean ? mustAnswer(g.requests) : [];
  g.closes = closes;
  return segs;
}

// ---------------------------------------------------------------- mutators

const INTERESTING_BYTES = [0x00, 0xff, 0x7f, 0x80, 0x01, 0xfe];
const HUGE_LENGTHS = [0xffffffff, 0x80000000, 0x7fffffff, 33 * MiB, 32 * MiB + 1, 64 * KiB + 1, 4097, 0x10000];
const HUGE_OFFSETS = [2n ** 63n, 2n ** 64n - 1n, 2n ** 63n - 1n, 2n ** 53n, 2n ** 32n, 0n];

/** A copy of segment i (mutators never write into shared buffers). */
function own(segs: Segment[], i: number): Segment {
  const s = segs[i]!;
  const copy = { ...s, bytes: Buffer.from(s.bytes) };
  segs[i] = copy;
  return copy;
}

/** A segment index, biased to option and request headers. */
function pickSegment(rng: Rng, segs: Segment[], kinds?: SegmentKind[]): number {
  const pool = kinds === undefined ? segs.map((_, i) => i) : segs.flatMap((s, i) => (kinds.includes(s.kind) ? [i] : []));
  if (pool.length === 0) return rng.below(segs.length);
  return rng.pick(pool);
}

/** A position in a segment, biased to its header. */
function pickPosition(rng: Rng, seg: Segment): number {
  const n = seg.bytes.length;
  if (n === 0) return 0;
  return rng.chance(0.8) ? rng.below(Math.min(n, 32)) : rng.below(n);
}

type Mutator = (rng: Rng, segs: Segment[], g: GenContext) => string;

const MUTATORS: readonly (readonly [number, string, Mutator])[] = [
  [14, 'bitflip', (rng, segs) => {
    const k = rng.int(1, 8);
    const at: string[] = [];
    for (let n = 0; n < k; n++) {
      const i = pickSegment(rng, segs);
      const s = own(segs, i);
      if (s.bytes.length === 0) continue;
      const p = pickPosition(rng, s);
      const bit = rng.below(8);
      s.bytes[p] = s.bytes[p]! ^ (1 << bit);
      at.push(`#${i}+${p}.${bit}`);
    }
    return `bitflip ${at.join(' ')}`;
  }],
  [10, 'setbyte', (rng, segs) => {
    const i = pickSegment(rng, segs);
    const s = own(segs, i);
    const at: string[] = [];
    for (let n = rng.int(1, 4); n > 0 && s.bytes.length > 0; n--) {
      const p = pickPosition(rng, s);
      const v = rng.chance(0.7) ? rng.pick(INTERESTING_BYTES) : rng.u32() & 0xff;
      s.bytes[p] = v;
      at.push(`+${p}=${v}`);
    }
    return `setbyte #${i}${at.join('')}`;
  }],
  [10, 'huge-length', (rng, segs) => {
    const i = pickSegment(rng, segs, ['option', 'request']);
    const s = own(segs, i);
    if (s.kind === 'option' && s.bytes.length >= OPTION_HEADER_LENGTH) {
      const v = rng.pick(HUGE_LENGTHS);
      s.bytes.writeUInt32BE(v >>> 0, 12);
      return `option-length #${i}=${v}`;
    }
    if (s.kind === 'request' && s.bytes.length >= REQUEST_HEADER_LENGTH) {
      if (rng.chance(0.5)) {
        const v = rng.pick(HUGE_LENGTHS);
        s.bytes.writeUInt32BE(v >>> 0, 24);
        return `request-length #${i}=${v}`;
      }
      const v = rng.pick(HUGE_OFFSETS);
      s.bytes.writeBigUInt64BE(v, 16);
      return `request-offset #${i}=${v}`;
    }
    return 'huge-length (no header)';
  }],
  [4, 'big-write', (rng, segs, g) => {
    const length = rng.pick([33 * MiB, 32 * MiB + 1, 0xffffffff, 0x80000000]);
    const full = length <= 33 * MiB && rng.chance(0.3);
    const body = full ? Buffer.alloc(length, 0xee) : rng.bytes(rng.int(0, 64 * KiB));
    const header = requestBytes({ type: NBD_CMD_WRITE, cookie: BigInt(g.nextCookie++), offset: rng.pick([0, g.size - 4096, g.size]), length });
    const at = rng.int(0, segs.length);
    segs.splice(at, 0, { kind: 'request', bytes: Buffer.concat([header, body]), note: `big write ${length}` });
    return `big-write@${at} length ${length} payload ${body.length}`;
  }],
  [6, 'duplicate', (rng, segs) => {
    const i = pickSegment(rng, segs);
    segs.splice(i + 1, 0, segs[i]!);
    return `duplicate #${i}`;
  }],
  [3, 'repeat', (rng, segs) => {
    const i = pickSegment(rng, segs, ['option', 'request']);
    const s = segs[i]!;
    const times = Math.min(rng.int(10, 400), Math.floor((4 * MiB) / Math.max(1, s.bytes.length)));
    segs.splice(i + 1, 0, ...Array.from({ length: times }, () => s));
    return `repeat #${i} x${times}`;
  }],
  [8, 'swap', (rng, segs) => {
    const i = rng.below(segs.length);
    const j = rng.below(segs.length);
    [segs[i], segs[j]] = [segs[j]!, segs[i]!];
    return `swap #${i} #${j}`;
  }],
  [6, 'move', (rng, segs) => {
    const i = rng.below(segs.length);
    const [s] = segs.splice(i, 1);
    const j = rng.int(0, segs.length);
    segs.splice(j, 0, s!);
    return `move #${i}->${j}`;
  }],
  [6, 'delete', (rng, segs) => {
    if (segs.length <= 1) return 'delete (none)';
    const i = rng.below(segs.length);
    segs.splice(i, 1);
    return `delete #${i}`;
  }],
  [8, 'cross-phase', (rng, segs, g) => {
    // Option data in transmission, or requests during negotiation.
    const at = rng.int(0, segs.length);
    if (rng.chance(0.5)) {
      const s = genOption(g);
      segs.splice(at, 0, s);
      return `insert option@${at} (${s.note})`;
    }
    const { seg } = genRequest(g);
    segs.splice(at, 0, seg);
    return `insert request@${at} (${seg.note})`;
  }],
  [6, 'bad-magic', (rng, segs) => {
    const i = pickSegment(rng, segs, ['option', 'request']);
    const s = own(segs, i);
    const n = Math.min(s.kind === 'option' ? 8 : 4, s.bytes.length);
    const how = rng.pick(['zero', 'random', 'swap-magic'] as const);
    if (how === 'zero') s.bytes.fill(0, 0, n);
    else if (how === 'random') rng.bytes(n).copy(s.bytes, 0);
    else if (s.kind === 'option' && s.bytes.length >= 8) s.bytes.writeBigUInt64BE(NBDMAGIC, 0);
    else if (s.bytes.length >= 4) s.bytes.writeUInt32BE(NBD_SIMPLE_REPLY_MAGIC, 0);
    return `bad-magic #${i} ${how}`;
  }],
  [5, 'garbage', (rng, segs) => {
    const at = rng.int(0, segs.length);
    const n = rng.weighted([
      [70, rng.int(1, 32)],
      [30, rng.int(33, 4096)],
    ]);
    segs.splice(at, 0, { kind: 'garbage', bytes: rng.bytes(n), note: `garbage ${n}` });
    return `garbage@${at} ${n}`;
  }],
  [3, 'client-flags', (rng, segs) => {
    const i = segs.findIndex((s) => s.kind === 'flags');
    if (i < 0) return 'client-flags (none)';
    const v = rng.pick([0, 2, 4, 0x80000000, 0xffffffff, rng.u32()]);
    segs[i] = { kind: 'flags', bytes: u32(v), note: `client flags 0x${(v >>> 0).toString(16)}` };
    return `client-flags 0x${(v >>> 0).toString(16)}`;
  }],
  [3, 'drop-greeting-flags', (_rng, segs) => {
    const i = segs.findIndex((s) => s.kind === 'flags');
    if (i >= 0) segs.splice(i, 1);
    return 'drop client flags';
  }],
];

const MUTATOR_TOTAL = MUTATORS.reduce((t, [w]) => t + w, 0);

function pickMutator(rng: Rng): readonly [number, string, Mutator] {
  let r = rng.below(MUTATOR_TOTAL);
  for (const m of MUTATORS) {
    if (r < m[0]) return m;
    r -= m[0];
  }
  return MUTATORS[0]!;
}

/** Case `index` of the run with `seed`, against an export of `size` bytes. */
export function makeCase(seed: number, index: number, size: number): Case {
  const rng = new Rng(caseSeed(seed, index));
  const g: GenContext = {
    rng,
    size,
    index,
    clean: true,
    options: 0,
    requests: [],
    cookies: [],
    nextCookie: 1,
    streamBytes: 0,
    readBytes: 0,
    closes: false,
  };
  const segs = generate(g);
  const notes = segs.map((s) => s.note);
  const mutations: string[] = [];
  if (!rng.chance(0.2)) {
    for (let n = rng.weighted([
      [50, 1],
      [30, 2],
      [20, 3],
    ]); n > 0; n--) {
      if (segs.length === 0) break;
      mutations.push(pickMutator(rng)[2](rng, segs, g));
    }
  }
  let stream = Buffer.concat(segs.map((s) => s.bytes));
  if (rng.chance(0.12) && stream.length > 0) {
    const at = rng.chance(0.7) ? rng.below(Math.min(stream.length, 512)) : rng.below(stream.length);
    stream = stream.subarray(0, at);
    mutations.push(`truncate@${at}`);
  }
  const clean = g.clean && mutations.length === 0;

  // How the bytes go out: whole, in tiny or random pieces, or per segment.
  const mode = rng.weighted([
    [30, 'whole'],
    [20, 'tiny'],
    [30, 'random'],
    [20, 'segments'],
  ] as const);
  const pieces: number[] = [];
  let left = stream.length;
  if (mode === 'segments') {
    for (const s of segs) {
      if (left === 0) break;
      const n = Math.min(left, s.bytes.length);
      if (n > 0) pieces.push(n);
      left -= n;
    }
  }
  while (left > 0 && mode !== 'whole' && pieces.length < 256) {
    const n = Math.min(left, mode === 'tiny' ? rng.int(1, 8) : rng.int(1, 4096));
    pieces.push(n);
    left -= n;
  }
  if (left > 0) pieces.push(left);
  const pauses = pieces.map(() => pieces.length > 1 && rng.chance(0.1));

  const reads = new Map<bigint, number>();
  for (const r of g.requests) if (r.type === NBD_CMD_READ) reads.set(r.cookie, r.length);
  return {
    index,
    notes,
    mutations,
    stream,
    clean,
    expectClose: clean && g.closes,
    options: g.options,
    cookies: clean ? g.cookies : [],
    reads,
    known: new Set(g.requests.map((r) => r.cookie)),
    pieces,
    pauses,
    waitGreeting: rng.chance(0.2),
    halfClose: rng.chance(0.25),
  };
}

// ---------------------------------------------------------------- reply oracle

const OPTION_ERRORS = new Set([
  NBD_REP_ERR_UNSUP,
  NBD_REP_ERR_POLICY,
  NBD_REP_ERR_INVALID,
  NBD_REP_ERR_PLATFORM,
  NBD_REP_ERR_TLS_REQD,
  NBD_REP_ERR_UNKNOWN,
  NBD_REP_ERR_SHUTDOWN,
  NBD_REP_ERR_BLOCK_SIZE_REQD,
  NBD_REP_ERR_TOO_BIG,
  NBD_REP_ERR_EXT_HEADER_REQD,
]);
const NBD_ERRORS = new Set([NBD_EPERM, NBD_EIO, NBD_ENOMEM, NBD_EINVAL, NBD_ENOSPC, NBD_EOVERFLOW, NBD_ENOTSUP, NBD_ESHUTDOWN]);
/** Largest option reply nbd-export or qemu-nbd sends: a SERVER entry with a maximal name and description. */
const MAX_OPTION_REPLY = 3 * 4096 + 64;
const MAX_CHUNK = 33 * MiB;

export interface Observed {
  /** First malformed thing the server sent, if any. */
  error?: string;
  phase: 'greeting' | 'options' | 'transmission' | 'aborted';
  optionFinals: number;
  structured: boolean;
  /** Cookies of completed replies, in order. */
  done: bigint[];
  /** Parsing stopped early (simple read reply of unknown length, extended headers). */
  partial: boolean;
}

/** Parse everything the server sent on one connection. */
export function observe(buf: Buffer, size: number, c: Pick<Case, 'reads' | 'known' | 'clean'>): Observed {
  const o: Observed = { phase: 'greeting', optionFinals: 0, structured: false, done: [], partial: false };
  const n = buf.length;
  const fail = (msg: string, at: number): Observed => {
    o.error = `${msg} at byte ${at}: ${buf.subarray(at, at + 32).toString('hex')}`;
    return o;
  };
  if (n < GREETING_LENGTH) return fail(`greeting of ${n} bytes`, 0);
  if (buf.readBigUInt64BE(0) !== NBDMAGIC || buf.readBigUInt64BE(8) !== IHAVEOPT) return fail('bad greeting magic', 0);
  if ((buf.readUInt16BE(16) & NBD_FLAG_FIXED_NEWSTYLE) === 0) return fail('greeting without FIXED_NEWSTYLE', 16);
  let p = GREETING_LENGTH;
  o.phase = 'options';
  while (o.phase === 'options' && p + 8 <= n) {
    const magic = buf.readBigUInt64BE(p);
    if (magic === NBD_OPT_REPLY_MAGIC) {
      if (p + OPTION_REPLY_HEADER_LENGTH > n) return o;
      const option = buf.readUInt32BE(p + 8);
      const type = buf.readUInt32BE(p + 12);
      const len = buf.readUInt32BE(p + 16);
      const what = `${optionName(option)} ${replyTypeName(type)} length ${len}`;
      if (len > MAX_OPTION_REPLY) return fail(`option reply too long: ${what}`, p);
      if (p + OPTION_REPLY_HEADER_LENGTH + len > n) return o;
      const data = buf.subarray(p + OPTION_REPLY_HEADER_LENGTH, p + OPTION_REPLY_HEADER_LENGTH + len);
      if (type === NBD_REP_ACK) {
        if (len !== 0) return fail(`ACK with data: ${what}`, p);
        o.optionFinals++;
        if (option === NBD_OPT_GO) o.phase = 'transmission';
        else if (option === NBD_OPT_ABORT) o.phase = 'aborted';
        else if (option === NBD_OPT_STRUCTURED_REPLY) o.structured = true;
        else if (option === NBD_OPT_EXTENDED_HEADERS || option === NBD_OPT_STARTTLS) {
          o.partial = true;
          return o;
        }
      } else if (type === NBD_REP_SERVER) {
        if (option !== NBD_OPT_LIST) return fail(`SERVER reply to another option: ${what}`, p);
        if (len < 4 || data.readUInt32BE(0) > len - 4) return fail(`malformed SERVER: ${what}`, p);
      } else if (type === NBD_REP_INFO) {
        if (option !== NBD_OPT_INFO && option !== NBD_OPT_GO) return fail(`INFO reply to another option: ${what}`, p);
        if (len < 2) return fail(`short INFO: ${what}`, p);
        const info = data.readUInt16BE(0);
        if (info === NBD_INFO_EXPORT && len !== 12) return fail(`INFO_EXPORT of length ${len}`, p);
        if (info === NBD_INFO_BLOCK_SIZE && len !== 14) return fail(`INFO_BLOCK_SIZE of length ${len}`, p);
        if (info === NBD_INFO_EXPORT && data.readBigUInt64BE(2) !== BigInt(size)) return fail('INFO_EXPORT with the wrong size', p);
      } else if (type === NBD_REP_META_CONTEXT) {
        if (option !== NBD_OPT_LIST_META_CONTEXT && option !== NBD_OPT_SET_META_CONTEXT) return fail(`META_CONTEXT reply to another option: ${what}`, p);
        if (len < 5) return fail(`short META_CONTEXT: ${what}`, p);
      } else if (OPTION_ERRORS.has(type)) {
        o.optionFinals++;
      } else {
        return fail(`unknown option reply type: ${what}`, p);
      }
      p += OPTION_REPLY_HEADER_LENGTH + len;
    } else if (magic === BigInt(size)) {
      // NBD_OPT_EXPORT_NAME's reply: size, flags, then 124 zeroes unless NO_ZEROES.
      if (p + 10 > n) return o;
      if ((buf.readUInt16BE(p + 8) & NBD_FLAG_HAS_FLAGS) === 0) return fail('EXPORT_NAME reply without HAS_FLAGS', p);
      p += 10;
      if (p < n && buf[p] === 0) {
        const zeroes = buf.subarray(p, Math.min(n, p + 124));
        if (zeroes.some((b) => b !== 0)) return fail('EXPORT_NAME padding not zero', p);
        p += 124;
      }
      o.optionFinals++;
      o.phase = 'transmission';
    } else {
      return fail('not an option reply', p);
    }
  }
  if (o.phase === 'aborted') {
    if (p < n) return fail('bytes after the ACK to NBD_OPT_ABORT', p);
    return o;
  }
  if (o.phase !== 'transmission') return o;
  while (p + 4 <= n) {
    const magic = buf.readUInt32BE(p);
    if (magic === NBD_SIMPLE_REPLY_MAGIC) {
      if (p + SIMPLE_REPLY_HEADER_LENGTH > n) return o;
      const error = buf.readUInt32BE(p + 4);
      const cookie = buf.readBigUInt64BE(p + 8);
      if (error !== 0 && !NBD_ERRORS.has(error)) return fail(`simple reply with error ${error}`, p);
      p += SIMPLE_REPLY_HEADER_LENGTH;
      if (!o.structured && error === 0) {
        const readLength = c.reads.get(cookie);
        // After mutation any request may have become a read of any
        // length: what follows a successful simple reply is unknown.
        if (!c.clean || (readLength === undefined && !c.known.has(cookie))) {
          o.partial = true;
          return o;
        }
        if (readLength !== undefined) {
          if (p + readLength > n) return o;
          p += readLength;
        }
      }
      o.done.push(cookie);
    } else if (magic === NBD_STRUCTURED_REPLY_MAGIC) {
      if (!o.structured) return fail('structured reply chunk without NBD_OPT_STRUCTURED_REPLY', p);
      if (p + STRUCTURED_REPLY_HEADER_LENGTH > n) return o;
      const flags = buf.readUInt16BE(p + 4);
      const type = buf.readUInt16BE(p + 6);
      const cookie = buf.readBigUInt64BE(p + 8);
      const len = buf.readUInt32BE(p + 16);
      const what = `${chunkTypeName(type)} flags ${flags} length ${len}`;
      if ((flags & ~NBD_REPLY_FLAG_DONE) !== 0) return fail(`chunk with unknown flags: ${what}`, p);
      if (len > MAX_CHUNK) return fail(`chunk too long: ${what}`, p);
      if (p + STRUCTURED_REPLY_HEADER_LENGTH + len > n) return o;
      const d = buf.subarray(p + STRUCTURED_REPLY_HEADER_LENGTH, p + STRUCTURED_REPLY_HEADER_LENGTH + len);
      let bad = '';
      switch (type) {
        case NBD_REPLY_TYPE_NONE:
          if (len !== 0 || (flags & NBD_REPLY_FLAG_DONE) === 0) bad = 'NONE must be empty and final';
          break;
        case NBD_REPLY_TYPE_OFFSET_DATA:
          if (len <= 8) bad = 'OFFSET_DATA without data';
          else if (d.readBigUInt64BE(0) + BigInt(len - 8) > BigInt(size)) bad = 'OFFSET_DATA past the end';
          break;
        case NBD_REPLY_TYPE_OFFSET_HOLE:
          if (len !== 12 || d.readUInt32BE(8) === 0) bad = 'malformed OFFSET_HOLE';
          else if (d.readBigUInt64BE(0) + BigInt(d.readUInt32BE(8)) > BigInt(size)) bad = 'OFFSET_HOLE past the end';
          break;
        case NBD_REPLY_TYPE_BLOCK_STATUS:
          if (len < 12 || (len - 4) % 8 !== 0) bad = 'malformed BLOCK_STATUS';
          break;
        case NBD_REPLY_TYPE_ERROR:
        case NBD_REPLY_TYPE_ERROR_OFFSET: {
          const extra = type === NBD_REPLY_TYPE_ERROR ? 6 : 14;
          if (len < extra || d.readUInt16BE(4) + extra !== len) bad = 'malformed error chunk';
          else if (!NBD_ERRORS.has(d.readUInt32BE(0))) bad = `error chunk with error ${d.readUInt32BE(0)}`;
          break;
        }
        default:
          bad = 'unknown chunk type';
      }
      if (bad !== '') return fail(`${bad}: ${what}`, p);
      p += STRUCTURED_REPLY_HEADER_LENGTH + len;
      if ((flags & NBD_REPLY_FLAG_DONE) !== 0) o.done.push(cookie);
    } else {
      return fail('not a reply', p);
    }
  }
  return o;
}

/**
 * Strict checks for a clean case the server has closed (or must have).
 * `negotiatingMs`: how long the connection had been open; past the
 * server's handshake limit it may rightly have been dropped mid-negotiation.
 */
function judgeClean(c: Case, o: Observed, closed: boolean, negotiatingMs: number): string | undefined {
  if (c.expectClose && !closed) return 'server did not close the connection after NBD_CMD_DISC / NBD_OPT_ABORT';
  if (!closed || o.partial) return undefined;
  if (o.phase === 'options' && negotiatingMs >= HANDSHAKE_LIMIT * 1000 * 0.75) return undefined;
  if (o.optionFinals !== c.options) return `${c.options} options sent but ${o.optionFinals} final option replies`;
  const seen = new Set<bigint>();
  for (const cookie of o.done) {
    if (!c.known.has(cookie)) return `reply for cookie 0x${cookie.toString(16)} that was not sent`;
    if (seen.has(cookie)) return `two replies for cookie 0x${cookie.toString(16)}`;
    seen.add(cookie);
  }
  if (c.expectClose) {
    const missing = c.cookies.filter((k) => !seen.has(k));
    if (missing.length > 0) return `${missing.length} of ${c.cookies.length} valid requests before DISC got no reply (first: cookie 0x${missing[0]!.toString(16)})`;
  }
  return undefined;
}

// ---------------------------------------------------------------- running a case

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
/** A sleep that does not keep the process alive (for races against it). */
const unrefSleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms).unref());

/** `sock`: a Unix socket's path, or tcp:HOST:PORT. */
function connect(sock: string): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const tcp = /^tcp:(.+):(\d+)$/.exec(sock);
    const s = tcp === null ? net.createConnection(sock) : net.createConnection({ host: tcp[1]!, port: Number(tcp[2]), noDelay: true });
    s.once('connect', () => {
      s.off('error', reject);
      resolve(s);
    });
    s.once('error', reject);
  });
}

interface CaseResult {
  bytesOut: number;
  bytesIn: number;
  closedByServer: boolean;
  /** An oracle failure. */
  failure?: string;
  /** The case could not run (e.g. the server is gone). */
  skipped?: string;
}

const CAPTURE_LIMIT = 80 * MiB;
const IDLE_MS = 30;
const QUIET_CAP_MS = 1000;
const CLOSE_WAIT_MS = 5000;
const GREETING_WAIT_MS = 5000;
const SEND_TIMEOUT_MS = 20000;

async function runCase(sock: string, c: Case, size: number): Promise<CaseResult> {
  let s: net.Socket;
  const connectedAt = Date.now();
  try {
    s = await connect(sock);
  } catch (err) {
    return { bytesOut: 0, bytesIn: 0, closedByServer: false, skipped: `connect: ${(err as Error).message}` };
  }
  const chunks: Buffer[] = [];
  let bytesIn = 0;
  let captured = true;
  let lastData = Date.now();
  let ended = false;
  let closed = false;
  const wakers = new Set<() => void>();
  const wake = (): void => {
    for (const w of wakers) w();
  };
  /** Resolves on the next event (data, end, close, drain) or after `ms`. */
  const next = (ms: number): Promise<void> =>
    new Promise((resolve) => {
      const t = setTimeout(done, ms);
      function done(): void {
        clearTimeout(t);
        wakers.delete(done);
        resolve();
      }
      wakers.add(done);
    });
  s.on('data', (d: Buffer) => {
    bytesIn += d.length;
    if (captured && bytesIn <= CAPTURE_LIMIT) chunks.push(d);
    else captured = false;
    lastData = Date.now();
    wake();
  });
  s.on('end', () => {
    ended = true;
    wake();
  });
  s.on('close', () => {
    closed = true;
    wake();
  });
  s.on('drain', wake);
  // EPIPE / ECONNRESET when the server hangs up first: Node then destroys
  // the socket, and what the server sent may not all have been read.
  let reset = false;
  s.on('error', () => {
    reset = true;
  });

  const deadline = Date.now() + SEND_TIMEOUT_MS;
  let stalled = false;
  if (c.waitGreeting) {
    while (bytesIn < GREETING_LENGTH && !closed && Date.now() < deadline) await next(deadline - Date.now());
  }
  let at = 0;
  for (let i = 0; i < c.pieces.length && !closed && !s.destroyed && !s.writableEnded; i++) {
    const n = c.pieces[i]!;
    const ok = s.write(c.stream.subarray(at, at + n));
    at += n;
    while (!ok && s.writableLength > 0 && !closed && Date.now() < deadline) await next(deadline - Date.now());
    if (Date.now() >= deadline && s.writableLength > 0) {
      stalled = true;
      break;
    }
    if (c.pauses[i]) await (i % 2 === 0 ? sleep(1) : new Promise<void>((r) => setImmediate(r)));
  }
  if (c.halfClose && !closed) s.end();

  // Read what comes back: until the server closes, or (once it has at
  // least greeted) it has been quiet a while.
  const waitStart = Date.now();
  lastData = Math.max(lastData, waitStart);
  const cap = c.expectClose ? CLOSE_WAIT_MS : QUIET_CAP_MS;
  while (!ended && !closed && !stalled) {
    const now = Date.now();
    if (bytesIn < GREETING_LENGTH) {
      if (now - waitStart >= GREETING_WAIT_MS) break;
    } else {
      if (now - waitStart >= cap) break;
      if (!c.expectClose && now - lastData >= IDLE_MS && s.writableLength === 0) break;
    }
    await next(c.expectClose || bytesIn < GREETING_LENGTH ? cap : IDLE_MS);
  }
  // A timer can fire before I/O that was already waiting (after a pause
  // of this process): let the poll phase deliver it before judging.
  await new Promise<void>((r) => setImmediate(r));
  const closedByServer = ended;
  const unsent = s.writableLength;
  s.destroy();
  const result: CaseResult = { bytesOut: at - unsent, bytesIn, closedByServer };
  if (stalled) {
    result.failure = `stalled: the server stopped reading, ${unsent} bytes unsent after ${SEND_TIMEOUT_MS / 1000} s`;
    return result;
  }
  if (!captured) return result;
  const received = Buffer.concat(chunks);
  if (reset && received.length < GREETING_LENGTH) return result;
  if (received.length < GREETING_LENGTH) {
    const waited = ((Date.now() - waitStart) / 1000).toFixed(1);
    result.failure = `${received.length} bytes of greeting: ${closedByServer ? 'the server hung up without greeting' : `no greeting after ${waited} s, connection still open`}`;
    return result;
  }
  const o = observe(received, size, c);
  if (o.error !== undefined) result.failure = `malformed server output: ${o.error}`;
  else if (c.clean) {
    const bad = judgeClean(c, o, closedByServer, Date.now() - connectedAt);
    if (bad !== undefined) result.failure = bad;
  }
  return result;
}

// ---------------------------------------------------------------- the check client

/** A socket read as a byte stream with awaitable reads. */
class Wire {
  readonly socket: net.Socket;
  readonly #queue = new ByteQueue();
  #ended = false;
  #error: Error | undefined;
  #waiter: (() => void) | undefined;

  constructor(socket: net.Socket) {
    this.socket = socket;
    const wake = (): void => {
      const w = this.#waiter;
      this.#waiter = undefined;
      w?.();
    };
    socket.on('data', (d: Buffer) => {
      this.#queue.push(d);
      wake();
    });
    socket.on('end', () => {
      this.#ended = true;
      wake();
    });
    socket.on('close', () => {
      this.#ended = true;
      wake();
    });
    socket.on('error', (err) => {
      this.#error = err;
      wake();
    });
  }

  async read(n: number): Promise<Buffer> {
    while (this.#queue.length < n) {
      if (this.#error !== undefined) throw new Error(`socket error: ${this.#error.message}`);
      if (this.#ended) throw new Error(`server closed the connection (wanted ${n} bytes, had ${this.#queue.length})`);
      await new Promise<void>((r) => (this.#waiter = r));
    }
    return this.#queue.take(n);
  }

  /** Resolves when the server has closed; throws if it sends anything first. */
  async closed(): Promise<void> {
    while (!this.#ended) {
      if (this.#queue.length > 0) throw new Error(`unexpected bytes before close: ${this.#queue.peek(Math.min(this.#queue.length, 32)).toString('hex')}`);
      await new Promise<void>((r) => (this.#waiter = r));
    }
  }

  write(b: Buffer): void {
    this.socket.write(b);
  }
}

interface Negotiated {
  wire: Wire;
  structured: boolean;
  size: number;
  flags: number;
}

/** A well-behaved client: fixed newstyle, optional structured replies, GO. */
async function negotiate(sock: string, structured: boolean, sockets?: net.Socket[]): Promise<Negotiated> {
  const wire = new Wire(await connect(sock));
  sockets?.push(wire.socket);
  const greeting = await wire.read(GREETING_LENGTH);
  if (greeting.readBigUInt64BE(0) !== NBDMAGIC || greeting.readBigUInt64BE(8) !== IHAVEOPT) throw new Error(`bad greeting ${greeting.toString('hex')}`);
  wire.write(u32(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES));
  const optionReply = async (): Promise<{ option: number; type: number; data: Buffer }> => {
    const h = await wire.read(OPTION_REPLY_HEADER_LENGTH);
    if (h.readBigUInt64BE(0) !== NBD_OPT_REPLY_MAGIC) throw new Error(`bad option reply ${h.toString('hex')}`);
    const len = h.readUInt32BE(16);
    if (len > MAX_OPTION_REPLY) throw new Error(`option reply of ${len} bytes`);
    return { option: h.readUInt32BE(8), type: h.readUInt32BE(12), data: await wire.read(len) };
  };
  if (structured) {
    wire.write(optionBytes(NBD_OPT_STRUCTURED_REPLY, Buffer.alloc(0)));
    const r = await optionReply();
    if (r.type !== NBD_REP_ACK) throw new Error(`STRUCTURED_REPLY answered ${replyTypeName(r.type)}`);
  }
  wire.write(optionBytes(NBD_OPT_GO, Buffer.concat([lstr(''), u16(1), u16(NBD_INFO_BLOCK_SIZE)])));
  let size = -1;
  let flags = 0;
  for (;;) {
    const r = await optionReply();
    if (r.option !== NBD_OPT_GO) throw new Error(`reply to ${optionName(r.option)} during GO`);
    if (r.type === NBD_REP_ACK) break;
    if (r.type !== NBD_REP_INFO) throw new Error(`GO answered ${replyTypeName(r.type)}: ${r.data.toString()}`);
    if (r.data.readUInt16BE(0) === NBD_INFO_EXPORT) {
      size = Number(r.data.readBigUInt64BE(2));
      flags = r.data.readUInt16BE(10);
    }
  }
  if (size < 0) throw new Error('GO without NBD_INFO_EXPORT');
  return { wire, structured, size, flags };
}

async function request(c: Negotiated, type: number, cookie: bigint, offset: number, length: number, flags = 0, data?: Buffer): Promise<Buffer> {
  c.wire.write(requestBytes({ flags, type, cookie, offset, length }));
  if (data !== undefined) c.wire.write(data);
  const out = Buffer.alloc(type === NBD_CMD_READ ? length : 0);
  const covered = new Uint8Array(out.length);
  const magic = (await c.wire.read(4)).readUInt32BE(0);
  if (magic === NBD_SIMPLE_REPLY_MAGIC) {
    const h = await c.wire.read(12);
    const error = h.readUInt32BE(0);
    if (h.readBigUInt64BE(4) !== cookie) throw new Error(`simple reply for cookie ${h.readBigUInt64BE(4)}, wanted ${cookie}`);
    if (error !== 0) throw new Error(`request ${type} failed with error ${error}`);
    if (type === NBD_CMD_READ) {
      if (c.structured) throw new Error('simple reply to a read after structured replies were negotiated');
      return c.wire.read(length);
    }
    return out;
  }
  if (magic !== NBD_STRUCTURED_REPLY_MAGIC || !c.structured) throw new Error(`bad reply magic 0x${magic.toString(16)}`);
  let m = magic;
  for (;;) {
    if (m !== NBD_STRUCTURED_REPLY_MAGIC) throw new Error(`bad chunk magic 0x${m.toString(16)}`);
    const h = await c.wire.read(16);
    const flags = h.readUInt16BE(0);
    const ctype = h.readUInt16BE(2);
    if (h.readBigUInt64BE(4) !== cookie) throw new Error(`chunk for cookie ${h.readBigUInt64BE(4)}, wanted ${cookie}`);
    const len = h.readUInt32BE(12);
    if (len > MAX_CHUNK) throw new Error(`chunk of ${len} bytes`);
    const d = await c.wire.read(len);
    if (ctype === NBD_REPLY_TYPE_OFFSET_DATA || ctype === NBD_REPLY_TYPE_OFFSET_HOLE) {
      const at = Number(d.readBigUInt64BE(0)) - offset;
      const n = ctype === NBD_REPLY_TYPE_OFFSET_DATA ? len - 8 : d.readUInt32BE(8);
      if (at < 0 || at + n > length) throw new Error(`${chunkTypeName(ctype)} outside the request`);
      if (ctype === NBD_REPLY_TYPE_OFFSET_DATA) d.copy(out, at, 8);
      else out.fill(0, at, at + n);
      covered.fill(1, at, at + n);
    } else if (ctype === NBD_REPLY_TYPE_ERROR || ctype === NBD_REPLY_TYPE_ERROR_OFFSET) {
      throw new Error(`request ${type} failed: error ${d.readUInt32BE(0)} ${d.subarray(6, 6 + d.readUInt16BE(4)).toString()}`);
    } else if (ctype !== NBD_REPLY_TYPE_NONE) {
      throw new Error(`unexpected ${chunkTypeName(ctype)}`);
    }
    if ((flags & NBD_REPLY_FLAG_DONE) !== 0) break;
    m = (await c.wire.read(4)).readUInt32BE(0);
  }
  if (covered.includes(0)) throw new Error('read reply does not cover the whole range');
  return out;
}

async function disconnect(c: Negotiated): Promise<void> {
  c.wire.write(requestBytes({ type: NBD_CMD_DISC, cookie: 99n, offset: 0, length: 0 }));
  await c.wire.closed();
}

/**
 * Two well-behaved clients (one structured, one not): A writes a random
 * 4 KiB pattern at a random offset, B and A read it back (DESIGN
 * invariant 1: a replied write is visible to every connection).
 */
async function checkClient(sock: string, rng: Rng, timeoutMs: number): Promise<void> {
  const sockets: net.Socket[] = [];
  const work = async (): Promise<void> => {
    const structuredA = rng.chance(0.5);
    const a = await negotiate(sock, structuredA, sockets);
    const b = await negotiate(sock, !structuredA, sockets);
    const offset = 4096 * rng.below(Math.floor(a.size / 4096));
    const pattern = rng.bytes(4096);
    const fua = (a.flags & NBD_FLAG_SEND_FUA) !== 0 && rng.chance(0.5) ? NBD_CMD_FLAG_FUA : 0;
    await request(a, NBD_CMD_WRITE, 1n, offset, 4096, fua, pattern);
    if ((a.flags & NBD_FLAG_SEND_FLUSH) !== 0 && rng.chance(0.3)) await request(a, NBD_CMD_FLUSH, 2n, 0, 0);
    for (const [who, conn] of [['second', b], ['writing', a]] as const) {
      const got = await request(conn, NBD_CMD_READ, 3n, offset, 4096);
      if (!got.equals(pattern)) {
        let first = 0;
        while (got[first] === pattern[first]) first++;
        throw new Error(`wrong data read back on the ${who} connection at offset ${offset} (+${first}): wrote ${pattern.subarray(first, first + 16).toString('hex')} read ${got.subarray(first, first + 16).toString('hex')}`);
      }
    }
    await disconnect(a);
    await disconnect(b);
  };
  let timer: NodeJS.Timeout | undefined;
  const running = work();
  running.catch(() => {}); // still pending when the timeout wins
  try {
    await Promise.race([
      running,
      new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`check client timed out after ${timeoutMs} ms`)), timeoutMs))),
    ]);
  } finally {
    clearTimeout(timer);
    for (const s of sockets) s.destroy();
  }
}

// ---------------------------------------------------------------- flood probes

/**
 * Clients that read nothing and keep sending. Whatever they send, the
 * memory the server holds for them must stay bounded (README, "Memory
 * bound"): it stops reading their socket, drains what it can discard, or
 * hangs up.
 */
export const PROBES = ['options', 'invalid-requests', 'valid-reads', 'closed-junk', 'disc-junk', 'budget-wait', 'mutated-tail'] as const;
export type ProbeKind = (typeof PROBES)[number];

const PROBE_DESCRIPTIONS: Record<ProbeKind, string> = {
  options: 'client flags, then NBD_OPT_INFO (name "", no info requests) repeated',
  'invalid-requests': 'GO, then NBD_CMD_READ of 512 bytes at the export size (EINVAL) repeated',
  'valid-reads': 'GO, then NBD_CMD_READ of 64 KiB at offset 0 repeated',
  'closed-junk': 'GO, 8 READs of 1 MiB, 300 ms, a request with magic 0xdeadbeef, then 0x41 bytes',
  'disc-junk': 'GO, 8 READs of 1 MiB, NBD_CMD_DISC, 300 ms, then 0x41 bytes',
  'budget-wait': '8 other clients hold unread 32 MiB READs (the shared budget); GO, a READ of 1 MiB, then 0x41 bytes',
  'mutated-tail': 'a fuzz case stream repeated',
};

const FLOOD_MAX = 192 * MiB;
const FLOOD_MS = 5000;
/** The server has stopped reading when nothing more drains for this long. */
const STALL_MS = 1000;
/**
 * How much a probe may grow the server's RSS: the replies or payloads a
 * connection has in flight (4 MiB, or one request of up to 32 MiB), writes landing on the 64 MiB memory disk, and
 * garbage not yet collected.
 */
const PROBE_GROWTH_MIB = 160;

export interface ProbeOutcome {
  kind: ProbeKind;
  sentMiB: number;
  growthMiB: number;
  rssAfterMiB: number;
  /** The server stopped taking bytes (paused, or too busy) for STALL_MS. */
  stoppedReading: boolean;
  closedByServer: boolean;
  failure?: string;
}

function repeatTo(unit: Buffer, bytes: number): Buffer {
  return Buffer.concat(Array.from({ length: Math.max(1, Math.floor(bytes / Math.max(1, unit.length))) }, () => unit));
}

async function floodProbe(sock: string, kind: ProbeKind, rng: Rng, size: number, rss: () => number | undefined): Promise<ProbeOutcome> {
  const hogs: net.Socket[] = [];
  if (kind === 'budget-wait') {
    // Replies nobody reads hold the server's shared memory budget.
    // Each holds its connection's share (one 32 MiB read unread): together
    // the whole 256 MiB budget.
    for (let i = 0; i < 8; i++) {
      const h = await connect(sock);
      h.pause();
      h.on('error', () => {});
      const hello = u32(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
      const reads = Array.from({ length: 2 }, (_, k) => requestBytes({ type: NBD_CMD_READ, cookie: BigInt(k + 1), offset: 0, length: 32 * MiB }));
      h.write(Buffer.concat([hello, optionBytes(NBD_OPT_GO, Buffer.concat([lstr(''), u16(0)])), ...reads]));
      hogs.push(h);
    }
    await sleep(1500);
  }
  const before = rss() ?? 0;
  const s = await connect(sock);
  s.pause(); // reads nothing, ever
  let closed = false;
  s.on('error', () => {});
  s.on('close', () => (closed = true));
  const hello = u32(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
  const go = Buffer.concat([hello, optionBytes(NBD_OPT_GO, Buffer.concat([lstr(''), u16(0)]))]);
  const bigReads = Array.from({ length: 8 }, (_, i) => requestBytes({ type: NBD_CMD_READ, cookie: BigInt(i + 1), offset: 0, length: 1 * MiB }));
  const junk = Buffer.alloc(1 * MiB, 0x41);
  let head: Buffer;
  let pauseMs = 0;
  let mid: Buffer = Buffer.alloc(0);
  let unit: Buffer;
  switch (kind) {
    case 'options':
      head = hello;
      unit = repeatTo(optionBytes(NBD_OPT_INFO, Buffer.concat([lstr(''), u16(0)])), 1 * MiB);
      break;
    case 'invalid-requests':
      head = go;
      unit = repeatTo(requestBytes({ type: NBD_CMD_READ, cookie: 7n, offset: size, length: 512 }), 1 * MiB);
      break;
    case 'valid-reads':
      head = go;
      unit = repeatTo(requestBytes({ type: NBD_CMD_READ, cookie: 7n, offset: 0, length: 64 * KiB }), 64 * KiB);
      break;
    case 'closed-junk':
      head = Buffer.concat([go, ...bigReads]);
      pauseMs = 300;
      mid = requestBytes({ type: NBD_CMD_READ, cookie: 9n, offset: 0, length: 0 });
      mid.writeUInt32BE(0xdeadbeef, 0);
      unit = junk;
      break;
    case 'disc-junk':
      head = Buffer.concat([go, ...bigReads, requestBytes({ type: NBD_CMD_DISC, cookie: 9n, offset: 0, length: 0 })]);
      pauseMs = 300;
      unit = junk;
      break;
    case 'budget-wait':
      head = Buffer.concat([go, bigReads[0]!]);
      pauseMs = 300;
      unit = junk;
      break;
    case 'mutated-tail': {
      const c = makeCase(rng.u32(), rng.u32(), size);
      head = c.stream;
      unit = repeatTo(c.stream.length > 0 ? c.stream.subarray(0, 1 * MiB) : junk, 1 * MiB);
      break;
    }
  }
  s.write(head);
  if (pauseMs > 0) await sleep(pauseMs);
  if (mid.length > 0) s.write(mid);
  let sent = head.length + mid.length;
  let stoppedReading = false;
  const deadline = Date.now() + FLOOD_MS;
  let accepted = 0;
  let progressAt = Date.now();
  while (sent < FLOOD_MAX && !closed && Date.now() < deadline) {
    if (s.writableLength > 8 * MiB) {
      await sleep(20);
      if (sent - s.writableLength > accepted) {
        accepted = sent - s.writableLength;
        progressAt = Date.now();
      } else if (Date.now() - progressAt > STALL_MS) {
        stoppedReading = true;
        break;
      }
      continue;
    }
    s.write(unit);
    sent += unit.length;
    await new Promise<void>((r) => setImmediate(r));
  }
  // The server may still be working through what it has read: take the
  // highest RSS until it settles (or 3 s), with the connection still open.
  let after = rss() ?? before;
  for (let prev = after, t = Date.now(); Date.now() - t < 3000; ) {
    await sleep(250);
    const now = rss() ?? prev;
    after = Math.max(after, now);
    if (Math.abs(now - prev) < 2) break;
    prev = now;
  }
  s.destroy();
  for (const h of hogs) h.destroy();
  const outcome: ProbeOutcome = {
    kind,
    sentMiB: (sent - s.writableLength) / MiB,
    growthMiB: after - before,
    rssAfterMiB: after,
    stoppedReading,
    closedByServer: closed,
  };
  if (outcome.growthMiB > PROBE_GROWTH_MIB) {
    outcome.failure =
      `memory grows with what a non-reading client sends: probe '${kind}' (${PROBE_DESCRIPTIONS[kind]}): ` +
      `after ${outcome.sentMiB.toFixed(0)} MiB sent, server RSS ${before.toFixed(0)} -> ${after.toFixed(0)} MiB ` +
      `(${stoppedReading ? `then it took no more bytes for ${STALL_MS} ms` : closed ? 'then it hung up' : 'it was still taking bytes'})`;
  }
  return outcome;
}

// ---------------------------------------------------------------- the server

/** A TCP port on 127.0.0.1 that nothing listens on just now. */
function freeLoopbackPort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const probe = net.createServer();
    probe.once('error', reject);
    probe.listen(0, '127.0.0.1', () => {
      const { port } = probe.address() as net.AddressInfo;
      probe.close(() => resolve(port));
    });
  });
}

class Server {
  readonly proc: ChildProcess;
  readonly sock: string;
  #stderr = '';
  #scanned = 0;
  exit: { code: number | null; signal: NodeJS.Signals | null } | undefined;
  readonly exited: Promise<void>;

  /** `port`: listen on it on 127.0.0.1 instead of a Unix socket (the default server only). */
  constructor(dir: string, serverCmd: string | undefined, image: 'memory' | 'raw', verbose: boolean, port?: number) {
    if (port !== undefined && serverCmd !== undefined) throw new Error('--transport tcp needs the default server');
    this.sock = port === undefined ? path.join(dir, 'nbd.sock') : `tcp:127.0.0.1:${port}`;
    const file = path.join(dir, 'disk.img');
    if (serverCmd !== undefined || image === 'raw') {
      fs.writeFileSync(file, '');
      fs.truncateSync(file, 64 * MiB);
    }
    if (serverCmd === undefined) {
      const disk = image === 'raw' ? ['-f', 'raw', file] : ['memory:64M'];
      const listen = port === undefined ? ['-k', this.sock] : ['--bind', '127.0.0.1', '-p', String(port)];
      this.proc = spawn(SERVER_BIN, ['-t', '-e', '0', '--handshake-limit', String(HANDSHAKE_LIMIT), ...listen, ...disk], {
        stdio: ['ignore', 'inherit', 'pipe'],
      });
    } else {
      const image = file;
      const cmd = serverCmd.replaceAll('$SOCK', this.sock).replaceAll('$IMAGE', image);
      this.proc = spawn('/bin/sh', ['-c', `exec ${cmd}`], { stdio: ['ignore', 'inherit', 'pipe'] });
    }
    this.proc.stderr!.setEncoding('utf8');
    this.proc.stderr!.on('data', (d: string) => {
      if (verbose) process.stderr.write(d);
      this.#stderr += d;
      if (this.#stderr.length > 1 * MiB) {
        const cut = this.#stderr.length - 256 * KiB;
        this.#stderr = this.#stderr.slice(cut);
        this.#scanned = Math.max(0, this.#scanned - cut);
      }
    });
    this.exited = new Promise((resolve) => {
      this.proc.on('exit', (code, signal) => {
        this.exit = { code, signal };
        resolve();
      });
    });
  }

  get pid(): number {
    return this.proc.pid!;
  }

  get alive(): boolean {
    return this.exit === undefined;
  }

  async ready(timeoutMs: number): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (Date.now() < deadline) {
      if (!this.alive) throw new Error(`server exited at start (${JSON.stringify(this.exit)}): ${this.stderrTail()}`);
      try {
        const s = await connect(this.sock);
        s.destroy();
        return;
      } catch {
        await sleep(50);
      }
    }
    throw new Error(`server did not listen on ${this.sock} within ${timeoutMs} ms`);
  }

  /** VmRSS and VmHWM in MiB. */
  memory(): { rss: number; hwm: number } | undefined {
    try {
      const status = fs.readFileSync(`/proc/${this.pid}/status`, 'utf8');
      const kib = (key: string): number => Number(new RegExp(`^${key}:\\s+(\\d+)`, 'm').exec(status)?.[1] ?? 0);
      return { rss: kib('VmRSS') / 1024, hwm: kib('VmHWM') / 1024 };
    } catch {
      return undefined;
    }
  }

  /** Lines logged since the last call that look like a crash or a bug. */
  newAlarms(): string[] {
    const text = this.#stderr.slice(this.#scanned);
    this.#scanned = this.#stderr.length;
    return text
      .split('\n')
      .filter((l) => /TypeError|RangeError|ReferenceError|SyntaxError|AssertionError|ERR_|uncaught|unhandled|FATAL|out of memory|^\s+at /i.test(l));
  }

  stderrTail(n = 2000): string {
    return this.#stderr.slice(-n);
  }
}

// ---------------------------------------------------------------- the run

export interface FuzzOptions {
  seed: number;
  /** Stop after this long (seconds)... */
  seconds: number;
  /** ...or this many cases. */
  cases: number;
  /** Run only these case indices, one at a time, printing each. */
  replay?: number[];
  /** Index of the first case (a run from the middle of another). */
  from: number;
  /** Shell command starting another server; $SOCK and $IMAGE (a 64 MiB raw file) are replaced. */
  serverCmd?: string;
  /** The default server's disk: memory:64M, or a 64 MiB raw file. */
  image: 'memory' | 'raw';
  /**
   * Where the default server listens: a Unix socket, or a free port on
   * 127.0.0.1 (TCP has its own paths: large writes done on the event loop,
   * no sendfile send-buffer widening).
   */
  transport: 'unix' | 'tcp';
  /** Connections fuzzed at once. */
  parallel: number;
  /** Cases between two checks by the well-behaved client (at most 50). */
  checkEvery: number;
  /** Run a flood probe (round robin over PROBES) every this many checks; 0 = never. */
  probeEvery: number;
  /** Index in PROBES of the first probe. */
  probeStart: number;
  /** Run only these probes, once each, and no cases. */
  probeOnly?: ProbeKind[];
  /** Bound on sampled RSS (the peak between samples, VmHWM, is only reported). */
  maxRssMiB: number;
  /** Write each replayed case's bytes here. */
  saveDir?: string;
  verbose: boolean;
  log: (line: string) => void;
}

export interface FuzzFailure {
  kind: string;
  seed: number;
  /** First and last case index that may have caused it. */
  cases: [number, number];
  detail: string;
  /** Arguments to `npm run fuzz --` that replay it. */
  replay: string;
}

export interface FuzzResult {
  seed: number;
  cases: number;
  seconds: number;
  casesPerSecond: number;
  checks: number;
  cleanCases: number;
  closedByServer: number;
  bytesOut: number;
  bytesIn: number;
  rssStartMiB: number;
  rssEndMiB: number;
  maxRssMiB: number;
  hwmMiB: number;
  sigterm: string;
  failures: FuzzFailure[];
}

export const DEFAULT_OPTIONS: Omit<FuzzOptions, 'seed'> = {
  seconds: 60,
  cases: Infinity,
  from: 0,
  image: 'memory',
  transport: 'unix',
  parallel: 4,
  checkEvery: 20,
  probeEvery: 10,
  probeStart: 0,
  // README "Memory bound": ~100 MiB runtime, the 256 MiB request budget,
  // 32 MiB of pooled buffers, plus the 64 MiB memory disk once the cases
  // have written all of it, and 64 MiB for garbage not yet collected.
  maxRssMiB: 100 + 256 + 32 + 64 + 64,
  verbose: false,
  log: (line) => console.log(line),
};

function describeCase(c: Case, hexBytes = 4096): string {
  const head = c.stream.subarray(0, hexBytes).toString('hex').replace(/(.{64})/g, '$1\n    ');
  return [
    `case ${c.index}: ${c.stream.length} bytes, ${c.clean ? 'clean' : 'not clean'}${c.expectClose ? ', server must close' : ''}; pieces ${c.pieces.length}${c.waitGreeting ? ', waits for greeting' : ''}${c.halfClose ? ', half-closes' : ''}`,
    `  generated: ${c.notes.join(' | ')}`,
    `  mutations: ${c.mutations.length === 0 ? 'none' : c.mutations.join('; ')}`,
    `  bytes${c.stream.length > hexBytes ? ` (first ${hexBytes})` : ''}:\n    ${head}`,
  ].join('\n');
}

export async function runFuzz(options: Partial<FuzzOptions> & { seed: number }): Promise<FuzzResult> {
  const opts: FuzzOptions = { ...DEFAULT_OPTIONS, ...options };
  const log = opts.log;
  const checkEvery = Math.max(1, Math.min(50, opts.checkEvery));
  const seed = opts.seed >>> 0;
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbd-fuzz-'));
  const server = new Server(dir, opts.serverCmd, opts.image, opts.verbose, opts.transport === 'tcp' ? await freeLoopbackPort() : undefined);
  const failures: FuzzFailure[] = [];
  const fail = (kind: string, cases: [number, number], detail: string, replay?: string): void => {
    const range = cases[0] === cases[1] ? `${cases[0]}` : `${cases[0]}-${cases[1]}`;
    failures.push({ kind, seed, cases, detail, replay: replay ?? `--seed ${seed} --replay ${range}` });
    log(`FAIL ${kind} (cases ${cases[0]}..${cases[1]}): ${detail}`);
  };
  const checkRng = new Rng(mix32(seed ^ 0xc0ffee));
  let casesRun = 0;
  let cleanCases = 0;
  let closedByServer = 0;
  let bytesOut = 0;
  let bytesIn = 0;
  let checks = 0;
  let probes = opts.probeStart;
  let maxRss = 0;
  let rssStart = 0;
  let rssEnd = 0;
  let sigterm = 'not tried';
  let started = performance.now();
  let fuzzSeconds = 0;
  let idle: Wire | undefined;
  let idleOpened = 0;
  try {
    await server.ready(20_000);
    // The export's size, from a well-behaved client.
    const sockets: net.Socket[] = [];
    const first = (async () => {
      const probe = await negotiate(server.sock, true, sockets);
      await disconnect(probe);
      return probe.size;
    })();
    first.catch(() => {});
    const size = await Promise.race([
      first,
      unrefSleep(10_000).then(() => {
        for (const s of sockets) s.destroy();
        throw new Error('a well-behaved client could not negotiate within 10 s');
      }),
    ]);
    rssStart = server.memory()?.rss ?? 0;
    maxRss = rssStart;
    if (opts.serverCmd === undefined) {
      // A client that never negotiates must be dropped after the handshake limit.
      idle = new Wire(await connect(server.sock));
      idleOpened = Date.now();
    }
    log(`fuzzing ${opts.serverCmd ?? SERVER_BIN} (pid ${server.pid}) on ${server.sock}, export of ${size} bytes, seed ${seed}`);
    started = performance.now();

    /** Liveness, the check client, RSS and the server's log, after cases first..last. */
    const check = async (first: number, last: number): Promise<boolean> => {
      checks++;
      const window: [number, number] = [first, last];
      if (!server.alive) {
        fail('server-died', window, `server exited ${JSON.stringify(server.exit)}; stderr:\n${server.stderrTail()}`);
        return false;
      }
      try {
        await checkClient(server.sock, checkRng, 5000);
      } catch (err) {
        await sleep(100);
        const how = server.alive ? 'alive' : `exited ${JSON.stringify(server.exit)}`;
        fail(server.alive ? 'check-failed' : 'server-died', window, `${(err as Error).message} (server ${how}); stderr:\n${server.stderrTail()}`);
        return false;
      }
      const mem = server.memory();
      if (mem !== undefined) {
        maxRss = Math.max(maxRss, mem.rss);
        if (mem.rss > opts.maxRssMiB) {
          fail('rss', window, `server RSS ${mem.rss.toFixed(0)} MiB exceeds ${opts.maxRssMiB} MiB`);
          return false;
        }
      }
      if (opts.probeEvery > 0 && checks % opts.probeEvery === 0) {
        const kind = PROBES[probes++ % PROBES.length]!;
        const p = await floodProbe(server.sock, kind, checkRng, size, () => server.memory()?.rss);
        if (opts.verbose) log(`probe ${kind}: sent ${p.sentMiB.toFixed(0)} MiB, RSS +${p.growthMiB.toFixed(0)} MiB${p.stoppedReading ? ', server stopped reading' : ''}${p.closedByServer ? ', server hung up' : ''}`);
        maxRss = Math.max(maxRss, p.rssAfterMiB);
        if (p.failure !== undefined) {
          // The server now holds that memory: what follows would not say more.
          fail('memory-growth', window, p.failure, `--probe ${kind}`);
          return false;
        }
        maxRss = Math.max(maxRss, server.memory()?.rss ?? 0);
        if (!server.alive) {
          fail('server-died', window, `during probe ${kind}: server exited ${JSON.stringify(server.exit)}; stderr:\n${server.stderrTail()}`);
          return false;
        }
      }
      const alarms = server.newAlarms();
      if (alarms.length > 0) fail('server-log', window, alarms.slice(0, 20).join('\n'));
      return true;
    };

    const record = (c: Case, r: CaseResult): void => {
      casesRun++;
      if (c.clean) cleanCases++;
      if (r.closedByServer) closedByServer++;
      bytesOut += r.bytesOut;
      bytesIn += r.bytesIn;
      if (r.failure !== undefined) {
        fail('oracle', [c.index, c.index], `${r.failure}\n${describeCase(c, 256)}`);
      }
    };

    if (opts.probeOnly !== undefined) {
      for (const kind of opts.probeOnly) {
        const p = await floodProbe(server.sock, kind, checkRng, size, () => server.memory()?.rss);
        log(`probe ${kind} (${PROBE_DESCRIPTIONS[kind]}): sent ${p.sentMiB.toFixed(0)} MiB, server RSS +${p.growthMiB.toFixed(0)} MiB${p.stoppedReading ? ', server stopped taking bytes' : ''}${p.closedByServer ? ', server hung up' : ''}`);
        if (p.failure !== undefined) fail('memory-growth', [0, 0], p.failure, `--probe ${kind}`);
        maxRss = Math.max(maxRss, p.rssAfterMiB);
        await sleep(500);
      }
    } else if (opts.replay !== undefined) {
      for (const index of opts.replay) {
        const c = makeCase(seed, index, size);
        log(describeCase(c));
        if (opts.saveDir !== undefined) {
          fs.mkdirSync(opts.saveDir, { recursive: true });
          const file = path.join(opts.saveDir, `case-${seed}-${index}.bin`);
          fs.writeFileSync(file, c.stream);
          log(`  saved to ${file}`);
        }
        const r = await runCase(server.sock, c, size);
        log(`  sent ${r.bytesOut} bytes, received ${r.bytesIn}, ${r.closedByServer ? 'server closed' : 'left open'}${r.failure ? `; FAIL ${r.failure}` : ''}`);
        record(c, r);
        if (!(await check(index, index))) break;
      }
    } else {
      const deadline = started + opts.seconds * 1000;
      let nextIndex = opts.from;
      const end = opts.from + opts.cases;
      const maxFailures = 20;
      while (nextIndex < end && performance.now() < deadline && failures.length < maxFailures) {
        const first = nextIndex;
        const batchEnd = Math.min(end, first + checkEvery);
        const lane = async (): Promise<void> => {
          while (nextIndex < batchEnd && performance.now() < deadline) {
            const c = makeCase(seed, nextIndex++, size);
            const r = await runCase(server.sock, c, size);
            if (r.skipped !== undefined) return;
            record(c, r);
          }
        };
        await Promise.all(Array.from({ length: Math.max(1, opts.parallel) }, lane));
        if (!(await check(first, nextIndex - 1))) break;
        if (opts.verbose) log(`${nextIndex} cases, ${((performance.now() - started) / 1000).toFixed(1)} s, received ${(bytesIn / MiB).toFixed(1)} MiB, RSS ${server.memory()?.rss.toFixed(0)} MiB, peak ${server.memory()?.hwm.toFixed(0)} MiB`);
      }
    }

    fuzzSeconds = (performance.now() - started) / 1000;
    if (idle !== undefined) {
      // Give the handshake limit its due, then the idle client must be gone.
      const wait = idleOpened + (HANDSHAKE_LIMIT + 2) * 1000 - Date.now();
      if (wait <= 0 || opts.replay === undefined) {
        const wire = idle;
        const dropped = (async (): Promise<boolean> => {
          await wire.read(GREETING_LENGTH);
          await wire.closed();
          return true;
        })().catch(() => false);
        const ok = await Promise.race([dropped, unrefSleep(Math.max(0, wait)).then(() => false)]);
        if (!ok) fail('handshake-limit', [0, casesRun - 1], `a client that sent nothing after the greeting was not dropped cleanly within ${HANDSHAKE_LIMIT + 2} s`, `--seed ${seed} --cases ${casesRun}`);
      }
      idle.socket.destroy();
    }
  } catch (err) {
    fail('harness', [casesRun, casesRun], `${(err as Error).stack ?? err}\nstderr:\n${server.stderrTail()}`, `--seed ${seed} --cases ${casesRun}`);
  }
  {
    const seconds = fuzzSeconds || (performance.now() - started) / 1000;
    const mem = server.memory();
    rssEnd = mem?.rss ?? 0;
    const hwm = mem?.hwm ?? 0;
    // The peak between samples is reported, not judged: it includes
    // garbage not yet collected (the flood probes judge growth).
    if (hwm > opts.maxRssMiB) log(`note: server peak RSS (VmHWM) ${hwm.toFixed(0)} MiB is above ${opts.maxRssMiB} MiB (sampled max ${maxRss.toFixed(0)} MiB)`);
    if (server.alive) {
      const t0 = performance.now();
      server.proc.kill('SIGTERM');
      const stopped = await Promise.race([server.exited.then(() => true), unrefSleep(15_000).then(() => false)]);
      if (!stopped) {
        server.proc.kill('SIGKILL');
        await server.exited;
        sigterm = 'did not exit within 15 s';
        fail('sigterm', [casesRun, casesRun], `server still running 15 s after SIGTERM; stderr:\n${server.stderrTail()}`, `--seed ${seed} --cases ${casesRun}`);
      } else {
        const { code, signal } = server.exit!;
        sigterm = `exit ${code ?? signal} in ${((performance.now() - t0) / 1000).toFixed(2)} s`;
        if (code !== 0) fail('sigterm', [casesRun, casesRun], `server exited ${code ?? signal} on SIGTERM; stderr:\n${server.stderrTail()}`, `--seed ${seed} --cases ${casesRun}`);
      }
    }
    const alarms = server.newAlarms();
    if (alarms.length > 0) fail('server-log', [0, casesRun], alarms.slice(0, 20).join('\n'), `--seed ${seed} --cases ${casesRun}`);
    fs.rmSync(dir, { recursive: true, force: true });
    const result: FuzzResult = {
      seed,
      cases: casesRun,
      seconds,
      casesPerSecond: casesRun / seconds,
      checks,
      cleanCases,
      closedByServer,
      bytesOut,
      bytesIn,
      rssStartMiB: rssStart,
      rssEndMiB: rssEnd,
      maxRssMiB: Math.max(maxRss, rssEnd),
      hwmMiB: hwm,
      sigterm,
      failures,
    };
    return result;
  }
}

export function formatResult(r: FuzzResult): string {
  const mib = (n: number): string => `${(n / MiB).toFixed(1)} MiB`;
  const lines = [
    `seed ${r.seed}: ${r.cases} cases in ${r.seconds.toFixed(1)} s (${r.casesPerSecond.toFixed(1)} cases/s), ${r.checks} checks`,
    `  ${r.cleanCases} clean cases; server closed ${r.closedByServer} connections; sent ${mib(r.bytesOut)}, received ${mib(r.bytesIn)}`,
    `  server RSS: start ${r.rssStartMiB.toFixed(0)} MiB, end ${r.rssEndMiB.toFixed(0)} MiB, max sampled ${r.maxRssMiB.toFixed(0)} MiB, peak (VmHWM) ${r.hwmMiB.toFixed(0)} MiB`,
    `  SIGTERM: ${r.sigterm}`,
  ];
  if (r.failures.length === 0) lines.push('  failures: none');
  for (const f of r.failures) {
    const range = f.cases[0] === f.cases[1] ? `${f.cases[0]}` : `${f.cases[0]}-${f.cases[1]}`;
    lines.push(`  FAILURE ${f.kind}, seed ${f.seed}, case ${range}: ${f.detail.split('\n')[0]}`);
    lines.push(`    replay: npm run fuzz -- ${f.replay}`);
  }
  return lines.join('\n');
}

function parseReplay(spec: string): number[] {
  const out: number[] = [];
  for (const part of spec.split(',')) {
    const m = /^(\d+)(?:-(\d+))?$/.exec(part.trim());
    if (m === null) throw new Error(`bad --replay ${spec}`);
    const a = Number(m[1]);
    const b = m[2] === undefined ? a : Number(m[2]);
    for (let i = a; i <= b; i++) out.push(i);
  }
  return out;
}

async function main(argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    options: {
      seed: { type: 'string' },
      seconds: { type: 'string' },
      cases: { type: 'string' },
      from: { type: 'string' },
      replay: { type: 'string' },
      'server-cmd': { type: 'string' },
      image: { type: 'string' },
      transport: { type: 'string' },
      parallel: { type: 'string' },
      'check-every': { type: 'string' },
      'max-rss-mib': { type: 'string' },
      'probe-every': { type: 'string' },
      probe: { type: 'string' },
      save: { type: 'string' },
      verbose: { type: 'boolean', short: 'v' },
      help: { type: 'boolean', short: 'h' },
    },
  });
  if (values.help) {
    console.log(fs.readFileSync(fileURLToPath(import.meta.url), 'utf8').split('\n').slice(0, 20).join('\n'));
    return 0;
  }
  const num = (v: string | undefined, name: string): number | undefined => {
    if (v === undefined) return undefined;
    const n = Number(v);
    if (!Number.isFinite(n) || n < 0) throw new Error(`bad --${name} ${v}`);
    return n;
  };
  const seed = num(values.seed, 'seed') ?? crypto.randomInt(2 ** 32 - 1);
  const cases = num(values.cases, 'cases');
  const seconds = num(values.seconds, 'seconds') ?? (cases === undefined ? DEFAULT_OPTIONS.seconds : Infinity);
  const replay = values.replay === undefined ? undefined : parseReplay(values.replay);
  let probeOnly: ProbeKind[] | undefined;
  if (values.probe !== undefined) {
    probeOnly = values.probe === 'all' ? [...PROBES] : (values.probe.split(',') as ProbeKind[]);
    for (const k of probeOnly) if (!PROBES.includes(k)) throw new Error(`--probe: one of ${PROBES.join(', ')}, or all`);
  }
  if (values.transport !== undefined && values.transport !== 'unix' && values.transport !== 'tcp') throw new Error(`--transport: unix or tcp, not ${values.transport}`);
  console.log(`nbd-export fuzz: seed ${seed} (replay with --seed ${seed})`);
  const result = await runFuzz({
    seed,
    seconds,
    cases: cases ?? Infinity,
    from: num(values.from, 'from') ?? 0,
    ...(replay !== undefined ? { replay, parallel: 1 } : {}),
    ...(probeOnly !== undefined ? { probeOnly } : {}),
    ...(values['server-cmd'] !== undefined ? { serverCmd: values['server-cmd'] } : {}),
    ...(values.image === 'raw' || values.image === 'memory' ? { image: values.image } : {}),
    ...(values.transport === 'unix' || values.transport === 'tcp' ? { transport: values.transport } : {}),
    ...(values.parallel !== undefined ? { parallel: num(values.parallel, 'parallel')! } : {}),
    ...(values['check-every'] !== undefined ? { checkEvery: num(values['check-every'], 'check-every')! } : {}),
    ...(values['probe-every'] !== undefined ? { probeEvery: num(values['probe-every'], 'probe-every')! } : {}),
    ...(values['max-rss-mib'] !== undefined ? { maxRssMiB: num(values['max-rss-mib'], 'max-rss-mib')! } : {}),
    ...(values.save !== undefined ? { saveDir: values.save } : {}),
    verbose: values.verbose ?? false,
  });
  console.log(formatResult(result));
  return result.failures.length === 0 ? 0 : 1;
}

if (process.argv[1] !== undefined && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  main(process.argv.slice(2)).then(
    (code) => process.exit(code),
    (err: unknown) => {
      console.error(err);
      process.exit(2);
    },
  );
}
