// The `base:allocation` metadata context (spec: "`base:allocation` metadata
// context"): bit 0 NBD_STATE_HOLE, bit 1 NBD_STATE_ZERO. The values are
// defined by the context itself, so they live here rather than in protocol/.
import type { BlockNode } from '../block/types.ts';
import type { MetaContext, StatusRun } from './context.ts';

export const STATE_HOLE = 1 << 0;
export const STATE_ZERO = 1 << 1;

export class BaseAllocationContext implements MetaContext {
  readonly name = 'base:allocation';
  readonly #node: BlockNode;

  constructor(node: BlockNode) {
    this.#node = node;
  }

  async status(offset: number, length: number, maxRuns: number): Promise<StatusRun[]> {
    const extents = await this.#node.extents(offset, length);
    const runs: StatusRun[] = [];
    for (const e of extents) {
      const flags = (e.hole ? STATE_HOLE : 0) | (e.zero ? STATE_ZERO : 0);
      const last = runs[runs.length - 1];
      if (last !== undefined && last.flags === flags) last.length += e.length;
      else if (runs.length < maxRuns) runs.push({ length: e.length, flags });
      else break;
    }
    return runs;
  }
}
