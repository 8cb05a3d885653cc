import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import fc from 'fast-check';
import { DATA, ExtentCollector, HOLE, normalizeExtents } from './extents.ts';
import { RangeLock } from './range-lock.ts';

const t = { timeout: 10_000 };
const ZERO = { hole: false, zero: true };

describe('ExtentCollector', () => {
  test('clips to the range and merges equal neighbours', t, () => {
    const c = new ExtentCollector(100, 1000);
    c.add(0, 150, HOLE); // starts before the range
    c.add(150, 50, HOLE); // merges
    c.add(200, 100, DATA);
    c.add(300, 100, DATA); // merges
    c.add(400, 100, ZERO);
    c.add(500, 10_000, HOLE); // ends after the range
    assert.equal(c.done, true);
    assert.deepEqual(c.finish(), [
      { length: 100, hole: true, zero: true },
      { length: 200, hole: false, zero: false },
      { length: 100, hole: false, zero: true },
      { length: 600, hole: true, zero: true },
    ]);
  });

  test('a gap is reported as data; overlaps are ignored', t, () => {
    const c = new ExtentCollector(0, 100);
    c.add(10, 10, HOLE);
    c.add(15, 10, DATA); // overlaps what is reported: only [20, 25) counts
    c.add(5, 3, HOLE); // entirely behind: ignored
    assert.equal(c.position, 25);
    assert.deepEqual(c.finish(), [
      { length: 10, hole: false, zero: false },
      { length: 10, hole: true, zero: true },
      { length: 5, hole: false, zero: false },
    ]);
  });

  test('at least one run, starting at the offset; empty ranges give none', t, () => {
    assert.deepEqual(new ExtentCollector(7, 9).finish(), [{ length: 9, hole: false, zero: false }]);
    assert.deepEqual(new ExtentCollector(7, 0).finish(), []);
  });

  test('caps the number of runs; add() says when to stop', t, () => {
    const c = new ExtentCollector(0, 1000, 3);
    assert.equal(c.add(0, 10, HOLE), true);
    assert.equal(c.add(10, 10, DATA), true);
    assert.equal(c.add(20, 10, HOLE), true);
    assert.equal(c.add(30, 10, HOLE), true, 'a merge still fits');
    assert.equal(c.add(40, 10, DATA), false, 'a fourth run does not');
    assert.equal(c.done, true);
    assert.deepEqual(c.finish(), [
      { length: 10, hole: true, zero: true },
      { length: 10, hole: false, zero: false },
      { length: 20, hole: true, zero: true },
    ]);
  });

  test('property: output obeys the contract for any input', t, () => {
    const run = fc.record({ length: fc.integer({ min: -5, max: 300 }), hole: fc.boolean(), zero: fc.boolean() });
    fc.assert(
      fc.property(fc.nat(1000), fc.integer({ min: 1, max: 2000 }), fc.array(run, { maxLength: 30 }), fc.integer({ min: 1, max: 10 }), (off, len, runs, max) => {
        const out = normalizeExtents(off, len, runs, max);
        assert.ok(out.length >= 1 && out.length <= max);
        let sum = 0;
        out.forEach((r, i) => {
          assert.ok(r.length > 0);
          const prev = out[i - 1];
          if (prev) assert.ok(prev.hole !== r.hole || prev.zero !== r.zero);
          sum += r.length;
        });
        assert.ok(sum <= len);
      }),
      { numRuns: 300 },
    );
  });
});

describe('RangeLock', () => {
  test('overlapping holders wait; disjoint ones do not', t, async () => {
    const lock = new RangeLock();
    const order: string[] = [];
    const a = await lock.acquire(0, 4096);
    const b = await lock.acquire(4096, 8192); // disjoint: granted at once
    const c = lock.acquire(4000, 5000).then((release) => {
      order.push('c');
      return release;
    });
    await new Promise((r) => setTimeout(r, 10));
    assert.deepEqual(order, []);
    a();
    await new Promise((r) => setTimeout(r, 10));
    assert.deepEqual(order, [], 'still blocked by b');
    b();
    (await c)();
    assert.deepEqual(order, ['c']);
    assert.equal(lock.heldCount, 0);
  });

  test('with() releases on failure', t, async () => {
    const lock = new RangeLock();
    await assert.rejects(lock.with(0, 10, async () => {
      throw new Error('x');
    }));
    assert.equal(lock.heldCount, 0);
    assert.equal(await lock.with(0, 10, async () => 5), 5);
  });
});
