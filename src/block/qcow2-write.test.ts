// qcow2 writing: the BlockNode conformance suite on writable qcow2 nodes
// (several cluster sizes, version 2, lazy refcounts, over a backing file),
// random operation sequences against a Buffer model, each followed by
// `qemu-img check` (no errors, no leaks) and `qemu-img compare`.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import { describe, test } from 'node:test';
import fc from 'fast-check';
import { runConformance } from './conformance.ts';
import { openBlockNode } from './open.ts';
import { Qcow2WritableNode } from './qcow2-write.ts';
import { openImage } from './qcow2-open.ts';
import { createQcow2, HAVE_QEMU, pattern, qemuCheck, qemuImg, qemuIo, qemuMap, qemuRaw, SKIP_NO_QEMU, tmp } from './qcow2-testlib.ts';
import type { BlockNode } from './types.ts';
import { BlockError } from './types.ts';

const t = { timeout: 300_000, skip: SKIP_NO_QEMU };
const K = 1024;
const M = 1024 * 1024;

/** Set the virtual size field (qemu-img rounds sizes to 512; the conformance suite wants exact ones). */
function setVirtualSize(file: string, size: number): void {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(BigInt(size));
  const fd = fs.openSync(file, 'r+');
  fs.writeSync(fd, b, 0, 8, 24);
  fs.closeSync(fd);
}

function assertClean(file: string, what: string): void {
  const r = qemuCheck(file);
  assert.ok(r.errors === 0 && r.leaks === 0 && r.corruptions === 0, `${what}: qemu-img check: ${r.raw}`);
}

interface MakerOptions {
  opts?: string[];
  /** Make a raw backing file of zeroes (so trims leave zero clusters). */
  backing?: boolean;
  discard?: 'ignore' | 'unmap';
  cache?: 'writeback' | 'none';
}

/**
 * A fresh writable qcow2 node of exactly `size` bytes, through the whole
 * stack (openBlockNode: probing, CheckedNode). On close: the contents as
 * qemu reads them equal ours, and qemu-img check finds nothing.
 */
function qcow2Maker(o: MakerOptions) {
  return async (size: number): Promise<BlockNode> => {
    const file = tmp('conf.qcow2');
    let backing: [string, string] | undefined;
    if (o.backing) {
      const b = tmp('conf-base.raw');
      fs.writeFileSync(b, Buffer.alloc(0));
      fs.truncateSync(b, Math.ceil(size / 512) * 512);
      backing = [b, 'raw'];
    }
    createQcow2(file, Math.ceil(size / 512) * 512, o.opts ?? [], backing);
    setVirtualSize(file, size);
    const node = await openBlockNode({ kind: 'file', path: file, discard: o.discard ?? 'unmap', cache: o.cache ?? 'writeback' });
    assert.ok(node.inner instanceof Qcow2WritableNode);
    const close = node.close.bind(node);
    return Object.assign(node, {
      close: async () => {
        const ours = await node.read(0, size).catch(() => null);
        await close();
        assertClean(file, 'after close');
        if (ours !== null) {
          const theirs = qemuRaw(file, 'qcow2');
          const n = Math.floor(size / 512) * 512;
          assert.ok(theirs.subarray(0, n).equals(ours.subarray(0, n)), 'qemu reads what we wrote');
        }
        fs.rmSync(file, { force: true });
        if (backing !== undefined) fs.rmSync(backing[0], { force: true });
      },
    });
  };
}

