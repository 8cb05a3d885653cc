// Dirty bitmaps of Redis disks against real redis-server processes: marking
// by every instance in the data's own script, granularity rules, changes
// made by one process seen by the next write of another, a checkpoint
// racing with writes from two instances (no write lost, and on a
// standalone Redis none in both bitmaps), extents, clear/remove/merge, and
// a three-master cluster.
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { parseRedisUrl } from './redis-url.ts';
import { RedisBitmapOpError, type DirtyRun } from './redis-bitmaps.ts';
import { RedisNode } from './redis.ts';
import { haveRedis, startCluster, startRedis, type RedisCluster, type RedisProcess } from './redis-test-server.ts';
import { BlockError } from './types.ts';

const available = haveRedis();
if (!available && process.env.IOTESTS_REQUIRE_CLIENTS === '1') throw new Error('redis-server is not installed');
const skip = available ? false : 'redis-server is not installed';
const t = { timeout: 120_000, skip };

let redis: RedisProcess | undefined;
let seq = 0;

before(async () => {
  if (available) redis = await startRedis();
});
after(async () => {
  await redis?.stop();
});

function fresh(): string {
  return `bm${process.pid}-${++seq}`;
}

async function open(url: string, size?: number): Promise<RedisNode> {
  return RedisNode.open({ target: parseRedisUrl(url), size });
}

const K = 1024;
const M = 1024 * 1024;

/** Dirty [offset, length] pairs of a bitmap over the whole disk. */
async function dirty(node: RedisNode, name: string): Promise<[number, number][]> {
  const out: [number, number][] = [];
  let pos = 0;
  while (pos < node.size) {
    const runs: DirtyRun[] = await node.bitmaps.runs(name, pos, node.size - pos, 1000);
    assert.ok(runs.length > 0);
    for (const r of runs) {
      if (r.dirty) {
        const last = out[out.length - 1];
        if (last !== undefined && last[0] + last[1] === pos) last[1] += r.length;
        else out.push([pos, r.length]);
      }
      pos += r.length;
    }
  }
  return out;
}

