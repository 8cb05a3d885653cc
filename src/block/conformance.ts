// The BlockNode contract as one test suite, run against every backend (and
// against the wrapped stacks): round trips at odd offsets, chunk and block
// borders, concurrency, flush and FUA, trim and zeroes, extents, and a
// property test against a plain Buffer model.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { describe, test } from 'node:test';
import fc from 'fast-check';
import type { BlockNode, Extent } from './types.ts';
import { BlockError } from './types.ts';

export interface ConformanceOptions {
  /** trim() deallocates and the range then reads as zeroes (default false: trim may do nothing). */
  trimZeroes?: boolean;
  /** extents() reports holes for never-written space (default false). */
  reportsHoles?: boolean;
  /** Runs of the property test (default 40). */
  propertyRuns?: number;
}

/** Opens a fresh, zero-filled node of `size` bytes; the suite closes it. */
export type MakeNode = (size: number) => Promise<BlockNode>;

/** Not a multiple of 512, and more than three 64 KiB chunks. */
export const CONFORMANCE_SIZE = 3 * 65536 + 1234;
const TIMEOUT = 60_000;

/** A buffer of `length` bytes, a pattern that depends on `seed`, with no zero bytes. */
export function pattern(length: number, seed: number): Buffer {
  const b = Buffer.allocUnsafe(length);
  let x = (seed * 2654435761 + 1) >>> 0;
  for (let i = 0; i < length; i++) {
    x = (x * 1103515245 + 12345) >>> 0;
    b[i] = ((x >>> 16) % 255) + 1;
  }
  return b;
}

/** Check the extent list contract; returns the bytes covered. */
export function checkExtents(runs: Extent[], length: number): number {
  assert.ok(runs.length >= 1, 'at least one extent');
  let sum = 0;
  for (let i = 0; i < runs.length; i++) {
    const r = runs[i]!;
    assert.ok(Number.isSafeInteger(r.length) && r.length > 0, `extent ${i} has a positive length`);
    if (r.hole) assert.ok(r.zero, 'a hole reads as zeroes');
    const prev = runs[i - 1];
    if (prev !== undefined) assert.ok(prev.hole !== r.hole || prev.zero !== r.zero, 'neighbours are merged');
    sum += r.length;
  }
  assert.ok(sum <= length, `extents cover ${sum} > ${length}`);
  return sum;
}

/** The flags of byte `at` (relative to the extents' start). */
function flagsAt(runs: Extent[], at: number): Extent | undefined {
  let pos = 0;
  for (const r of runs) {
    if (at < pos + r.length) return r;
    pos += r.length;
  }
  return undefined;
}

async function withNode(makeNode: MakeNode, size: number, fn: (node: BlockNode) => Promise<void>): Promise<void> {
  const node = await makeNode(size);
  try {
    await fn(node);
  } finally {
    await node.close();
  }
}

async function expectZeroes(node: BlockNode, offset: number, length: number): Promise<void> {
  const got = await node.read(offset, length);
  assert.ok(got.equals(Buffer.alloc(length)), `[${offset}, +${length}) reads as zeroes`);
}

