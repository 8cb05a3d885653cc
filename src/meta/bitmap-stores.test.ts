// The two bitmap stores: the raw sidecar file (format, atomic replace,
// crash and foreign-writer detection) and qcow2's bitmaps extension, with
// qemu-img as the oracle; and the image lock against qemu-img.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import { describe, test } from 'node:test';
import { EDIT_PERMS, ImageLock, servePerms } from '../block/image-lock.ts';
import { createQcow2, qemuCheck, qemuImg, qemuIo, SKIP_NO_QEMU, tmp } from '../block/qcow2-testlib.ts';
import { NodeBitmaps } from './bitmaps.ts';
import type { BitmapStore } from './bitmap-store.ts';
import { EXT_BITMAPS, parseHeader } from '../block/qcow2-format.ts';
import { AUTOCLEAR_BITMAPS, decodeDirectory, headerExtensions, Qcow2BitmapStore } from './qcow2-bitmaps.ts';
import { crc32, decodeSidecar, RawBitmapStore, sidecarPath } from './raw-bitmaps.ts';

const K = 1024;
const M = 1024 * K;
const t = { timeout: 30_000 };

function runsOf(b: NodeBitmaps, name: string): string {
  const bm = b.get(name)!;
  return bm
    .runs(0, bm.size, 1e6)
    .map((r) => `${r.length}${r.dirty ? 'D' : 'c'}`)
    .join(' ');
}

interface QemuBitmap {
  name: string;
  granularity: number;
  flags: string[];
}

function qemuBitmaps(file: string, force = false): QemuBitmap[] {
  const info = JSON.parse(qemuImg('info', ...(force ? ['-U'] : []), '--output=json', file)) as {
    'format-specific'?: { data?: { bitmaps?: QemuBitmap[] } };
  };
  return info['format-specific']?.data?.bitmaps ?? [];
}

function autoclear(file: string): bigint {
  const b = Buffer.alloc(8);
  const fd = fs.openSync(file, 'r');
  fs.readSync(fd, b, 0, 8, 88);
  fs.closeSync(fd);
  return b.readBigUInt64BE(0);
}

describe('crc32', () => {
  test('matches the standard check value', () => {
    assert.equal(crc32(Buffer.from('123456789')), 0xcbf43926);
  });
});

