// -s: the temporary qcow2 overlay. The BlockNode conformance suite over a
// memory disk; the overlay file is unlinked at once (nothing left in the
// temporary folder, even while open); $TMPDIR is used; an unusable folder
// is one clear error; the overlay is a qcow2 image qemu would accept.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { describe, test } from 'node:test';
import { runConformance } from './conformance.ts';
import { MemoryNode } from './memory.ts';
import { CheckedNode } from './node.ts';
import { emptyImage, parseHeader } from './qcow2-format.ts';
import { openImage } from './qcow2-open.ts';
import { openTemporaryOverlay, temporaryDirectory } from './qcow2-temp.ts';
import { HAVE_QEMU, qemuCheck, qemuRaw, SKIP_NO_QEMU, testDir, tmp } from './qcow2-testlib.ts';
import { BlockError } from './types.ts';

const K = 1024;
const M = 1024 * 1024;

function folder(name: string): string {
  const d = tmp(name);
  fs.mkdirSync(d);
  return d;
}

runConformance('temporary qcow2 overlay over a memory disk', async (size) => openTemporaryOverlay(new MemoryNode(size), folder('conf')), { reportsHoles: true, propertyRuns: 20 });
runConformance('temporary qcow2 overlay, checked, discard=unmap', async (size) => new CheckedNode(await openTemporaryOverlay(new MemoryNode(size), folder('conf2')), { discard: 'unmap' }), {
  reportsHoles: true,
  propertyRuns: 15,
});

describe('temporary qcow2 overlay (-s)', () => {
  test('an empty image is valid qcow2 for qemu, of any size', { skip: SKIP_NO_QEMU }, () => {
    for (const size of [512, 64 * K + 512, 3 * M, 2 ** 40]) {
      const f = tmp('empty.qcow2');
      fs.writeFileSync(f, emptyImage(size));
      const r = qemuCheck(f);
      assert.ok(r.errors === 0 && r.leaks === 0 && r.corruptions === 0, `${size}: ${r.raw}`);
      assert.equal(parseHeader(fs.readFileSync(f)).size, size);
      if (size <= 3 * M) assert.ok(qemuRaw(f, 'qcow2').equals(Buffer.alloc(size)));
    }
  });

  test('the overlay file is gone from its folder while open; writes stay out of the base', async () => {
    const dir = folder('tmpdir');
    const base = new MemoryNode(4 * M);
    await base.write(0, Buffer.alloc(M, 7));
    const node = await openTemporaryOverlay(base, dir);
    try {
      assert.deepEqual(fs.readdirSync(dir), []);
      await node.write(100, Buffer.alloc(70 * K, 9));
      await node.writeZeroes(M, M);
      await node.flush();
      assert.ok((await base.read(0, M)).equals(Buffer.alloc(M, 7)), 'the base is unchanged');
      const got = await node.read(0, 2 * M);
      const want = Buffer.alloc(2 * M);
      want.fill(7, 0, M);
      want.fill(9, 100, 100 + 70 * K);
      assert.ok(got.equals(want));
      assert.deepEqual(await node.allocationDepth(0, 4 * M), [
        { length: 128 * K, depth: 1 },
        { length: M - 128 * K, depth: 2 },
        { length: M, depth: 1 },
        { length: 2 * M, depth: 2 },
      ]);
    } finally {
      await node.close();
    }
    assert.deepEqual(fs.readdirSync(dir), []);
  });

  test('$TMPDIR names the folder (else /var/tmp, as qemu)', () => {
    const saved = process.env.TMPDIR;
    try {
      process.env.TMPDIR = '/some/where';
      assert.equal(temporaryDirectory(), '/some/where');
      delete process.env.TMPDIR;
      assert.equal(temporaryDirectory(), '/var/tmp');
    } finally {
      if (saved === undefined) delete process.env.TMPDIR;
      else process.env.TMPDIR = saved;
    }
  });

  test('a folder that cannot be used is one clear error, and the image is closed', { skip: HAVE_QEMU ? false : SKIP_NO_QEMU }, async () => {
    const raw = path.join(testDir(), 'snap-base.raw');
    fs.writeFileSync(raw, Buffer.alloc(64 * K, 1));
    const saved = process.env.TMPDIR;
    process.env.TMPDIR = path.join(testDir(), 'no-such-folder');
    try {
      await assert.rejects(
        openImage({ path: raw, snapshot: true }),
        (e: unknown) => e instanceof BlockError && e.code === 'ENOENT' && /^cannot make the temporary overlay for -s in .*no-such-folder: /.test(e.message) && !e.message.includes('\n'),
      );
    } finally {
      if (saved === undefined) delete process.env.TMPDIR;
      else process.env.TMPDIR = saved;
    }
  });
});
