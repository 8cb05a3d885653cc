// A temporary copy-on-write overlay in memory over a base node that is
// never written (qemu-nbd -s): sparse chunks of `granularity` bytes (64 KiB
// by default, the cluster size of qemu's temporary qcow2 overlay), each
// either a private copy (data) or a zero marker; everything else reads
// from the base. The first write to a chunk copies the base's bytes in
// (copy-on-write). Everything is dropped when the node closes.
//
// Every change to a chunk runs under a lock on that chunk, so a
// copy-on-write that awaits the base never loses a concurrent change.
import { DepthCollector, depthsOf } from './depth.ts';
import { DATA, ExtentCollector, HOLE } from './extents.ts';
import { RangeLock } from './range-lock.ts';
import type { BlockCapabilities, BlockNode, DepthRun, Extent, WriteOptions, ZeroOptions } from './types.ts';

export const DEFAULT_OVERLAY_GRANULARITY = 64 * 1024;

const ZERO = 'zero' as const;
type Chunk = Buffer | typeof ZERO;

interface Run {
  offset: number;
  length: number;
  /** undefined: not in the overlay (the base shows through). */
  chunk: Chunk | undefined;
}

export class OverlayNode implements BlockNode {
  readonly size: number;
  readonly capabilities: BlockCapabilities = Object.freeze({
    writable: true,
    canFlush: true,
    canTrim: true,
    canFastZero: true,
    canExtents: true,
    canCache: false,
  });
  readonly granularity: number;
  readonly #base: BlockNode;
  readonly #chunks = new Map<number, Chunk>();
  readonly #locks = new RangeLock();

  constructor(base: BlockNode, granularity = DEFAULT_OVERLAY_GRANULARITY) {
    this.#base = base;
    this.size = base.size;
    this.granularity = granularity;
  }

  /** Bytes of memory holding private copies. */
  get allocatedBytes(): number {
    let n = 0;
    for (const c of this.#chunks.values()) if (c !== ZERO) n += c.length;
    return n;
  }

  #chunkLength(index: number): number {
    return Math.min(this.granularity, this.size - index * this.granularity);
  }

