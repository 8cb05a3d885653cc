// A sparse disk in memory: fixed-size chunks allocated on first write, so a
// 1 TiB disk costs nothing until written. Unallocated chunks read as zeroes
// and are reported as holes. Every operation runs to completion without
// awaiting, so each is atomic with respect to the others.
import { DATA, ExtentCollector, HOLE } from './extents.ts';
import type { BlockCapabilities, BlockNode, Extent, MemoryRun, WriteOptions, ZeroOptions } from './types.ts';
import { BlockError } from './types.ts';

export const DEFAULT_CHUNK_SIZE = 64 * 1024;
/** The largest size: offsets stay exact doubles. */
export const MAX_MEMORY_SIZE = 2 ** 53;
/** Above this many chunks in a range, extents() walks the allocated chunks instead of the range. */
const WALK_LIMIT = 4096;

export interface MemoryNodeOptions {
  /** Allocation unit in bytes (default 64 KiB). */
  chunkSize?: number;
}

export class MemoryNode implements BlockNode {
  readonly size: number;
  readonly capabilities: BlockCapabilities = Object.freeze({
    writable: true,
    canFlush: true,
    canTrim: true,
    canFastZero: true,
    canExtents: true,
    canCache: false,
  });
  readonly #chunkSize: number;
  readonly #chunks = new Map<number, Buffer>();
  readonly #zero: Buffer;

  constructor(size: number, opts: MemoryNodeOptions = {}) {
    if (!Number.isInteger(size) || size < 0 || size > MAX_MEMORY_SIZE) {
      throw new BlockError('EINVAL', `memory disk size must be an integer from 0 to 2^53, not ${size}`);
    }
    const chunkSize = opts.chunkSize ?? DEFAULT_CHUNK_SIZE;
    if (!Number.isInteger(chunkSize) || chunkSize < 1 || chunkSize > 64 * 1024 * 1024) {
      throw new BlockError('EINVAL', `invalid chunk size ${chunkSize}`);
    }
    this.size = size;
    this.#chunkSize = chunkSize;
    this.#zero = Buffer.alloc(chunkSize);
  }

