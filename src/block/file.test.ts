import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, describe, test } from 'node:test';
import { pattern, runConformance } from './conformance.ts';
import { DIRECT_ALIGN, FileNode } from './file.ts';
import { bufferAddress, cachedFully, fallocate, filesystemType, preadNowait, seek, SEEK_DATA, setFfiEnabled, TMPFS_MAGIC } from './ffi.ts';
import { openBlockNode } from './open.ts';
import { stallNextWrite } from './write-stall-testlib.ts';
import { BlockError } from './types.ts';

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbd-export-block-'));
after(() => fs.rmSync(dir, { recursive: true, force: true }));

let counter = 0;
/** A new sparse file of `size` bytes (after `head` bytes of header). */
function tempFile(size: number, head?: Buffer): string {
  const p = path.join(dir, `img-${counter++}`);
  fs.writeFileSync(p, head ?? Buffer.alloc(0));
  fs.truncateSync(p, (head?.length ?? 0) + size);
  return p;
}

/** Opens a node over a fresh temp file and removes the file when the node closes. */
function fileMaker(opts: { direct?: boolean; discard?: 'ignore' | 'unmap'; offset?: number }) {
  return async (size: number) => {
    const head = opts.offset === undefined ? undefined : Buffer.alloc(opts.offset, 0xaa);
    const p = tempFile(size, head);
    const node = await FileNode.open({ path: p, ...opts });
    const close = node.close.bind(node);
    return Object.assign(node, {
      close: async () => {
        await close();
        if (head !== undefined) assert.ok(fs.readFileSync(p).subarray(0, head.length).equals(head), 'the skipped header is untouched');
        fs.rmSync(p, { force: true });
      },
    });
  };
}

runConformance('FileNode, discard=unmap', fileMaker({ discard: 'unmap' }), { trimZeroes: true, reportsHoles: true });
runConformance('FileNode, discard=ignore', fileMaker({}), { reportsHoles: true, propertyRuns: 20 });
runConformance('FileNode, O_DIRECT', fileMaker({ direct: true, discard: 'unmap' }), { trimZeroes: true, reportsHoles: true, propertyRuns: 20 });
runConformance('FileNode, -o 1000', fileMaker({ offset: 1000, discard: 'unmap' }), { trimZeroes: true, propertyRuns: 20 });
runConformance('FileNode, O_DIRECT, -o 4097', fileMaker({ direct: true, offset: 4097 }), { propertyRuns: 15 });
runConformance('file stack (openBlockNode, cache=directsync, detect-zeroes=on)', async (size) => {
  const p = tempFile(size);
  const node = await openBlockNode({ kind: 'file', path: p, cache: 'directsync', detectZeroes: 'on', discard: 'unmap' });
  const close = node.close.bind(node);
  return Object.assign(node, { close: async () => { await close(); fs.rmSync(p, { force: true }); } });
}, { trimZeroes: true, propertyRuns: 10 });

// tmpfs lacks FALLOC_FL_ZERO_RANGE: zeroing with noHole falls back to writing zeroes.
const shmDir = fs.existsSync('/dev/shm') ? fs.mkdtempSync('/dev/shm/nbd-export-block-') : undefined;
after(() => {
  if (shmDir !== undefined) fs.rmSync(shmDir, { recursive: true, force: true });
});
if (shmDir !== undefined) {
  runConformance('FileNode on tmpfs, discard=unmap', async (size) => {
    const p = path.join(shmDir, `img-${counter++}`);
    fs.writeFileSync(p, Buffer.alloc(0));
    fs.truncateSync(p, size);
    const node = await FileNode.open({ path: p, discard: 'unmap' });
    const close = node.close.bind(node);
    return Object.assign(node, { close: async () => { await close(); fs.rmSync(p, { force: true }); } });
  }, { trimZeroes: true, reportsHoles: true, propertyRuns: 15 });
}

const t = { timeout: 20_000 };

/** lseek, with ENXIO (nothing more of that kind) as the end of the file. */
function seekOrEnd(fd: number, at: number, whence: typeof SEEK_DATA): number {
  try {
    return seek(fd, at, whence);
  } catch {
    return fs.fstatSync(fd).size;
  }
}

async function withFile<T>(node: Promise<FileNode>, fn: (n: FileNode) => Promise<T>): Promise<T> {
  const n = await node;
  try {
    return await fn(n);
  } finally {
    await n.close();
  }
}

