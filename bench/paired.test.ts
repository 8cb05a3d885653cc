import assert from 'node:assert/strict';
import { test } from 'node:test';
import { median, pairedRatio } from './paired.ts';

test('median of odd and even counts', () => {
  assert.equal(median([3, 1, 2]), 2);
  assert.equal(median([4, 1, 3, 2]), 2.5);
});

test('paired ratios cancel a drift that hits both servers of a round', () => {
  // The machine halves its speed in rounds 3 and 4; a is 10 % faster throughout.
  const speed = [1, 1, 0.5, 0.5, 1];
  const a = speed.map((s, i) => ({ round: `r${i}`, value: 110 * s }));
  const b = speed.map((s, i) => ({ round: `r${i}`, value: 100 * s }));
  const p = pairedRatio(a, b)!;
  assert.ok(Math.abs(p.median - 1.1) < 1e-9);
  assert.ok(Math.abs(p.min - 1.1) < 1e-9 && Math.abs(p.max - 1.1) < 1e-9);
  assert.equal(p.atLeast, 5);
  assert.equal(p.rounds, 5);
});

test('only rounds that both servers have are paired; a zero or missing peer value is skipped', () => {
  const a = [
    { round: 'x', value: 90 },
    { round: 'y', value: 120 },
    { round: 'z', value: 50 },
  ];
  const b = [
    { round: 'x', value: 100 },
    { round: 'y', value: 100 },
    { round: 'w', value: 100 },
    { round: 'z', value: 0 },
  ];
  const p = pairedRatio(a, b)!;
  assert.equal(p.rounds, 2);
  assert.equal(p.atLeast, 1);
  assert.ok(Math.abs(p.median - 1.05) < 1e-9);
  assert.equal(p.min, 0.9);
  assert.equal(p.max, 1.2);
  assert.equal(pairedRatio(a, [{ round: 'q', value: 1 }]), null);
});
