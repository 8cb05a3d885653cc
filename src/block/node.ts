// The one wrapper every block node goes through (nbdkit's backend.c): it
// checks every call's range and the read-only state before the backend
// sees it, applies the cache, discard and detect-zeroes policies, and fills
// in what a backend lacks (extents become one data run, zeroing falls back
// to writing zeroes, trim becomes a no-op), so backends stay small.
import { depthsOf } from './depth.ts';
import { isNotSupported, toBlockError } from './errno.ts';
import { normalizeExtents } from './extents.ts';
import type {
  BlockCapabilities,
  BlockNode,
  CacheMode,
  DepthRun,
  DetectZeroesMode,
  DiscardMode,
  Extent,
  FileSlice,
  MemoryRun,
  WriteOptions,
  ZeroOptions,
} from './types.ts';
import { BlockError } from './types.ts';

export interface CheckedNodeOptions {
  /** Refuse write, trim and writeZeroes with EPERM. */
  readOnly?: boolean;
  /** Turn all-zero writes into zero requests (default 'off'). */
  detectZeroes?: DetectZeroesMode;
  /** writethrough/directsync: every write is FUA; unsafe: flush does nothing (default 'writeback'). */
  cache?: CacheMode;
  /** ignore (default): trim is a no-op and zeroing never deallocates. */
  discard?: DiscardMode;
}

/** Zeroes written per piece when the backend cannot zero by itself. */
const ZERO_PIECE = 1024 * 1024;
const ZERO_BUFFER = Buffer.alloc(ZERO_PIECE);

/** True when every byte of buf is zero (memcmp against a shared zero buffer, no per-byte JS loop). */
export function isAllZero(buf: Buffer): boolean {
  const n = buf.length;
  if (n === 0) return true;
  if (buf[0] !== 0 || buf[n - 1] !== 0) return false;
  for (let at = 0; at < n; at += ZERO_PIECE) {
    const len = Math.min(ZERO_PIECE, n - at);
    if (ZERO_BUFFER.compare(buf, at, at + len, 0, len) !== 0) return false;
  }
  return true;
}

export interface ZeroRun {
  offset: number;
  length: number;
  zero: boolean;
}

/**
 * Split `buf` (the bytes at `offset`) into runs of all-zero and other
 * granules, granules aligned to `granule` in absolute offsets; adjacent
 * runs of the same kind are merged. One memcmp per granule, each stopping
 * at its first non-zero byte.
 */
export function zeroRuns(buf: Buffer, offset: number, granule = 4096): ZeroRun[] {
  const runs: ZeroRun[] = [];
  let at = 0;
  while (at < buf.length) {
    const end = Math.min(buf.length, at + granule - ((offset + at) % granule));
    // Most data granules fail on their first or last byte, in JS, without
    // a native call; compare() with ranges makes no subarray objects.
    const zero = buf[at] === 0 && buf[end - 1] === 0 && ZERO_BUFFER.compare(buf, at, end, 0, end - at) === 0;
    const last = runs[runs.length - 1];
    if (last !== undefined && last.zero === zero) last.length += end - at;
    else runs.push({ offset: offset + at, length: end - at, zero });
    at = end;
  }
  return runs;
}

/**
 * A node that hands every call to `inner`: the base of wrappers that change
 * one or two operations (dirty tracking, a probed image's header guard, a
 * temporary file's flushes) and pass the rest through untouched.
 */
export class ForwardingNode implements BlockNode {
  readonly inner: BlockNode;

  constructor(inner: BlockNode) {
    this.inner = inner;
  }

  get size(): number {
    return this.inner.size;
  }

  get capabilities(): BlockCapabilities {
    return this.inner.capabilities;
  }

  get loopWriteSpells(): number | undefined {
    return this.inner.loopWriteSpells;
  }

  read(offset: number, length: number, into?: Buffer): Promise<Buffer> {
    return this.inner.read(offset, length, into);
  }

  // Forwarded like read(): a subclass that changes reads overrides both.
  readNow(offset: number, length: number, into?: Buffer): Buffer | null {
    return this.inner.readNow?.(offset, length, into) ?? null;
  }

  fileSlice(offset: number, length: number): FileSlice | null {
    return this.inner.fileSlice?.(offset, length) ?? null;
  }

  readViews(offset: number, length: number): MemoryRun[] | null {
    return this.inner.readViews?.(offset, length) ?? null;
  }

  write(offset: number, data: Buffer, opts?: WriteOptions): Promise<void> {
    return this.inner.write(offset, data, opts);
  }

