// Allocation depth runs (which layer of a backing chain holds a range):
// one collector that clips, merges neighbours of equal depth and caps the
// number of runs, as ExtentCollector does for extents; and the one way to
// ask any node for its depths (a node without layers is depth 1).
import type { BlockNode, DepthRun } from './types.ts';

/** Runs reported when the caller names no cap. */
export const DEFAULT_MAX_DEPTH_RUNS = 128 * 1024;

export class DepthCollector {
  readonly #end: number;
  readonly #max: number;
  #pos: number;
  readonly #runs: DepthRun[] = [];
  #full = false;

  constructor(offset: number, length: number, maxRuns: number = DEFAULT_MAX_DEPTH_RUNS) {
    this.#pos = offset;
    this.#end = offset + length;
    this.#max = Math.max(1, Math.floor(maxRuns));
  }

  /** The absolute offset the next run starts at. */
  get position(): number {
    return this.#pos;
  }

  get end(): number {
    return this.#end;
  }

  /** Runs still allowed before the cap (at least 1 while not done). */
  get remaining(): number {
    return Math.max(1, this.#max - this.#runs.length + 1);
  }

  get done(): boolean {
    return this.#full || this.#pos >= this.#end;
  }

  /** Report `length` bytes from the current position at `depth`; false once done. */
  add(length: number, depth: number): boolean {
    if (this.done || !(length > 0)) return !this.done;
    const n = Math.min(length, this.#end - this.#pos);
    const last = this.#runs[this.#runs.length - 1];
    if (last !== undefined && last.depth === depth) last.length += n;
    else if (this.#runs.length >= this.#max) {
      this.#full = true;
      return false;
    } else this.#runs.push({ length: n, depth });
    this.#pos += n;
    return !this.done;
  }

  /** Add runs (as lengths from the current position), each depth but 0 (allocated nowhere) shifted by `plus`. */
  addRuns(runs: readonly DepthRun[], plus = 0): boolean {
    for (const r of runs) if (!this.add(r.length, r.depth === 0 ? 0 : r.depth + plus)) return false;
    return !this.done;
  }

  finish(): DepthRun[] {
    return this.#runs.map((r) => ({ ...r }));
  }
}

/**
 * Depths of [offset, offset+length) of any node: its own answer when it has
 * layers, else depth 1 throughout. Always covers at least one byte when
 * length > 0, at most `length`.
 */
export async function depthsOf(node: BlockNode, offset: number, length: number, maxRuns?: number): Promise<DepthRun[]> {
  if (length <= 0) return [];
  if (node.allocationDepth === undefined) return [{ length, depth: 1 }];
  const c = new DepthCollector(offset, length, maxRuns);
  c.addRuns(await node.allocationDepth(offset, length, maxRuns));
  const runs = c.finish();
  return runs.length > 0 ? runs : [{ length, depth: 1 }];
}
