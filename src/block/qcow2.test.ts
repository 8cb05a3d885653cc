// qcow2 reading, checked against qemu: images made with qemu-img and
// filled with qemu-io, read through our node and compared with
// `qemu-img convert -O raw`; extents compared with `qemu-img map`.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { describe, test } from 'node:test';
import fc from 'fast-check';
import { openBlockNode } from './open.ts';
import { FileNode } from './file.ts';
import { Qcow2Node } from './qcow2.ts';
import { decodeL2, encodeStandard, getRefcount, setRefcount, parseHeader } from './qcow2-format.ts';
import { openImage, ProbedRawNode } from './qcow2-open.ts';
import {
  createQcow2,
  mapAsExtents,
  qemuImg,
  qemuIo,
  qemuMap,
  qemuRaw,
  SKIP_NO_QEMU,
  tmp,
} from './qcow2-testlib.ts';
import type { BlockNode } from './types.ts';
import { BlockError } from './types.ts';

const t = { timeout: 120_000, skip: SKIP_NO_QEMU };
const K = 1024;
const M = 1024 * 1024;

/** Read the whole node in pieces of odd sizes and compare with `expected`. */
async function assertReadsLike(node: BlockNode, expected: Buffer, what: string): Promise<void> {
  assert.equal(node.size, expected.length, `${what}: size`);
  const whole = await node.read(0, node.size);
  assert.ok(whole.equals(expected), `${what}: whole read`);
  // Odd pieces that cross cluster and table borders.
  const step = 7 * K + 333;
  for (let off = 0; off < node.size; off += step) {
    const len = Math.min(step + 1000, node.size - off);
    const got = await node.read(off, len);
    if (!got.equals(expected.subarray(off, off + len))) assert.fail(`${what}: read [${off}, +${len})`);
  }
}

async function assertExtentsLikeQemu(node: BlockNode, file: string, format: string): Promise<void> {
  const ours = await node.extents(0, node.size);
  assert.deepEqual(ours, mapAsExtents(qemuMap(file, format)), `extents of ${path.basename(file)}`);
}

describe('qcow2 format helpers', () => {
  test('standard entries round trip, compressed entries decode', () => {
    const table = Buffer.alloc(64);
    encodeStandard(table, 1, 0x123450000, true);
    assert.deepEqual(decodeL2(table, 1, 16), { kind: 'normal', host: 0x123450000, compressedLength: 0, copied: true });
    encodeStandard(table, 2, 0, false, true);
    assert.equal(decodeL2(table, 2, 16).kind, 'zero');
    assert.equal(decodeL2(table, 3, 16).kind, 'unallocated');
    // Compressed, cluster_bits 16: x = 54 bits of offset, then 8 bits of extra sectors.
    const v = (1n << 62n) | (3n << 54n) | 0x10203n;
    table.writeBigUInt64BE(v, 32);
    const e = decodeL2(table, 4, 16);
    assert.equal(e.kind, 'compressed');
    assert.equal(e.host, 0x10203);
    assert.equal(e.compressedLength, 4 * 512 - (0x10203 % 512));
  });

  test('refcounts of every width', () => {
    for (let order = 0; order <= 6; order++) {
      const block = Buffer.alloc(512);
      const max = order >= 6 ? 2 ** 40 : 2 ** (1 << order) - 1;
      setRefcount(block, 5, order, max);
      setRefcount(block, 6, order, 1);
      assert.equal(getRefcount(block, 5, order), max, `order ${order}`);
      assert.equal(getRefcount(block, 6, order), 1);
      assert.equal(getRefcount(block, 4, order), 0);
      assert.equal(getRefcount(block, 7, order), 0);
    }
    // Sub-byte widths: bit 0 is the least significant bit.
    const b = Buffer.alloc(1);
    setRefcount(b, 0, 0, 1);
    assert.equal(b[0], 1);
  });

  test('a header that is not qcow2 is refused', () => {
    assert.throws(() => parseHeader(Buffer.alloc(512)), /no qcow2 magic/);
  });
});

