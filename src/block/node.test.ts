import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { MemoryNode } from './memory.ts';
import { CheckedNode, isAllZero, zeroRuns, type CheckedNodeOptions } from './node.ts';
import { openBlockNode } from './open.ts';
import type { BlockCapabilities, BlockNode, Extent, WriteOptions, ZeroOptions } from './types.ts';
import { BlockError } from './types.ts';

type Call = { op: string; args: unknown[] };

/** A memory node that records every call and can be told to fail or to lack features. */
class SpyNode implements BlockNode {
  readonly calls: Call[] = [];
  readonly mem: MemoryNode;
  readonly capabilities: BlockCapabilities;
  zeroError: string | undefined;
  extentsAnswer: Extent[] | undefined;
  constructor(size: number, caps: Partial<BlockCapabilities> = {}) {
    this.mem = new MemoryNode(size);
    this.capabilities = { ...this.mem.capabilities, canCache: true, ...caps };
  }
  get size(): number {
    return this.mem.size;
  }
  #log(op: string, ...args: unknown[]): void {
    this.calls.push({ op, args });
  }
  ops(): string[] {
    return this.calls.map((c) => c.op);
  }
  async read(offset: number, length: number, into?: Buffer): Promise<Buffer> {
    this.#log('read', offset, length);
    return this.mem.read(offset, length, into);
  }
  async write(offset: number, data: Buffer, opts?: WriteOptions): Promise<void> {
    this.#log('write', offset, data.length, { ...opts });
    return this.mem.write(offset, data);
  }
  async flush(): Promise<void> {
    this.#log('flush');
  }
  async trim(offset: number, length: number, opts?: WriteOptions): Promise<void> {
    this.#log('trim', offset, length, { ...opts });
    return this.mem.trim(offset, length);
  }
  async writeZeroes(offset: number, length: number, opts?: ZeroOptions): Promise<void> {
    this.#log('writeZeroes', offset, length, { ...opts });
    if (this.zeroError !== undefined) throw new BlockError(this.zeroError);
    return this.mem.writeZeroes(offset, length, opts);
  }
  async cache(offset: number, length: number): Promise<void> {
    this.#log('cache', offset, length);
  }
  async extents(offset: number, length: number, maxExtents?: number): Promise<Extent[]> {
    this.#log('extents', offset, length);
    return this.extentsAnswer ?? this.mem.extents(offset, length, maxExtents);
  }
  async close(): Promise<void> {
    this.#log('close');
  }
}

function make(opts: CheckedNodeOptions = {}, caps: Partial<BlockCapabilities> = {}, size = 10000): { spy: SpyNode; node: CheckedNode } {
  const spy = new SpyNode(size, caps);
  return { spy, node: new CheckedNode(spy, opts) };
}

const code = (c: string) => (e: unknown) => e instanceof BlockError && e.code === c;
const t = { timeout: 10_000 };