describe('FileNode', () => {
  test('extents follow SEEK_DATA/SEEK_HOLE', t, async () => {
    const p = tempFile(1024 * 1024);
    await withFile(FileNode.open({ path: p }), async (node) => {
      assert.deepEqual(await node.extents(0, node.size), [{ length: 1024 * 1024, hole: true, zero: true }]);
      await node.write(256 * 1024, Buffer.alloc(4096, 1));
      assert.deepEqual(await node.extents(0, node.size), [
        { length: 256 * 1024, hole: true, zero: true },
        { length: 4096, hole: false, zero: false },
        { length: 1024 * 1024 - 256 * 1024 - 4096, hole: true, zero: true },
      ]);
      assert.deepEqual(await node.extents(256 * 1024 + 10, 100), [{ length: 100, hole: false, zero: false }]);
      assert.deepEqual(await node.extents(256 * 1024 - 10, 20), [
        { length: 10, hole: true, zero: true },
        { length: 10, hole: false, zero: false },
      ]);
      assert.equal((await node.extents(0, node.size, 2)).length, 2);
    });
  });

  test('reads leave holes and unwritten extents unread, so they stay holes', t, async (ctx) => {
    // Reading an unwritten extent would fill the page cache, after which
    // ext4 reports it as data; qemu-nbd fills such ranges with zeroes instead.
    const p = tempFile(1024 * 1024);
    const fd = fs.openSync(p, 'r+');
    let unwrittenIsHole: boolean;
    try {
      await fallocate(fd, 0, 0, 512 * 1024); // unwritten extents
      unwrittenIsHole = seekOrEnd(fd, 0, SEEK_DATA) > 0;
    } catch {
      ctx.skip('no fallocate here');
      return;
    } finally {
      fs.closeSync(fd);
    }
    if (!unwrittenIsHole) {
      ctx.skip('this filesystem reports unwritten extents as data');
      return;
    }
    await withFile(FileNode.open({ path: p }), async (node) => {
      await node.write(700 * 1024, Buffer.alloc(4096, 7));
      const layout = [
        { length: 700 * 1024, hole: true, zero: true },
        { length: 4096, hole: false, zero: false },
        { length: 1024 * 1024 - 704 * 1024, hole: true, zero: true },
      ];
      assert.deepEqual(await node.extents(0, node.size), layout, 'opening the file read nothing');
      // Small reads (the page-cache fast path), one large read, and reads across the written block.
      for (let at = 0; at < node.size; at += 64 * 1024) await node.read(at, 64 * 1024);
      assert.ok((await node.read(0, node.size)).subarray(0, 700 * 1024).equals(Buffer.alloc(700 * 1024)));
      const around = await node.read(700 * 1024 - 8192, 16384);
      assert.ok(around.subarray(8192, 12288).equals(Buffer.alloc(4096, 7)));
      assert.deepEqual(await node.extents(0, node.size), layout);
      // Known data is read without asking again; zeroing makes it unknown again.
      await node.write(0, Buffer.alloc(128 * 1024, 1));
      assert.deepEqual((await node.extents(0, node.size))[0], { length: 128 * 1024, hole: false, zero: false });
      await node.read(0, 4096);
      await node.flush(); // ext4 zeroes delayed-allocation blocks by writing them
      await node.writeZeroes(64 * 1024, 64 * 1024);
      const zeroed = await node.extents(64 * 1024, 64 * 1024);
      assert.deepEqual(zeroed, [{ length: 64 * 1024, hole: true, zero: true }]);
      await node.read(64 * 1024, 64 * 1024);
      await node.read(96 * 1024, 4096);
      assert.deepEqual(await node.extents(64 * 1024, 64 * 1024), zeroed, 'zeroed range not read');
    });
  });

  test('extents of a fragmented file: many runs, capped on request', t, async () => {
    const p = tempFile(600 * 8192);
    await withFile(FileNode.open({ path: p }), async (node) => {
      for (let i = 0; i < 600; i++) await node.write(i * 8192, Buffer.from([1]));
      const runs = await node.extents(0, node.size);
      assert.equal(runs.length, 1200);
      assert.ok(runs.every((r, i) => r.length === 4096 && r.hole === (i % 2 === 1)));
      const capped = await node.extents(100, node.size - 100, 1000);
      assert.equal(capped.length, 1000);
      assert.equal(capped[0]!.length, 3996);
    });
  });

  test('trim punches a hole with discard=unmap, does nothing with discard=ignore', t, async () => {
    const p = tempFile(512 * 1024);
    await withFile(FileNode.open({ path: p, discard: 'unmap' }), async (node) => {
      await node.write(0, pattern(512 * 1024, 1));
      const blocks = fs.statSync(p).blocks;
      await node.trim(64 * 1024, 128 * 1024);
      assert.ok(fs.statSync(p).blocks < blocks, 'blocks were freed');
      assert.ok((await node.read(64 * 1024, 128 * 1024)).equals(Buffer.alloc(128 * 1024)));
      assert.deepEqual(await node.extents(0, node.size), [
        { length: 64 * 1024, hole: false, zero: false },
        { length: 128 * 1024, hole: true, zero: true },
        { length: 320 * 1024, hole: false, zero: false },
      ]);
      // Zeroes without noHole punch too; with noHole they stay allocated
      // (ext4 may still report ZERO_RANGE's unwritten extents as a hole).
      await node.writeZeroes(256 * 1024, 64 * 1024);
      assert.deepEqual(await node.extents(256 * 1024, 64 * 1024), [{ length: 64 * 1024, hole: true, zero: true }]);
      const kept = fs.statSync(p).blocks;
      await node.writeZeroes(384 * 1024, 64 * 1024, { noHole: true });
      assert.equal(fs.statSync(p).blocks, kept, 'noHole frees nothing');
      assert.ok((await node.read(384 * 1024, 64 * 1024)).equals(Buffer.alloc(64 * 1024)));
    });
    await withFile(FileNode.open({ path: p, discard: 'ignore' }), async (node) => {
      const before = await node.read(0, node.size);
      await node.trim(0, node.size);
      assert.ok((await node.read(0, node.size)).equals(before), 'trim ignored');
      const kept = fs.statSync(p).blocks;
      await node.writeZeroes(0, 64 * 1024);
      assert.equal(fs.statSync(p).blocks, kept, 'zeroing frees nothing with discard=ignore');
      assert.ok((await node.read(0, 64 * 1024)).equals(Buffer.alloc(64 * 1024)));
      await node.writeZeroes(0, 64 * 1024, { fast: true });
    });
  });

  test('-o skips a header: size, reads, writes and extents are shifted', t, async () => {
    const head = Buffer.alloc(1000, 0x55);
    const p = tempFile(64 * 1024, head);
    await withFile(FileNode.open({ path: p, offset: 1000, discard: 'unmap' }), async (node) => {
      assert.equal(node.size, 64 * 1024);
      await node.write(0, Buffer.from('abc'));
      const raw = fs.readFileSync(p);
      assert.equal(raw.subarray(1000, 1003).toString(), 'abc');
      assert.ok(raw.subarray(0, 1000).equals(head));
      const runs = await node.extents(0, node.size);
      assert.ok(!runs[0]!.hole, 'the first block (holding the header) is data');
      assert.equal(runs.reduce((s, r) => s + r.length, 0), node.size);
      await node.writeZeroes(0, node.size);
      assert.ok(fs.readFileSync(p).subarray(0, 1000).equals(head), 'zeroing spares the header');
    });
    await assert.rejects(FileNode.open({ path: p, offset: 64 * 1024 + 1001 }), (e: BlockError) => e.code === 'EINVAL');
    await withFile(FileNode.open({ path: p, offset: 64 * 1024 + 1000 }), async (node) => assert.equal(node.size, 0));
  });

  for (const direct of [false, true]) {
    test(`a 1000-byte file is served exactly${direct ? ' (O_DIRECT)' : ''}`, t, async () => {
      const p = tempFile(0);
      fs.writeFileSync(p, pattern(1000, 3));
      await withFile(FileNode.open({ path: p, direct, discard: 'unmap' }), async (node) => {
        assert.equal(node.size, 1000);
        assert.ok((await node.read(0, 1000)).equals(pattern(1000, 3)));
        await node.write(999, Buffer.from([0]));
        await node.write(0, Buffer.from([7]), { fua: true });
        const runs = await node.extents(0, 1000);
        assert.equal(runs.reduce((s, r) => s + r.length, 0), 1000);
        await node.writeZeroes(500, 500);
        const got = await node.read(0, 1000);
        assert.equal(got[0], 7);
        assert.ok(got.subarray(1, 500).equals(pattern(1000, 3).subarray(1, 500)));
        assert.ok(got.subarray(500).equals(Buffer.alloc(500)));
      });
      assert.equal(fs.statSync(p).size, 1000, 'the file never grows');
    });
  }

  test('O_DIRECT: concurrent unaligned writes into one block lose nothing', t, async () => {
    const size = 3 * DIRECT_ALIGN + 100;
    const p = tempFile(size);
    await withFile(FileNode.open({ path: p, direct: true }), async (node) => {
      assert.equal(node.direct, true);
      const model = Buffer.alloc(size);
      const writes: Promise<void>[] = [];
      for (let i = 0; i < 200; i++) {
        const off = (i * 61) % (size - 3);
        const data = Buffer.from([i + 1, i + 2, i + 3].map((x) => x & 0xff || 1));
        // Overlapping writes land in an unspecified order: keep them disjoint.
        if (model.subarray(off, off + 3).some((b) => b !== 0)) continue;
        data.copy(model, off);
        writes.push(node.write(off, data));
      }
      writes.push(node.writeZeroes(DIRECT_ALIGN - 1, 2));
      model.fill(0, DIRECT_ALIGN - 1, DIRECT_ALIGN + 1);
      await Promise.all(writes);
      assert.ok((await node.read(0, size)).equals(model));
      assert.ok(fs.readFileSync(p).equals(model));
    });
    assert.equal(fs.statSync(p).size, size);
  });

  test('open errors are BlockErrors named by errno', t, async () => {
    await assert.rejects(FileNode.open({ path: path.join(dir, 'missing') }), (e: BlockError) => e instanceof BlockError && e.code === 'ENOENT' && /No such file/.test(e.message));
    await assert.rejects(FileNode.open({ path: dir }), (e: BlockError) => e.code === 'EISDIR');
    await assert.rejects(FileNode.open({ path: dir, readOnly: true }), (e: BlockError) => e.code === 'EISDIR');
    await assert.rejects(FileNode.open({ path: '/dev/null' }), (e: BlockError) => e.code === 'EINVAL');
    if (process.getuid?.() !== 0) {
      const p = tempFile(4096);
      fs.chmodSync(p, 0o444);
      await assert.rejects(FileNode.open({ path: p }), (e: BlockError) => e.code === 'EACCES');
      await withFile(FileNode.open({ path: p, readOnly: true }), async (node) => assert.equal(node.capabilities.writable, false));
    }
  });

  test('O_DIRECT on a filesystem without it fails with EINVAL and says so', t, async (ctx) => {
    const shm = '/dev/shm';
    if (!fs.existsSync(shm)) return ctx.skip('no /dev/shm');
    const p = path.join(fs.mkdtempSync(path.join(shm, 'nbd-export-block-')), 'img');
    try {
      fs.writeFileSync(p, Buffer.alloc(4096));
      try {
        const node = await FileNode.open({ path: p, direct: true });
        await node.close();
        ctx.skip('this tmpfs supports O_DIRECT');
      } catch (e) {
        assert.ok(e instanceof BlockError && e.code === 'EINVAL' && /O_DIRECT not supported/.test(e.message), String(e));
      }
    } finally {
      fs.rmSync(path.dirname(p), { recursive: true, force: true });
    }
  });

  test('read-only open: writes fail, reads and extents work', t, async () => {
    const p = tempFile(8192);
    await withFile(FileNode.open({ path: p, readOnly: true }), async (node) => {
      assert.equal(node.capabilities.writable, false);
      await assert.rejects(node.write(0, Buffer.from([1])), (e: BlockError) => e.code === 'EBADF');
      assert.ok((await node.read(0, 8192)).equals(Buffer.alloc(8192)));
      assert.equal((await node.extents(0, 8192)).length, 1);
    });
  });

  test('without the FFI: extents are all data, zeroes are written, fast zero is refused', t, async () => {
    setFfiEnabled(false);
    try {
      const p = tempFile(100000);
      await withFile(FileNode.open({ path: p, discard: 'unmap', direct: true }), async (node) => {
        assert.equal(node.direct, false, 'O_DIRECT needs aligned buffers, hence the FFI');
        assert.equal(node.capabilities.canExtents, false);
        assert.equal(node.capabilities.canFastZero, false);
        assert.deepEqual(await node.extents(0, node.size), [{ length: 100000, hole: false, zero: false }]);
        await node.write(0, pattern(100000, 5));
        await node.writeZeroes(10, 99990);
        assert.ok((await node.read(10, 99990)).equals(Buffer.alloc(99990)));
        await assert.rejects(node.writeZeroes(0, 10, { fast: true }), (e: BlockError) => e.code === 'ENOTSUP');
        await node.trim(0, 10); // a no-op
        assert.ok((await node.read(0, 10)).equals(pattern(100000, 5).subarray(0, 10)));
      });
    } finally {
      setFfiEnabled(true);
    }
  });

  test('close is idempotent and later calls fail', t, async () => {
    const node = await FileNode.open({ path: tempFile(4096) });
    await node.close();
    await node.close();
    await assert.rejects(node.read(0, 1), (e: BlockError) => e.code === 'EBADF');
  });

  test('openBlockNode: cache=none opens O_DIRECT, writethrough does not', t, async () => {
    const p = tempFile(8192);
    const a = await openBlockNode({ kind: 'file', path: p, format: 'raw', cache: 'none' });
    assert.equal((a.inner as FileNode).direct, true);
    await a.close();
    const b = await openBlockNode({ kind: 'file', path: p, cache: 'writethrough', readOnly: true });
    assert.equal((b.inner as FileNode).direct, false);
    assert.equal(b.capabilities.writable, false);
    await assert.rejects(b.write(0, Buffer.from([1])), (e: BlockError) => e.code === 'EPERM');
    await b.close();
    await assert.rejects(openBlockNode({ kind: 'file', path: path.join(dir, 'nope') }), (e: BlockError) => e.code === 'ENOENT');
  });
});

