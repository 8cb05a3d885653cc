import assert from 'node:assert/strict';
import { test } from 'node:test';
import { LoopWriteGuard } from './loop-write-guard.ts';

const t = { timeout: 5_000 };
const K128 = 128 * 1024;

test('LoopWriteGuard: quick writes and a lone slow one keep the event loop', t, () => {
  const g = new LoopWriteGuard();
  assert.equal(g.allows(0), true);
  g.took(0, 0.05, K128);
  g.took(1, 2.1, K128); // 2 ms + 0.13 ms for the bytes: not slow
  g.took(5, 6, 4 * 1024 * 1024); // 4 MiB in 6 ms: within 2 + 4.2 ms
  assert.equal(g.slowWrites, 0);
  g.took(100, 5, K128); // descheduled once
  assert.equal(g.slowWrites, 1);
  assert.equal(g.allows(106), true, 'a lone slow write is not throttling');
  g.took(1_200, 5, K128); // another, but more than a second later
  assert.equal(g.allows(1_206), true);
});

test('LoopWriteGuard: two slow writes within a second, or one very slow, send writes to the pool for a spell that doubles up to 64 s and is forgiven after a quiet minute', t, () => {
  const g = new LoopWriteGuard();
  g.took(100, 5, K128);
  g.took(300, 10, K128); // the second within a second: ends at 310
  assert.equal(g.allows(1_309), false, 'in the pool for 1 s after the slow write ended');
  assert.equal(g.allows(1_310), true);

  g.took(1_400, 30, K128); // very slow on its own: 2 s this time
  assert.equal(g.allows(3_429), false);
  assert.equal(g.allows(3_430), true);
  let at = 3_500;
  for (let i = 0; i < 10; i++) {
    g.took(at, 30, 4096);
    at += 9_000; // each within a minute of the last
  }
  const lastEnd = at - 9_000 + 30;
  assert.equal(g.allows(lastEnd + 63_999), false, 'the spell stops doubling at 64 s');
  assert.equal(g.allows(lastEnd + 64_000), true);

  const later = lastEnd + 200_000;
  g.took(later, 30, 4096);
  assert.equal(g.allows(later + 30 + 999), false);
  assert.equal(g.allows(later + 30 + 1_000), true, 'after a quiet minute the spell is 1 s again');
  assert.equal(g.slowWrites, 14);
});

test('LoopWriteGuard: each spell in the pool is told, with its length and the write that started it', t, () => {
  const told: [number, number][] = [];
  const g = new LoopWriteGuard((spellMs, blockedMs) => told.push([spellMs, blockedMs]));
  g.took(100, 5, K128); // lone: no spell
  assert.deepEqual(told, []);
  g.took(300, 10, K128);
  g.took(1_400, 30, K128);
  assert.deepEqual(told, [
    [1_000, 10],
    [2_000, 30],
  ]);
  assert.equal(g.spells, 2);
  assert.equal(g.slowWrites, 3);
});

test('LoopWriteGuard: time spent waiting for a CPU is not the kernel blocking the write', t, () => {
  const told: [number, number][] = [];
  const g = new LoopWriteGuard((spellMs, blockedMs) => told.push([spellMs, blockedMs]));
  let asked = 0;
  const waited = (ms: number) => () => {
    asked++;
    return ms;
  };
  g.took(0, 0.05, 4096, waited(0));
  assert.equal(asked, 0, 'a quick write does not read the run delay');
  // Descheduled for 4 ms of a 4.1 ms write, twice within a second, then once for 30 ms.
  g.took(100, 4.1, 4096, waited(4));
  g.took(300, 4.1, 4096, waited(3.5));
  g.took(500, 31, 4096, waited(30));
  assert.equal(asked, 3);
  assert.equal(g.slowWrites, 0);
  assert.equal(g.allows(600), true);
  // Blocked in the kernel beyond what it waited for a CPU: slow, and a pair sends writes to the pool.
  g.took(1_000, 9, 4096, waited(3));
  g.took(1_200, 9, 4096, waited(3));
  assert.equal(g.slowWrites, 2);
  assert.equal(g.allows(1_209), false);
  assert.deepEqual(told, [[1_000, 6]]);
});