describe('qcow2 read, against qemu-img convert', () => {
  const layouts: [string, string[], number][] = [
    ['v3, 64 KiB clusters', [], 64 * K],
    ['v3, 512 B clusters', ['cluster_size=512'], 512],
    ['v3, 4 KiB clusters', ['cluster_size=4096'], 4 * K],
    ['v3, 2 MiB clusters', ['cluster_size=2M'], 2 * M],
    ['v2 (compat=0.10), 64 KiB clusters', ['compat=0.10'], 64 * K],
    ['v2 (compat=0.10), 1 KiB clusters', ['compat=0.10', 'cluster_size=1024'], K],
    ['v3, refcount_bits=1', ['refcount_bits=1'], 64 * K],
  ];
  for (const [name, opts, cs] of layouts) {
    test(name, t, async () => {
      // Several L2 tables for small clusters; the size is not a multiple of the cluster size.
      const size = Math.max(4 * cs, 6 * M) + 1536;
      const file = createQcow2(tmp('img.qcow2'), size, opts);
      const v2 = opts.includes('compat=0.10');
      qemuIo(
        file,
        'qcow2',
        'write -P 0x11 0 3k',
        `write -P 0x22 ${cs - 100} 300`,
        `write -P 0x33 ${3 * M - 5000} 70000`,
        `write -P 0x44 ${size - 1536} 1536`,
        ...(v2 ? [] : [`write -z ${4 * M} 256k`, `write -P 0x55 ${5 * M} 64k`, `write -z ${5 * M + 4096} 8k`]),
        `write -c -P 0x66 ${Math.floor((size - 1536) / cs) * cs - cs} ${cs}`,
        `discard ${3 * M} 64k`,
      );
      const node = await openImage({ path: file, readOnly: true });
      try {
        assert.ok(node instanceof Qcow2Node);
        await assertReadsLike(node, qemuRaw(file, 'qcow2'), name);
        await assertExtentsLikeQemu(node, file, 'qcow2');
      } finally {
        await node.close();
      }
    });
  }

  test('compressed image from qemu-img convert -c; random reads', t, async () => {
    const raw = tmp('src.raw');
    const data = Buffer.alloc(3 * M + 4096);
    for (let i = 0; i < 40; i++) {
      const off = (i * 77777) % (data.length - 20000);
      // Compressible stretches and random ones.
      if (i % 2 === 0) data.fill(i + 1, off, off + 20000);
      else for (let j = 0; j < 20000; j++) data[off + j] = (j * 31 + i * 7) & 0xff;
    }
    fs.writeFileSync(raw, data);
    for (const cs of ['4096', '65536', '2M']) {
      const file = tmp(`c-${cs}.qcow2`);
      qemuImg('convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', `cluster_size=${cs}`, raw, file);
      const node = await openImage({ path: file, readOnly: true });
      try {
        await assertReadsLike(node, data, `convert -c cluster_size=${cs}`);
        await fc.assert(
          fc.asyncProperty(fc.integer({ min: 0, max: data.length - 1 }), fc.integer({ min: 1, max: 300000 }), async (off, len) => {
            const n = Math.min(len, data.length - off);
            assert.ok((await node.read(off, n)).equals(data.subarray(off, off + n)));
          }),
          { numRuns: 50 },
        );
        await assertExtentsLikeQemu(node, file, 'qcow2');
      } finally {
        await node.close();
      }
    }
  });

  test('virtual size independent of the file size; a huge sparse image', t, async () => {
    const file = createQcow2(tmp('huge.qcow2'), '4T');
    qemuIo(file, 'qcow2', 'write -P 0x77 3T 4k');
    assert.ok(fs.statSync(file).size < 4 * M);
    const node = await openImage({ path: file, readOnly: true });
    try {
      assert.equal(node.size, 4 * 2 ** 40);
      assert.ok((await node.read(3 * 2 ** 40 - 10, 20)).equals(Buffer.concat([Buffer.alloc(10), Buffer.alloc(10, 0x77)])));
      const ext = await node.extents(0, node.size);
      assert.deepEqual(ext, [
        { length: 3 * 2 ** 40, hole: true, zero: true },
        { length: 65536, hole: false, zero: false },
        { length: 2 ** 40 - 65536, hole: true, zero: true },
      ]);
      await assertExtentsLikeQemu(node, file, 'qcow2');
    } finally {
      await node.close();
    }
  });

  test('preallocation=metadata: data clusters over file holes read as zeroes, as qemu-img map says', t, async () => {
    const file = createQcow2(tmp('prealloc.qcow2'), 4 * M, ['preallocation=metadata']);
    qemuIo(file, 'qcow2', 'write -P 5 0 4k', 'write -P 6 1M 100k');
    const node = await openImage({ path: file, readOnly: true });
    try {
      const ext = await node.extents(0, node.size);
      assert.equal(ext[0]!.length, 4096);
      assert.deepEqual(ext[1], { length: M - 4096, hole: false, zero: true });
      await assertExtentsLikeQemu(node, file, 'qcow2');
      await assertReadsLike(node, qemuRaw(file, 'qcow2'), 'preallocated');
    } finally {
      await node.close();
    }
  });

  test('the L2 cache is shared: many concurrent readers, a small cache', t, async () => {
    const file = createQcow2(tmp('cache.qcow2'), 64 * M, ['cluster_size=4096']);
    const cmds: string[] = [];
    for (let i = 0; i < 32; i++) cmds.push(`write -P 0x${(i + 1).toString(16)} ${i * 2 * M + 4096 * i} 8k`);
    qemuIo(file, 'qcow2', ...cmds);
    const expected = qemuRaw(file, 'qcow2');
    const fnode = await FileNode.open({ path: file, readOnly: true });
    const { readQcow2Header } = await import('./qcow2-open.ts');
    const header = await readQcow2Header(fnode);
    const l1 = await fnode.read(header.l1TableOffset, header.l1Size * 8);
    const node = new Qcow2Node({ file: fnode, header, l1, backing: null, writable: false, discard: 'ignore', path: file, l2CacheBytes: 4 * 4096 });
    try {
      const reads: Promise<void>[] = [];
      for (let k = 0; k < 200; k++) {
        const off = ((k * 1234567) % (64 * M - 20000)) & ~7;
        reads.push(node.read(off, 20000).then((got) => assert.ok(got.equals(expected.subarray(off, off + 20000)), `read at ${off}`)));
      }
      await Promise.all(reads);
    } finally {
      await node.close();
    }
  });
});