  /** Runs of [offset, offset+length): data chunks one by one, zero and base runs merged. */
  #runs(offset: number, length: number): Run[] {
    const g = this.granularity;
    const end = offset + length;
    const first = Math.floor(offset / g);
    const last = Math.floor((end - 1) / g);
    const runs: Run[] = [];
    const push = (from: number, to: number, chunk: Chunk | undefined): void => {
      const a = Math.max(from, offset);
      const b = Math.min(to, end);
      if (b <= a) return;
      const prev = runs[runs.length - 1];
      if (prev !== undefined && prev.offset + prev.length === a && (chunk === undefined || chunk === ZERO) && prev.chunk === chunk) {
        prev.length += b - a;
      } else runs.push({ offset: a, length: b - a, chunk });
    };
    if (last - first <= this.#chunks.size * 4 + 64) {
      for (let i = first; i <= last; i++) push(i * g, (i + 1) * g, this.#chunks.get(i));
    } else {
      // A long range over a sparse overlay: visit only the chunks present.
      const keys = [...this.#chunks.keys()].filter((k) => k >= first && k <= last).sort((a, b) => a - b);
      let pos = offset;
      for (const k of keys) {
        push(pos, k * g, undefined);
        push(k * g, (k + 1) * g, this.#chunks.get(k));
        pos = (k + 1) * g;
      }
      push(pos, end, undefined);
    }
    return runs;
  }

  async read(offset: number, length: number, into?: Buffer): Promise<Buffer> {
    const out = into === undefined ? Buffer.allocUnsafe(length) : into.subarray(0, length);
    const jobs: Promise<unknown>[] = [];
    for (const r of this.#runs(offset, length)) {
      const dst = out.subarray(r.offset - offset, r.offset - offset + r.length);
      if (r.chunk === undefined) jobs.push(this.#base.read(r.offset, r.length, dst));
      else if (r.chunk === ZERO) dst.fill(0);
      else {
        const at = r.offset % this.granularity;
        r.chunk.copy(dst, 0, at, at + r.length);
      }
    }
    await Promise.all(jobs);
    return out;
  }

  /** Run fn with every chunk of [offset, offset+length) locked. */
  #locked<T>(offset: number, length: number, fn: () => Promise<T>): Promise<T> {
    const g = this.granularity;
    const a = Math.floor(offset / g) * g;
    const b = Math.ceil((offset + length) / g) * g;
    return this.#locks.with(a, b, fn);
  }

  /** The private copy of chunk `index`, made from the base (or zeroes) when absent. Caller holds its lock. */
  async #own(index: number): Promise<Buffer> {
    const c = this.#chunks.get(index);
    if (c !== undefined && c !== ZERO) return c;
    const len = this.#chunkLength(index);
    const buf = c === ZERO ? Buffer.alloc(len) : await this.#base.read(index * this.granularity, len, Buffer.allocUnsafe(len));
    this.#chunks.set(index, buf);
    return buf;
  }

  async write(offset: number, data: Buffer, _opts?: WriteOptions): Promise<void> {
    if (data.length === 0) return;
    await this.#locked(offset, data.length, async () => {
      const g = this.granularity;
      let done = 0;
      while (done < data.length) {
        const pos = offset + done;
        const index = Math.floor(pos / g);
        const at = pos - index * g;
        const n = Math.min(this.#chunkLength(index) - at, data.length - done);
        if (at === 0 && n === this.#chunkLength(index)) {
          this.#chunks.set(index, Buffer.from(data.subarray(done, done + n)));
        } else {
          data.copy(await this.#own(index), at, done, done + n);
        }
        done += n;
      }
    });
  }

  async writeZeroes(offset: number, length: number, _opts?: ZeroOptions): Promise<void> {
    await this.#zero(offset, length, true);
  }

  /** Trim: whole chunks read as zeroes afterwards (the base must not show through); partial ones keep their bytes. */
  async trim(offset: number, length: number, _opts?: WriteOptions): Promise<void> {
    await this.#zero(offset, length, false);
  }

  async #zero(offset: number, length: number, partial: boolean): Promise<void> {
    if (length === 0) return;
    await this.#locked(offset, length, async () => {
      const g = this.granularity;
      const end = offset + length;
      for (let index = Math.floor(offset / g); index * g < end; index++) {
        const from = Math.max(offset, index * g);
        const to = Math.min(end, index * g + this.#chunkLength(index));
        if (from === index * g && to === index * g + this.#chunkLength(index)) {
          this.#chunks.set(index, ZERO);
        } else if (partial && this.#chunks.get(index) !== ZERO) {
          (await this.#own(index)).fill(0, from - index * g, to - index * g);
        }
      }
    });
  }

  async flush(): Promise<void> {}

  async cache(_offset: number, _length: number): Promise<void> {}

  async extents(offset: number, length: number, maxExtents?: number): Promise<Extent[]> {
    const c = new ExtentCollector(offset, length, maxExtents);
    for (const r of this.#runs(offset, length)) {
      if (r.chunk === undefined) {
        const runs = this.#base.capabilities.canExtents ? await this.#base.extents(r.offset, r.length) : [{ length: r.length, hole: false, zero: false }];
        let pos = r.offset;
        for (const e of runs) {
          if (!c.add(pos, e.length, e)) break;
          pos += e.length;
        }
        if (pos < r.offset + r.length) c.add(pos, r.offset + r.length - pos, DATA);
      } else {
        c.add(r.offset, r.length, r.chunk === ZERO ? HOLE : DATA);
      }
      if (c.done) break;
    }
    return c.finish();
  }

  /** 1 where the overlay holds the range (data or zeroes), else the base's depth plus one. */
  async allocationDepth(offset: number, length: number, maxRuns?: number): Promise<DepthRun[]> {
    const c = new DepthCollector(offset, length, maxRuns);
    for (const r of this.#runs(offset, length)) {
      if (r.chunk !== undefined) {
        if (!c.add(r.length, 1)) break;
        continue;
      }
      const runs = await depthsOf(this.#base, r.offset, r.length, c.remaining);
      let covered = 0;
      for (const d of runs) covered += d.length;
      if (!c.addRuns(runs, 1) || covered < r.length) break;
    }
    return c.finish();
  }

  async close(): Promise<void> {
    this.#chunks.clear();
    await this.#base.close();
  }
}