describe('Redis dirty bitmaps (standalone)', { skip }, () => {
  const url = (disk: string, params = '') => `redis+unix://${redis!.socket}?disk=${disk}${params}`;

  test('writes, zeroes and trims through two instances mark one bitmap, read alike by both', t, async () => {
    const disk = fresh();
    const a = await open(url(disk, '&chunk=4K&group=8'), 4 * M);
    const b = await open(url(disk));
    try {
      // Nothing is marked before a bitmap exists.
      await a.write(0, Buffer.alloc(100, 1));
      await a.bitmaps.apply([{ kind: 'add', name: 'b0', granularity: 4 * K }]);
      await b.bitmaps.apply([{ kind: 'add', name: 'fine', granularity: 512 }]);
      await a.write(10 * K + 5, Buffer.alloc(5000, 2)); // granules 2..3 of 4K
      await b.writeZeroes(100 * K, 40 * K, {}); // partial and whole chunks, allocated or not
      await b.trim(1 * M, 64 * K); // nothing allocated there: marked all the same
      await a.writeZeroes(2 * M + 100, 1, { noHole: true });
      const want = [
        [8 * K, 8 * K],
        [100 * K, 40 * K],
        [1 * M, 64 * K],
        [2 * M, 4 * K],
      ];
      assert.deepEqual(await dirty(a, 'b0'), want);
      assert.deepEqual(await dirty(b, 'b0'), want);
      assert.deepEqual(await dirty(b, 'fine'), [
        [10 * K, 5120],
        [100 * K, 40 * K],
        [1 * M, 64 * K],
        [2 * M, 512],
      ]);
      assert.equal(await b.bitmaps.dirtyBytes('b0'), (8 + 40 + 64 + 4) * K);
      // Runs are clipped to the request, and capped.
      assert.deepEqual(await a.bitmaps.runs('b0', 9 * K, 2 * K, 10), [{ length: 2 * K, dirty: true }]);
      assert.deepEqual(await a.bitmaps.runs('b0', 0, 4 * M, 2), [
        { length: 8 * K, dirty: false },
        { length: 8 * K, dirty: true },
      ]);
      await assert.rejects(a.bitmaps.runs('nope', 0, 1, 1), (e: unknown) => e instanceof BlockError && e.code === 'ENOENT');
    } finally {
      await a.close();
      await b.close();
    }
  });

  test('granularity: a power of two from 512 dividing a chunk group', t, async () => {
    const a = await open(url(fresh(), '&chunk=4K&group=3'), 1 * M);
    try {
      for (const g of [256, 1000, 8 * K, 64 * K]) {
        await assert.rejects(a.bitmaps.apply([{ kind: 'add', name: 'x', granularity: g }]), (e: unknown) => {
          assert.ok(e instanceof RedisBitmapOpError);
          assert.equal(e.message, `granularity ${g} does not fit this Redis disk: a power of two that divides a chunk group (3 chunks of 4096 bytes) is needed (512 to 4096)`);
          return true;
        });
      }
      await a.bitmaps.apply([{ kind: 'add', name: 'x', granularity: 4 * K }, { kind: 'add', name: 'y', granularity: 512 }]);
      // A write spanning groups (12 KiB each) marks granules on both sides.
      await a.write(12 * K - 1, Buffer.alloc(2, 9));
      assert.deepEqual(await dirty(a, 'x'), [[8 * K, 8 * K]]);
      assert.deepEqual(await dirty(a, 'y'), [[12 * K - 512, 1024]]);
    } finally {
      await a.close();
    }
    // The default 64 KiB groups of 256 chunks take 512 to 16 MiB.
    const d = await open(url(fresh()), 64 * M);
    try {
      await d.bitmaps.apply([{ kind: 'add', name: 'big', granularity: 16 * M }]);
      await assert.rejects(d.bitmaps.apply([{ kind: 'add', name: 'huge', granularity: 32 * M }]), /\(512 to 16777216\)$/);
      await d.write(64 * M - 1, Buffer.alloc(1, 1));
      assert.deepEqual(await dirty(d, 'big'), [[48 * M, 16 * M]]);
    } finally {
      await d.close();
    }
  });

  test('enable, disable and checkpoint by one process apply to the next write of another', t, async () => {
    const disk = fresh();
    const a = await open(url(disk), 8 * M);
    const b = await open(url(disk));
    const admin = await open(url(disk));
    try {
      await admin.bitmaps.apply([{ kind: 'add', name: 'b0', granularity: 64 * K }]);
      await a.write(0, Buffer.alloc(1, 1));
      await admin.bitmaps.apply([{ kind: 'disable', name: 'b0' }]);
      await b.write(1 * M, Buffer.alloc(1, 1));
      await admin.bitmaps.apply([{ kind: 'enable', name: 'b0' }]);
      await b.write(2 * M, Buffer.alloc(1, 1));
      await admin.bitmaps.apply([{ kind: 'checkpoint', name: 'b1', granularity: 64 * K }]);
      await a.write(3 * M, Buffer.alloc(1, 1));
      await b.trim(4 * M, 64 * K);
      assert.deepEqual(await dirty(b, 'b0'), [
        [0, 64 * K],
        [2 * M, 64 * K],
      ]);
      assert.deepEqual(await dirty(a, 'b1'), [
        [3 * M, 64 * K],
        [4 * M, 64 * K],
      ]);
      assert.deepEqual(
        (await b.bitmaps.list()).map((x) => [x.name, x.enabled]),
        [
          ['b0', false],
          ['b1', true],
        ],
      );
    } finally {
      await Promise.all([a.close(), b.close(), admin.close()]);
    }
  });

  test('a checkpoint racing with writes from two instances: every write in exactly one bitmap', t, async () => {
    const disk = fresh();
    const a = await open(url(disk, '&chunk=4K&group=16'), 16 * M);
    const b = await open(url(disk));
    try {
      await a.bitmaps.apply([{ kind: 'add', name: 'old', granularity: 4 * K }]);
      // 2048 writes, each to its own 4 KiB granule, alternating instances, all in flight while the checkpoint runs.
      const writes: Promise<void>[] = [];
      let checkpoint: Promise<void> | undefined;
      for (let i = 0; i < 2048; i++) {
        writes.push((i % 2 === 0 ? a : b).write(i * 8 * K, Buffer.alloc(10, i & 255)));
        if (i === 1024) checkpoint = a.bitmaps.apply([{ kind: 'checkpoint', name: 'new', granularity: 4 * K }]);
      }
      await Promise.all([...writes, checkpoint]);
      const inOld = new Set((await dirty(a, 'old')).flatMap(([o, n]) => Array.from({ length: n / (4 * K) }, (_, k) => o + k * 4 * K)));
      const inNew = new Set((await dirty(b, 'new')).flatMap(([o, n]) => Array.from({ length: n / (4 * K) }, (_, k) => o + k * 4 * K)));
      for (let i = 0; i < 2048; i++) {
        const at = i * 8 * K;
        assert.ok(inOld.has(at) !== inNew.has(at), `write ${i} is in ${inOld.has(at) ? 'both' : 'neither'}`);
      }
      assert.equal(inOld.size + inNew.size, 2048);
      assert.ok(inOld.size > 0 && inNew.size > 0, 'the checkpoint fell among the writes');
    } finally {
      await a.close();
      await b.close();
    }
  });

  test('clear, remove, merge; all operations or none; bit keys of dropped bitmaps go', t, async () => {
    const disk = fresh();
    const a = await open(url(disk, '&chunk=4K&group=4'), 1 * M);
    try {
      await a.bitmaps.apply([
        { kind: 'add', name: 'x', granularity: 4 * K },
        { kind: 'add', name: 'y', granularity: 4 * K },
        { kind: 'add', name: 'z', granularity: 8 * K },
      ]);
      await a.write(0, Buffer.alloc(1));
      await a.bitmaps.apply([{ kind: 'disable', name: 'y' }]);
      await a.write(100 * K, Buffer.alloc(1));
      await assert.rejects(
        a.bitmaps.apply([
          { kind: 'remove', name: 'x' },
          { kind: 'merge', source: 'z', name: 'y' },
        ]),
        (e: unknown) => e instanceof RedisBitmapOpError && e.index === 1 && e.message === 'Bitmaps z and y have different granularities (8192 and 4096)',
      );
      await assert.rejects(a.bitmaps.apply([{ kind: 'add', name: 'w', granularity: 4 * K }, { kind: 'clear', name: 'nope' }]), (e: unknown) =>
        e instanceof RedisBitmapOpError && e.index === 1 && e.message === "Dirty bitmap 'nope' not found");
      await assert.rejects(a.bitmaps.apply([{ kind: 'add', name: 'x', granularity: 4 * K }]), /^BlockError: Bitmap already exists: x$|Bitmap already exists: x/);
      assert.deepEqual((await a.bitmaps.list()).map((b) => b.name), ['x', 'y', 'z'], 'nothing applied');
      assert.deepEqual(await dirty(a, 'x'), [
        [0, 4 * K],
        [100 * K, 4 * K],
      ]);
      // y misses the second write; merge x into y, then clear x.
      await a.bitmaps.apply([
        { kind: 'merge', source: 'x', name: 'y' },
        { kind: 'clear', name: 'x' },
      ]);
      assert.deepEqual(await dirty(a, 'y'), [
        [0, 4 * K],
        [100 * K, 4 * K],
      ]);
      assert.deepEqual(await dirty(a, 'x'), []);
      await a.write(200 * K, Buffer.alloc(1));
      assert.deepEqual(await dirty(a, 'x'), [[200 * K, 4 * K]], 'a cleared bitmap keeps tracking');
      await a.bitmaps.apply([{ kind: 'remove', name: 'x' }, { kind: 'remove', name: 'y' }, { kind: 'remove', name: 'z' }]);
      const keys = redis!.cli('--scan', '--pattern', `nbd:{${disk}*`).split('\n').filter((k) => k.includes(':bm:') || k.endsWith(':marks'));
      assert.deepEqual(keys, []);
    } finally {
      await a.close();
    }
  });
});

