// A dirty bitmap (QEMU's BdrvDirtyBitmap, persistent as in qcow2's bitmaps
// extension): one bit per granule of the node, set when a write, a
// write-zeroes or a trim touches any byte of the granule. The bits are kept
// dense, in the order qcow2 stores them (bit k of the bitmap is bit k%8 of
// byte k/8, least significant first), so loading and saving are copies.
// A count of set bits is kept as bits change, so dirtyBytes() is O(1).
import { BlockError } from '../block/types.ts';

/** qcow2's limits (docs/interop/qcow2.txt, "Bitmaps extension"): granularity 2^9..2^31, names up to 1023 bytes. */
export const MIN_GRANULARITY_BITS = 9;
export const MAX_GRANULARITY_BITS = 31;
export const MAX_NAME_BYTES = 1023;
export const DEFAULT_GRANULARITY = 64 * 1024;
/** qemu's BME_MAX_PHYS_SIZE: the bits of one bitmap fit in 64 MiB. */
export const MAX_BITMAP_BYTES = 64 * 1024 * 1024;

const POPCOUNT = new Uint8Array(256);
for (let i = 1; i < 256; i++) POPCOUNT[i] = (i & 1) + POPCOUNT[i >> 1]!;

/** One run of equal state, as the meta context reports it. */
export interface BitmapRun {
  length: number;
  dirty: boolean;
}

export interface BitmapInfo {
  name: string;
  granularity: number;
  enabled: boolean;
}

/** Check a bitmap name and granularity as qemu does; throws BlockError('EINVAL'). */
export function checkBitmapParams(name: string, granularity: number): void {
  if (name.length === 0) throw new BlockError('EINVAL', 'bitmap name must not be empty');
  if (Buffer.byteLength(name, 'utf8') > MAX_NAME_BYTES) throw new BlockError('EINVAL', `bitmap name is longer than ${MAX_NAME_BYTES} bytes`);
  const bits = Math.log2(granularity);
  if (!Number.isInteger(bits) || bits < MIN_GRANULARITY_BITS || bits > MAX_GRANULARITY_BITS) {
    throw new BlockError('EINVAL', 'Granularity must be power of 2 and at least 512');
  }
}

/** Bytes of bitmap data for a node of `size` bytes at `granularity`. */
export function bitmapBytes(size: number, granularity: number): number {
  return Math.ceil(Math.ceil(size / granularity) / 8);
}

export class DirtyBitmap {
  readonly name: string;
  readonly granularity: number;
  readonly granularityBits: number;
  /** Bytes of the node the bitmap covers. */
  readonly size: number;
  /** Tracks writes while true (qcow2's "auto" flag). */
  enabled: boolean;
  /** Bits changed since load or since the owner last saved (the owner resets it). */
  modified = false;
  readonly #bits: Uint8Array;
  readonly #granules: number;
  #count = 0;

