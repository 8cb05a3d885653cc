import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { CheckedNode } from '../block/node.ts';
import { MemoryNode } from '../block/memory.ts';
import { BlockError } from '../block/types.ts';
import type { BitmapStore, StoredBitmap } from './bitmap-store.ts';
import { BitmapError, NodeBitmaps } from './bitmaps.ts';
import { DirtyBitmapContext, STATE_DIRTY } from './dirty-bitmap-context.ts';
import { DirtyBitmap, type BitmapRun } from './dirty-bitmap.ts';

const K = 1024;
const M = 1024 * K;

function bm(size: number, granularity = 64 * K, enabled = true): DirtyBitmap {
  return new DirtyBitmap({ name: 'b', granularity, enabled }, size);
}

/** A model: one boolean per granule. */
function modelRuns(dirty: boolean[], granularity: number, size: number, offset: number, length: number): BitmapRun[] {
  const out: BitmapRun[] = [];
  for (let pos = offset; pos < offset + length; ) {
    const g = Math.floor(pos / granularity);
    const end = Math.min(offset + length, size, (g + 1) * granularity);
    const d = dirty[g] ?? false;
    const last = out[out.length - 1];
    if (last !== undefined && last.dirty === d) last.length += end - pos;
    else out.push({ length: end - pos, dirty: d });
    pos = end;
  }
  return out;
}

describe('DirtyBitmap', () => {
  test('marks every granule a range touches, clipped to the node', () => {
    const b = bm(4 * M);
    b.mark(100 * K, 5 * K);
    assert.deepEqual(b.runs(0, 4 * M, 100), [
      { length: 64 * K, dirty: false },
      { length: 64 * K, dirty: true },
      { length: 4 * M - 128 * K, dirty: false },
    ]);
    assert.equal(b.dirtyBytes(), 64 * K);
    // Runs are clipped to the request, as qemu-nbd clips them.
    assert.deepEqual(b.runs(70 * K, 10 * K, 100), [{ length: 10 * K, dirty: true }]);
    assert.deepEqual(b.runs(60 * K, 10 * K, 1), [{ length: 4 * K, dirty: false }]);
  });

  test('the last granule counts only its bytes inside the node', () => {
    const b = bm(100 * K + 512);
    b.mark(100 * K, 1);
    assert.equal(b.dirtyBytes(), 100 * K + 512 - 64 * K);
    b.mark(0, 1);
    assert.equal(b.dirtyBytes(), 100 * K + 512);
    assert.equal(b.dirtyGranules, 2);
  });

  test('matches a model under random marks (byte-wide fills and single bits)', () => {
    let seed = 7;
    const rnd = (n: number): number => {
      seed = (seed * 1103515245 + 12345) % 2 ** 31;
      return seed % n;
    };
    for (const [size, g] of [[1 * M + 3 * K, 4 * K], [300 * K, 512], [8 * M, 64 * K]] as const) {
      const b = bm(size, g);
      const model: boolean[] = [];
      for (let i = 0; i < 60; i++) {
        const off = rnd(size);
        const len = 1 + rnd(Math.min(size - off, 40 * g));
        b.mark(off, len);
        for (let x = Math.floor(off / g); x <= Math.floor((off + len - 1) / g); x++) model[x] = true;
        const qo = rnd(size);
        const ql = 1 + rnd(size - qo);
        assert.deepEqual(b.runs(qo, ql, 1e9), modelRuns(model, g, size, qo, ql));
      }
      const count = model.filter(Boolean).length;
      assert.equal(b.dirtyGranules, count);
      // Serialized and loaded again: the same bits.
      const again = new DirtyBitmap(b.info, size, b.serialize());
      assert.deepEqual(again.runs(0, size, 1e9), b.runs(0, size, 1e9));
      assert.equal(again.dirtyBytes(), b.dirtyBytes());
    }
  });

  test('bits are stored least significant first, as qcow2 does', () => {
    const b = bm(64 * M, 64 * K);
    b.mark(0, 1); // bit 0
    b.mark(9 * 64 * K, 1); // bit 9: byte 1, bit 1
    const s = b.serialize();
    assert.equal(s[0], 0x01);
    assert.equal(s[1], 0x02);
    assert.equal(s.length, 128);
  });

  test('loading ignores bits past the last granule', () => {
    const b = new DirtyBitmap({ name: 'b', granularity: 64 * K, enabled: true }, 3 * 64 * K, Uint8Array.of(0xff));
    assert.equal(b.dirtyGranules, 3);
    assert.equal(b.dirtyBytes(), 3 * 64 * K);
  });

  test('merge ORs bits, across granularities too', () => {
    const a = bm(1 * M, 64 * K);
    const fine = new DirtyBitmap({ name: 'f', granularity: 4 * K, enabled: true }, 1 * M);
    fine.mark(130 * K, 1);
    a.mark(0, 1);
    a.merge(fine);
    assert.deepEqual(a.runs(0, 1 * M, 10), [
      { length: 64 * K, dirty: true },
      { length: 64 * K, dirty: false },
      { length: 64 * K, dirty: true },
      { length: 1 * M - 192 * K, dirty: false },
    ]);
    const fine2 = new DirtyBitmap({ name: 'g', granularity: 4 * K, enabled: true }, 1 * M);
    fine2.merge(a);
    assert.equal(fine2.dirtyBytes(), 128 * K);
  });

  test('rejects bad granularities and names as qemu does', () => {
    assert.throws(() => bm(M, 1000), /Granularity must be power of 2 and at least 512/);
    assert.throws(() => bm(M, 256), /Granularity must be power of 2 and at least 512/);
    assert.throws(() => new DirtyBitmap({ name: '', granularity: 65536, enabled: true }, M), BlockError);
    assert.throws(() => new DirtyBitmap({ name: 'x'.repeat(1024), granularity: 65536, enabled: true }, M), /1023/);
  });
});

