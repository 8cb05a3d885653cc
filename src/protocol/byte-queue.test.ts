import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import fc from 'fast-check';
import { ByteQueue } from './byte-queue.ts';
import { queueOf, splits } from './test-helpers.ts';

const t = { timeout: 10_000 };
/** A fresh, unpooled buffer (its own ArrayBuffer) of n counting bytes. */
function bytes(n: number, from = 0): Buffer {
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i++) b[i] = (from + i) & 0xff;
  return b;
}

/** Every composition of n into positive parts (2^(n-1) of them). */
function* compositions(n: number): Generator<number[]> {
  for (let mask = 0; mask < 2 ** (n - 1); mask++) {
    const parts: number[] = [];
    let run = 1;
    for (let i = 0; i < n - 1; i++) {
      if (mask & (1 << i)) {
        parts.push(run);
        run = 1;
      } else run++;
    }
    parts.push(run);
    yield parts;
  }
}

describe('ByteQueue', () => {
  test('contiguous() tells whether the next bytes lie in one chunk', () => {
    const q = new ByteQueue();
    assert.equal(q.contiguous(1), false);
    q.push(Buffer.from([1, 2, 3]));
    q.push(Buffer.from([4, 5]));
    assert.equal(q.contiguous(3), true);
    assert.equal(q.contiguous(4), false);
    q.take(2);
    assert.equal(q.contiguous(1), true);
    assert.equal(q.contiguous(2), false);
    assert.deepEqual([...q.takeInto(Buffer.alloc(3))], [3, 4, 5]);
    assert.equal(q.length, 0);
  });

  test('starts empty; empty chunks are ignored', t, () => {
    const q = new ByteQueue();
    assert.equal(q.length, 0);
    q.push(Buffer.alloc(0));
    assert.equal(q.length, 0);
    assert.equal(q.take(0).length, 0);
    assert.equal(q.peek(0).length, 0);
    assert.equal(q.skip(5), 0);
  });

  test('pushed chunks split anywhere come back the same whatever the take sizes', t, () => {
    const data = bytes(8, 0xa0);
    const pushSplits = [...compositions(8)];
    const takeSplits = [...compositions(8)];
    for (const pushes of pushSplits) {
      for (const takes of takeSplits) {
        const q = new ByteQueue();
        let at = 0;
        for (const p of pushes) {
          q.push(Buffer.from(data.subarray(at, at + p)));
          at += p;
        }
        assert.equal(q.length, 8);
        const got: Buffer[] = [];
        let left = 8;
        for (const n of takes) {
          got.push(q.take(n));
          left -= n;
          assert.equal(q.length, left);
        }
        assert.deepEqual(Buffer.concat(got), data, `pushes ${pushes} takes ${takes}`);
      }
    }
  });

  test('peek across chunks returns the bytes without consuming them', t, () => {
    const data = bytes(10);
    for (const chunks of splits(data)) {
      const q = queueOf(chunks);
      for (let n = 0; n <= 10; n++) {
        assert.deepEqual(q.peek(n), data.subarray(0, n));
        assert.equal(q.length, 10);
      }
      q.skip(3);
      assert.deepEqual(q.peek(7), data.subarray(3));
      assert.deepEqual(q.take(7), data.subarray(3));
    }
  });

  test('skip drops bytes across chunks and returns how many it dropped', t, () => {
    const data = bytes(10);
    for (const chunks of splits(data)) {
      for (let n = 0; n <= 10; n++) {
        const q = queueOf(chunks);
        assert.equal(q.skip(n), n);
        assert.equal(q.length, 10 - n);
        assert.deepEqual(q.take(10 - n), data.subarray(n));
      }
      const q = queueOf(chunks);
      q.take(4);
      assert.equal(q.skip(100), 6, 'skip past the end drops only what is buffered');
      assert.equal(q.length, 0);
    }
  });

  test('take within one chunk is zero-copy: same ArrayBuffer, same bytes', t, () => {
    const chunk = bytes(16);
    const q = new ByteQueue();
    q.push(chunk);
    q.skip(2);
    const a = q.take(5);
    assert.equal(a.buffer, chunk.buffer);
    assert.equal(a.byteOffset, chunk.byteOffset + 2);
    chunk[2] = 0xee;
    assert.equal(a[0], 0xee, 'a view, not a copy');
    const p = q.peek(9);
    assert.equal(p.buffer, chunk.buffer);
    assert.equal(p.byteOffset, chunk.byteOffset + 7);
  });

  test('take that spans chunks copies into a new buffer', t, () => {
    const one = bytes(4);
    const two = bytes(4, 4);
    const q = queueOf([one, two]);
    q.skip(1);
    const got = q.take(5);
    assert.deepEqual([...got], [1, 2, 3, 4, 5]);
    assert.notEqual(got.buffer, one.buffer);
    assert.notEqual(got.buffer, two.buffer);
    // The rest of the second chunk is still used in place.
    const rest = q.take(2);
    assert.equal(rest.buffer, two.buffer);
    assert.equal(rest.byteOffset, two.byteOffset + 2);
  });

  test('take and peek of more than is buffered throw RangeError and change nothing', t, () => {
    const q = queueOf([bytes(3), bytes(2, 3)]);
    q.skip(1);
    assert.throws(() => q.take(5), RangeError);
    assert.throws(() => q.peek(5), RangeError);
    assert.throws(() => new ByteQueue().take(1), RangeError);
    assert.throws(() => new ByteQueue().peek(1), RangeError);
    assert.equal(q.length, 4);
    assert.deepEqual([...q.take(4)], [1, 2, 3, 4]);
  });

  test('matches a plain array model under random pushes and operations (property)', t, () => {
    const op = fc.oneof(
      fc.record({ kind: fc.constant('push' as const), data: fc.uint8Array({ maxLength: 9 }) }),
      fc.record({ kind: fc.constantFrom('take' as const, 'peek' as const, 'skip' as const, 'takeInto' as const), n: fc.nat(12) }),
    );
    fc.assert(
      fc.property(fc.array(op, { maxLength: 40 }), (ops) => {
        const q = new ByteQueue();
        let model: number[] = [];
        for (const o of ops) {
          if (o.kind === 'push') {
            q.push(Buffer.from(o.data));
            model.push(...o.data);
          } else if (o.kind === 'skip') {
            const dropped = Math.min(o.n, model.length);
            assert.equal(q.skip(o.n), dropped);
            model = model.slice(dropped);
          } else if (o.n > model.length) {
            const run = { take: () => q.take(o.n), peek: () => q.peek(o.n), takeInto: () => q.takeInto(Buffer.alloc(o.n)) }[o.kind];
            assert.throws(run, RangeError);
          } else {
            const target = Buffer.alloc(o.n);
            const got = o.kind === 'take' ? q.take(o.n) : o.kind === 'peek' ? q.peek(o.n) : q.takeInto(target);
            assert.deepEqual([...got], model.slice(0, o.n));
            if (o.kind === 'takeInto') assert.equal(got, target);
            if (o.kind !== 'peek') model = model.slice(o.n);
          }
          assert.equal(q.length, model.length);
        }
      }),
      { numRuns: 300 },
    );
  });
  test('lent chunks: takeKept and release copy what outlives them (property)', t, () => {
    // As the socket reader does: bytes lent from one scratch buffer, which is
    // scribbled over after every release().
    const op = fc.oneof(
      fc.record({ kind: fc.constantFrom('push' as const, 'lend' as const), data: fc.uint8Array({ minLength: 1, maxLength: 9 }) }),
      fc.record({ kind: fc.constantFrom('take' as const, 'takeKept' as const, 'skip' as const), n: fc.nat(12) }),
      fc.record({ kind: fc.constant('release' as const) }),
    );
    fc.assert(
      fc.property(fc.array(op, { maxLength: 40 }), (ops) => {
        const q = new ByteQueue();
        const scratch = Buffer.alloc(64);
        let scratchUsed = 0;
        let model: number[] = [];
        const kept: { got: Buffer; want: number[] }[] = [];
        const release = () => {
          q.release();
          scratch.fill(0xee);
          scratchUsed = 0;
        };
        for (const o of ops) {
          if (o.kind === 'push') {
            q.push(Buffer.from(o.data));
            model.push(...o.data);
          } else if (o.kind === 'lend') {
            if (scratchUsed + o.data.length > scratch.length) release();
            scratch.set(o.data, scratchUsed);
            q.pushBorrowed(scratch.subarray(scratchUsed, scratchUsed + o.data.length));
            scratchUsed += o.data.length;
            model.push(...o.data);
          } else if (o.kind === 'release') {
            release();
          } else if (o.kind === 'skip') {
            model = model.slice(q.skip(o.n));
          } else if (o.kind === 'take' || o.kind === 'takeKept') {
            if (o.n > model.length) continue;
            const got = o.kind === 'take' ? q.take(o.n) : q.takeKept(o.n);
            const want = model.slice(0, o.n);
            assert.deepEqual([...got], want);
            if (o.kind === 'takeKept') kept.push({ got, want });
            model = model.slice(o.n);
          }
          assert.equal(q.length, model.length);
        }
        release();
        assert.deepEqual([...q.take(q.length)], model, 'what was left unread survived the scribbling');
        for (const k of kept) assert.deepEqual([...k.got], k.want, 'kept bytes survived the scribbling');
      }),
      { numRuns: 500 },
    );
  });

  test('contiguous() is false over a lent chunk: a kept payload must be copied', () => {
    const q = new ByteQueue();
    const lent = Buffer.from([1, 2, 3, 4]);
    q.pushBorrowed(lent);
    assert.equal(q.contiguous(2), false);
    const kept = q.takeKept(2);
    q.release();
    lent.fill(0);
    assert.deepEqual([...kept], [1, 2], 'kept bytes are a copy');
    q.push(Buffer.from([5, 6]));
    assert.equal(q.contiguous(2), true, 'released bytes are our own');
    assert.deepEqual([...q.take(4)], [3, 4, 5, 6]);
  });
});