describe('CheckedNode', () => {
  test('read-only: write, trim and zeroes fail with EPERM before the backend sees them', t, async () => {
    const { spy, node } = make({ readOnly: true, discard: 'unmap' });
    assert.equal(node.capabilities.writable, false);
    assert.equal(node.capabilities.canTrim, false);
    await assert.rejects(node.write(0, Buffer.from([1])), code('EPERM'));
    await assert.rejects(node.trim(0, 10), code('EPERM'));
    await assert.rejects(node.writeZeroes(0, 10), code('EPERM'));
    assert.ok((await node.read(0, 10)).equals(Buffer.alloc(10)));
    await node.flush();
    assert.deepEqual(spy.ops(), ['read', 'flush']);
    // A backend that cannot write makes the wrapper read-only too.
    const ro = make({}, { writable: false });
    assert.equal(ro.node.capabilities.writable, false);
    await assert.rejects(ro.node.write(0, Buffer.from([1])), code('EPERM'));
  });

  test('ranges: EINVAL for bad or past-the-end ranges, ENOSPC for writes past the end', t, async () => {
    const { spy, node } = make();
    await assert.rejects(node.read(-1, 1), code('EINVAL'));
    await assert.rejects(node.read(0.5, 1), code('EINVAL'));
    await assert.rejects(node.read(0, -1), code('EINVAL'));
    await assert.rejects(node.read(0, NaN), code('EINVAL'));
    await assert.rejects(node.read(2 ** 53, 1), code('EINVAL'));
    await assert.rejects(node.read(9999, 2), code('EINVAL'));
    await assert.rejects(node.read(10001, 0), code('EINVAL'));
    await assert.rejects(node.read(0, 10, Buffer.alloc(5)), code('EINVAL'));
    await assert.rejects(node.write(9999, Buffer.alloc(2, 1)), code('ENOSPC'));
    await assert.rejects(node.write(20000, Buffer.alloc(1, 1)), code('ENOSPC'));
    await assert.rejects(node.write(-1, Buffer.alloc(1, 1)), code('EINVAL'));
    await assert.rejects(node.writeZeroes(9000, 1001), code('ENOSPC'));
    await assert.rejects(node.trim(9000, 1001), code('EINVAL'));
    await assert.rejects(node.cache(9000, 1001), code('EINVAL'));
    await assert.rejects(node.extents(9000, 1001), code('EINVAL'));
    assert.deepEqual(spy.ops(), []);
    // Exactly up to the end is fine; empty ranges do not reach the backend.
    await node.write(9999, Buffer.from([1]));
    assert.equal((await node.read(9999, 1))[0], 1);
    assert.equal((await node.read(10000, 0)).length, 0);
    await node.write(10000, Buffer.alloc(0));
    await node.writeZeroes(10000, 0);
    assert.deepEqual(await node.extents(10000, 0), []);
    assert.deepEqual(spy.ops(), ['write', 'read']);
  });

  test('detect-zeroes: all-zero writes become zero requests', t, async () => {
    const off = make({ detectZeroes: 'off' });
    await off.node.write(0, Buffer.alloc(4096));
    assert.deepEqual(off.spy.ops(), ['write']);

    const on = make({ detectZeroes: 'on', discard: 'unmap' });
    await on.node.write(0, Buffer.alloc(4096));
    await on.node.write(0, Buffer.from([0, 0, 1, 0]));
    assert.deepEqual(on.spy.calls, [
      { op: 'writeZeroes', args: [0, 4096, { fua: false, noHole: true, fast: false }] },
      { op: 'write', args: [0, 4, { fua: false }] },
    ]);

    const unmap = make({ detectZeroes: 'unmap', discard: 'unmap' });
    await unmap.node.write(100, Buffer.alloc(9000), { fua: true });
    assert.deepEqual(unmap.spy.calls, [{ op: 'writeZeroes', args: [100, 9000, { fua: true, noHole: false, fast: false }] }]);

    // unmap without discard=unmap keeps the allocation.
    const noDiscard = make({ detectZeroes: 'unmap', discard: 'ignore' });
    assert.equal(noDiscard.node.detectZeroes, 'on');
    await noDiscard.node.write(0, Buffer.alloc(10));
    assert.deepEqual(noDiscard.spy.calls, [{ op: 'writeZeroes', args: [0, 10, { fua: false, noHole: true, fast: false }] }]);
  });

  test('isAllZero works on large buffers without a byte loop', t, () => {
    const big = Buffer.alloc(3 * 1024 * 1024 + 5);
    assert.ok(isAllZero(big));
    assert.ok(isAllZero(Buffer.alloc(0)));
    for (const at of [0, 1, 1024 * 1024 - 1, 1024 * 1024, 2 * 1024 * 1024 + 7, big.length - 1]) {
      big[at] = 1;
      assert.ok(!isAllZero(big), `non-zero byte at ${at}`);
      big[at] = 0;
    }
  });

  test('cache=unsafe makes flush a no-op; writeback passes it on', t, async () => {
    const unsafe = make({ cache: 'unsafe' });
    await unsafe.node.flush();
    assert.deepEqual(unsafe.spy.ops(), []);
    const wb = make({ cache: 'writeback' });
    await wb.node.flush();
    assert.deepEqual(wb.spy.ops(), ['flush']);
  });

  test('writethrough and directsync make every write FUA', t, async () => {
    for (const cache of ['writethrough', 'directsync'] as const) {
      const { spy, node } = make({ cache, discard: 'unmap' });
      await node.write(0, Buffer.from([1]));
      await node.writeZeroes(0, 1);
      await node.trim(0, 1);
      assert.deepEqual(spy.calls, [
        { op: 'write', args: [0, 1, { fua: true }] },
        { op: 'writeZeroes', args: [0, 1, { fua: true, noHole: false, fast: false }] },
        { op: 'trim', args: [0, 1, { fua: true }] },
      ]);
    }
    const { spy, node } = make({ cache: 'writeback' });
    await node.write(0, Buffer.from([1]));
    await node.write(0, Buffer.from([1]), { fua: true });
    assert.deepEqual(spy.calls.map((c) => c.args[2]), [{ fua: false }, { fua: true }]);
  });

  test('discard=ignore: trim is a no-op and zeroing never deallocates', t, async () => {
    const { spy, node } = make({ discard: 'ignore' });
    assert.equal(node.capabilities.canTrim, false);
    await node.trim(0, 100);
    await node.writeZeroes(0, 100);
    assert.deepEqual(spy.calls, [{ op: 'writeZeroes', args: [0, 100, { fua: false, noHole: true, fast: false }] }]);
    const unmap = make({ discard: 'unmap' });
    assert.equal(unmap.node.capabilities.canTrim, true);
    await unmap.node.trim(0, 100);
    assert.deepEqual(unmap.spy.ops(), ['trim']);
    // A backend that cannot trim gets no trim even with discard=unmap.
    const cannot = make({ discard: 'unmap' }, { canTrim: false });
    await cannot.node.trim(0, 100);
    assert.deepEqual(cannot.spy.ops(), []);
  });

  test('zeroes fall back to writing zeroes on ENOTSUP, unless fast', t, async () => {
    const { spy, node } = make({}, {}, 3 * 1024 * 1024);
    await node.write(0, Buffer.alloc(3 * 1024 * 1024, 7));
    spy.calls.length = 0;
    spy.zeroError = 'ENOTSUP';
    await node.writeZeroes(5, 2 * 1024 * 1024 + 10, { fua: true });
    assert.deepEqual(spy.ops(), ['writeZeroes', 'write', 'write', 'write', 'flush']);
    const got = await node.read(0, 3 * 1024 * 1024);
    assert.equal(got[4], 7);
    assert.ok(got.subarray(5, 2 * 1024 * 1024 + 15).equals(Buffer.alloc(2 * 1024 * 1024 + 10)));
    assert.equal(got[2 * 1024 * 1024 + 15], 7);
    spy.calls.length = 0;
    await assert.rejects(node.writeZeroes(0, 10, { fast: true }), code('ENOTSUP'));
    assert.deepEqual(spy.ops(), ['writeZeroes']);
    spy.zeroError = 'EIO';
    await assert.rejects(node.writeZeroes(0, 10), code('EIO'));
    // A backend that can never zero fast is not asked.
    const slow = make({}, { canFastZero: false });
    assert.equal(slow.node.capabilities.canFastZero, false);
    await assert.rejects(slow.node.writeZeroes(0, 10, { fast: true }), code('ENOTSUP'));
    assert.deepEqual(slow.spy.ops(), []);
  });

  test('extents: one data run without the capability; backend answers are clipped and merged', t, async () => {
    const none = make({}, { canExtents: false });
    assert.deepEqual(await none.node.extents(10, 100), [{ length: 100, hole: false, zero: false }]);
    assert.deepEqual(none.spy.ops(), []);
    const { spy, node } = make();
    spy.extentsAnswer = [
      { length: 10, hole: true, zero: true },
      { length: 20, hole: true, zero: true },
      { length: 0, hole: false, zero: false },
    ];
    assert.deepEqual(await node.extents(0, 100), [{ length: 30, hole: true, zero: true }]);
    spy.extentsAnswer = [{ length: 500, hole: false, zero: false }, { length: 5, hole: true, zero: true }];
    assert.deepEqual(await node.extents(0, 100), [{ length: 100, hole: false, zero: false }]);
    spy.extentsAnswer = [];
    assert.deepEqual(await node.extents(0, 100), [{ length: 100, hole: false, zero: false }]);
  });

  test('cache passes on only when the backend can prefetch', t, async () => {
    const yes = make();
    await yes.node.cache(0, 10);
    assert.deepEqual(yes.spy.ops(), ['cache']);
    const no = make({}, { canCache: false });
    await no.node.cache(0, 10);
    assert.deepEqual(no.spy.ops(), []);
  });

  test('errors from the backend come out as BlockErrors; close is idempotent', t, async () => {
    const { spy, node } = make();
    spy.read = async () => {
      throw Object.assign(new Error('boom'), { code: 'EIO' });
    };
    await assert.rejects(node.read(0, 1), code('EIO'));
    spy.read = async () => {
      throw new TypeError('bug');
    };
    await assert.rejects(node.read(0, 1), code('EIO'));
    await node.close();
    await node.close();
    assert.deepEqual(spy.ops(), ['close']);
    await assert.rejects(node.read(0, 1), code('ESHUTDOWN'));
    await assert.rejects(node.flush(), code('ESHUTDOWN'));
  });

  test('openBlockNode builds a memory stack', t, async () => {
    const node = await openBlockNode({ kind: 'memory', size: 1 << 20, readOnly: true });
    assert.ok(node instanceof CheckedNode);
    assert.ok(node.inner instanceof MemoryNode);
    assert.equal(node.size, 1 << 20);
    await assert.rejects(node.write(0, Buffer.from([1])), code('EPERM'));
    await assert.rejects(openBlockNode({ kind: 'memory', size: -5 }), code('EINVAL'));
  });
});

test('zeroRuns splits on absolute 4 KiB granules and merges equal neighbours', () => {
  const buf = Buffer.alloc(20480);
  buf.fill(1, 2048, 6144); // bytes 4096-8191 of the export, as buf starts at 2048
  const runs = zeroRuns(buf, 2048);
  assert.deepEqual(runs, [
    { offset: 2048, length: 2048, zero: true },
    { offset: 4096, length: 4096, zero: false },
    { offset: 8192, length: 14336, zero: true },
  ]);
  assert.deepEqual(zeroRuns(Buffer.alloc(0), 0), []);
  const edge = Buffer.alloc(8192);
  edge[8191] = 7; // only the last byte of the second granule
  assert.deepEqual(zeroRuns(edge, 0), [
    { offset: 0, length: 4096, zero: true },
    { offset: 4096, length: 4096, zero: false },
  ]);
});
