// Test-only helpers for the server layer: a tiny in-memory BlockNode (so
// these tests do not depend on src/block implementations), fake hosts for
// Negotiation and Transmission, and parsers for what they send.
// Not imported by production code.
import type { BlockCapabilities, BlockNode, Extent, WriteOptions, ZeroOptions } from '../block/types.ts';
import { Export, type BlockSizeConstraints } from '../exports/export.ts';
import { ExportRegistry } from '../exports/registry.ts';
import type { MetaContext } from '../meta/context.ts';
import { u32 } from '../protocol/test-helpers.ts';
import type { NegotiationHost, Session } from './negotiation.ts';
import type { RequestEvent, TransmissionHost } from './transmission.ts';

export type Op = 'read' | 'write' | 'flush' | 'trim' | 'writeZeroes' | 'cache' | 'extents';

/**
 * A BlockNode over a Buffer with a per-byte allocation map. Unwritten bytes
 * are holes (read as zeroes). `before` runs ahead of every operation and
 * may delay it (return a promise) or fail it (throw).
 */
export class FakeNode implements BlockNode {
  readonly data: Buffer;
  /** 1 where the byte is allocated (data), 0 in a hole. */
  readonly allocated: Uint8Array;
  readonly capabilities: BlockCapabilities;
  readonly calls: { op: Op; offset: number; length: number; opts?: ZeroOptions }[] = [];
  before: ((op: Op, offset: number, length: number) => Promise<void> | void) | undefined;

  constructor(size: number, caps: Partial<BlockCapabilities> = {}) {
    this.data = Buffer.alloc(size);
    this.allocated = new Uint8Array(size);
    this.capabilities = {
      writable: true,
      canFlush: true,
      canTrim: true,
      canFastZero: true,
      canExtents: true,
      canCache: true,
      ...caps,
    };
  }

  get size(): number {
    return this.data.length;
  }

  /** Fill a range with data (allocating it) without going through write(). */
  fill(offset: number, bytes: Buffer): void {
    bytes.copy(this.data, offset);
    this.allocated.fill(1, offset, offset + bytes.length);
  }

  async #enter(op: Op, offset: number, length: number, opts?: ZeroOptions): Promise<void> {
    this.calls.push(opts === undefined ? { op, offset, length } : { op, offset, length, opts });
    await this.before?.(op, offset, length);
  }

  async read(offset: number, length: number, into?: Buffer): Promise<Buffer> {
    await this.#enter('read', offset, length);
    const out = into ?? Buffer.alloc(length);
    this.data.copy(out, 0, offset, offset + length);
    return out;
  }

  async write(offset: number, data: Buffer, opts?: WriteOptions): Promise<void> {
    await this.#enter('write', offset, data.length, opts);
    this.fill(offset, data);
  }

  async flush(): Promise<void> {
    await this.#enter('flush', 0, 0);
  }

  async trim(offset: number, length: number, opts?: WriteOptions): Promise<void> {
    await this.#enter('trim', offset, length, opts);
    this.data.fill(0, offset, offset + length);
    this.allocated.fill(0, offset, offset + length);
  }

  async writeZeroes(offset: number, length: number, opts?: ZeroOptions): Promise<void> {
    await this.#enter('writeZeroes', offset, length, opts);
    this.data.fill(0, offset, offset + length);
    this.allocated.fill(opts?.noHole === true ? 1 : 0, offset, offset + length);
  }

  async cache(offset: number, length: number): Promise<void> {
    await this.#enter('cache', offset, length);
  }

  async extents(offset: number, length: number, maxExtents = Infinity): Promise<Extent[]> {
    await this.#enter('extents', offset, length);
    const runs: Extent[] = [];
    const end = offset + length;
    let at = offset;
    while (at < end && runs.length < maxExtents) {
      const state = this.allocated[at];
      let next = at + 1;
      while (next < end && this.allocated[next] === state) next++;
      runs.push({ length: next - at, hole: state === 0, zero: state === 0 });
      at = next;
    }
    return runs;
  }

  async close(): Promise<void> {}
}

export interface Deferred {
  promise: Promise<void>;
  resolve(): void;
}

export function deferred(): Deferred {
  let resolve!: () => void;
  const promise = new Promise<void>((r) => (resolve = r));
  return { promise, resolve };
}

/** Resolve once `pred` holds, checking after each turn of the event loop; reject after `ms`. */
export async function waitFor(pred: () => boolean, ms = 2000, what = 'condition'): Promise<void> {
  const deadline = Date.now() + ms;
  while (!pred()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setImmediate(r));
  }
}

/** Let pending promise callbacks and immediates run. */
export async function settle(turns = 5): Promise<void> {
  for (let i = 0; i < turns; i++) await new Promise((r) => setImmediate(r));
}

export interface ExportSpec {
  name: string;
  size?: number;
  description?: string;
  multiConn?: boolean;
  readOnly?: boolean;
  metaContexts?: MetaContext[];
  blockSize?: BlockSizeConstraints;
  node?: FakeNode;
}