if (HAVE_QEMU) {
  runConformance('qcow2, 64 KiB clusters', qcow2Maker({}), { reportsHoles: true, propertyRuns: 25 });
  runConformance('qcow2, 512 B clusters', qcow2Maker({ opts: ['cluster_size=512'] }), { reportsHoles: true, propertyRuns: 15 });
  runConformance('qcow2, 4 KiB clusters, refcount_bits=1, lazy refcounts', qcow2Maker({ opts: ['cluster_size=4096', 'refcount_bits=1', 'lazy_refcounts=on'] }), { reportsHoles: true, propertyRuns: 15 });
  runConformance('qcow2 v2 (compat=0.10), 1 KiB clusters', qcow2Maker({ opts: ['compat=0.10', 'cluster_size=1024'] }), { reportsHoles: true, propertyRuns: 15 });
  runConformance('qcow2 over a raw backing file, 8 KiB clusters', qcow2Maker({ opts: ['cluster_size=8192'], backing: true }), { reportsHoles: true, propertyRuns: 15 });
  runConformance('qcow2, O_DIRECT, discard=ignore', qcow2Maker({ cache: 'none', discard: 'ignore' }), { reportsHoles: true, propertyRuns: 10 });
}

/** Random operations on a node and a model of what it should read. */
type Op =
  | { kind: 'write'; offset: number; length: number; seed: number; fua: boolean }
  | { kind: 'zero'; offset: number; length: number; noHole: boolean }
  | { kind: 'trim'; offset: number; length: number }
  | { kind: 'flush' };

function opArb(size: number, cs: number): fc.Arbitrary<Op> {
  const offset = fc.oneof(fc.integer({ min: 0, max: size - 1 }), fc.integer({ min: 0, max: Math.floor((size - 1) / cs) }).map((c) => c * cs));
  const length = fc.oneof(fc.integer({ min: 1, max: 3 * cs }), fc.integer({ min: 1, max: 300 * K }), fc.integer({ min: 1, max: 8 }).map((n) => n * cs));
  return fc.oneof(
    { weight: 5, arbitrary: fc.record({ kind: fc.constant('write' as const), offset, length, seed: fc.nat(), fua: fc.boolean() }) },
    { weight: 2, arbitrary: fc.record({ kind: fc.constant('zero' as const), offset, length, noHole: fc.boolean() }) },
    { weight: 2, arbitrary: fc.record({ kind: fc.constant('trim' as const), offset, length }) },
    { weight: 1, arbitrary: fc.constant({ kind: 'flush' as const }) },
  );
}

/** Apply ops, some of them concurrently (in batches), to node and model. */
async function apply(node: BlockNode, model: Buffer, ops: Op[], concurrent: boolean): Promise<void> {
  const size = model.length;
  const batch: Promise<void>[] = [];
  // Concurrent ops must not overlap (their order would be undefined); overlapping ones wait for the batch.
  let claimed: [number, number][] = [];
  const drain = async () => {
    await Promise.all(batch.splice(0));
    claimed = [];
  };
  for (const o of ops) {
    if (o.kind === 'flush') {
      await drain();
      await node.flush();
      continue;
    }
    const len = Math.min(o.length, size - o.offset);
    const range: [number, number] = [o.offset, o.offset + len];
    if (!concurrent || claimed.some(([a, b]) => a < range[1] && range[0] < b)) await drain();
    claimed.push(range);
    let p: Promise<void>;
    switch (o.kind) {
      case 'write': {
        const data = pattern(len, o.seed);
        data.copy(model, o.offset);
        p = node.write(o.offset, data, { fua: o.fua });
        break;
      }
      case 'zero':
        model.fill(0, o.offset, o.offset + len);
        p = node.writeZeroes(o.offset, len, { noHole: o.noHole });
        break;
      case 'trim':
        // Trim may zero or keep each byte: read back afterwards to learn which.
        p = node.trim(o.offset, len).then(async () => {
          const got = await node.read(o.offset, len);
          for (let i = 0; i < len; i++) {
            const b = got[i]!;
            if (b !== 0 && b !== model[o.offset + i]) assert.fail(`byte ${o.offset + i} after trim is neither old nor zero`);
          }
          got.copy(model, o.offset);
        });
        break;
    }
    batch.push(p);
  }
  await drain();
}