describe('FileNode.fileSlice', () => {
  const KiB = 1024;
  /** Skips unless this kernel has cachestat (fileSlice is then always null). */
  function needCachestat(ctx: { skip(reason: string): void }, p: string): boolean {
    const fd = fs.openSync(p, 'r');
    try {
      if (cachedFully(fd, 0, 1) !== null) return true;
    } finally {
      fs.closeSync(fd);
    }
    ctx.skip('no cachestat(2) on this kernel');
    return false;
  }
  function bytesOf(slice: { fd: number; position: number; length: number }): Buffer {
    const out = Buffer.alloc(slice.length);
    assert.equal(fs.readSync(slice.fd, out, 0, slice.length, slice.position), slice.length);
    return out;
  }

  test('on a disk filesystem: only where a scan saw data, never over a hole or a trimmed range', t, async (ctx) => {
    const p = tempFile(1024 * KiB, Buffer.alloc(1000, 0xaa));
    if (!needCachestat(ctx, p)) return;
    await withFile(FileNode.open({ path: p, offset: 1000, discard: 'unmap' }), async (node) => {
      const fd = fs.openSync(p, 'r');
      const tmpfs = filesystemType(fd) === TMPFS_MAGIC;
      fs.closeSync(fd);
      if (tmpfs) return ctx.skip('the temporary directory is on tmpfs');
      // Written past both ends of the slice below, so that the 64 KiB chunks it touches are all data.
      const written = pattern(384 * KiB, 7);
      await node.write(0, written);
      const data = written.subarray(64 * KiB, 320 * KiB);
      assert.equal(node.fileSlice(64 * KiB, 256 * KiB), null, 'no scan has seen the range as data yet');
      assert.ok((await node.read(64 * KiB, 256 * KiB)).equals(data)); // the read scans, and marks what it saw
      const slice = node.fileSlice(64 * KiB, 256 * KiB);
      assert.ok(slice !== null);
      assert.equal(slice.position, 1000 + 64 * KiB, 'file coordinates: -o is added');
      assert.ok(bytesOf(slice).equals(data));
      slice.release();
      await node.read(512 * KiB, 64 * KiB);
      assert.equal(node.fileSlice(512 * KiB, 64 * KiB), null, 'a hole is never a slice (it is sent as a hole)');
      await node.trim(128 * KiB, 64 * KiB);
      assert.equal(node.fileSlice(64 * KiB, 256 * KiB), null, 'trim forgets the range');
    });
  });

  test('on tmpfs: the page cache is the file, so a range with a hole is not a slice', t, async (ctx) => {
    if (shmDir === undefined) return ctx.skip('no /dev/shm');
    const p = path.join(shmDir, `img-${counter++}`);
    fs.writeFileSync(p, Buffer.alloc(0));
    fs.truncateSync(p, 1024 * KiB);
    if (!needCachestat(ctx, p)) return;
    await withFile(FileNode.open({ path: p }), async (node) => {
      assert.equal(node.fileSlice(0, 64 * KiB), null);
      const data = pattern(128 * KiB, 3);
      await node.write(0, data);
      const slice = node.fileSlice(0, 128 * KiB);
      assert.ok(slice !== null, 'written data on tmpfs needs no scan');
      assert.ok(bytesOf(slice).equals(data));
      slice.release();
      assert.equal(node.fileSlice(0, 192 * KiB), null, 'the last 64 KiB is a hole');
    });
    fs.rmSync(p);
  });

  test('close waits until every slice is released; O_DIRECT and closed nodes give none', t, async (ctx) => {
    const p = tempFile(256 * KiB);
    if (!needCachestat(ctx, p)) return;
    const node = await FileNode.open({ path: p });
    await node.write(0, pattern(256 * KiB, 1));
    await node.read(0, 256 * KiB);
    const slice = node.fileSlice(0, 128 * KiB);
    assert.ok(slice !== null);
    let closed = false;
    const closing = node.close().then(() => (closed = true));
    await new Promise((resolve) => setTimeout(resolve, 50));
    assert.equal(closed, false, 'the fd must outlive the slice');
    assert.ok(bytesOf(slice).equals(pattern(128 * KiB, 1)), 'and still reads the file');
    assert.equal(node.fileSlice(0, 64 * KiB), null, 'a closing node hands out no more');
    slice.release();
    slice.release(); // twice is harmless
    await closing;
    await withFile(FileNode.open({ path: p, direct: true }), async (direct) => {
      await direct.read(0, 256 * KiB);
      assert.equal(direct.fileSlice(0, 128 * KiB), null, 'O_DIRECT reads bypass the page cache');
    });
  });
});