export function makeExport(spec: ExportSpec): Export {
  return new Export({
    name: spec.name,
    description: spec.description,
    node: spec.node ?? new FakeNode(spec.size ?? 1024 * 1024),
    multiConn: spec.multiConn ?? false,
    readOnly: spec.readOnly,
    metaContexts: spec.metaContexts,
    blockSize: spec.blockSize,
  });
}

export function registryOf(...exports: Export[]): ExportRegistry {
  const r = new ExportRegistry();
  for (const e of exports) r.add(e);
  return r;
}

/** Records what Negotiation does to its host. */
export class FakeNegotiationHost implements NegotiationHost {
  readonly exports: ExportRegistry;
  readonly sent: Buffer[] = [];
  readonly closed: string[] = [];
  readonly sessions: Session[] = [];
  constructor(exports: ExportRegistry) {
    this.exports = exports;
  }
  send(buf: Buffer): void {
    this.sent.push(Buffer.from(buf));
  }
  close(reason: string): void {
    this.closed.push(reason);
  }
  enterTransmission(session: Session): void {
    this.sessions.push(session);
  }
  debug(): void {}
  get output(): Buffer {
    return Buffer.concat(this.sent);
  }
}

/** Records what Transmission does to its host; `onProgress` can feed again, as Connection does. */
export class FakeTransmissionHost implements TransmissionHost {
  readonly replies: Buffer[] = [];
  readonly closed: string[] = [];
  readonly events: RequestEvent[] = [];
  readonly warnings: string[] = [];
  /** Index into `replies` at the moment of each close() call. */
  readonly closedAfter: number[] = [];
  progressCalls = 0;
  onProgress: (() => void) | undefined;
  readInto: ((buf: Buffer, filled: number, done: () => void, thenRead?: number) => void) | undefined;
  writesLargeNow = false;
  sendReply(parts: Buffer[], sent?: () => void): void {
    this.replies.push(Buffer.concat(parts.map((p) => Buffer.from(p))));
    // As if the bytes reached the kernel at once.
    sent?.();
  }
  close(reason: string): void {
    this.closed.push(reason);
    this.closedAfter.push(this.replies.length);
  }
  progress(): void {
    this.progressCalls++;
    this.onProgress?.();
  }
  debug(): void {}
  warn(message: string): void {
    this.warnings.push(message);
  }
  requestDone(event: RequestEvent): void {
    this.events.push(event);
  }
}

/** Client option: IHAVEOPT, u32 option, u32 length, data. */
export function optionBytes(option: number, data: Buffer = Buffer.alloc(0)): Buffer {
  return Buffer.concat([Buffer.from('IHAVEOPT', 'latin1'), u32(option), u32(data.length), data]);
}

export interface OptionReply {
  option: number;
  type: number;
  data: Buffer;
}

/** Split a stream of option replies; throws on bad magic or a torn reply. */
export function parseOptionReplies(buf: Buffer): OptionReply[] {
  const out: OptionReply[] = [];
  let at = 0;
  while (at < buf.length) {
    if (buf.length - at < 20) throw new Error(`torn option reply at ${at}`);
    if (buf.readBigUInt64BE(at) !== 0x0003e889045565a9n) throw new Error(`bad option reply magic at ${at}`);
    const length = buf.readUInt32BE(at + 16);
    if (buf.length - at - 20 < length) throw new Error(`option reply data torn at ${at}`);
    out.push({ option: buf.readUInt32BE(at + 8), type: buf.readUInt32BE(at + 12), data: buf.subarray(at + 20, at + 20 + length) });
    at += 20 + length;
  }
  return out;
}

export interface SimpleReply {
  error: number;
  cookie: bigint;
  data: Buffer;
}

/** One whole simple reply as sent by sendReply: header then any read data. */
export function parseSimpleReply(buf: Buffer): SimpleReply {
  if (buf.readUInt32BE(0) !== 0x67446698) throw new Error('not a simple reply');
  return { error: buf.readUInt32BE(4), cookie: buf.readBigUInt64BE(8), data: buf.subarray(16) };
}

export interface Chunk {
  flags: number;
  type: number;
  cookie: bigint;
  payload: Buffer;
}

/** The structured chunks of one reply; throws on a torn chunk. */
export function parseChunks(buf: Buffer): Chunk[] {
  const out: Chunk[] = [];
  let at = 0;
  while (at < buf.length) {
    if (buf.readUInt32BE(at) !== 0x668e33ef) throw new Error(`not a structured chunk at ${at}`);
    const length = buf.readUInt32BE(at + 16);
    if (buf.length - at - 20 < length) throw new Error(`chunk torn at ${at}`);
    out.push({
      flags: buf.readUInt16BE(at + 4),
      type: buf.readUInt16BE(at + 6),
      cookie: buf.readBigUInt64BE(at + 8),
      payload: buf.subarray(at + 20, at + 20 + length),
    });
    at += 20 + length;
  }
  return out;
}