describe('qemu:dirty-bitmap context', () => {
  test('flag 1 where dirty, runs capped by maxRuns', async () => {
    const b = bm(1 * M, 64 * K);
    b.mark(64 * K, 1);
    b.mark(256 * K, 1);
    const ctx = new DirtyBitmapContext(b);
    assert.equal(ctx.name, 'qemu:dirty-bitmap:b');
    assert.deepEqual(await ctx.status(0, 1 * M, 100), [
      { length: 64 * K, flags: 0 },
      { length: 64 * K, flags: STATE_DIRTY },
      { length: 128 * K, flags: 0 },
      { length: 64 * K, flags: STATE_DIRTY },
      { length: 1 * M - 320 * K, flags: 0 },
    ]);
    assert.deepEqual(await ctx.status(0, 1 * M, 2), [
      { length: 64 * K, flags: 0 },
      { length: 64 * K, flags: STATE_DIRTY },
    ]);
  });
});

/** A store in memory that records what happened. */
class MemoryStore implements BitmapStore {
  readonly where = 'memory store';
  stored: StoredBitmap[] = [];
  inUse: string[] = [];
  saves = 0;
  async load(): Promise<StoredBitmap[]> {
    return this.stored.map((s) => ({ ...s }));
  }
  async markInUse(names: readonly string[]): Promise<void> {
    this.inUse = [...names];
  }
  async save(bitmaps: readonly import('./dirty-bitmap.ts').DirtyBitmap[], inconsistent: readonly string[]): Promise<void> {
    this.saves++;
    const kept = this.stored.filter((s) => inconsistent.includes(s.info.name));
    this.stored = [...kept, ...bitmaps.map((b) => ({ info: b.info, inconsistent: null, data: b.serialize() }))];
    this.inUse = [];
  }
}