export function runConformance(name: string, makeNode: MakeNode, opts: ConformanceOptions = {}): void {
  const SIZE = CONFORMANCE_SIZE;
  const t = { timeout: TIMEOUT };

  describe(`BlockNode conformance: ${name}`, () => {
    test('size is served exactly and a new node reads zeroes', t, async () => {
      await withNode(makeNode, SIZE, async (node) => {
        assert.equal(node.size, SIZE);
        await expectZeroes(node, 0, SIZE);
        await expectZeroes(node, SIZE - 1, 1);
        assert.equal((await node.read(SIZE, 0)).length, 0);
      });
    });

    test('round trips at odd offsets and lengths, across chunk and block borders', t, async () => {
      await withNode(makeNode, SIZE, async (node) => {
        const cases: [number, number][] = [
          [0, 1],
          [1, 1],
          [511, 2],
          [4095, 2],
          [4096, 4096],
          [65536 - 3, 10],
          [65536 * 2 - 4097, 8195],
          [12345, 65536 * 2 + 17],
          [SIZE - 1, 1],
          [SIZE - 1234, 1234],
          [SIZE - 5000, 5000],
        ];
        const model = Buffer.alloc(SIZE);
        for (const [i, [off, len]] of cases.entries()) {
          const data = pattern(len, i + 1);
          await node.write(off, data);
          data.copy(model, off);
          assert.ok((await node.read(off, len)).equals(data), `read back [${off}, +${len})`);
        }
        assert.ok((await node.read(0, SIZE)).equals(model), 'whole device matches');
        // Reads at other odd ranges see the same bytes.
        for (const [off, len] of [[3, 70000], [65530, 12], [SIZE - 777, 777], [100000, 1]] as const) {
          assert.ok((await node.read(off, len)).equals(model.subarray(off, off + len)), `read [${off}, +${len})`);
        }
      });
    });

    test('read into a supplied buffer', t, async () => {
      await withNode(makeNode, SIZE, async (node) => {
        const data = pattern(9000, 7);
        await node.write(60000, data);
        const big = Buffer.alloc(20000, 0xee);
        const into = big.subarray(3, 9003);
        const got = await node.read(60000, 9000, into);
        assert.equal(got.length, 9000);
        assert.ok(into.equals(data), 'the supplied buffer holds the data');
        assert.equal(big[2], 0xee);
        assert.equal(big[9003], 0xee);
      });
    });

    test('concurrent writes to different ranges all land, even within one block', t, async () => {
      await withNode(makeNode, SIZE, async (node) => {
        const model = Buffer.alloc(SIZE);
        const writes: Promise<void>[] = [];
        // Neighbouring small writes share 512- and 4096-byte blocks.
        for (let i = 0; i < 64; i++) {
          const off = 8192 + i * 37;
          const data = pattern(37, 100 + i);
          data.copy(model, off);
          writes.push(node.write(off, data));
        }
        // Larger ones spread over the device.
        for (let i = 0; i < 16; i++) {
          const off = 20000 + i * 11111;
          const data = pattern(5000, 200 + i);
          data.copy(model, off);
          writes.push(node.write(off, data));
        }
        await Promise.all(writes);
        assert.ok((await node.read(0, SIZE)).equals(model));
      });
    });

    test('a write is seen by every later read, from any caller', t, async () => {
      await withNode(makeNode, SIZE, async (node) => {
        const data = pattern(3000, 9);
        await node.write(70001, data);
        // Many callers read at once, each through its own path.
        const reads = await Promise.all([
          node.read(70001, 3000),
          node.read(70000, 3002),
          node.read(70001, 3000, Buffer.alloc(3000)),
        ]);
        assert.ok(reads[0]!.equals(data));
        assert.ok(reads[1]!.subarray(1, 3001).equals(data));
        assert.ok(reads[2]!.equals(data));
      });
    });

    test('flush and FUA writes succeed and keep the data', t, async () => {
      await withNode(makeNode, SIZE, async (node) => {
        const a = pattern(1000, 11);
        const b = pattern(777, 12);
        await node.write(100, a);
        await node.flush();
        await node.write(150000, b, { fua: true });
        assert.ok((await node.read(100, 1000)).equals(a));
        assert.ok((await node.read(150000, 777)).equals(b));
        await node.flush();
      });
    });

    test('writeZeroes reads back zeroes (with and without noHole), trim is safe', t, async () => {
      await withNode(makeNode, SIZE, async (node) => {
        const all = pattern(SIZE, 13);
        await node.write(0, all);
        await node.writeZeroes(1000, 70000);
        await expectZeroes(node, 1000, 70000);
        await node.writeZeroes(80001, 3, { noHole: true });
        await expectZeroes(node, 80001, 3);
        await node.writeZeroes(SIZE - 1000, 1000, { fua: true });
        await expectZeroes(node, SIZE - 1000, 1000);
        const got = await node.read(0, SIZE);
        assert.ok(got.subarray(0, 1000).equals(all.subarray(0, 1000)), 'bytes before stay');
        assert.ok(got.subarray(71000, 80001).equals(all.subarray(71000, 80001)), 'bytes between stay');
        assert.ok(got.subarray(80004, SIZE - 1000).equals(all.subarray(80004, SIZE - 1000)), 'bytes after stay');

        // trim: afterwards each byte reads as before or as zero.
        const before = await node.read(0, SIZE);
        await node.trim(65536, 65536 * 2);
        await node.trim(3, 5);
        const after = await node.read(0, SIZE);
        for (let i = 0; i < SIZE; i++) {
          if (after[i] !== before[i] && after[i] !== 0) assert.fail(`byte ${i} after trim is neither old nor zero`);
        }
        if (opts.trimZeroes) await expectZeroes(node, 65536, 65536 * 2);
        assert.ok(after.subarray(0, 3).equals(before.subarray(0, 3)));
      });
    });

    test('fast zero either zeroes or fails with ENOTSUP', t, async () => {
      await withNode(makeNode, SIZE, async (node) => {
        const data = pattern(10000, 14);
        await node.write(5000, data);
        try {
          await node.writeZeroes(6000, 5000, { fast: true });
          await expectZeroes(node, 6000, 5000);
        } catch (err) {
          assert.ok(err instanceof BlockError, 'a BlockError');
          assert.ok(err.code === 'ENOTSUP' || err.code === 'EOPNOTSUPP', `ENOTSUP, not ${err.code}`);
          assert.ok((await node.read(5000, 10000)).equals(data), 'a refused fast zero changes nothing');
        }
      });
    });

    test('extents: start at the offset, cover the range exactly, follow writes and zeroes', t, async () => {
      await withNode(makeNode, SIZE, async (node) => {
        for (const [off, len] of [[0, SIZE], [1, SIZE - 1], [65535, 2], [SIZE - 1, 1], [12345, 54321]] as const) {
          const runs = await node.extents(off, len);
          assert.equal(checkExtents(runs, len), len, `extents of [${off}, +${len}) cover it`);
          if (opts.reportsHoles) assert.ok(runs.every((r) => r.hole && r.zero), 'a new node is all hole');
        }
        await node.write(65536 + 100, pattern(200, 15));
        let runs = await node.extents(0, SIZE);
        checkExtents(runs, SIZE);
        for (const at of [65536 + 100, 65536 + 299]) {
          const f = flagsAt(runs, at);
          assert.ok(f !== undefined && !f.hole && !f.zero, `written byte ${at} is data`);
        }
        // A range inside the written bytes.
        runs = await node.extents(65536 + 150, 10);
        assert.deepEqual(runs, [{ length: 10, hole: false, zero: false }]);

        // Zeroes that may deallocate: whatever is reported must read as reported.
        await node.writeZeroes(65536, 65536);
        runs = await node.extents(0, SIZE);
        checkExtents(runs, SIZE);
        if (opts.reportsHoles && opts.trimZeroes) {
          const f = flagsAt(runs, 65536 + 100);
          assert.ok(f?.zero, 'zeroed range is reported zero');
        }
        // One run when capped.
        const capped = await node.extents(0, SIZE, 1);
        assert.equal(capped.length, 1);
        assert.ok(capped[0]!.length > 0 && capped[0]!.length <= SIZE);
      });
    });

    test('extents agree with the data: zero runs read as zeroes', t, async () => {
      await withNode(makeNode, SIZE, async (node) => {
        await node.write(0, pattern(5000, 16));
        await node.write(140000, pattern(30000, 17));
        await node.trim(140000, 20000);
        await node.writeZeroes(0, 4096);
        const runs = await node.extents(0, SIZE);
        checkExtents(runs, SIZE);
        const data = await node.read(0, SIZE);
        let pos = 0;
        for (const r of runs) {
          if (r.zero) assert.ok(data.subarray(pos, pos + r.length).equals(Buffer.alloc(r.length)), `zero run at ${pos} reads zeroes`);
          pos += r.length;
        }
      });
    });

    test('property: matches a Buffer model under random operations', { timeout: TIMEOUT * 3 }, async () => {
      const size = SIZE;
      const offset = fc.oneof(
        fc.integer({ min: 0, max: size - 1 }),
        fc.constantFrom(0, 511, 4095, 4096, 65535, 65536, 131071, size - 1234, size - 1),
      );
      const op = fc.record({
        kind: fc.constantFrom('write', 'write', 'write', 'zero', 'zero-nohole', 'trim', 'read', 'extents', 'flush'),
        offset,
        length: fc.oneof(fc.integer({ min: 0, max: 600 }), fc.integer({ min: 0, max: 70000 })),
        seed: fc.nat(),
        fua: fc.boolean(),
      });
      await fc.assert(
        fc.asyncProperty(fc.array(op, { minLength: 1, maxLength: 25 }), async (ops) => {
          await withNode(makeNode, size, async (node) => {
            const model = Buffer.alloc(size);
            for (const o of ops) {
              const len = Math.min(o.length, size - o.offset);
              const end = o.offset + len;
              switch (o.kind) {
                case 'write': {
                  const data = pattern(len, o.seed);
                  // Half the writes try the synchronous path first, with a buffer reused at once after it.
                  const now = o.seed % 2 === 0 && node.writeNow !== undefined ? node.writeNow(o.offset, data, { fua: o.fua }) : false;
                  if (now) data.fill(0xee);
                  else await node.write(o.offset, data, { fua: o.fua });
                  pattern(len, o.seed).copy(model, o.offset);
                  break;
                }
                case 'zero':
                case 'zero-nohole':
                  await node.writeZeroes(o.offset, len, { noHole: o.kind === 'zero-nohole', fua: o.fua });
                  model.fill(0, o.offset, end);
                  break;
                case 'trim': {
                  await node.trim(o.offset, len);
                  const got = await node.read(o.offset, len);
                  for (let i = 0; i < len; i++) {
                    const b = got[i]!;
                    if (b !== 0 && b !== model[o.offset + i]) assert.fail(`byte ${o.offset + i} after trim is neither old nor zero`);
                  }
                  if (opts.trimZeroes) assert.ok(got.equals(Buffer.alloc(len)));
                  got.copy(model, o.offset);
                  break;
                }
                case 'read': {
                  // Half the reads try the synchronous path first.
                  const now = o.seed % 2 === 0 ? (node.readNow?.(o.offset, len) ?? null) : null;
                  const got = now ?? (await node.read(o.offset, len));
                  assert.ok(got.equals(model.subarray(o.offset, end)), `read [${o.offset}, +${len})`);
                  // Where the node offers the file's own bytes instead, they are the same bytes.
                  const slice = node.fileSlice?.(o.offset, len) ?? null;
                  if (slice !== null) {
                    const bytes = Buffer.alloc(len);
                    assert.equal(fs.readSync(slice.fd, bytes, 0, len, slice.position), len);
                    slice.release();
                    assert.ok(bytes.equals(model.subarray(o.offset, end)), `file slice of [${o.offset}, +${len})`);
                  }
                  // Where the node offers views of its memory, they hold the same bytes, and holes are zeroes.
                  const views = node.readViews?.(o.offset, len) ?? null;
                  if (views !== null) {
                    const bytes = Buffer.concat(views.map((v) => (typeof v === 'number' ? Buffer.alloc(v) : v)));
                    assert.ok(bytes.equals(model.subarray(o.offset, end)), `views of [${o.offset}, +${len})`);
                  }
                  break;
                }
                case 'extents': {
                  if (len === 0) break;
                  const runs = await node.extents(o.offset, len);
                  const covered = checkExtents(runs, len);
                  assert.equal(covered, len);
                  let pos = o.offset;
                  for (const r of runs) {
                    if (r.zero) assert.ok(model.subarray(pos, pos + r.length).equals(Buffer.alloc(r.length)), 'zero run is zero in the model');
                    pos += r.length;
                  }
                  break;
                }
                case 'flush':
                  await node.flush();
                  break;
              }
            }
            assert.ok((await node.read(0, size)).equals(model), 'final contents match the model');
          });
        }),
        { numRuns: opts.propertyRuns ?? 40 },
      );
    });
  });
}