describe('raw sidecar store', () => {
  const rawImage = (): string => {
    const p = tmp('raw.img');
    fs.writeFileSync(p, Buffer.alloc(1 * M));
    return p;
  };

  test('add, store, load again; in use after a writable open; cleared by a clean close', t, async () => {
    const img = rawImage();
    const open = (writable: boolean) => NodeBitmaps.open({ store: new RawBitmapStore(img, 1 * M), size: 1 * M, writable });
    const a = await open(false);
    assert.deepEqual(a.list(), []);
    a.add('b0');
    a.add('b1', 4096, false);
    await a.save();
    assert.ok(fs.existsSync(sidecarPath(img)));
    const rw = await open(true);
    let file = decodeSidecar(fs.readFileSync(sidecarPath(img)), 'x');
    assert.deepEqual(file.entries.map((e) => [e.name, e.flags]), [['b0', 3], ['b1', 0]], 'enabled bitmap in use while open');
    rw.mark(100 * K, 1);
    fs.appendFileSync(img, ''); // no change of data
    await rw.close();
    file = decodeSidecar(fs.readFileSync(sidecarPath(img)), 'x');
    assert.deepEqual(file.entries.map((e) => [e.name, e.flags]), [['b0', 2], ['b1', 0]]);
    const again = await open(false);
    assert.equal(runsOf(again, 'b0'), `${64 * K}c ${64 * K}D ${1 * M - 128 * K}c`);
    assert.equal(again.get('b1')!.enabled, false);
    assert.equal(again.get('b1')!.granularity, 4096);
  });

  test('a crash leaves enabled bitmaps inconsistent, disabled ones usable', t, async () => {
    const img = rawImage();
    const a = await NodeBitmaps.open({ store: new RawBitmapStore(img, 1 * M), size: 1 * M, writable: false });
    a.add('on');
    a.add('off', 65536, false);
    await a.save();
    await NodeBitmaps.open({ store: new RawBitmapStore(img, 1 * M), size: 1 * M, writable: true }); // never closed: a crash
    const after = await NodeBitmaps.open({ store: new RawBitmapStore(img, 1 * M), size: 1 * M, writable: false });
    assert.deepEqual(after.list().map((x) => [x.name, x.inconsistent !== null]), [['on', true], ['off', false]]);
    assert.throws(() => after.contexts(['on'], true), /Bitmap 'on' is inconsistent and cannot be used/);
    assert.throws(() => after.clear('on'), /inconsistent/);
    // Only removal helps; the inconsistent entry survives other changes.
    after.add('new');
    await after.save();
    const later = await NodeBitmaps.open({ store: new RawBitmapStore(img, 1 * M), size: 1 * M, writable: false });
    assert.deepEqual(later.list().map((x) => [x.name, x.inconsistent !== null]), [['on', true], ['off', false], ['new', false]]);
    later.remove('on');
    await later.save();
    const last = await NodeBitmaps.open({ store: new RawBitmapStore(img, 1 * M), size: 1 * M, writable: false });
    assert.deepEqual(last.list().map((x) => x.name), ['off', 'new']);
  });

  test('a write by another program makes enabled bitmaps inconsistent (the mtime check)', t, async () => {
    const img = rawImage();
    const a = await NodeBitmaps.open({ store: new RawBitmapStore(img, 1 * M), size: 1 * M, writable: false });
    a.add('on');
    a.add('off', 65536, false);
    await a.save();
    const st = fs.statSync(img);
    fs.writeFileSync(img, Buffer.alloc(1 * M, 1));
    fs.utimesSync(img, st.atime, new Date(st.mtimeMs + 5000));
    const b = await NodeBitmaps.open({ store: new RawBitmapStore(img, 1 * M), size: 1 * M, writable: false });
    assert.deepEqual(b.list().map((x) => [x.name, x.inconsistent]), [
      ['on', 'the image was written by another program since the bitmap was stored'],
      ['off', null],
    ]);
  });

  test('damaged files are refused, never trusted', t, async () => {
    const img = rawImage();
    const a = await NodeBitmaps.open({ store: new RawBitmapStore(img, 1 * M), size: 1 * M, writable: false });
    a.add('b');
    await a.save();
    const buf = fs.readFileSync(sidecarPath(img));
    buf[40]! ^= 1;
    fs.writeFileSync(sidecarPath(img), buf);
    await assert.rejects(new RawBitmapStore(img, 1 * M).load(), /checksum mismatch/);
    fs.writeFileSync(sidecarPath(img), 'junk');
    await assert.rejects(new RawBitmapStore(img, 1 * M).load(), /no magic/);
    // A size change makes every bitmap inconsistent.
    fs.rmSync(sidecarPath(img));
    const c = await NodeBitmaps.open({ store: new RawBitmapStore(img, 1 * M), size: 1 * M, writable: false });
    c.add('b');
    await c.save();
    const other = await NodeBitmaps.open({ store: new RawBitmapStore(img, 2 * M), size: 2 * M, writable: false });
    assert.match(other.list()[0]!.inconsistent!, /covers 1048576 bytes/);
  });

  test('removing the last bitmap removes the file; no temporary file is left', t, async () => {
    const img = rawImage();
    const a = await NodeBitmaps.open({ store: new RawBitmapStore(img, 1 * M), size: 1 * M, writable: false });
    a.add('b');
    await a.save();
    a.remove('b');
    await a.save();
    assert.ok(!fs.existsSync(sidecarPath(img)));
    const dir = fs.readdirSync(tmp('x').replace(/\/[^/]*$/, ''));
    assert.ok(!dir.some((n) => n.includes('.tmp-')));
  });
});

