import assert from 'node:assert/strict';
import { test } from 'node:test';
import fc from 'fast-check';
import { DataMap } from './data-map.ts';

const K = 1024;

test('marks whole chunks only, the short last chunk included', () => {
  const m = new DataMap(1000 * K); // 64 KiB chunks; the last one is 40 KiB
  assert.equal(m.chunk, 64 * K);
  m.mark(10 * K, 200 * K, m.generation); // chunk 0 and 3 are partial
  assert.equal(m.covers(64 * K, 192 * K), true);
  assert.equal(m.covers(60 * K, 70 * K), false);
  assert.equal(m.covers(192 * K, 193 * K), false);
  m.mark(960 * K, 1000 * K, m.generation);
  assert.equal(m.covers(990 * K, 1000 * K), true);
  assert.equal(m.covers(990 * K, 1001 * K), false, 'past the end is never covered');
});

test('forget clears every chunk it touches, and voids scans that began before it', () => {
  const m = new DataMap(1024 * K);
  m.mark(0, 1024 * K, m.generation);
  const scan = m.generation;
  m.forget(100 * K, 101 * K);
  assert.equal(m.covers(64 * K, 128 * K), false);
  assert.equal(m.covers(0, 64 * K), true);
  assert.equal(m.covers(128 * K, 1024 * K), true);
  m.mark(64 * K, 128 * K, scan);
  assert.equal(m.covers(64 * K, 128 * K), false, 'a stale scan marks nothing');
  m.mark(64 * K, 128 * K, m.generation);
  assert.equal(m.covers(64 * K, 128 * K), true);
});

test('huge files get larger chunks, so the map stays at most 2 MiB', () => {
  const m = new DataMap(2 ** 50);
  assert.ok(m.chunk >= 2 ** 50 / 2 ** 24);
  m.mark(0, m.chunk * 3, m.generation);
  assert.equal(m.covers(0, m.chunk * 3), true);
  assert.equal(m.covers(0, m.chunk * 3 + 1), false);
});

test('covers() is true exactly when every byte asked was inside a marked, unforgotten range', () => {
  const size = 1024 * K;
  const range = fc.tuple(fc.nat(size), fc.nat(size)).map(([a, b]) => [Math.min(a, b), Math.max(a, b)] as const);
  fc.assert(
    fc.property(fc.array(fc.tuple(fc.boolean(), range), { maxLength: 20 }), range, (ops, [s, e]) => {
      const m = new DataMap(size);
      const known = new Uint8Array(size / m.chunk); // the model: per chunk
      for (const [isMark, [a, b]] of ops) {
        if (isMark) {
          m.mark(a, b, m.generation);
          for (let i = 0; i < known.length; i++) if (i * m.chunk >= a && (i + 1) * m.chunk <= b) known[i] = 1;
        } else {
          m.forget(a, b);
          for (let i = 0; i < known.length; i++) if (i * m.chunk < b && (i + 1) * m.chunk > a) known[i] = 0;
        }
      }
      if (e === s) return;
      let expect = true;
      for (let i = Math.floor(s / m.chunk); i * m.chunk < e; i++) if (known[i] !== 1) expect = false;
      assert.equal(m.covers(s, e), expect);
    }),
  );
});
