// The one extent collector every backend reports into. Backends say what
// they know, in order, in absolute offsets; the collector clips to the
// asked range, merges neighbours with equal flags, caps the number of runs
// and always answers with at least one run starting at the asked offset.
import type { Extent } from './types.ts';

/** The flags of a run. */
export interface ExtentFlags {
  hole: boolean;
  zero: boolean;
}

/** Allocated storage (contents unknown). */
export const DATA: ExtentFlags = Object.freeze({ hole: false, zero: false });
/** Unallocated, reads as zeroes. */
export const HOLE: ExtentFlags = Object.freeze({ hole: true, zero: true });

/** Runs reported when the caller names no cap. */
export const DEFAULT_MAX_EXTENTS = 128 * 1024;

export class ExtentCollector {
  readonly #start: number;
  readonly #end: number;
  readonly #max: number;
  /** Everything before this absolute offset has been reported. */
  #pos: number;
  readonly #runs: Extent[] = [];
  #full = false;

  /** Collect runs for [offset, offset + length), at most `maxExtents` of them. */
  constructor(offset: number, length: number, maxExtents: number = DEFAULT_MAX_EXTENTS) {
    this.#start = offset;
    this.#end = offset + length;
    this.#max = Math.max(1, Math.floor(maxExtents));
    this.#pos = offset;
  }

  /** The absolute offset the next run should start at. */
  get position(): number {
    return this.#pos;
  }

  /** The end of the asked range (absolute). */
  get end(): number {
    return this.#end;
  }

  /** True when nothing more will be taken: the range is covered or the cap is reached. */
  get done(): boolean {
    return this.#full || this.#pos >= this.#end;
  }

  /**
   * Report [offset, offset + length) with `flags`. Parts before position or
   * past the end are clipped; a gap before `offset` is reported as data
   * (unknown). Returns false once the collector is done, so a backend can
   * stop walking.
   */
  add(offset: number, length: number, flags: ExtentFlags): boolean {
    if (this.done || !(length > 0)) return !this.done;
    const end = Math.min(offset + length, this.#end);
    if (end <= this.#pos) return true;
    if (offset > this.#pos) {
      this.#push(Math.min(offset, this.#end) - this.#pos, DATA);
      if (this.done) return false;
    }
    this.#push(end - this.#pos, flags);
    return !this.done;
  }

  #push(length: number, flags: ExtentFlags): void {
    const last = this.#runs[this.#runs.length - 1];
    if (last !== undefined && last.hole === flags.hole && last.zero === flags.zero) {
      last.length += length;
    } else if (this.#runs.length >= this.#max) {
      this.#full = true;
      return;
    } else {
      this.#runs.push({ length, hole: flags.hole, zero: flags.zero });
    }
    this.#pos += length;
  }

  /**
   * The runs, in order from the asked offset. When nothing was reported
   * (and the range is not empty), one data run covering the whole range.
   */
  finish(): Extent[] {
    if (this.#runs.length === 0 && this.#end > this.#start) {
      return [{ length: this.#end - this.#start, hole: false, zero: false }];
    }
    return this.#runs.map((r) => ({ ...r }));
  }
}

/**
 * Pass runs given as consecutive lengths from `offset` (a backend's answer)
 * through a collector: the result obeys the contract whatever the input.
 */
export function normalizeExtents(offset: number, length: number, runs: readonly Extent[], maxExtents?: number): Extent[] {
  const c = new ExtentCollector(offset, length, maxExtents);
  let pos = offset;
  for (const r of runs) {
    if (!(Number.isSafeInteger(r.length) && r.length > 0)) break;
    if (!c.add(pos, r.length, r)) break;
    pos += r.length;
  }
  return c.finish();
}