describe('qcow2 backing chains', () => {
  test('three layers over a raw base, relative names, reads and extents like qemu, depths like qemu-nbd', t, async () => {
    const d = path.dirname(tmp('x'));
    const sub = fs.mkdtempSync(path.join(d, 'chain-'));
    fs.mkdirSync(path.join(sub, 'base'));
    const base = path.join(sub, 'base', 'base.raw');
    fs.writeFileSync(base, Buffer.alloc(0));
    fs.truncateSync(base, 1 * M);
    qemuIo(base, 'raw', 'write -P 1 0 64k', 'write -P 9 900k 4k');
    const mid = createQcow2(path.join(sub, 'mid.qcow2'), 2 * M, [], ['base/base.raw', 'raw']);
    qemuIo(mid, 'qcow2', 'write -P 2 64k 64k', 'write -z 256k 64k', 'write -P 4 1000k 100k');
    // top names mid relative to its own folder.
    const top = createQcow2(path.join(sub, 'top.qcow2'), 3 * M, [], ['mid.qcow2', 'qcow2']);
    qemuIo(top, 'qcow2', 'write -P 3 128k 64k', 'write -P 5 2047k 2k');
    const cwd = process.cwd();
    process.chdir('/'); // names resolve against the image's folder, not the working directory
    try {
      const node = await openBlockNode({ kind: 'file', path: top, readOnly: true });
      try {
        await assertReadsLike(node, qemuRaw(top, 'qcow2'), 'top of the chain');
        await assertExtentsLikeQemu(node, top, 'qcow2');
        const depths = await node.allocationDepth(0, node.size);
        // qemu-nbd -A's answer for the same chain (a shorter layer "allocates" past its end).
        assert.deepEqual(depths, [
          { length: 64 * K, depth: 3 }, // raw data
          { length: 64 * K, depth: 2 }, // mid data
          { length: 64 * K, depth: 1 }, // top data
          { length: 64 * K, depth: 3 }, // raw hole: a raw file allocates everything
          { length: 64 * K, depth: 2 }, // mid zero cluster
          { length: 640 * K, depth: 3 },
          { length: 192 * K, depth: 2 }, // mid's three clusters at 960k
          { length: 832 * K, depth: 3 }, // past the raw file's end: it "allocates" the zeroes
          { length: 128 * K, depth: 1 }, // top's two clusters at 1984k
          { length: 3 * M - 2112 * K, depth: 2 }, // past mid's end
        ]);
        // Depth 1 exactly where top allocates.
        const topMap = qemuMap(top, 'qcow2');
        let pos = 0;
        for (const r of depths) {
          for (const m of topMap) {
            const a = Math.max(pos, m.start);
            const b = Math.min(pos + r.length, m.start + m.length);
            if (a < b && m.depth === 0 && m.present) assert.equal(r.depth, 1, `top allocates [${a}, ${b})`);
          }
          pos += r.length;
        }
        assert.equal(pos, node.size);
      } finally {
        await node.close();
      }
    } finally {
      process.chdir(cwd);
    }
  });

  test('qcow2 base without a backing file: unallocated is depth 0; a shorter base allocates past its end', t, async () => {
    const base = createQcow2(tmp('b.qcow2'), 1 * M);
    qemuIo(base, 'qcow2', 'write -P 1 0 64k');
    const top = createQcow2(tmp('t.qcow2'), 2 * M, [], [base, 'qcow2']);
    qemuIo(top, 'qcow2', 'write -P 2 128k 64k');
    const node = await openBlockNode({ kind: 'file', path: top, readOnly: true });
    try {
      assert.deepEqual(await node.allocationDepth(0, node.size), [
        { length: 64 * K, depth: 2 },
        { length: 64 * K, depth: 0 },
        { length: 64 * K, depth: 1 },
        { length: M - 192 * K, depth: 0 },
        { length: M, depth: 2 },
      ]);
      assert.deepEqual(await node.allocationDepth(100 * K, 100, 1), [{ length: 100, depth: 0 }]);
      await assertReadsLike(node, qemuRaw(top, 'qcow2'), 'short base');
      await assertExtentsLikeQemu(node, top, 'qcow2');
    } finally {
      await node.close();
    }
  });

  test('a backing file without a format is probed; a missing one is named in the error', t, async () => {
    const base = createQcow2(tmp('p.qcow2'), M);
    qemuIo(base, 'qcow2', 'write -P 7 0 4k');
    const top = tmp('np.qcow2');
    // qemu-img 7.2 requires -F: make the image, then turn the format extension into an unknown one.
    createQcow2(top, M, [], [base, 'qcow2']);
    const head = fs.readFileSync(top).subarray(0, 65536);
    const at = head.indexOf(Buffer.from([0xe2, 0x79, 0x2a, 0xca]));
    assert.ok(at > 0);
    const fd = fs.openSync(top, 'r+');
    fs.writeSync(fd, Buffer.from([0x12, 0x34, 0x56, 0x78]), 0, 4, at);
    fs.closeSync(fd);
    const node = await openImage({ path: top, readOnly: true });
    try {
      assert.ok((await node.read(0, 4096)).equals(Buffer.alloc(4096, 7)));
    } finally {
      await node.close();
    }
    const orphan = createQcow2(tmp('orphan.qcow2'), M, [], [base, 'qcow2']);
    fs.rmSync(base);
    await assert.rejects(openImage({ path: orphan, readOnly: true }), (e: unknown) => e instanceof BlockError && e.code === 'ENOENT' && /backing file '.*p\.qcow2'/.test(e.message));
  });

  test('a backing loop is refused', t, async () => {
    const a = createQcow2(tmp('loop-a.qcow2'), M);
    const b = createQcow2(tmp('loop-b.qcow2'), M, [], [a, 'qcow2']);
    qemuImg('rebase', '-u', '-f', 'qcow2', '-b', b, '-F', 'qcow2', a);
    await assert.rejects(openImage({ path: a, readOnly: true }), /loops back/);
  });
});

