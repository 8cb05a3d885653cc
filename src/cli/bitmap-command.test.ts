import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, describe, test } from 'node:test';
import { ImageLock, servePerms } from '../block/image-lock.ts';
import { parseArgs } from './args.ts';
import { parseBitmapArgs, runBitmapCommand } from './bitmap-command.ts';
import { UsageError } from './size.ts';

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbd-export-bitmap-cmd-'));
after(() => fs.rmSync(dir, { recursive: true, force: true }));

describe('-B/--bitmap', () => {
  test('repeatable, in any spelling, never swallowing FILENAME', () => {
    assert.deepEqual(parseArgs(['-B', 'a', '--bitmap', 'b', '--bitmap=c', 'img'])!.bitmaps, ['a', 'b', 'c']);
    assert.deepEqual(parseArgs(['-r', '-B', 'x', 'img'])!.bitmaps, ['x']);
    assert.equal(parseArgs(['-B', 'x', 'img'])!.image.kind, 'file');
    assert.deepEqual(parseArgs(['img'])!.bitmaps, []);
  });
});

describe('nbd-export bitmap: arguments', () => {
  test('operations keep their order', () => {
    const c = parseBitmapArgs(['--add', '--disable', '-g', '4k', 'img', 'b'])!;
    assert.deepEqual(c.ops.map((o) => o.kind), ['add', 'disable']);
    assert.equal(c.granularity, 4096);
    assert.equal(c.name, 'b');
    assert.deepEqual(parseBitmapArgs(['--merge', 'src', 'img', 'dst'])!.ops, [{ kind: 'merge', source: 'src' }]);
    assert.deepEqual(parseBitmapArgs(['img', '--checkpoint=new'])!.ops, [{ kind: 'checkpoint', name: 'new' }]);
    assert.equal(parseBitmapArgs(['--list', 'img'])!.name, undefined);
    assert.equal(parseBitmapArgs(['--help']), null);
  });

  test('mistakes are usage errors with qemu-img wording', () => {
    assert.throws(() => parseBitmapArgs(['img', 'b']), new UsageError('Need at least one of --add, --remove, --clear, --enable, --disable, --merge, --checkpoint or --list'));
    assert.throws(() => parseBitmapArgs(['--add', 'img']), new UsageError('Expecting image file name and bitmap name'));
    assert.throws(() => parseBitmapArgs(['--remove', '-g', '4096', 'img', 'b']), new UsageError('granularity only supported with --add or --checkpoint'));
    assert.throws(() => parseBitmapArgs(['--add', '--bogus', 'img', 'b']), new UsageError("unknown option '--bogus' for bitmap"));
    assert.throws(() => parseBitmapArgs(['--merge']), new UsageError('--merge needs a value'));
    assert.throws(() => parseBitmapArgs(['--add', 'img', 'b', 'c']), new UsageError("unexpected argument 'c'"));
    assert.throws(() => parseBitmapArgs(['--add', '-f', 'vmdk', 'img', 'b']), /format 'vmdk' is not supported/);
  });
});

describe('nbd-export bitmap: runs', () => {
  test('raw image: add, checkpoint, list; all-or-nothing; refused while served', async () => {
    const img = path.join(dir, 'r.img');
    fs.writeFileSync(img, Buffer.alloc(1024 * 1024));
    const out: string[] = [];
    const run = (...argv: string[]) => runBitmapCommand(parseBitmapArgs(argv)!, (s) => out.push(s));
    await run('--add', img, 'b0');
    await run('--checkpoint', 'b1', '-g', '4096', img);
    await assert.rejects(run('--add', '--add', img, 'b2'), /Operation add on bitmap b2 failed: Bitmap already exists: b2/);
    await run('--list', img);
    assert.equal(out.join(''), 'b0: granularity 64 KiB, disabled, 0 dirty bytes\nb1: granularity 4 KiB, enabled, 0 dirty bytes\n', 'b2 was not stored');
    if (ImageLock.available) {
      const lock = ImageLock.acquire(img, servePerms('raw', true, true));
      await assert.rejects(run('--remove', img, 'b0'), /Failed to get "write" lock; is another process using the image/);
      await assert.rejects(run('--list', img), /Failed to get shared "write" lock/);
      lock.release();
    }
    await assert.rejects(run('--add', path.join(dir, 'nope'), 'x'), /cannot open '.*nope': No such file or directory/);
  });
});
