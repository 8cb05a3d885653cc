import assert from 'node:assert/strict';
import { test } from 'node:test';
import { LoopWriteGuard } from './loop-write-guard.ts';

const t = { timeout: 5_000 };

test('LoopWriteGuard: quick writes keep the event loop; a slow one sends writes to the pool for a spell that doubles, and is forgiven after a quiet minute', t, () => {
  const g = new LoopWriteGuard();
  assert.equal(g.allows(0), true);
  g.took(0, 0.05, 128 * 1024);
  g.took(1, 2.1, 128 * 1024); // 2 ms + 0.13 ms for the bytes: not slow yet
  g.took(5, 5, 4 * 1024 * 1024); // 4 MiB in 5 ms: within 2 + 4.2 ms
  assert.equal(g.slowWrites, 0);
  assert.equal(g.allows(10), true);

  g.took(100, 50, 128 * 1024); // throttled: ends at 150
  assert.equal(g.slowWrites, 1);
  assert.equal(g.allows(1_149), false, 'in the pool for 1 s after the slow write ended');
  assert.equal(g.allows(1_150), true);

  g.took(1_200, 10, 128 * 1024); // slow again soon: 2 s
  assert.equal(g.allows(3_209), false);
  assert.equal(g.allows(3_210), true);
  let at = 3_300;
  for (let i = 0; i < 10; i++) {
    g.took(at, 10, 4096);
    at += 70_000 - 61_000; // each within a minute of the last
  }
  assert.equal(g.allows(at - 9_000 + 10 + 63_999), false, 'the spell stops doubling at 64 s');
  assert.equal(g.allows(at - 9_000 + 10 + 64_000), true);

  const quietEnd = at + 200_000;
  g.took(quietEnd, 10, 4096);
  assert.equal(g.allows(quietEnd + 10 + 999), false);
  assert.equal(g.allows(quietEnd + 10 + 1_000), true, 'after a quiet minute the spell is 1 s again');
});