describe('qcow2 refusals: one clear line', () => {
  const cases: [string, () => string, RegExp][] = [
    ['zstd compression', () => createQcow2(tmp('z.qcow2'), M, ['compression_type=zstd']), /compression zstd is not supported/],
    ['extended L2 entries', () => createQcow2(tmp('e.qcow2'), M, ['extended_l2=on']), /extended L2 entries/],
    ['an external data file', () => createQcow2(tmp('d.qcow2'), M, [`data_file=${tmp('d.data')}`]), /external data file/],
    [
      'encryption',
      () => {
        const f = createQcow2(tmp('enc.qcow2'), M);
        const fd = fs.openSync(f, 'r+');
        fs.writeSync(fd, Buffer.from([0, 0, 0, 2]), 0, 4, 32);
        fs.closeSync(fd);
        return f;
      },
      /encrypted qcow2 images are not supported/,
    ],
    [
      'an unknown incompatible feature',
      () => {
        const f = createQcow2(tmp('unk.qcow2'), M);
        const fd = fs.openSync(f, 'r+');
        fs.writeSync(fd, Buffer.from([0, 0, 0, 0, 0, 0, 0, 0x20]), 0, 8, 72);
        fs.closeSync(fd);
        return f;
      },
      /unsupported qcow2 feature\(s\): bit 5/,
    ],
    [
      'version 4',
      () => {
        const f = createQcow2(tmp('v4.qcow2'), M);
        const fd = fs.openSync(f, 'r+');
        fs.writeSync(fd, Buffer.from([0, 0, 0, 4]), 0, 4, 4);
        fs.closeSync(fd);
        return f;
      },
      /qcow2 version 4 is not supported/,
    ],
  ];
  for (const [name, make, message] of cases) {
    test(name, t, async () => {
      const f = make();
      await assert.rejects(openImage({ path: f, readOnly: true }), (e: unknown) => e instanceof BlockError && message.test(e.message) && !e.message.includes('\n'));
    });
  }

  test('-f qcow2 on a raw file is refused; -f raw serves a qcow2 file as bytes', t, async () => {
    const raw = tmp('plain.raw');
    fs.writeFileSync(raw, Buffer.alloc(4096, 1));
    await assert.rejects(openImage({ path: raw, format: 'qcow2', readOnly: true }), /not a qcow2 image/);
    const q = createQcow2(tmp('q.qcow2'), M);
    const node = await openImage({ path: q, format: 'raw', readOnly: true });
    try {
      assert.equal(node.size, fs.statSync(q).size);
      assert.equal((await node.read(0, 4)).toString('latin1'), 'QFI\xfb');
    } finally {
      await node.close();
    }
  });
});

