// A short bounded pass of the protocol fuzzer (iotests/fuzz.ts) for
// `npm test`: a fixed seed, then a random one (printed, so a failure can
// be replayed with `npm run fuzz -- --seed N --replay I`).
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import { test } from 'node:test';
import { formatResult, makeCase, observe, runFuzz } from './fuzz.ts';

test('fuzz oracle: a case replays byte for byte; a malformed reply is caught', () => {
  const a = makeCase(7, 42, 64 << 20);
  const b = makeCase(7, 42, 64 << 20);
  assert.ok(a.stream.equals(b.stream));
  assert.deepEqual(a.pieces, b.pieces);
  // Greeting, then an option reply with a wrong magic.
  const greeting = Buffer.from('4e42444d414749434948415645' + '4f5054' + '0003', 'hex');
  const bad = Buffer.concat([greeting, Buffer.alloc(20, 0x11)]);
  assert.match(observe(bad, 64 << 20, a).error ?? '', /not an option reply/);
  assert.equal(observe(greeting, 64 << 20, a).error, undefined);
});

test('protocol fuzzer: short bounded pass against bin/nbd-export', { timeout: 90_000 }, async (t) => {
  // Each pass also runs flood probes (a client that reads nothing and keeps
  // sending): three in the first pass, the other four in the second.
  // The third pass serves a raw file: reads go by sendfile and storage is
  // slow enough for replies to be pending when a client hangs up. The
  // fourth goes over TCP, where large writes are done on the event loop.
  for (const [seed, probeStart, image, transport] of [
    [1, 0, 'memory', 'unix'],
    [crypto.randomInt(2 ** 31), 3, 'memory', 'unix'],
    [crypto.randomInt(2 ** 31), 0, 'raw', 'unix'],
    [crypto.randomInt(2 ** 31), 5, 'memory', 'tcp'],
  ] as const) {
    const lines: string[] = [];
    const result = await runFuzz({ seed, cases: 300, seconds: 5, probeEvery: 4, probeStart, image, transport, log: (line) => lines.push(line) });
    for (const line of formatResult(result).split('\n')) t.diagnostic(line);
    assert.ok(result.cases > 0, 'no case ran');
    assert.deepEqual(result.failures, [], `${formatResult(result)}\n${lines.join('\n')}`);
  }
});