describe('writeNow (small writes on the caller\'s thread)', () => {
  test('FileNode: on tmpfs and in a disk file\'s page cache, without FUA; the buffer may be reused at once', t, async (ctx) => {
    if (shmDir === undefined) return ctx.skip('no /dev/shm');
    const p = path.join(shmDir, `img-${counter++}`);
    fs.writeFileSync(p, Buffer.alloc(0));
    fs.truncateSync(p, 1024 * 1024);
    await withFile(FileNode.open({ path: p }), async (node) => {
      const data = pattern(4096, 9);
      assert.equal(node.writeNow(8192, data), true);
      data.fill(0); // the write is done: the caller's buffer is free
      assert.ok((await node.read(8192, 4096)).equals(pattern(4096, 9)));
      assert.equal(node.writeNow(0, data, { fua: true }), false, 'FUA needs a flush');
      assert.equal(node.writeNow(0, Buffer.alloc(4 * 1024 * 1024 + 1)), false, 'above 4 MiB, writes go to the pool');
      assert.equal(node.writeNow(0, Buffer.alloc(512 * 1024, 3)), true, 'a caller may choose to wait for a larger one');
      assert.ok((await node.read(0, 512 * 1024)).equals(Buffer.alloc(512 * 1024, 3)));
    });
    fs.rmSync(p);
    const disk = tempFile(64 * 1024);
    const fd = fs.openSync(disk, 'r');
    const onTmpfs = filesystemType(fd) === TMPFS_MAGIC;
    fs.closeSync(fd);
    if (!onTmpfs) {
      // Into a disk file's page cache too, while such writes are quick (LoopWriteGuard).
      await withFile(FileNode.open({ path: disk }), async (node) => {
        assert.equal(node.writeNow(0, Buffer.alloc(512, 1)), true);
        assert.equal(node.writeNow(4096, Buffer.alloc(512, 1), { fua: true }), false, 'FUA needs a flush');
        assert.ok((await node.read(0, 512)).equals(Buffer.alloc(512, 1)));
        assert.equal(node.slowLoopWrites, 0);
      });
      await withFile(FileNode.open({ path: disk, direct: true }), async (node) => {
        assert.equal(node.writeNow(0, Buffer.alloc(4096, 2)), false, 'O_DIRECT: always the pool');
      });
    }
  });

  test('a write that blocks the event loop sends the next ones to the pool, and says so through warn', t, async (ctx) => {
    const disk = tempFile(64 * 1024);
    const fd = fs.openSync(disk, 'r');
    const onTmpfs = filesystemType(fd) === TMPFS_MAGIC;
    fs.closeSync(fd);
    if (onTmpfs) return ctx.skip('the temporary directory is on tmpfs, where writes are never timed');
    const warnings: string[] = [];
    const node = await openBlockNode({ kind: 'file', path: disk, format: 'raw', warn: (m) => warnings.push(m) });
    // One write the kernel holds for 60 ms.
    const unstall = stallNextWrite(60);
    try {
      assert.equal(node.writeNow!(0, Buffer.alloc(4096, 7)), true, 'the slow write itself is done');
      assert.equal(warnings.length, 1);
      const held = new RegExp(`a write into ${disk} held the event loop for (\\d+\\.\\d) ms in the kernel.*thread pool for the next 1 s`).exec(warnings[0]!);
      assert.ok(held !== null, warnings[0]);
      assert.ok(Number(held[1]) >= 20 && Number(held[1]) < 1000, warnings[0]);
      assert.equal(node.writeNow!(4096, Buffer.alloc(4096, 8)), false, 'the next write goes to the pool');
      await node.write(4096, Buffer.alloc(4096, 8));
      assert.ok((await node.read(0, 8192)).equals(Buffer.concat([Buffer.alloc(4096, 7), Buffer.alloc(4096, 8)])));
    } finally {
      unstall();
      await node.close();
    }
  });

  test('CheckedNode passes it through only for a plain write; everything else takes write()', t, async (ctx) => {
    if (shmDir === undefined) return ctx.skip('no /dev/shm');
    const p = path.join(shmDir, `img-${counter++}`);
    fs.writeFileSync(p, Buffer.alloc(0));
    fs.truncateSync(p, 64 * 1024);
    const plain = await openBlockNode({ kind: 'file', path: p, format: 'raw' });
    assert.equal(plain.writeNow!(0, Buffer.from('abcd')), true);
    assert.equal(plain.writeNow!(64 * 1024 - 2, Buffer.from('abcd')), false, 'past the end: write() reports ENOSPC');
    assert.equal(plain.writeNow!(0, Buffer.alloc(0)), false);
    await plain.close();
    assert.equal(plain.writeNow!(0, Buffer.from('abcd')), false, 'closed');
    for (const opts of [{ readOnly: true }, { detectZeroes: 'on' as const }, { cache: 'writethrough' as const }]) {
      const node = await openBlockNode({ kind: 'file', path: p, format: 'raw', ...opts });
      assert.equal(node.writeNow!(0, Buffer.from('wxyz')), false, JSON.stringify(opts));
      await node.close();
    }
    assert.equal(fs.readFileSync(p).subarray(0, 4).toString(), 'abcd');
    fs.rmSync(p);
  });
});

