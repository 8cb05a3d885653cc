// The -B side of Redis bitmaps against a real redis-server: contexts built
// with qemu-nbd's rules, status read from Redis at every query (so a write
// through another instance shows at once), the metrics count, and the
// operations' name checks.
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { RedisBitmapOpError } from '../block/redis-bitmaps.ts';
import { haveRedis, startRedis, type RedisProcess } from '../block/redis-test-server.ts';
import { parseRedisUrl } from '../block/redis-url.ts';
import { RedisNode } from '../block/redis.ts';
import { BitmapError } from './bitmaps.ts';
import { STATE_DIRTY } from './dirty-bitmap-context.ts';
import { applyRedisBitmapOps, listRedisBitmaps, redisBitmapContexts } from './redis-bitmaps.ts';

const available = haveRedis();
if (!available && process.env.IOTESTS_REQUIRE_CLIENTS === '1') throw new Error('redis-server is not installed');
const skip = available ? false : 'redis-server is not installed';
const K = 1024;

let redis: RedisProcess | undefined;
before(async () => {
  if (available) redis = await startRedis();
});
after(async () => {
  await redis?.stop();
});

describe('Redis bitmap contexts', { skip }, () => {
  test('qemu-nbd rules, status from Redis at every query, dirty bytes for metrics', { timeout: 60_000 }, async () => {
    const url = `redis+unix://${redis!.socket}?disk=ctx${process.pid}&chunk=4K&group=16`;
    const a = await RedisNode.open({ target: parseRedisUrl(url), size: 1024 * K });
    const b = await RedisNode.open({ target: parseRedisUrl(url) });
    try {
      await assert.rejects(applyRedisBitmapOps(a.bitmaps, [{ kind: 'add', name: '', granularity: 4 * K }]), (e: unknown) =>
        e instanceof RedisBitmapOpError && e.index === 0 && e.message === 'bitmap name must not be empty');
      await assert.rejects(applyRedisBitmapOps(a.bitmaps, [{ kind: 'add', name: 'x', granularity: 3000 }]), (e: unknown) =>
        e instanceof RedisBitmapOpError && e.message === 'Granularity must be power of 2 and at least 512');
      await applyRedisBitmapOps(a.bitmaps, [
        { kind: 'add', name: 'on', granularity: 4 * K },
        { kind: 'add', name: 'off', granularity: 4 * K },
        { kind: 'disable', name: 'off' },
      ]);
      await assert.rejects(redisBitmapContexts(a.bitmaps, ['nope'], false, true), (e: unknown) =>
        e instanceof BitmapError && e.message === "Bitmap 'nope' is not found");
      await assert.rejects(redisBitmapContexts(a.bitmaps, ['on'], true, true), (e: unknown) =>
        e instanceof BitmapError && e.message === "Enabled bitmap 'on' incompatible with readonly export");
      // A read-only instance may offer an enabled bitmap (others write), and a disabled one anywhere.
      assert.equal((await redisBitmapContexts(b.bitmaps, ['on'], true, false)).length, 1);
      assert.equal((await redisBitmapContexts(a.bitmaps, ['off'], true, true)).length, 1);

      const [ctx] = await redisBitmapContexts(a.bitmaps, ['on'], false, true);
      assert.equal(ctx!.name, 'qemu:dirty-bitmap:on');
      assert.deepEqual(await ctx!.status(0, 64 * K, 10), [{ length: 64 * K, flags: 0 }]);
      await b.write(8 * K + 1, Buffer.alloc(1, 1));
      assert.deepEqual(await ctx!.status(0, 64 * K, 10), [
        { length: 8 * K, flags: 0 },
        { length: 4 * K, flags: STATE_DIRTY },
        { length: 52 * K, flags: 0 },
      ]);
      // Metrics: the count made at one scrape is answered at the next.
      assert.equal(ctx!.bitmap.dirtyBytes(), 0);
      const until = Date.now() + 5000;
      while (ctx!.bitmap.dirtyBytes() === 0 && Date.now() < until) await new Promise((r) => setTimeout(r, 20));
      assert.equal(ctx!.bitmap.dirtyBytes(), 4 * K);
      assert.deepEqual(
        (await listRedisBitmaps(b.bitmaps)).map((x) => [x.name, x.enabled, x.dirtyBytes]),
        [
          ['on', true, 4 * K],
          ['off', false, 0],
        ],
      );
      // Removed while exported: the next query fails (NBD_EIO), never reports stale bits.
      await applyRedisBitmapOps(b.bitmaps, [{ kind: 'remove', name: 'on' }]);
      await assert.rejects(ctx!.status(0, 4 * K, 1), (e: unknown) => (e as { code?: string }).code === 'ENOENT');
    } finally {
      await a.close();
      await b.close();
    }
  });
});