describe('probing', () => {
  test('raw without -f: served as raw; a write that would make it look like qcow2 is refused', t, async () => {
    const raw = tmp('probe.raw');
    fs.writeFileSync(raw, Buffer.alloc(8192));
    const node = await openImage({ path: raw });
    try {
      assert.ok(node instanceof ProbedRawNode);
      await assert.rejects(node.write(0, Buffer.from('QFI\xfb....', 'latin1')), (e: unknown) => e instanceof BlockError && e.code === 'EPERM');
      await assert.rejects(node.write(2, Buffer.from('\x49\xfb', 'latin1')).then(() => node.write(0, Buffer.from('QF', 'latin1'))), (e: unknown) => e instanceof BlockError && e.code === 'EPERM');
      await node.write(0, Buffer.from('hello'));
      assert.equal((await node.read(0, 5)).toString(), 'hello');
    } finally {
      await node.close();
    }
    // Named raw: any bytes may be written.
    const named = await openImage({ path: raw, format: 'raw' });
    try {
      await named.write(0, Buffer.from('QFI\xfb', 'latin1'));
    } finally {
      await named.close();
    }
  });

  test('qcow2 without -f: probed', t, async () => {
    const q = createQcow2(tmp('probe.qcow2'), M);
    const node = await openImage({ path: q, readOnly: true });
    try {
      assert.ok(node instanceof Qcow2Node);
      assert.equal(node.size, M);
    } finally {
      await node.close();
    }
  });
});