describe('qcow2 bitmaps extension', { skip: SKIP_NO_QEMU }, () => {
  const open = (file: string, size: number, writable: boolean, store: BitmapStore = new Qcow2BitmapStore(file)) =>
    NodeBitmaps.open({ store, size, writable });

  test('reads bitmaps that qemu-img made and qemu-io dirtied, at 64 KiB and 4 KiB', t, async () => {
    const img = tmp('a.qcow2');
    createQcow2(img, 4 * M);
    qemuImg('bitmap', '--add', img, 'b0');
    qemuImg('bitmap', '--add', '-g', '4096', img, 'b1');
    qemuImg('bitmap', '--add', '--disable', img, 'b2');
    qemuIo(img, 'qcow2', 'write 100k 5k', 'write 1M 4k');
    const b = await open(img, 4 * M, false);
    assert.deepEqual(b.list().map((x) => [x.name, x.granularity, x.enabled, x.inconsistent]), [
      ['b0', 65536, true, null],
      ['b1', 4096, true, null],
      ['b2', 65536, false, null],
    ]);
    assert.equal(runsOf(b, 'b0'), `${64 * K}c ${64 * K}D ${1 * M - 128 * K}c ${64 * K}D ${3 * M - 64 * K}c`);
    assert.equal(runsOf(b, 'b1'), `${100 * K}c ${8 * K}D ${1 * M - 108 * K}c ${4 * K}D ${3 * M - 4 * K}c`);
    assert.equal(runsOf(b, 'b2'), `${4 * M}c`);
  });

  test('a writable open flags enabled bitmaps in use; a clean close stores them; qemu-img check is clean', t, async () => {
    const img = tmp('w.qcow2');
    createQcow2(img, 4 * M);
    qemuImg('bitmap', '--add', img, 'b0');
    qemuImg('bitmap', '--add', '--disable', img, 'b2');
    const b = await open(img, 4 * M, true);
    assert.deepEqual(qemuBitmaps(img, true).map((x) => [x.name, x.flags]), [['b0', ['in-use', 'auto']], ['b2', []]]);
    b.mark(2 * M, 64 * K);
    b.mark(0, 1);
    await b.close();
    assert.deepEqual(qemuBitmaps(img).map((x) => [x.name, x.flags]), [['b0', ['auto']], ['b2', []]]);
    assert.equal(qemuCheck(img).errors ?? 0, 0);
    assert.match(qemuImg('check', img), /No errors were found/);
    assert.doesNotMatch(qemuImg('check', img), /leaked/);
    // qemu loads our bits and stores them again (an unrelated change): the same bits come back.
    qemuImg('bitmap', '--add', img, 'tmp');
    qemuImg('bitmap', '--remove', img, 'tmp');
    const again = await open(img, 4 * M, false);
    assert.equal(runsOf(again, 'b0'), `${64 * K}D ${2 * M - 64 * K}c ${64 * K}D ${2 * M - 64 * K}c`);
  });

  test('bitmaps of many clusters, with a backing file and small clusters: header rewritten, qemu agrees', t, async () => {
    const base = tmp('base.qcow2');
    createQcow2(base, 64 * M);
    const img = tmp('top.qcow2');
    createQcow2(img, 64 * M, ['cluster_size=4096'], [base, 'qcow2']);
    const b = await open(img, 64 * M, false);
    b.add('fine', 512);
    b.add('coarse', 1 * M, false);
    b.get('fine')!.mark(0, 1);
    b.get('fine')!.mark(33 * M + 7, 40 * K);
    b.get('fine')!.mark(64 * M - 1, 1);
    b.get('coarse')!.mark(5 * M, 1);
    await b.save();
    const info = JSON.parse(qemuImg('info', '--output=json', img)) as { 'backing-filename': string };
    assert.equal(info['backing-filename'], base);
    assert.deepEqual(qemuBitmaps(img).map((x) => [x.name, x.granularity, x.flags]), [['fine', 512, ['auto']], ['coarse', 1048576, []]]);
    assert.match(qemuImg('check', img), /No errors were found/);
    qemuImg('bitmap', '--add', img, 'tmp');
    qemuImg('bitmap', '--remove', img, 'tmp');
    const again = await open(img, 64 * M, false);
    assert.equal(runsOf(again, 'fine'), runsOf(b, 'fine'));
    assert.equal(runsOf(again, 'coarse'), runsOf(b, 'coarse'));
    // Everything removed: no extension, the auto-clear bit cleared, nothing leaked.
    again.remove('fine');
    again.remove('coarse');
    await again.save();
    assert.deepEqual(qemuBitmaps(img), []);
    assert.equal(autoclear(img) & AUTOCLEAR_BITMAPS, 0n);
    assert.match(qemuImg('check', img), /No errors were found/);
    assert.doesNotMatch(qemuImg('check', img), /leaked/);
    assert.equal((JSON.parse(qemuImg('info', '--output=json', img)) as { 'backing-filename': string })['backing-filename'], base);
  });

  test('a crash leaves the enabled bitmap in use: qemu and we call it inconsistent; removal works', t, async () => {
    const img = tmp('c.qcow2');
    createQcow2(img, 4 * M);
    qemuImg('bitmap', '--add', img, 'b0');
    qemuImg('bitmap', '--add', '--disable', img, 'b2');
    await open(img, 4 * M, true); // never closed
    const after = await open(img, 4 * M, false);
    assert.deepEqual(after.list().map((x) => [x.name, x.inconsistent !== null]), [['b0', true], ['b2', false]]);
    after.remove('b0');
    await after.save();
    assert.deepEqual(qemuBitmaps(img).map((x) => x.name), ['b2']);
    assert.match(qemuImg('check', img), /No errors were found/);
  });

  test('a cleared auto-clear bit (a program without bitmap support wrote the image) makes every bitmap inconsistent', t, async () => {
    const img = tmp('ac.qcow2');
    createQcow2(img, 4 * M);
    qemuImg('bitmap', '--add', img, 'b0');
    const fd = fs.openSync(img, 'r+');
    fs.writeSync(fd, Buffer.alloc(8), 0, 8, 88);
    fs.closeSync(fd);
    const b = await open(img, 4 * M, false);
    assert.match(b.list()[0]!.inconsistent!, /does not keep bitmaps/);
  });

  test('a bitmap whose table points outside the file is inconsistent; the others load', t, async () => {
    const img = tmp('dmg.qcow2');
    createQcow2(img, 4 * M);
    qemuImg('bitmap', '--add', img, 'b0');
    qemuImg('bitmap', '--add', img, 'b1');
    qemuIo(img, 'qcow2', 'write 0 4k');
    const cluster0 = fs.readFileSync(img).subarray(0, 65536);
    const header = parseHeader(cluster0);
    const ext = headerExtensions(cluster0, header).find((e) => e.type === EXT_BITMAPS)!;
    const dirOffset = Number(ext.data.readBigUInt64BE(16));
    const dir = decodeDirectory(fs.readFileSync(img).subarray(dirOffset, dirOffset + Number(ext.data.readBigUInt64BE(8))), 2);
    const entry = Buffer.alloc(8);
    entry.writeBigUInt64BE(1n << 40n);
    const fd = fs.openSync(img, 'r+');
    fs.writeSync(fd, entry, 0, 8, dir[0]!.tableOffset);
    fs.closeSync(fd);
    const b = await open(img, 4 * M, false);
    assert.deepEqual(b.list().map((x) => [x.name, x.inconsistent]), [
      ['b0', "invalid qcow2 bitmaps: a data cluster of bitmap 'b0' is outside the file"],
      ['b1', null],
    ]);
    assert.equal(b.get('b1')!.dirtyBytes(), 64 * K);
  });

  test('version 2 images cannot store bitmaps', t, async () => {
    const img = tmp('v2.qcow2');
    createQcow2(img, 4 * M, ['compat=0.10']);
    const b = await open(img, 4 * M, false);
    b.add('x');
    await assert.rejects(b.save(), /version 2/);
  });
});