describe('Redis dirty bitmaps on a three-master cluster', { skip }, () => {
  let cluster: RedisCluster | undefined;
  before(async () => {
    if (available) cluster = await startCluster(3);
  });
  after(async () => {
    await cluster?.stop();
  });
  const url = (disk: string, params = '') => `redis+cluster://127.0.0.1:${cluster!.ports[0]},127.0.0.1:${cluster!.ports[1]}?disk=${disk}${params}`;

  test('bits spread over every shard; two instances mark and read alike; a racing checkpoint loses no write', t, async () => {
    const disk = fresh();
    const a = await open(url(disk, '&chunk=4K&group=2'), 4 * M);
    const b = await open(url(disk));
    try {
      await a.bitmaps.apply([{ kind: 'add', name: 'old', granularity: 4 * K }]);
      const writes: Promise<void>[] = [];
      let checkpoint: Promise<void> | undefined;
      for (let i = 0; i < 512; i++) {
        writes.push((i % 2 === 0 ? a : b).write(i * 8 * K, Buffer.alloc(10, 1)));
        if (i === 256) checkpoint = b.bitmaps.apply([{ kind: 'checkpoint', name: 'new', granularity: 4 * K }]);
      }
      await Promise.all([...writes, checkpoint]);
      const granules = async (n: RedisNode, name: string) =>
        new Set((await dirty(n, name)).flatMap(([o, len]) => Array.from({ length: len / (4 * K) }, (_, k) => o + k * 4 * K)));
      const inOld = await granules(a, 'old');
      const inNew = await granules(b, 'new');
      for (let i = 0; i < 512; i++) assert.ok(inOld.has(i * 8 * K) || inNew.has(i * 8 * K), `write ${i} lost`);
      assert.deepEqual([...(await granules(b, 'old'))], [...inOld]);
      await a.write(1, Buffer.alloc(1));
      assert.ok((await granules(b, 'new')).has(0));
      assert.ok(!(await granules(b, 'old')).has(0) || inOld.has(0));
      // Bit keys on every master.
      for (const port of cluster!.ports) assert.ok(cluster!.cli(port, '--scan', '--pattern', `nbd:{${disk}:*}:bm:*`).length > 0, `bits on ${port}`);
      await a.bitmaps.apply([{ kind: 'remove', name: 'old' }, { kind: 'remove', name: 'new' }]);
      for (const port of cluster!.ports) assert.equal(cluster!.cli(port, '--scan', '--pattern', `nbd:{${disk}:*}:bm:*`), '', `no bits left on ${port}`);
      await a.write(2, Buffer.alloc(1));
      for (const port of cluster!.ports) assert.equal(cluster!.cli(port, '--scan', '--pattern', `nbd:{${disk}:*}:bm:*`), '');
    } finally {
      await a.close();
      await b.close();
    }
  });
});
