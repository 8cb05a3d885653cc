import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { runConformance } from './conformance.ts';
import { MemoryNode } from './memory.ts';
import { CheckedNode } from './node.ts';
import { OverlayNode } from './overlay.ts';

runConformance('OverlayNode over a memory disk', async (size) => new OverlayNode(new MemoryNode(size)), { reportsHoles: true });
runConformance('OverlayNode, 4 KiB granularity, checked, discard=unmap', async (size) => new CheckedNode(new OverlayNode(new MemoryNode(size), 4096), { discard: 'unmap' }), {
  reportsHoles: true,
  propertyRuns: 20,
});

describe('OverlayNode', () => {
  test('the base is never written; extents merge with the base; depths are the base plus one', async () => {
    const base = new MemoryNode(1 << 20);
    await base.write(0, Buffer.alloc(200000, 7));
    const snapshot = await base.read(0, base.size);
    const o = new OverlayNode(base);
    await o.write(70000, Buffer.alloc(10, 1));
    await o.writeZeroes(131072, 65536);
    await o.trim(262144, 65536);
    await o.trim(400000, 10); // partial: nothing happens
    assert.ok((await base.read(0, base.size)).equals(snapshot), 'base unchanged');
    assert.deepEqual(await o.extents(0, o.size), [
      { length: 131072, hole: false, zero: false },
      { length: 65536, hole: true, zero: true },
      { length: 65536, hole: false, zero: false }, // the base's data up to its 256 KiB chunk
      { length: 65536, hole: true, zero: true },
      { length: (1 << 20) - 327680, hole: true, zero: true },
    ].reduce<{ length: number; hole: boolean; zero: boolean }[]>((acc, r) => {
      const last = acc[acc.length - 1];
      if (last !== undefined && last.hole === r.hole && last.zero === r.zero) last.length += r.length;
      else acc.push({ ...r });
      return acc;
    }, []));
    assert.deepEqual(await o.allocationDepth(0, o.size), [
      { length: 65536, depth: 2 },
      { length: 65536, depth: 1 },
      { length: 65536, depth: 1 },
      { length: 65536, depth: 2 },
      { length: 65536, depth: 1 },
      { length: (1 << 20) - 327680, depth: 2 },
    ].reduce<{ length: number; depth: number }[]>((acc, r) => {
      const last = acc[acc.length - 1];
      if (last !== undefined && last.depth === r.depth) last.length += r.length;
      else acc.push({ ...r });
      return acc;
    }, []));
    assert.deepEqual(await o.allocationDepth(1000, 10, 1), [{ length: 10, depth: 2 }]);
    await o.close();
  });
});