describe('image lock', { skip: ImageLock.available ? false : 'no OFD locks here' }, () => {
  test('serving writable excludes editing and qemu-img; read-only serving allows readers', t, () => {
    const img = tmp('lock.qcow2');
    if (SKIP_NO_QEMU !== false) fs.writeFileSync(img, Buffer.alloc(M));
    else createQcow2(img, 4 * M);
    const serve = ImageLock.acquire(img, servePerms('qcow2', true));
    assert.throws(() => ImageLock.acquire(img, EDIT_PERMS), /Failed to get "write" lock; is another process using the image/);
    if (SKIP_NO_QEMU === false) {
      const r = spawnSync('qemu-img', ['info', img], { encoding: 'utf8' });
      assert.notEqual(r.status, 0);
      assert.match(r.stderr, /Failed to get shared "write" lock/);
    }
    serve.release();
    const ro = ImageLock.acquire(img, servePerms('qcow2', false));
    const ro2 = ImageLock.acquire(img, servePerms('qcow2', false));
    assert.throws(() => ImageLock.acquire(img, EDIT_PERMS), /Failed to get "write" lock/);
    if (SKIP_NO_QEMU === false) assert.equal(spawnSync('qemu-img', ['info', img]).status, 0);
    ro.release();
    ro2.release();
    ImageLock.acquire(img, EDIT_PERMS).release();
  });

  test('raw images share writing unless we keep their bitmaps', t, () => {
    const img = tmp('lock.raw');
    fs.writeFileSync(img, Buffer.alloc(M));
    const a = ImageLock.acquire(img, servePerms('raw', true));
    const b = ImageLock.acquire(img, servePerms('raw', true));
    assert.throws(() => ImageLock.acquire(img, servePerms('raw', true, true)), /Failed to get shared "write" lock/);
    a.release();
    b.release();
  });
});