  flush(): Promise<void> {
    return this.inner.flush();
  }

  trim(offset: number, length: number, opts?: WriteOptions): Promise<void> {
    return this.inner.trim(offset, length, opts);
  }

  writeZeroes(offset: number, length: number, opts?: ZeroOptions): Promise<void> {
    return this.inner.writeZeroes(offset, length, opts);
  }

  cache(offset: number, length: number): Promise<void> {
    return this.inner.cache(offset, length);
  }

  extents(offset: number, length: number, maxExtents?: number): Promise<Extent[]> {
    return this.inner.extents(offset, length, maxExtents);
  }

  allocationDepth(offset: number, length: number, maxRuns?: number): Promise<DepthRun[]> {
    return depthsOf(this.inner, offset, length, maxRuns);
  }

  close(): Promise<void> {
    return this.inner.close();
  }
}

export class CheckedNode implements BlockNode {
  readonly size: number;
  readonly capabilities: BlockCapabilities;
  readonly readOnly: boolean;
  readonly detectZeroes: DetectZeroesMode;
  readonly cacheMode: CacheMode;
  readonly discard: DiscardMode;
  readonly #inner: BlockNode;
  #closed = false;

  get loopWriteSpells(): number | undefined {
    return this.#inner.loopWriteSpells;
  }

  constructor(inner: BlockNode, opts: CheckedNodeOptions = {}) {
    this.#inner = inner;
    this.size = inner.size;
    this.readOnly = (opts.readOnly ?? false) || !inner.capabilities.writable;
    this.cacheMode = opts.cache ?? 'writeback';
    this.discard = opts.discard ?? 'ignore';
    // detect-zeroes=unmap only unmaps when discard=unmap; otherwise it acts as 'on'.
    const dz = opts.detectZeroes ?? 'off';
    this.detectZeroes = dz === 'unmap' && this.discard !== 'unmap' ? 'on' : dz;
    const ic = inner.capabilities;
    const writable = !this.readOnly;
    this.capabilities = Object.freeze({
      writable,
      canFlush: ic.canFlush,
      canTrim: writable && this.discard === 'unmap' && ic.canTrim,
      canFastZero: writable && ic.canFastZero,
      canExtents: ic.canExtents,
      canCache: ic.canCache,
    });
  }

  /** The wrapped node. */
  get inner(): BlockNode {
    return this.#inner;
  }

  /** EINVAL unless offset and length are non-negative safe integers within the size (ENOSPC for writes past it). */
  #check(offset: number, length: number, pastEnd: 'EINVAL' | 'ENOSPC' = 'EINVAL'): void {
    if (this.#closed) throw new BlockError('ESHUTDOWN', 'the block node is closed');
    if (!Number.isSafeInteger(offset) || offset < 0) throw new BlockError('EINVAL', `invalid offset ${offset}`);
    if (!Number.isSafeInteger(length) || length < 0) throw new BlockError('EINVAL', `invalid length ${length}`);
    if (offset + length > this.size) {
      throw new BlockError(pastEnd, `range ${offset}+${length} passes the end (${this.size} bytes)`);
    }
  }

