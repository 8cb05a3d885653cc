import assert from 'node:assert/strict';
import { test } from 'node:test';
import { parseArgs } from './args.ts';
import { formatSize, parseSize, UsageError } from './size.ts';

const parse = (...argv: string[]) => {
  const config = parseArgs(argv);
  assert.ok(config !== null);
  return config;
};

test('qemu-nbd defaults', () => {
  const c = parse('disk.img');
  assert.deepEqual(c.image, { kind: 'file', path: 'disk.img' });
  assert.equal(c.bind, '0.0.0.0');
  assert.equal(c.port, 10809);
  assert.equal(c.shared, 1);
  assert.equal(c.persistent, false);
  assert.equal(c.readOnly, false);
  assert.equal(c.exportName, '');
  assert.equal(c.discard, 'ignore');
  assert.equal(c.detectZeroes, 'off');
  assert.equal(c.cache, 'writeback');
  assert.equal(c.handshakeLimitSeconds, 10);
  assert.equal(c.loopbackReno, true);
  assert.equal(c.logLevel, 'warn');
});

test('--no-loopback-reno keeps the system congestion control', () => {
  assert.equal(parse('--no-loopback-reno', 'img').loopbackReno, false);
  assert.equal(parse('--loopback-reno=false', 'img').loopbackReno, false);
});

test('short and long flags', () => {
  const c = parse('-f', 'raw', '-k', '/tmp/s', '-e', '0', '-t', '-r', '-x', 'disk', '-D', 'a disk', '-o', '1M', '--discard=unmap', '--detect-zeroes=unmap', '--cache', 'unsafe', '-vv', 'img');
  assert.equal(c.format, 'raw');
  assert.equal(c.socket, '/tmp/s');
  assert.equal(c.shared, 0);
  assert.ok(c.persistent && c.readOnly);
  assert.equal(c.exportName, 'disk');
  assert.equal(c.description, 'a disk');
  assert.equal(c.offset, 1 << 20);
  assert.equal(c.discard, 'unmap');
  assert.equal(c.detectZeroes, 'unmap');
  assert.equal(c.cache, 'unsafe');
  assert.equal(c.logLevel, 'debug');
  assert.equal(parse('-n', 'img').cache, 'none');
  assert.equal(parse('--discard=on', 'img').discard, 'unmap');
});

test('formats, -s and -A', () => {
  const c = parse('img');
  assert.equal(c.format, undefined);
  assert.equal(c.snapshot, false);
  assert.equal(c.allocationDepth, false);
  assert.equal(parse('-f', 'qcow2', 'img').format, 'qcow2');
  assert.equal(parse('--format=raw', 'img').format, 'raw');
  const d = parse('-s', '-A', 'img');
  assert.equal(d.snapshot, true);
  assert.equal(d.allocationDepth, true);
  assert.equal(parse('--snapshot', '--allocation-depth', 'img').allocationDepth, true);
});

test('memory disks', () => {
  assert.deepEqual(parse('memory:1G').image, { kind: 'memory', size: 2 ** 30 });
  assert.deepEqual(parse('memory:1T').image, { kind: 'memory', size: 2 ** 40 });
});

test('mistakes are one-line UsageErrors', () => {
  const cases: [string[], RegExp][] = [
    [[], /missing FILENAME/],
    [['a', 'b'], /unexpected argument 'b'/],
    [['-e', 'x', 'img'], /invalid --shared 'x'/],
    [['-p', '70000', 'img'], /invalid --port '70000' \(expected 0 to 65535\)/],
    [['-f', 'vmdk', 'img'], /format 'vmdk' is not supported \(raw or qcow2\)/],
    [['-s', 'memory:1G'], /--snapshot applies to files/],
    [['--cache=bogus', 'img'], /invalid --cache 'bogus'/],
    [['--discard=maybe', 'img'], /invalid --discard 'maybe'/],
    [['--detect-zeroes=unmap', 'img'], /requires --discard=unmap/],
    [['-k', '/tmp/s', '-p', '5', 'img'], /cannot be combined/],
    [['--no-such-flag', 'img'], /Unknown argument/],
    [['memory:12Q'], /invalid memory disk size/],
    [['-o', '4096', 'memory:1G'], /--offset applies to files/],
  ];
  for (const [argv, message] of cases) {
    assert.throws(() => parseArgs(argv), (err: unknown) => err instanceof UsageError && message.test(err.message) && !err.message.includes('\n'), argv.join(' '));
  }
});

test('sizes', () => {
  assert.equal(parseSize('512', 'x'), 512);
  assert.equal(parseSize('64k', 'x'), 65536);
  assert.equal(parseSize('1.5M', 'x'), 1.5 * 2 ** 20);
  assert.equal(parseSize('2GiB', 'x'), 2 ** 31);
  assert.throws(() => parseSize('1.3', 'x'), UsageError);
  assert.throws(() => parseSize('-1', 'x'), UsageError);
  assert.equal(formatSize(2 ** 30), '1 GiB');
  assert.equal(formatSize(1000), '1000 bytes');
});

test('--help prints the usage lines whole: no line broken inside a word or a URL', (t) => {
  const printed: string[] = [];
  t.mock.method(process.stdout, 'write', (s: string) => {
    printed.push(s);
    return true;
  });
  assert.equal(parseArgs(['--help']), null);
  t.mock.reset();
  const lines = printed.join('').split('\n');
  // yargs wrapping at a width broke these mid-word ("Mana" / "ge dirty bitmaps").
  for (const want of [
    'Serve FILENAME (a raw or qcow2 disk image or block device, or memory:SIZE for a sparse',
    'A Redis disk: redis://HOST:PORT/DB?disk=NAME, rediss://,',
    'Manage dirty bitmaps: nbd-export bitmap --help',
  ]) assert.ok(lines.includes(want), `missing line: ${want}`);
  assert.ok(lines.some((l) => /^ {2}-e, --shared +clients served at once/.test(l)));
});