describe('qcow2 writes: random sequences, then qemu-img check and compare', () => {
  const cases: [string, string[], boolean, number][] = [
    ['64 KiB clusters, no backing', [], false, 64 * K],
    ['4 KiB clusters over a qcow2 backing chain', ['cluster_size=4096'], true, 4 * K],
    ['512 B clusters over a backing chain', ['cluster_size=512'], true, 512],
    ['2 MiB clusters', ['cluster_size=2M'], false, 2 * M],
  ];
  for (const [name, opts, chain, cs] of cases) {
    test(name, t, async () => {
      const size = 5 * M + 4096;
      let base: string | undefined;
      let raw: string | undefined;
      let baseBefore: Buffer | undefined;
      if (chain) {
        raw = tmp('rb.raw');
        fs.writeFileSync(raw, Buffer.alloc(0));
        fs.truncateSync(raw, 3 * M);
        qemuIo(raw, 'raw', 'write -P 0x31 0 1M', 'write -P 0x32 2M 100k');
        base = createQcow2(tmp('rb.qcow2'), 4 * M, ['cluster_size=65536'], [raw, 'raw']);
        qemuIo(base, 'qcow2', 'write -P 0x41 512k 1M', 'write -z 3M 64k', 'write -c -P 0x42 3584k 64k');
        baseBefore = Buffer.concat([fs.readFileSync(raw), fs.readFileSync(base)]);
      }
      await fc.assert(
        fc.asyncProperty(fc.array(opArb(size, cs), { minLength: 1, maxLength: 30 }), fc.boolean(), async (ops, concurrent) => {
          const file = createQcow2(tmp('rand.qcow2'), size, opts, base === undefined ? undefined : [base, 'qcow2']);
          if (!chain) qemuIo(file, 'qcow2', 'write -P 0x51 1M 200k', 'write -c -P 0x52 2M 2M');
          const model = qemuRaw(file, 'qcow2');
          const node = await openBlockNode({ kind: 'file', path: file, discard: 'unmap' });
          try {
            await apply(node, model, ops, concurrent);
            assert.ok((await node.read(0, size)).equals(model), 'contents match the model');
          } finally {
            await node.close();
          }
          assertClean(file, name);
          assert.ok(qemuRaw(file, 'qcow2').equals(model), 'qemu reads the model');
          fs.rmSync(file);
        }),
        { numRuns: cs <= 512 ? 8 : 15 },
      );
      if (baseBefore !== undefined) {
        assert.ok(Buffer.concat([fs.readFileSync(raw!), fs.readFileSync(base!)]).equals(baseBefore), 'backing files unchanged');
      }
    });
  }
});

describe('qcow2 writes: concurrent requests crowded into a few clusters', () => {
  // Many small requests at once on disjoint bytes of the same four clusters
  // (over a backing file, so every first write copies the rest up): all
  // land, each cluster gets one host cluster (no leak), qemu agrees.
  test('random batches vs a model', t, async () => {
    const cs = 4096;
    const size = 4 * cs;
    const raw = tmp('crowd.raw');
    fs.writeFileSync(raw, pattern(size, 77));
    const small = fc.oneof(
      fc.record({ kind: fc.constant('write' as const), offset: fc.integer({ min: 0, max: size - 1 }), length: fc.integer({ min: 1, max: 700 }), seed: fc.nat(), fua: fc.boolean() }),
      fc.record({ kind: fc.constant('zero' as const), offset: fc.integer({ min: 0, max: size - 1 }), length: fc.integer({ min: 1, max: 700 }), noHole: fc.boolean() }),
    );
    await fc.assert(
      fc.asyncProperty(fc.array(small, { minLength: 10, maxLength: 60 }), async (ops) => {
        const file = createQcow2(tmp('crowd.qcow2'), size, [`cluster_size=${cs}`], [raw, 'raw']);
        const model = qemuRaw(file, 'qcow2');
        const node = await openBlockNode({ kind: 'file', path: file, discard: 'unmap' });
        try {
          await apply(node, model, ops, true);
          assert.ok((await node.read(0, size)).equals(model), 'contents match the model');
        } finally {
          await node.close();
        }
        assertClean(file, 'crowded');
        assert.ok(qemuRaw(file, 'qcow2').equals(model), 'qemu reads the model');
        fs.rmSync(file);
      }),
      { numRuns: 30 },
    );
  });
});

