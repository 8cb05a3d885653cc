import assert from 'node:assert/strict';
import { test } from 'node:test';
import { BufferPool } from './buffer-pool.ts';
import { sendfileAvailable } from './sendfile.ts';
import { waitFor } from './test-helpers.ts';

const K64 = 64 * 1024;

/** Take n buffers of `length` from the pool, then give them all back. */
function cycle(pool: BufferPool, n: number, length = K64): Buffer[] {
  const bufs = Array.from({ length: n }, () => pool.get(length)!);
  for (const b of bufs) pool.release(b);
  return bufs;
}

test('BufferPool reuses released buffers and pools nothing below 64 KiB', () => {
  const pool = new BufferPool(1 << 30, 0);
  assert.equal(pool.get(K64 - 1), undefined);
  const a = pool.get(100_000)!;
  assert.equal(a.length, 100_000);
  assert.equal(a.buffer.byteLength, 128 * 1024, 'size classes are powers of two');
  pool.release(a);
  assert.equal(pool.retained, 128 * 1024);
  const b = pool.get(128 * 1024)!;
  assert.equal(b.buffer, a.buffer, 'the released buffer comes back');
  assert.equal(pool.retained, 0);
});

test('BufferPool keeps no more than its limit', () => {
  const pool = new BufferPool(2 * K64, 0);
  cycle(pool, 3);
  assert.equal(pool.retained, 2 * K64);
});

test('a sweep gives back the memory of each buffer it lets go, and only those', () => {
  const discarded: ArrayBufferLike[] = [];
  const pool = new BufferPool(1 << 30, 0, (buf) => {
    assert.equal(buf.length, buf.buffer.byteLength, 'the whole buffer, not the view a get() returned');
    discarded.push(buf.buffer);
  });
  const bufs = cycle(pool, 3);
  pool.sweep();
  assert.deepEqual(discarded, []);
  pool.get(K64);
  pool.sweep();
  assert.equal(discarded.length, 2);
  for (const b of discarded) assert.ok(bufs.some((x) => x.buffer === b));
});

test('the pages of a buffer the pool lets go are given back: they read as zeroes', { skip: !sendfileAvailable() && 'koffi cannot load here' }, () => {
  const pool = new BufferPool(1 << 30, 0);
  const buf = pool.get(1024 * 1024)!.fill(0xaa);
  pool.release(buf);
  pool.sweep();
  assert.equal(pool.sweep(), 1024 * 1024);
  // madvise(MADV_DONTNEED) takes whole pages: all but the partial ones at either end.
  assert.ok(buf.subarray(8192, buf.length - 8192).every((b) => b === 0), 'the interior pages were given back');
});

test('a sweep lets go of what no get() took since the previous sweep, and only that', () => {
  const pool = new BufferPool(1 << 30, 0);
  cycle(pool, 4);
  assert.equal(pool.sweep(), 0, 'buffers released since the last sweep have not sat unused a whole interval');
  assert.equal(pool.retained, 4 * K64);

  // Steady traffic that needs two buffers at a time: the other two are surplus.
  cycle(pool, 2);
  cycle(pool, 1);
  assert.equal(pool.sweep(), 2 * K64);
  assert.equal(pool.retained, 2 * K64);

  cycle(pool, 2);
  assert.equal(pool.sweep(), 0, 'every buffer left was in use during the interval');
  assert.equal(pool.sweep(), 2 * K64, 'an interval with no traffic lets go of the rest');
  assert.equal(pool.retained, 0);
  const fresh = pool.get(K64)!;
  assert.equal(fresh.length, K64, 'an emptied pool still hands out buffers');
});

test('a sweep counts each size class on its own', () => {
  const pool = new BufferPool(1 << 30, 0);
  cycle(pool, 2, K64);
  cycle(pool, 2, 1024 * 1024);
  pool.sweep();
  cycle(pool, 2, 1024 * 1024);
  assert.equal(pool.sweep(), 2 * K64, 'the unused 64 KiB buffers go, the used 1 MiB ones stay');
  assert.equal(pool.retained, 2 * 1024 * 1024);
});

test('the pool sweeps by itself once it holds buffers', async () => {
  const pool = new BufferPool(1 << 30, 10);
  cycle(pool, 3);
  assert.equal(pool.retained, 3 * K64);
  await waitFor(() => pool.retained === 0, 2000, 'the idle buffers to be let go');
  // A new burst arms the timer again.
  cycle(pool, 1);
  await waitFor(() => pool.retained === 0, 2000, 'the second burst to be let go');
});
