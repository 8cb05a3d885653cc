import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { runConformance } from './conformance.ts';
import { MemoryNode } from './memory.ts';
import { openBlockNode } from './open.ts';
import { BlockError } from './types.ts';

runConformance('MemoryNode', async (size) => new MemoryNode(size), { trimZeroes: true, reportsHoles: true });
runConformance('MemoryNode, 4 KiB chunks', async (size) => new MemoryNode(size, { chunkSize: 4096 }), { trimZeroes: true, reportsHoles: true, propertyRuns: 20 });
runConformance('memory stack (openBlockNode, discard=unmap, detect-zeroes=unmap)', (size) =>
  openBlockNode({ kind: 'memory', size, discard: 'unmap', detectZeroes: 'unmap' }), { trimZeroes: true, reportsHoles: true, propertyRuns: 20 });
runConformance('memory stack (openBlockNode, defaults)', (size) => openBlockNode({ kind: 'memory', size }), { propertyRuns: 20 });

const t = { timeout: 10_000 };

describe('MemoryNode', () => {
  test('readViews: the chunks themselves for data, one number per stretch of holes', t, async () => {
    const node = new MemoryNode(8 * 65536);
    await node.write(65536 + 100, Buffer.from('abc'));
    await node.write(2 * 65536, Buffer.alloc(65536, 0x62));
    const runs = node.readViews(100, 6 * 65536);
    assert.deepEqual(runs.map((r) => (typeof r === 'number' ? r : r.length)), [65536 - 100, 65536, 65536, 3 * 65536 + 100]);
    const view = runs[1] as Buffer;
    assert.equal(view.subarray(100, 103).toString(), 'abc');
    // A view, not a copy: what it shows is what the memory holds when it is sent.
    await node.write(65536 + 100, Buffer.from('xyz'));
    assert.equal(view.subarray(100, 103).toString(), 'xyz');
    // Checked: out of range is refused as read() refuses it; a closed node offers none.
    const checked = await openBlockNode({ kind: 'memory', size: 65536 });
    assert.throws(() => checked.readViews(1, 65536), (err: unknown) => err instanceof BlockError && err.code === 'EINVAL');
    assert.deepEqual(checked.readViews(0, 65536), [65536]);
    await checked.close();
    assert.equal(checked.readViews(0, 65536), null);
  });

  test('a 1 TiB disk costs nothing until written', t, async () => {
    const node = new MemoryNode(2 ** 40);
    assert.equal(node.allocatedBytes, 0);
    assert.ok((await node.read(2 ** 40 - 10, 10)).equals(Buffer.alloc(10)));
    assert.deepEqual(await node.extents(0, 2 ** 40), [{ length: 2 ** 40, hole: true, zero: true }]);
    await node.write(2 ** 39 + 5, Buffer.from('hello'));
    assert.equal(node.allocatedBytes, 65536);
    const runs = await node.extents(0, 2 ** 40);
    assert.deepEqual(runs, [
      { length: 2 ** 39, hole: true, zero: true },
      { length: 65536, hole: false, zero: false },
      { length: 2 ** 39 - 65536, hole: true, zero: true },
    ]);
    await node.writeZeroes(0, 2 ** 40);
    assert.equal(node.allocatedBytes, 0);
  });

  test('sizes up to 2^53 and odd sizes', t, async () => {
    const big = new MemoryNode(2 ** 53);
    await big.write(2 ** 53 - 3, Buffer.from([1, 2, 3]));
    assert.deepEqual([...(await big.read(2 ** 53 - 4, 4))], [0, 1, 2, 3]);
    const runs = await big.extents(2 ** 53 - 65536 * 3, 65536 * 3);
    assert.deepEqual(runs, [
      { length: 65536 * 2, hole: true, zero: true },
      { length: 65536, hole: false, zero: false },
    ]);
    const odd = new MemoryNode(1000);
    await odd.write(0, Buffer.alloc(1000, 7));
    assert.equal(odd.allocatedBytes, 1000, 'a short last chunk');
    assert.throws(() => new MemoryNode(2 ** 53 + 2), BlockError);
    assert.throws(() => new MemoryNode(-1), BlockError);
    assert.throws(() => new MemoryNode(1.5), BlockError);
  });

  test('zeroing frees whole chunks, zeroes partial ones, keeps them with noHole', t, async () => {
    const node = new MemoryNode(65536 * 4);
    await node.write(0, Buffer.alloc(65536 * 4, 9));
    await node.writeZeroes(65536, 65536, { noHole: true });
    assert.equal(node.allocatedBytes, 65536 * 4, 'noHole keeps the chunk');
    assert.deepEqual(await node.extents(65536, 65536), [{ length: 65536, hole: false, zero: false }]);
    await node.trim(65536 * 2 + 10, 65536 - 10);
    assert.equal(node.allocatedBytes, 65536 * 4, 'a partial trim keeps the chunk');
    assert.ok((await node.read(65536 * 2, 11)).equals(Buffer.from([9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 0])));
    await node.trim(65536 * 2, 10);
    assert.equal(node.allocatedBytes, 65536 * 3, 'a chunk that became all zero is freed');
    await node.trim(0, 65536 * 2);
    assert.equal(node.allocatedBytes, 65536);
    assert.deepEqual(await node.extents(0, 65536 * 4), [
      { length: 65536 * 3, hole: true, zero: true },
      { length: 65536, hole: false, zero: false },
    ]);
  });

  test('extents are capped by maxExtents', t, async () => {
    const node = new MemoryNode(65536 * 100);
    for (let i = 0; i < 100; i += 2) await node.write(i * 65536, Buffer.from([1]));
    assert.equal((await node.extents(0, node.size)).length, 100);
    const capped = await node.extents(0, node.size, 7);
    assert.equal(capped.length, 7);
    assert.equal(capped.reduce((s, r) => s + r.length, 0), 7 * 65536);
  });

  test('sparse walk over a huge range visits only allocated chunks', t, async () => {
    const node = new MemoryNode(2 ** 50);
    const at = [5, 6, 1000, 2 ** 30, 2 ** 33 + 1];
    for (const c of at) await node.write(c * 65536, Buffer.from([1]));
    const runs = await node.extents(65536 * 5 + 3, 2 ** 50 - 65536 * 5 - 3);
    assert.deepEqual(runs.slice(0, 3), [
      { length: 2 * 65536 - 3, hole: false, zero: false },
      { length: (1000 - 7) * 65536, hole: true, zero: true },
      { length: 65536, hole: false, zero: false },
    ]);
    assert.equal(runs.length, 8);
    assert.equal(runs.reduce((s, r) => s + r.length, 0), 2 ** 50 - 65536 * 5 - 3);
  });
});
