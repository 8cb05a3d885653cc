import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { MemoryNode } from '../block/memory.ts';
import { AllocationDepthContext } from '../meta/allocation-depth.ts';
import { DirtyBitmapContext } from '../meta/dirty-bitmap-context.ts';
import { DirtyBitmap } from '../meta/dirty-bitmap.ts';
import { Export } from './export.ts';

describe('Export meta context ids (as qemu-nbd numbers them)', () => {
  const node = new MemoryNode(1 << 20);
  const bitmap = (name: string) => new DirtyBitmapContext(new DirtyBitmap({ name, granularity: 65536, enabled: true }, node.size));

  test('base:allocation 0, qemu:allocation-depth 1, bitmaps from 2', () => {
    const [b0, b1] = [bitmap('b0'), bitmap('b1')];
    const exp = new Export({ name: '', node, multiConn: false, metaContexts: [new AllocationDepthContext(node)], bitmapContexts: [b0, b1] });
    assert.deepEqual(exp.metaContexts.map((c) => [c.name, exp.contextId(c)]), [
      ['base:allocation', 0],
      ['qemu:allocation-depth', 1],
      ['qemu:dirty-bitmap:b0', 2],
      ['qemu:dirty-bitmap:b1', 3],
    ]);
    assert.equal(exp.context(3), b1);
  });

  test('without -A the bitmaps still start at 2; id 1 names nothing', () => {
    const b0 = bitmap('b0');
    const exp = new Export({ name: '', node, multiConn: false, bitmapContexts: [b0], bitmapStats: () => [b0.bitmap] });
    assert.equal(exp.contextId(b0), 2);
    assert.equal(exp.context(1), undefined);
    assert.equal(exp.context(2), b0);
    b0.bitmap.mark(0, 1);
    assert.deepEqual([...exp.bitmapStats()].map((s) => [s.name, s.dirtyBytes()]), [['b0', 65536]]);
  });
});