describe('-s: a temporary overlay', () => {
  test('over raw and qcow2: writes are seen, the image stays byte-identical, depths shift by one', t, async () => {
    const raw = tmp('s.raw');
    fs.writeFileSync(raw, Buffer.alloc(0));
    fs.truncateSync(raw, 2 * M);
    qemuIo(raw, 'raw', 'write -P 1 0 128k');
    const q = createQcow2(tmp('s.qcow2'), 2 * M, [], [raw, 'raw']);
    qemuIo(q, 'qcow2', 'write -P 2 1M 64k');
    for (const [file, format] of [[raw, 'raw'], [q, 'qcow2']] as const) {
      const before = fs.readFileSync(file);
      const model = qemuRaw(file, format);
      const node = await openBlockNode({ kind: 'file', path: file, snapshot: true, discard: 'unmap' });
      try {
        assert.equal(node.capabilities.writable, true);
        const d = Buffer.alloc(5000, 0xab);
        await node.write(60000, d);
        d.copy(model, 60000);
        await node.writeZeroes(192 * K, 128 * K);
        model.fill(0, 192 * K, 320 * K);
        await node.trim(M, 64 * K);
        model.fill(0, M, M + 64 * K);
        await node.flush();
        assert.ok((await node.read(0, node.size)).equals(model), `${format}: contents through the overlay`);
        assert.deepEqual(await node.allocationDepth(128 * K, 64 * K), [{ length: 64 * K, depth: format === 'raw' ? 2 : 3 }]);
        const depths = await node.allocationDepth(0, node.size);
        assert.deepEqual(depths[0], { length: 64 * K, depth: 1 });
        assert.deepEqual(depths[2], { length: 128 * K, depth: 1 }, 'zeroed chunks belong to the overlay');
      } finally {
        await node.close();
      }
      assert.ok(fs.readFileSync(file).equals(before), `${format}: the image is byte-identical`);
    }
  });

  test('concurrent partial writes to one cluster of the overlay all land', t, async () => {
    const raw = tmp('c.raw');
    fs.writeFileSync(raw, Buffer.alloc(256 * K, 3));
    const node = await openImage({ path: raw, format: 'raw', snapshot: true });
    try {
      const model = Buffer.alloc(256 * K, 3);
      const writes: Promise<void>[] = [];
      for (let i = 0; i < 100; i++) {
        const off = 1000 + i * 61;
        const data = Buffer.alloc(61, i + 10);
        data.copy(model, off);
        writes.push(node.write(off, data));
        if (i % 10 === 0) writes.push(node.writeZeroes(20000 + i * 100, 100));
        if (i % 10 === 0) model.fill(0, 20000 + i * 100, 20100 + i * 100);
      }
      await Promise.all(writes);
      assert.ok((await node.read(0, node.size)).equals(model));
    } finally {
      await node.close();
    }
  });
});