describe('qcow2 writes: metadata', () => {
  test('the refcount table grows (512 B clusters, 12 MiB written); qemu agrees', t, async () => {
    const file = createQcow2(tmp('grow.qcow2'), 64 * M, ['cluster_size=512']);
    const node = await openImage({ path: file });
    const model = Buffer.alloc(64 * M);
    try {
      for (let i = 0; i < 24; i++) {
        const data = pattern(512 * K, i);
        const off = i * 2 * M + (i % 3) * 1000;
        await node.write(off, data);
        data.copy(model, off);
      }
      await node.flush();
    } finally {
      await node.close();
    }
    assertClean(file, 'grown');
    assert.ok(qemuRaw(file, 'qcow2').equals(model));
    const header = fs.readFileSync(file).subarray(0, 64);
    assert.ok(header.readUInt32BE(56) > 1, 'the refcount table has more than one cluster now');
  });

  test('lazy refcounts: dirty bit set while writing, cleared at close; plain images keep a clean header', t, async () => {
    for (const lazy of [true, false]) {
      const file = createQcow2(tmp('lazy.qcow2'), 4 * M, lazy ? ['lazy_refcounts=on'] : []);
      const node = await openImage({ path: file });
      try {
        await node.write(0, Buffer.alloc(4096, 1));
        const incompat = fs.readFileSync(file).readBigUInt64BE(72);
        assert.equal(incompat & 1n, lazy ? 1n : 0n, `dirty bit while open (lazy ${lazy})`);
      } finally {
        await node.close();
      }
      assert.equal(fs.readFileSync(file).readBigUInt64BE(72) & 1n, 0n, 'clean after close');
      assertClean(file, 'lazy');
    }
  });

  test('auto-clear bits (a persistent bitmap) are cleared at the first write', t, async () => {
    const file = createQcow2(tmp('bitmap.qcow2'), 4 * M);
    qemuImg('bitmap', '--add', file, 'b0');
    assert.equal(fs.readFileSync(file).readBigUInt64BE(88) & 1n, 1n);
    const node = await openImage({ path: file });
    try {
      await node.write(0, Buffer.alloc(512, 1));
    } finally {
      await node.close();
    }
    assert.equal(fs.readFileSync(file).readBigUInt64BE(88), 0n);
    // qemu now treats the bitmaps as inconsistent (as the spec says) and counts their clusters as leaks; nothing else.
    const r = qemuCheck(file);
    assert.equal(r.errors, 0, r.raw);
    assert.equal(r.corruptions, 0, r.raw);
    assert.match(r.raw, /bitmaps are now considered inconsistent/);
  });

  test('write-zeroes and trim leave zero clusters and free space as qemu-img map shows', t, async () => {
    const raw = tmp('zb.raw');
    fs.writeFileSync(raw, Buffer.alloc(M, 0x61));
    const file = createQcow2(tmp('z.qcow2'), 2 * M, [], [raw, 'raw']);
    const node = await openImage({ path: file, discard: 'unmap' });
    try {
      await node.write(0, Buffer.alloc(256 * K, 1));
      await node.writeZeroes(0, 64 * K, { noHole: true }); // keeps its host cluster
      await node.writeZeroes(64 * K, 64 * K); // freed
      await node.trim(128 * K, 64 * K); // backing would show through: zero cluster
      await node.trim(512 * K, 64 * K); // unallocated over a backing file: zero cluster
      await node.trim(300 * K, 10); // partial: nothing
      await node.writeZeroes(M + 1000, 100); // partial, past the backing file: the whole cluster becomes zero
      await assert.rejects(node.writeZeroes(192 * K + 1, 100, { fast: true }), (e: unknown) => e instanceof BlockError && e.code === 'ENOTSUP');
    } finally {
      await node.close();
    }
    assertClean(file, 'zeroes');
    const map = qemuMap(file, 'qcow2').filter((m) => m.depth === 0);
    const at = (start: number) => map.find((m) => m.start <= start && start < m.start + m.length);
    assert.equal(at(0)?.zero, true);
    assert.notEqual(at(0)?.offset, undefined, 'noHole keeps the preallocated cluster');
    assert.equal(at(64 * K)?.zero, true);
    assert.equal(at(64 * K)?.offset, undefined);
    assert.equal(at(128 * K)?.zero, true);
    assert.equal(at(512 * K)?.zero, true);
    assert.equal(at(192 * K)?.data, true);
    assert.equal(at(M)?.zero, true);
    const expected = Buffer.alloc(2 * M);
    expected.fill(0x61, 0, M);
    expected.fill(0, 0, 192 * K);
    expected.fill(1, 192 * K, 256 * K);
    expected.fill(0, 512 * K, 576 * K);
    assert.ok(qemuRaw(file, 'qcow2').equals(expected));
  });

  test('many concurrent writes to one cluster and one L2 table all land', t, async () => {
    const file = createQcow2(tmp('conc.qcow2'), 8 * M, ['cluster_size=4096']);
    const node = await openImage({ path: file });
    const model = Buffer.alloc(8 * M);
    try {
      const ops: Promise<void>[] = [];
      for (let i = 0; i < 300; i++) {
        const off = i < 150 ? 100 + i * 27 : (i * 7919 * 13) % (8 * M - 5000);
        const data = pattern(i < 150 ? 27 : 5000, i);
        data.copy(model, off);
        ops.push(node.write(off, data, { fua: i % 50 === 0 }));
        if (i % 40 === 0) ops.push(node.flush());
      }
      await Promise.all(ops);
      assert.ok((await node.read(0, 8 * M)).equals(model));
    } finally {
      await node.close();
    }
    assertClean(file, 'concurrent');
    assert.ok(qemuRaw(file, 'qcow2').equals(model));
  });

  test('metadata found wrong while writing: EIO, no more writes, the corrupt bit set, metadata untouched', t, async () => {
    const cases: [string, (img: Buffer, l1: number, l2: number) => void, RegExp][] = [
      // The first L2 entry (COPIED, standard) pointed at the L1 table: writing there would destroy it.
      ['a data cluster inside the L1 table', (img, l1, l2) => img.writeBigUInt64BE((1n << 63n) | BigInt(l1), l2), /data cluster at \d+ overlaps the image's metadata \(corrupt image\)/],
      ['a data cluster at a misaligned offset', (img, _l1, l2) => img.writeBigUInt64BE((1n << 63n) | BigInt(5 * 65536 + 512), l2), /cluster offset \d+ is not aligned \(corrupt image\)/],
      // The first L1 entry (COPIED) pointed at the refcount table: the next sync would write an L2 table over it.
      ['an L2 table on the refcount table', (img, l1) => img.writeBigUInt64BE((1n << 63n) | img.readBigUInt64BE(48), l1), /L2 table at \d+ overlaps the image's metadata \(corrupt image\)/],
    ];
    for (const [what, damage, message] of cases) {
      const file = createQcow2(tmp('corrupt.qcow2'), 4 * M);
      qemuIo(file, 'qcow2', 'write -P 1 0 64k');
      const img = fs.readFileSync(file);
      const l1 = Number(img.readBigUInt64BE(40));
      const l2 = Number(img.readBigUInt64BE(l1) & 0x00fffffffffffe00n);
      damage(img, l1, l2);
      fs.writeFileSync(file, img);
      const node = await openImage({ path: file });
      try {
        await assert.rejects(node.write(100, Buffer.alloc(10, 2)), (e: unknown) => e instanceof BlockError && e.code === 'EIO' && message.test(e.message), what);
        // Elsewhere too: the node writes nothing more.
        await assert.rejects(node.write(3 * M, Buffer.alloc(10, 2)), (e: unknown) => e instanceof BlockError && e.code === 'EIO' && /read-only now/.test(e.message), `${what}: later writes`);
      } finally {
        await node.close();
      }
      const after = fs.readFileSync(file);
      assert.equal(after.readBigUInt64BE(72) & 2n, 2n, `${what}: the corrupt bit is set`);
      assert.ok(after.subarray(512).equals(img.subarray(512)), `${what}: nothing but the header changed`);
      await assert.rejects(openImage({ path: file }), /marked corrupt/);
    }
  });

  test('a dirty image (lazy refcounts, qemu-io killed) is repaired at a writable open, as qemu does', t, async () => {
    for (const [opts, cmds] of [
      [['cluster_size=4096'], ['write -c -P 3 5M 64k', 'write -P 1 0 1M', 'write -P 2 3M 100k', 'discard 256k 128k']],
      [['cluster_size=512'], ['write -z 1M 512k', 'write -P 4 0 3M', 'discard 2M 256k']],
      [['cluster_size=65536', 'refcount_bits=1'], ['write -P 6 0 2M', 'discard 0 1M', 'write -P 7 512k 64k']],
    ] as const) {
      const file = createQcow2(tmp('dirty.qcow2'), 8 * M, ['lazy_refcounts=on', ...opts]);
      spawnSync('qemu-io', ['-f', 'qcow2', ...cmds.flatMap((c) => ['-c', c]), '-c', 'abort', file], { stdio: 'ignore' });
      assert.equal(fs.readFileSync(file).readBigUInt64BE(72) & 1n, 1n, `${opts}: qemu-io left the image dirty`);
      const before = qemuCheck(file);
      assert.ok(before.errors + before.leaks + before.corruptions > 0, `${opts}: the dirty image has refcount errors: ${before.raw}`);
      const model = qemuRaw(file, 'qcow2');
      const node = await openImage({ path: file });
      try {
        assert.equal(fs.readFileSync(file).readBigUInt64BE(72) & 1n, 0n, `${opts}: clean after the repair`);
        assertClean(file, `${opts}: repaired`);
        const d = pattern(70000, 9);
        await node.write(7 * M + 5, d);
        d.copy(model, 7 * M + 5);
      } finally {
        await node.close();
      }
      assertClean(file, `${opts}: repaired, written, closed`);
      assert.ok(qemuRaw(file, 'qcow2').equals(model), `${opts}: contents kept`);
    }
  });

  test('a dirty image with persistent bitmaps is refused for writing (qemu-img check -r all repairs it)', t, async () => {
    const file = createQcow2(tmp('dirty-bitmap.qcow2'), M);
    qemuImg('bitmap', '--add', file, 'b0');
    const fd = fs.openSync(file, 'r+');
    fs.writeSync(fd, Buffer.from([0, 0, 0, 0, 0, 0, 0, 1]), 0, 8, 72);
    fs.closeSync(fd);
    await assert.rejects(openImage({ path: file }), (e: unknown) => e instanceof BlockError && /not closed cleanly \(dirty\) and has persistent bitmaps/.test(e.message) && !e.message.includes('\n'));
    await openImage({ path: file, readOnly: true }).then((n) => n.close());
  });

  test('writable open refuses corrupt and snapshotted images with one line', t, async () => {
    const snap = createQcow2(tmp('snap.qcow2'), M);
    qemuImg('snapshot', '-c', 's1', snap);
    await assert.rejects(openImage({ path: snap }), /internal snapshots/);
    (await openImage({ path: snap, readOnly: true }).then((n) => n.close()));
    for (const [bit, message] of [[2, /marked corrupt/]] as const) {
      const f = createQcow2(tmp('bits.qcow2'), M);
      const fd = fs.openSync(f, 'r+');
      fs.writeSync(fd, Buffer.from([0, 0, 0, 0, 0, 0, 0, bit]), 0, 8, 72);
      fs.closeSync(fd);
      await assert.rejects(openImage({ path: f }), (e: unknown) => e instanceof BlockError && message.test(e.message) && !e.message.includes('\n'));
      await openImage({ path: f, readOnly: true }).then((n) => n.close());
    }
  });
});