  constructor(info: BitmapInfo, size: number, data?: Uint8Array) {
    checkBitmapParams(info.name, info.granularity);
    this.name = info.name;
    this.granularity = info.granularity;
    this.granularityBits = Math.log2(info.granularity);
    this.enabled = info.enabled;
    this.size = size;
    this.#granules = Math.ceil(size / info.granularity);
    const n = bitmapBytes(size, info.granularity);
    if (n > MAX_BITMAP_BYTES) throw new BlockError('EINVAL', `bitmap '${info.name}' would need ${n} bytes; use a larger granularity`);
    this.#bits = new Uint8Array(n);
    if (data !== undefined) {
      this.#bits.set(data.subarray(0, n));
      // Bits past the last granule are meaningless: keep them clear so counts are exact.
      const tail = this.#granules % 8;
      if (tail !== 0 && n > 0) this.#bits[n - 1]! &= (1 << tail) - 1;
      for (const b of this.#bits) this.#count += POPCOUNT[b]!;
    }
  }

  get info(): BitmapInfo {
    return { name: this.name, granularity: this.granularity, enabled: this.enabled };
  }

  /** The bitmap's bits in qcow2 order (a copy). */
  serialize(): Buffer {
    return Buffer.from(this.#bits);
  }

  /** The bits as stored, without copying (for writers that copy anyway). */
  get bytes(): Uint8Array {
    return this.#bits;
  }

  /** Granules set. */
  get dirtyGranules(): number {
    return this.#count;
  }

  /** Bytes of the node in dirty granules (the last granule counts only its part inside the node). Cheap. */
  dirtyBytes(): number {
    if (this.#count === 0) return 0;
    const last = this.#granules - 1;
    const lastDirty = (this.#bits[last >> 3]! >> (last & 7)) & 1;
    const lastShort = this.#granules * this.granularity - this.size;
    return this.#count * this.granularity - (lastDirty ? lastShort : 0);
  }

  isDirty(offset: number): boolean {
    const g = Math.floor(offset / this.granularity);
    return ((this.#bits[g >> 3]! >> (g & 7)) & 1) === 1;
  }

  /** Mark every granule that [offset, offset+length) touches. */
  mark(offset: number, length: number): void {
    if (length <= 0) return;
    const first = Math.floor(offset / this.granularity);
    const last = Math.min(this.#granules, Math.ceil((offset + length) / this.granularity)) - 1;
    if (last < first) return;
    this.#setBits(first, last + 1, true);
  }

  /** Clear every bit (qemu-img bitmap --clear). */
  clear(): void {
    this.#bits.fill(0);
    if (this.#count !== 0) this.modified = true;
    this.#count = 0;
  }

  /** OR another bitmap of the same node into this one (qemu's block-dirty-bitmap-merge). */
  merge(src: DirtyBitmap): void {
    if (src.size !== this.size) throw new BlockError('EINVAL', `bitmaps '${src.name}' and '${this.name}' cover different sizes`);
    if (src.granularity === this.granularity) {
      const a = this.#bits;
      const b = src.#bits;
      let count = 0;
      for (let i = 0; i < a.length; i++) {
        a[i]! |= b[i]!;
        count += POPCOUNT[a[i]!]!;
      }
      if (count !== this.#count) this.modified = true;
      this.#count = count;
      return;
    }
    // Different granularities: every dirty run of the source dirties the granules it touches here.
    let pos = 0;
    while (pos < src.size) {
      const run = src.runAt(pos, src.size - pos);
      if (run.dirty) this.mark(pos, run.length);
      pos += run.length;
    }
  }

  #setBits(from: number, to: number, value: boolean): void {
    const bits = this.#bits;
    let changed = 0;
    let g = from;
    // Leading partial byte.
    while (g < to && (g & 7) !== 0) {
      changed += this.#setOne(g, value);
      g++;
    }
    // Whole bytes.
    const fill = value ? 0xff : 0;
    while (g + 8 <= to) {
      const i = g >> 3;
      const before = bits[i]!;
      if (before !== fill) {
        changed += value ? 8 - POPCOUNT[before]! : POPCOUNT[before]!;
        bits[i] = fill;
      }
      g += 8;
    }
    while (g < to) {
      changed += this.#setOne(g, value);
      g++;
    }
    if (changed !== 0) {
      this.#count += value ? changed : -changed;
      this.modified = true;
    }
  }

  #setOne(g: number, value: boolean): number {
    const i = g >> 3;
    const m = 1 << (g & 7);
    const before = this.#bits[i]!;
    const after = value ? before | m : before & ~m;
    this.#bits[i] = after;
    return before === after ? 0 : 1;
  }

  /** The first granule at or after g whose bit is `value`, or the granule count. Skips whole bytes. */
  #next(g: number, value: boolean): number {
    const bits = this.#bits;
    const skip = value ? 0 : 0xff;
    const n = this.#granules;
    while (g < n) {
      if ((g & 7) === 0) {
        // Bytes that hold no bit of interest.
        let i = g >> 3;
        while (i < bits.length && bits[i] === skip) i++;
        g = i << 3;
        if (g >= n) return n;
      }
      if ((((bits[g >> 3]! >> (g & 7)) & 1) === 1) === value) return g;
      g++;
    }
    return n;
  }

  /** The run of equal state starting at `offset`, clipped to `length` bytes. */
  runAt(offset: number, length: number): BitmapRun {
    const g = Math.floor(offset / this.granularity);
    const dirty = g < this.#granules && ((this.#bits[g >> 3]! >> (g & 7)) & 1) === 1;
    const endG = this.#next(g + 1, !dirty);
    const end = Math.min(offset + length, endG * this.granularity);
    return { length: end - offset, dirty };
  }

  /**
   * Runs of [offset, offset+length), in order, clipped to the range, at most
   * `maxRuns` (a capped answer covers less), as qemu-nbd's bitmap_to_extents.
   */
  runs(offset: number, length: number, maxRuns: number): BitmapRun[] {
    const out: BitmapRun[] = [];
    let pos = offset;
    const end = offset + length;
    while (pos < end && out.length < maxRuns) {
      const r = this.runAt(pos, end - pos);
      out.push(r);
      pos += r.length;
    }
    return out;
  }
}