describe('NodeBitmaps and the tracking node', () => {
  test('writes, zeroes and trims through the shared node mark enabled bitmaps before they resolve', async () => {
    const store = new MemoryStore();
    store.stored = [
      { info: { name: 'on', granularity: 64 * K, enabled: true }, inconsistent: null, data: new Uint8Array(2) },
      { info: { name: 'off', granularity: 64 * K, enabled: false }, inconsistent: null, data: new Uint8Array(2) },
    ];
    const inner = new CheckedNode(new MemoryNode(1 * M), { discard: 'unmap' });
    const bitmaps = await NodeBitmaps.open({ store, size: inner.size, writable: true });
    assert.deepEqual(store.inUse, ['on'], 'the enabled bitmap is flagged in use at open');
    const node = bitmaps.wrap(inner);
    const on = bitmaps.get('on')!;
    const writing = node.write(0, Buffer.alloc(10, 1));
    assert.ok(on.isDirty(0), 'marked before the write completes');
    await writing;
    await node.writeZeroes(128 * K, 1);
    await node.trim(256 * K, 64 * K);
    assert.deepEqual(on.runs(0, 384 * K, 10), [
      { length: 64 * K, dirty: true },
      { length: 64 * K, dirty: false },
      { length: 64 * K, dirty: true },
      { length: 64 * K, dirty: false },
      { length: 64 * K, dirty: true },
      { length: 64 * K, dirty: false },
    ]);
    assert.equal(bitmaps.get('off')!.dirtyBytes(), 0);
    // A refused request marks nothing.
    await assert.rejects(node.write(1 * M - 1, Buffer.alloc(2)));
    assert.ok(!on.isDirty(1 * M - 1));
    await node.close();
    assert.equal(store.saves, 1);
    assert.deepEqual(store.inUse, []);
    const saved = store.stored.find((s) => s.info.name === 'on')!;
    assert.equal(saved.data![0], 0b10101);
  });

  test('trim marks nothing when it cannot deallocate (--discard=ignore); a fast zero that cannot be fast marks nothing', async () => {
    const inner = new CheckedNode(new MemoryNode(1 * M));
    const store = new MemoryStore();
    const bitmaps = await NodeBitmaps.open({ store, size: inner.size, writable: true });
    const b = bitmaps.add('b');
    const node = bitmaps.wrap(inner);
    await node.trim(0, 64 * K);
    assert.equal(b.dirtyBytes(), 0);
    // A backend that cannot zero fast: FAST_ZERO fails with ENOTSUP and changes nothing.
    const slowInner = new MemoryNode(1 * M);
    Object.defineProperty(slowInner, 'capabilities', { value: { ...slowInner.capabilities, canFastZero: false } });
    const slow = bitmaps.wrap(new CheckedNode(slowInner));
    await assert.rejects(slow.writeZeroes(0, 1, { fast: true }), { code: 'ENOTSUP' });
    assert.equal(b.dirtyBytes(), 0);
    await node.writeZeroes(0, 1, { fast: true });
    assert.equal(b.dirtyBytes(), 64 * K);
  });

  test('export checks follow qemu-nbd: not found, inconsistent, enabled on a read-only export of a writable node', async () => {
    const store = new MemoryStore();
    store.stored = [
      { info: { name: 'on', granularity: 64 * K, enabled: true }, inconsistent: null, data: new Uint8Array(2) },
      { info: { name: 'off', granularity: 64 * K, enabled: false }, inconsistent: null, data: new Uint8Array(2) },
      { info: { name: 'bad', granularity: 64 * K, enabled: true }, inconsistent: 'in use' },
    ];
    const rw = await NodeBitmaps.open({ store, size: 1 * M, writable: true });
    assert.throws(() => rw.contexts(['nosuch'], false), new BitmapError("Bitmap 'nosuch' is not found"));
    assert.throws(() => rw.contexts(['bad'], false), new BitmapError("Bitmap 'bad' is inconsistent and cannot be used"));
    assert.throws(() => rw.contexts(['on'], true), new BitmapError("Enabled bitmap 'on' incompatible with readonly export"));
    assert.deepEqual(rw.contexts(['off', 'on'], false).map((c) => c.name), ['qemu:dirty-bitmap:off', 'qemu:dirty-bitmap:on']);
    assert.deepEqual(rw.contexts(['off'], true).map((c) => c.name), ['qemu:dirty-bitmap:off']);
    // A read-only node cannot change the bitmap: enabled is fine.
    const ro = await NodeBitmaps.open({ store, size: 1 * M, writable: false });
    assert.deepEqual(ro.contexts(['on'], true).map((c) => c.name), ['qemu:dirty-bitmap:on']);
  });

  test('management: qemu-img messages, checkpoint disables every enabled bitmap and adds one', async () => {
    const store = new MemoryStore();
    const b = await NodeBitmaps.open({ store, size: 1 * M, writable: false });
    b.add('a');
    assert.throws(() => b.add('a'), new BitmapError('Bitmap already exists: a'));
    assert.throws(() => b.remove('z'), new BitmapError("Dirty bitmap 'z' not found"));
    b.add('c', 4096, false);
    assert.deepEqual(b.checkpoint('d'), ['a']);
    assert.deepEqual(b.list().map((x) => [x.name, x.enabled, x.granularity]), [['a', false, 65536], ['c', false, 4096], ['d', true, 65536]]);
    b.get('c')!.mark(0, 1);
    b.merge('c', 'a');
    assert.equal(b.get('a')!.dirtyBytes(), 64 * K);
    b.clear('a');
    assert.equal(b.get('a')!.dirtyBytes(), 0);
    await b.save();
    assert.deepEqual(store.stored.map((s) => s.info.name), ['a', 'c', 'd']);
    const none = await NodeBitmaps.open({ store: null, size: 1 * M, writable: false });
    assert.throws(() => none.add('x'), /cannot store bitmaps/);
  });
});