describe('bufferAddress and preadNowait', () => {
  test('addresses of slices of one store, asked in any order, and reads into them land where they should', t, (ctx) => {
    const slab = Buffer.allocUnsafeSlow(64 * 1024).fill(0xee);
    const late = slab.subarray(40_000, 44_096);
    const lateAddress = bufferAddress(late);
    if (lateAddress === null) return ctx.skip('no FFI');
    assert.equal(bufferAddress(slab), lateAddress - 40_000);
    assert.equal(bufferAddress(slab.subarray(4097, 4098)), lateAddress - 40_000 + 4097);
    // A small Buffer may start out inside V8's heap: its address must still hold after more allocation.
    const small = Buffer.from('0123456789abcdef');
    const smallAddress = bufferAddress(small);
    for (let i = 0; i < 10_000; i++) Buffer.from(`garbage ${i}`);
    assert.equal(bufferAddress(small), smallAddress);
    const p = tempFile(0);
    fs.writeFileSync(p, pattern(64 * 1024, 9));
    const fd = fs.openSync(p, 'r');
    try {
      fs.readFileSync(p); // cached
      let n: number;
      try {
        n = preadNowait(fd, late, 8192);
      } catch (err) {
        if ((err as BlockError).code === 'EOPNOTSUPP') return ctx.skip('no RWF_NOWAIT here');
        throw err;
      }
      if (n === -1) return ctx.skip('the page cache let the file go');
      assert.equal(n, 4096);
      assert.ok(late.equals(pattern(64 * 1024, 9).subarray(8192, 8192 + 4096)), 'the bytes of the file at 8192');
      assert.ok(slab.subarray(0, 40_000).equals(Buffer.alloc(40_000, 0xee)), 'nothing before the slice touched');
      assert.ok(slab.subarray(44_096).equals(Buffer.alloc(64 * 1024 - 44_096, 0xee)), 'nothing after it');
      assert.equal(preadNowait(fd, small, 16), 16);
      assert.ok(small.equals(pattern(64 * 1024, 9).subarray(16, 32)));
    } finally {
      fs.closeSync(fd);
      fs.rmSync(p);
    }
  });
});