  /** Bytes of memory holding data (allocated chunks). */
  get allocatedBytes(): number {
    let n = 0;
    for (const c of this.#chunks.values()) n += c.length;
    return n;
  }

  /** Length of chunk `index` (the last one may be short). */
  #chunkLength(index: number): number {
    return Math.min(this.#chunkSize, this.size - index * this.#chunkSize);
  }

  /** Chunk `index`, allocated (zeroed) if it was not. */
  #chunk(index: number): Buffer {
    let chunk = this.#chunks.get(index);
    if (chunk === undefined) {
      chunk = Buffer.alloc(this.#chunkLength(index));
      this.#chunks.set(index, chunk);
    }
    return chunk;
  }

  /** Call fn for each chunk piece of [offset, offset+length): chunk index, offset in chunk, length, offset in range. */
  #each(offset: number, length: number, fn: (index: number, at: number, n: number, done: number) => void): void {
    let done = 0;
    while (done < length) {
      const pos = offset + done;
      const index = Math.floor(pos / this.#chunkSize);
      const at = pos - index * this.#chunkSize;
      const n = Math.min(this.#chunkSize - at, length - done);
      fn(index, at, n, done);
      done += n;
    }
  }

  async read(offset: number, length: number, into?: Buffer): Promise<Buffer> {
    return this.readNow(offset, length, into);
  }

  /** Every read is a copy out of memory: done before returning. */
  readNow(offset: number, length: number, into?: Buffer): Buffer {
    const out = into === undefined ? Buffer.allocUnsafe(length) : into.length === length ? into : into.subarray(0, length);
    // Within one chunk (a small read, the common case): no closure, one lookup.
    const index = Math.floor(offset / this.#chunkSize);
    const at = offset - index * this.#chunkSize;
    if (at + length <= this.#chunkSize) {
      const chunk = this.#chunks.get(index);
      if (chunk === undefined) out.fill(0);
      else chunk.copy(out, 0, at, at + length);
      return out;
    }
    this.#each(offset, length, (index, at, n, done) => {
      const chunk = this.#chunks.get(index);
      if (chunk === undefined) out.fill(0, done, done + n);
      else chunk.copy(out, done, at, at + n);
    });
    return out;
  }

  /**
   * The chunks themselves, for a reply sent without copying them: a 1 MiB
   * read copied into a buffer and scanned for zeroes cost more CPU per byte
   * than nbdkit's memory plugin. Unallocated chunks are holes.
   */
  readViews(offset: number, length: number): MemoryRun[] {
    const runs: MemoryRun[] = [];
    this.#each(offset, length, (index, at, n) => {
      const chunk = this.#chunks.get(index);
      const last = runs.length - 1;
      if (chunk !== undefined) runs.push(chunk.subarray(at, at + n));
      else if (last >= 0 && typeof runs[last] === 'number') (runs[last] as number) += n;
      else runs.push(n);
    });
    return runs;
  }

  async write(offset: number, data: Buffer, _opts?: WriteOptions): Promise<void> {
    this.writeNow(offset, data);
  }

  /** Every write is a copy into memory: done before returning (data is not kept). */
  writeNow(offset: number, data: Buffer, _opts?: WriteOptions): boolean {
    if (data.length === 0) return true;
    const index = Math.floor(offset / this.#chunkSize);
    const at = offset - index * this.#chunkSize;
    if (at + data.length <= this.#chunkSize) {
      data.copy(this.#chunk(index), at);
      return true;
    }
    this.#each(offset, data.length, (index, at, n, done) => {
      data.copy(this.#chunk(index), at, done, done + n);
    });
    return true;
  }

  async flush(): Promise<void> {}

  async trim(offset: number, length: number, _opts?: WriteOptions): Promise<void> {
    this.#zeroRange(offset, length, false);
  }

  async writeZeroes(offset: number, length: number, opts: ZeroOptions = {}): Promise<void> {
    this.#zeroRange(offset, length, opts.noHole === true);
  }

  /** Zero a range: whole chunks are freed (unless keep), partial ones zeroed in place. */
  #zeroRange(offset: number, length: number, keep: boolean): void {
    if (length === 0) return;
    const cs = this.#chunkSize;
    const end = offset + length;
    const first = Math.floor(offset / cs);
    const last = Math.floor((end - 1) / cs);
    const zeroChunk = (index: number): void => {
      const chunk = this.#chunks.get(index);
      if (chunk === undefined) return;
      const at = Math.max(offset - index * cs, 0);
      const to = Math.min(end - index * cs, chunk.length);
      if (!keep && at === 0 && to === chunk.length) {
        this.#chunks.delete(index);
        return;
      }
      chunk.fill(0, at, to);
      // A chunk that became all zeroes is freed too when holes are allowed.
      if (!keep && chunk.equals(this.#zero.subarray(0, chunk.length))) this.#chunks.delete(index);
    };
    if (last - first < this.#chunks.size) {
      for (let i = first; i <= last; i++) zeroChunk(i);
    } else {
      // A big range over a sparse disk: visit only the allocated chunks.
      for (const k of [...this.#chunks.keys()]) if (k >= first && k <= last) zeroChunk(k);
    }
  }

  async cache(_offset: number, _length: number): Promise<void> {}

  async extents(offset: number, length: number, maxExtents?: number): Promise<Extent[]> {
    const c = new ExtentCollector(offset, length, maxExtents);
    if (length === 0) return c.finish();
    const cs = this.#chunkSize;
    const first = Math.floor(offset / cs);
    const last = Math.floor((offset + length - 1) / cs);
    if (last - first < WALK_LIMIT || last - first < this.#chunks.size) {
      for (let i = first; i <= last && !c.done; i++) c.add(i * cs, cs, this.#chunks.has(i) ? DATA : HOLE);
    } else {
      // A big, sparse range: visit only the allocated chunks in it.
      const keys: number[] = [];
      for (const k of this.#chunks.keys()) if (k >= first && k <= last) keys.push(k);
      keys.sort((a, b) => a - b);
      for (const k of keys) {
        if (k * cs > c.position) c.add(c.position, k * cs - c.position, HOLE);
        if (!c.add(k * cs, cs, DATA)) break;
      }
      c.add(c.position, c.end - c.position, HOLE);
    }
    return c.finish();
  }

  async close(): Promise<void> {}
}