  #checkWritable(): void {
    if (this.readOnly) throw new BlockError('EPERM', 'the block node is read-only');
  }

  #fua(opts: WriteOptions | undefined): boolean {
    return opts?.fua === true || this.cacheMode === 'writethrough' || this.cacheMode === 'directsync';
  }

  async read(offset: number, length: number, into?: Buffer): Promise<Buffer> {
    this.#check(offset, length);
    if (into !== undefined && into.length < length) {
      throw new BlockError('EINVAL', `buffer of ${into.length} bytes is too small for ${length}`);
    }
    if (length === 0) return into?.subarray(0, 0) ?? Buffer.alloc(0);
    return this.#call(() => this.#inner.read(offset, length, into));
  }

  readNow(offset: number, length: number, into?: Buffer): Buffer | null {
    // Anything read() would refuse takes the async path (which reports the error).
    if (this.#closed || length === 0 || this.#inner.readNow === undefined || (into !== undefined && into.length < length)) return null;
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.size) return null;
    try {
      return this.#inner.readNow(offset, length, into);
    } catch (err) {
      throw toBlockError(err);
    }
  }

  fileSlice(offset: number, length: number): FileSlice | null {
    if (this.#closed || length === 0 || this.#inner.fileSlice === undefined) return null;
    this.#check(offset, length);
    return this.#inner.fileSlice(offset, length);
  }

  readViews(offset: number, length: number): MemoryRun[] | null {
    if (this.#closed || length === 0 || this.#inner.readViews === undefined) return null;
    this.#check(offset, length);
    return this.#inner.readViews(offset, length);
  }

  writeNow(offset: number, data: Buffer, opts?: WriteOptions): boolean {
    // Anything write() would refuse, or turn into more than one plain
    // write, takes the async path (which reports the error).
    if (this.#closed || this.readOnly || data.length === 0 || this.detectZeroes !== 'off' || this.#fua(opts)) return false;
    if (this.#inner.writeNow === undefined || !Number.isSafeInteger(offset) || offset < 0 || offset + data.length > this.size) return false;
    try {
      return this.#inner.writeNow(offset, data, { fua: false });
    } catch (err) {
      throw toBlockError(err);
    }
  }

  async write(offset: number, data: Buffer, opts?: WriteOptions): Promise<void> {
    this.#check(offset, data.length, 'ENOSPC');
    this.#checkWritable();
    if (data.length === 0) return;
    const fua = this.#fua(opts);
    if (this.detectZeroes !== 'off' && isAllZero(data)) {
      return this.#zeroes(offset, data.length, { fua, noHole: this.detectZeroes !== 'unmap' });
    }
    return this.#call(() => this.#inner.write(offset, data, { fua }));
  }

  async flush(): Promise<void> {
    if (this.#closed) throw new BlockError('ESHUTDOWN', 'the block node is closed');
    if (this.cacheMode === 'unsafe') return;
    return this.#call(() => this.#inner.flush());
  }

  async trim(offset: number, length: number, opts?: WriteOptions): Promise<void> {
    this.#check(offset, length);
    this.#checkWritable();
    if (length === 0 || this.discard !== 'unmap' || !this.#inner.capabilities.canTrim) return;
    const fua = this.#fua(opts);
    return this.#call(() => this.#inner.trim(offset, length, { fua }));
  }

  async writeZeroes(offset: number, length: number, opts: ZeroOptions = {}): Promise<void> {
    this.#check(offset, length, 'ENOSPC');
    this.#checkWritable();
    if (length === 0) return;
    return this.#zeroes(offset, length, { fua: this.#fua(opts), noHole: opts.noHole === true, fast: opts.fast === true });
  }

  /** Zero a checked range: the backend's own way, else (unless fast) by writing zeroes. */
  async #zeroes(offset: number, length: number, opts: ZeroOptions): Promise<void> {
    // With discard=ignore nothing is ever deallocated.
    const zopts: ZeroOptions = { fua: opts.fua === true, noHole: opts.noHole === true || this.discard !== 'unmap', fast: opts.fast === true };
    if (zopts.fast && !this.#inner.capabilities.canFastZero) {
      throw new BlockError('ENOTSUP', 'fast zeroing is not supported');
    }
    try {
      await this.#inner.writeZeroes(offset, length, zopts);
      return;
    } catch (err) {
      const e = toBlockError(err);
      if (zopts.fast || !isNotSupported(e.code)) throw e;
    }
    await this.#call(async () => {
      for (let done = 0; done < length; done += ZERO_PIECE) {
        const n = Math.min(ZERO_PIECE, length - done);
        await this.#inner.write(offset + done, ZERO_BUFFER.subarray(0, n));
      }
      if (zopts.fua) await this.#inner.flush();
    });
  }

  async cache(offset: number, length: number): Promise<void> {
    this.#check(offset, length);
    if (length === 0 || !this.#inner.capabilities.canCache) return;
    return this.#call(() => this.#inner.cache(offset, length));
  }

  async extents(offset: number, length: number, maxExtents?: number): Promise<Extent[]> {
    this.#check(offset, length);
    if (length === 0) return [];
    if (!this.#inner.capabilities.canExtents) return [{ length, hole: false, zero: false }];
    const runs = await this.#call(() => this.#inner.extents(offset, length, maxExtents));
    return normalizeExtents(offset, length, runs, maxExtents);
  }

  /** Allocation depth per run (a node without layers is depth 1 throughout). */
  async allocationDepth(offset: number, length: number, maxRuns?: number): Promise<DepthRun[]> {
    this.#check(offset, length);
    if (length === 0) return [];
    return this.#call(() => depthsOf(this.#inner, offset, length, maxRuns));
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    return this.#call(() => this.#inner.close());
  }

  /** Run a backend call; whatever it throws comes out as a BlockError. */
  async #call<T>(fn: () => Promise<T>): Promise<T> {
    try {
      return await fn();
    } catch (err) {
      throw toBlockError(err);
    }
  }
}
