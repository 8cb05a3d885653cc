import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import { test } from 'node:test';
import { RunDelayClock } from './run-delay.ts';

const t = { timeout: 5_000 };
const available = fs.existsSync('/proc/thread-self/schedstat');

test('RunDelayClock reads this thread\'s run delay, and what it waited since a mark', { ...t, skip: !available && 'no /proc/thread-self/schedstat' }, () => {
  const clock = new RunDelayClock();
  const first = clock.read();
  assert.ok(first !== null && first >= 0);
  assert.equal(clock.waitedSinceMark(0), 0, 'no mark yet');
  clock.mark(performance.now());
  // Busy for 30 ms: the thread runs (or waits for a CPU), it never sleeps.
  const until = performance.now() + 30;
  while (performance.now() < until);
  const waited = clock.waitedSinceMark(performance.now());
  assert.ok(waited >= 0 && waited <= 30 + 5, `waited ${waited} ms`);
  assert.ok(clock.read()! >= first!, 'the run delay only grows');
});

test('RunDelayClock sees the wait for a CPU when every core is busy', { ...t, skip: !available && 'no /proc/thread-self/schedstat' }, async () => {
  // One more busy process than there are cores: this thread now shares a core.
  const hogs = Array.from({ length: os.availableParallelism() + 1 }, () => spawn('timeout', ['5', 'sh', '-c', 'while :; do :; done'], { stdio: 'ignore', detached: true }));
  try {
    await new Promise((r) => setTimeout(r, 50));
    const clock = new RunDelayClock();
    clock.mark(performance.now());
    const until = performance.now() + 300;
    while (performance.now() < until);
    const waited = clock.waitedSinceMark(performance.now());
    assert.ok(waited > 10, `waited only ${waited} ms of 300 for a CPU beside ${hogs.length} busy processes`);
  } finally {
    // Each in its own process group: timeout and its shell go together.
    for (const h of hogs) process.kill(-h.pid!, 'SIGKILL');
  }
});

test('RunDelayClock.mark reads at most every few ms', t, () => {
  const clock = new RunDelayClock();
  let reads = 0;
  const read = clock.read.bind(clock);
  clock.read = () => {
    reads++;
    return read();
  };
  clock.mark(1_000);
  clock.mark(1_001);
  clock.mark(1_004);
  assert.equal(reads, available ? 1 : 3, 'a fresh baseline is kept');
  clock.mark(1_006);
  assert.equal(reads, available ? 2 : 4);
});