describe('readNow (small reads on the caller\'s thread)', () => {
  const KiB = 1024;
  test('FileNode on tmpfs: small buffered reads, into the given buffer; none when large, O_DIRECT or closed', t, async (ctx) => {
    if (shmDir === undefined) return ctx.skip('no /dev/shm');
    const p = path.join(shmDir, `img-${counter++}`);
    fs.writeFileSync(p, Buffer.alloc(0));
    fs.truncateSync(p, 1024 * KiB);
    await withFile(FileNode.open({ path: p }), async (node) => {
      await node.write(8 * KiB, pattern(4 * KiB, 5));
      assert.ok(node.readNow(8 * KiB, 4 * KiB)?.equals(pattern(4 * KiB, 5)));
      const into = Buffer.alloc(8 * KiB, 0xff);
      const got = node.readNow(6 * KiB, 4 * KiB, into);
      assert.ok(got !== null && got.buffer === into.buffer, 'read into the caller\'s buffer');
      assert.ok(got.subarray(0, 2 * KiB).equals(Buffer.alloc(2 * KiB)), 'a hole reads as zeroes');
      assert.ok(got.subarray(2 * KiB).equals(pattern(4 * KiB, 5).subarray(0, 2 * KiB)));
      const exact = Buffer.alloc(4 * KiB, 0xff);
      assert.equal(node.readNow(8 * KiB, 4 * KiB, exact), exact, 'a buffer of the read\'s length is itself returned');
      assert.ok(exact.equals(pattern(4 * KiB, 5)));
      assert.equal(node.readNow(0, 256 * KiB), null, 'large reads go to the pool');
    });
    await withFile(FileNode.open({ path: p, direct: true }), async (node) => {
      assert.equal(node.readNow(0, 4 * KiB), null, 'O_DIRECT never reads on the event loop');
    });
    const node = await FileNode.open({ path: p });
    await node.close();
    assert.equal(node.readNow(0, 4 * KiB), null, 'closed');
    fs.rmSync(p);
  });

  test('FileNode on a disk filesystem: never over a range no scan has seen as data, so a hole stays a hole', t, async (ctx) => {
    const p = tempFile(1024 * KiB);
    await withFile(FileNode.open({ path: p, discard: 'unmap' }), async (node) => {
      const fd = fs.openSync(p, 'r');
      try {
        if (filesystemType(fd) === TMPFS_MAGIC) return ctx.skip('the temporary directory is on tmpfs');
        assert.equal(node.readNow(512 * KiB, 4 * KiB), null, 'nothing known about the range yet');
        assert.equal(seekOrEnd(fd, 0, SEEK_DATA), fs.fstatSync(fd).size, 'the file is still one hole');
        await node.write(0, pattern(128 * KiB, 2));
        assert.equal(node.readNow(4 * KiB, 4 * KiB), null, 'written, but not yet seen by a scan');
        await node.read(0, 128 * KiB); // the read scans, and marks what it saw
        const got = node.readNow(4 * KiB, 4 * KiB);
        // null is allowed (pages not cached, or no RWF_NOWAIT here); wrong bytes are not.
        if (got !== null) assert.ok(got.equals(pattern(128 * KiB, 2).subarray(4 * KiB, 8 * KiB)));
        await node.trim(0, 64 * KiB);
        assert.equal(node.readNow(4 * KiB, 4 * KiB), null, 'trim forgets the range');
      } finally {
        fs.closeSync(fd);
      }
    });
  });

  test('CheckedNode passes it through, and leaves whatever read() would refuse to read()', t, async (ctx) => {
    if (shmDir === undefined) return ctx.skip('no /dev/shm');
    const p = path.join(shmDir, `img-${counter++}`);
    fs.writeFileSync(p, Buffer.from('abcdefgh'));
    fs.truncateSync(p, 64 * KiB);
    const node = await openBlockNode({ kind: 'file', path: p, format: 'raw', readOnly: true });
    assert.equal(node.readNow!(2, 4)?.toString(), 'cdef', 'read-only exports read on the spot too');
    assert.equal(node.readNow!(64 * KiB - 2, 4), null, 'past the end: read() reports it');
    assert.equal(node.readNow!(-1, 4), null);
    assert.equal(node.readNow!(0, 0), null);
    assert.equal(node.readNow!(0, 8, Buffer.alloc(4)), null, 'a buffer too small: read() reports it');
    await node.close();
    assert.equal(node.readNow!(0, 4), null, 'closed');
    fs.rmSync(p);
  });
});
