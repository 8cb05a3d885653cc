// The `qemu:allocation-depth` metadata context (qemu's docs/interop/nbd.txt):
// each extent's flags are the depth of the backing chain layer that
// allocates it: 0 unallocated anywhere, 1 the top image, 2 its backing
// file, and so on. qemu-nbd offers it with -A, as context id 1.
import type { BlockNode } from '../block/types.ts';
import { depthsOf } from '../block/depth.ts';
import type { MetaContext, StatusRun } from './context.ts';

export const ALLOCATION_DEPTH_CONTEXT = 'qemu:allocation-depth';

export class AllocationDepthContext implements MetaContext {
  readonly name = ALLOCATION_DEPTH_CONTEXT;
  readonly #node: BlockNode;

  constructor(node: BlockNode) {
    this.#node = node;
  }

  async status(offset: number, length: number, maxRuns: number): Promise<StatusRun[]> {
    const runs: StatusRun[] = [];
    for (const r of await depthsOf(this.#node, offset, length, maxRuns)) {
      const last = runs[runs.length - 1];
      if (last !== undefined && last.flags === r.depth) last.length += r.length;
      else if (runs.length < maxRuns) runs.push({ length: r.length, flags: r.depth });
      else break;
    }
    return runs;
  }
}
