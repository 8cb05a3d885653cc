// The Redis block node against real redis-server processes: the shared
// conformance suite (standalone on a Unix socket, and a three-master
// cluster), several nodes on one disk, metadata checks, the allocation
// index, durability options, and faults (Redis killed, paused, unreachable).
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { pattern, runConformance } from './conformance.ts';
import { openBlockNode } from './open.ts';
import { parseRedisUrl, type RedisTarget } from './redis-url.ts';
import { keySlot, RedisNode } from './redis.ts';
import { freePort, haveRedis, startCluster, startRedis, type RedisCluster, type RedisProcess } from './redis-test-server.ts';
import { BlockError } from './types.ts';

const available = haveRedis();
if (!available && process.env.IOTESTS_REQUIRE_CLIENTS === '1') throw new Error('redis-server is not installed');
const skip = available ? false : 'redis-server is not installed';

let redis: RedisProcess | undefined;
let cluster: RedisCluster | undefined;
let seq = 0;

before(async () => {
  if (!available) return;
  redis = await startRedis();
});
after(async () => {
  await redis?.stop();
  await cluster?.stop();
});

function unixUrl(server: RedisProcess, disk: string, params = ''): string {
  return `redis+unix://${server.socket}?disk=${disk}${params}`;
}

async function open(url: string, extra: { size?: number; readOnly?: boolean } = {}): Promise<RedisNode> {
  return RedisNode.open({ target: parseRedisUrl(url), ...extra });
}

function fresh(): string {
  return `t${process.pid}-${++seq}`;
}

const t = { timeout: 60_000, skip };

if (available) {
  runConformance('RedisNode (Unix socket, 64 KiB chunks)', (size) => open(unixUrl(redis!, fresh()), { size }), {
    trimZeroes: true,
    reportsHoles: true,
    propertyRuns: 20,
  });
  runConformance('RedisNode (4 KiB chunks, 3 chunks per group)', (size) => open(unixUrl(redis!, fresh(), '&chunk=4K&group=3'), { size }), {
    trimZeroes: true,
    reportsHoles: true,
    propertyRuns: 20,
  });
  runConformance('Redis stack (openBlockNode, discard=unmap)', (size) =>
    openBlockNode({ kind: 'redis', target: parseRedisUrl(unixUrl(redis!, fresh(), '&chunk=4096')), size, discard: 'unmap' }), {
    trimZeroes: true,
    reportsHoles: true,
    propertyRuns: 10,
  });
}

describe('Redis URLs', () => {
  test('the forms', () => {
    let u = parseRedisUrl('redis://h.example:7000/3?disk=vm-1&size=1G&chunk=4K&group=16&wait=1&waittimeout=200&timeout=900');
    assert.deepEqual(
      [u.scheme, u.hosts, u.db, u.disk, u.size, u.chunkSize, u.groupChunks, u.wait, u.waitTimeoutMs, u.timeoutMs, u.tls, u.cluster],
      ['redis', [{ host: 'h.example', port: 7000 }], 3, 'vm-1', 2 ** 30, 4096, 16, 1, 200, 900, false, false],
    );
    u = parseRedisUrl('rediss://user:s%40cret@[::1]?disk=d');
    assert.deepEqual([u.tls, u.hosts, u.username, u.password, u.db, u.waitTimeoutMs], [true, [{ host: '::1', port: 6379 }], 'user', 's@cret', 0, 2500]);
    assert.equal(u.display, 'rediss://user:***@[::1]?disk=d');
    u = parseRedisUrl('redis+unix:///run/redis/redis.sock?disk=d&db=2&password=pw');
    assert.deepEqual([u.path, u.db, u.password, u.hosts], ['/run/redis/redis.sock', 2, 'pw', []]);
    assert.equal(u.display, 'redis+unix:///run/redis/redis.sock?disk=d&db=2&password=***');
    u = parseRedisUrl('redis+cluster://10.0.0.1:7000,10.0.0.2:7001,10.0.0.3?disk=d');
    assert.deepEqual(u.hosts, [
      { host: '10.0.0.1', port: 7000 },
      { host: '10.0.0.2', port: 7001 },
      { host: '10.0.0.3', port: 6379 },
    ]);
    assert.ok(u.cluster);
    assert.equal(parseRedisUrl('redis://secret@h?disk=d').password, 'secret');
  });

  test('mistakes are one-line EINVAL errors', () => {
    for (const [url, re] of [
      ['redis://h', /needs the disk's name/],
      ['redis://h?disk=a}b', /invalid disk name/],
      ['redis://h?disk=d&sise=1G', /unknown parameter 'sise'/],
      ['redis://h?disk=d&chunk=1000', /invalid chunk size/],
      ['redis://h?disk=d&size=1X', /invalid disk size/],
      ['redis://h:99999?disk=d', /invalid Redis port/],
      ['redis+unix://?disk=d', /needs the socket path/],
      ['redis+cluster://a:1,b:2/2?disk=d', /only database 0/],
      ['redis+tcp://h?disk=d', /unknown URL scheme/],
      ['redis://h?disk=d&ca=/x', /rediss:\/\//],
      ['redis://h?disk=d&disk=e', /given twice/],
    ] as const) {
      assert.throws(() => parseRedisUrl(url), (e: unknown) => e instanceof BlockError && e.code === 'EINVAL' && re.test(e.message) && !e.message.includes('\n'), url);
    }
  });

  test('key slots follow Redis (hash tags honoured)', () => {
    // Values from CLUSTER KEYSLOT.
    assert.equal(keySlot('foo'), 12182);
    assert.equal(keySlot('{user1000}.following'), keySlot('user1000'));
    assert.equal(keySlot('nbd:{d:7}:alloc'), keySlot('nbd:{d:7}:123'));
  });
});

describe('RedisNode', () => {
  test('metadata: created once, then checked; mismatches and missing disks refused', t, async () => {
    const disk = fresh();
    const url = unixUrl(redis!, disk, '&chunk=8K&group=8');
    await assert.rejects(open(unixUrl(redis!, disk)), (e: unknown) => e instanceof BlockError && e.code === 'ENOENT' && /does not exist.*--size/.test(e.message));
    await assert.rejects(open(unixUrl(redis!, disk), { size: 4096, readOnly: true }), /does not exist.*read-only/);
    const a = await open(url, { size: 1 << 20 });
    assert.deepEqual([a.size, a.chunkSize, a.groupChunks], [1 << 20, 8192, 8]);
    await a.close();
    const b = await open(unixUrl(redis!, disk));
    assert.deepEqual([b.size, b.chunkSize, b.groupChunks], [1 << 20, 8192, 8], 'an existing disk needs no parameters');
    await b.close();
    const c = await open(unixUrl(redis!, disk, '&size=1M'), { readOnly: true });
    assert.equal(c.capabilities.writable, false);
    await c.close();
    await assert.rejects(open(url, { size: 2 << 20 }), (e: unknown) => e instanceof BlockError && e.code === 'EINVAL' && /has size 1048576 bytes, not 2097152/.test(e.message));
    await assert.rejects(open(unixUrl(redis!, disk, '&chunk=64K')), /has chunk size 8192, not 65536/);
    await assert.rejects(open(unixUrl(redis!, disk, '&group=4')), /has 8 chunks per group, not 4/);
    assert.equal(redis!.cli('hgetall', `nbd:{${disk}}:meta`).split('\n').join(' '), 'format nbd-export-redis version 1 size 1048576 chunk 8192 group 8');
    redis!.cli('set', 'nbd:{other}:meta', 'x');
    await assert.rejects(open(unixUrl(redis!, 'other')), /WRONGTYPE/);
    redis!.cli('del', 'nbd:{other}:meta');
    redis!.cli('hset', 'nbd:{other}:meta', 'format', 'something');
    await assert.rejects(open(unixUrl(redis!, 'other')), /is not an nbd-export disk/);
  });

  test('keys: chunks and bitmap under one hash tag per group; zeroing drops them', t, async () => {
    const disk = fresh();
    const node = await open(unixUrl(redis!, disk, '&chunk=4K&group=4'), { size: 64 * 1024 });
    await node.write(4096 * 5 + 10, Buffer.from('hello'));
    await node.write(0, Buffer.alloc(4096, 1));
    const keys = redis!.cli('--scan', '--pattern', `nbd:{${disk}*`).split('\n').sort();
    assert.deepEqual(keys, [`nbd:{${disk}:0}:0`, `nbd:{${disk}:0}:alloc`, `nbd:{${disk}:1}:5`, `nbd:{${disk}:1}:alloc`, `nbd:{${disk}}:meta`]);
    assert.equal(redis!.cli('strlen', `nbd:{${disk}:1}:5`), '15', 'a partial chunk stores only what was written up to');
    // noHole keeps the allocation (bit) but drops the bytes.
    await node.writeZeroes(0, 4096, { noHole: true });
    assert.equal(redis!.cli('exists', `nbd:{${disk}:0}:0`), '0');
    assert.deepEqual(await node.extents(0, 8192), [
      { length: 4096, hole: false, zero: false },
      { length: 4096, hole: true, zero: true },
    ]);
    // Zeroing the written bytes of a partial chunk frees it.
    await node.trim(4096 * 5 + 8, 100);
    assert.equal(redis!.cli('exists', `nbd:{${disk}:1}:5`), '0');
    await node.writeZeroes(0, 64 * 1024);
    assert.deepEqual(redis!.cli('--scan', '--pattern', `nbd:{${disk}*`).split('\n'), [`nbd:{${disk}}:meta`]);
    await node.close();
  });

  test('two nodes on one disk: each sees the other at once, partial writes to one chunk never lose bytes', t, async () => {
    const disk = fresh();
    const a = await open(unixUrl(redis!, disk), { size: 8 << 20 });
    const b = await open(unixUrl(redis!, disk));
    try {
      for (let i = 0; i < 20; i++) {
        const data = pattern(1000 + i * 3001, i);
        const off = i * 300_007;
        await a.write(off, data);
        assert.ok((await b.read(off, data.length)).equals(data), `round ${i}: b reads what a wrote`);
        await b.writeZeroes(off + 10, 100);
        assert.ok((await a.read(off + 10, 100)).equals(Buffer.alloc(100)), `round ${i}: a reads b's zeroes`);
      }
      // Interleaved small writes into the same chunks from both nodes.
      const model = Buffer.alloc(65536 * 2);
      const writes: Promise<void>[] = [];
      for (let i = 0; i < 400; i++) {
        const node = i % 2 === 0 ? a : b;
        const off = (7 << 20) + i * 300 + (i % 7);
        const data = pattern(290, 1000 + i);
        data.copy(model, off - (7 << 20));
        writes.push(node.write(off, data));
      }
      await Promise.all(writes);
      const got = await a.read(7 << 20, model.length);
      assert.ok(got.equals(model), 'every byte of every concurrent write is there');
      assert.deepEqual(await a.extents(0, 8 << 20), await b.extents(0, 8 << 20));
    } finally {
      await a.close();
      await b.close();
    }
  });

  test('block status over a huge disk reads one bitmap per group, not the chunk keys', t, async () => {
    const disk = fresh();
    const node = await open(unixUrl(redis!, disk), { size: 2 ** 50 });
    await node.write(2 ** 40 + 5, Buffer.from('x'));
    await node.write(2 ** 40 + 65536 * 3, Buffer.from('y'));
    redis!.cli('config', 'resetstat');
    const runs = await node.extents(2 ** 40 - 65536 * 10, 2 ** 30);
    assert.deepEqual(runs, [
      { length: 65536 * 10, hole: true, zero: true },
      { length: 65536, hole: false, zero: false },
      { length: 65536 * 2, hole: true, zero: true },
      { length: 65536, hole: false, zero: false },
      { length: 2 ** 30 - 65536 * 14, hole: true, zero: true },
    ]);
    const stats = redis!.cli('info', 'commandstats');
    const calls = (name: string) => Number(new RegExp(`cmdstat_${name}:calls=(\\d+)`).exec(stats)?.[1] ?? 0);
    // 64 groups of 16 MiB: their bitmaps in one MGET (up to 128 per extents round).
    assert.equal(calls('mget'), 1, `bitmaps read by one MGET (${calls('mget')})`);
    assert.equal(calls('scan') + calls('keys') + calls('exists') + calls('get') + calls('getrange'), 0);
    // A whole-disk query is answered for a bounded prefix, not by walking 2^24 groups.
    const whole = await node.extents(0, 2 ** 50);
    const covered = whole.reduce((s, r) => s + r.length, 0);
    assert.ok(covered > 0 && covered <= 2 ** 50);
    // Zeroing a huge range drops only what is allocated.
    await node.writeZeroes(0, 2 ** 41);
    assert.deepEqual(await node.extents(2 ** 40, 2 ** 30), [{ length: 2 ** 30, hole: true, zero: true }]);
    await node.close();
  });

  test('zeroing a range of many groups is done in bounded steps, not under one timeout', t, async (ctx) => {
    // 512-byte chunks, one per group: 256 MiB is 524288 groups, so zeroing
    // it all reads 524288 bitmaps, one to two seconds on an idle machine.
    // Each step of the zeroing (at most 1024 keys, counted below) has its
    // own timeout. The timeout is generous because a loaded CI machine can
    // stall one step for over a second; the step count is what shows the
    // work was split.
    const disk = fresh();
    const size = 256 << 20;
    const writer = await open(unixUrl(redis!, disk, '&chunk=512&group=1'), { size });
    const node = await open(unixUrl(redis!, disk, '&timeout=5000'));
    try {
      const offsets: number[] = [];
      for (let i = 0; i < 300; i++) offsets.push(Math.floor((i * 223_211) % (size - 2048)));
      await Promise.all(offsets.map((off, i) => writer.write(off, pattern(1500, i))));
      redis!.cli('config', 'resetstat');
      const started = performance.now();
      await node.writeZeroes(0, size, { noHole: false });
      ctx.diagnostic(`zeroing 524288 groups took ${(performance.now() - started).toFixed(0)} ms`);
      const stats = redis!.cli('info', 'commandstats');
      const calls = (name: string) => Number(new RegExp(`cmdstat_${name}:calls=(\\d+)`).exec(stats)?.[1] ?? 0);
      assert.ok(calls('mget') >= size / 512 / 1024, 'bitmaps read by MGET, up to 1024 at once');
      assert.equal(calls('get') + calls('getrange') + calls('scan') + calls('keys'), 0, 'no chunk key read, no scan');
      for (const off of offsets) assert.ok((await writer.read(off, 1500)).equals(Buffer.alloc(1500)), `zeroes at ${off}`);
      assert.deepEqual(await writer.extents(0, 256 << 10), [{ length: 256 << 10, hole: true, zero: true }]);
      assert.deepEqual(redis!.cli('--scan', '--pattern', `nbd:{${disk}*`).split('\n'), [`nbd:{${disk}}:meta`]);
      // NO_HOLE over the same range: the allocation bits stay, the bytes go.
      await writer.write(4096, Buffer.alloc(512, 7));
      await node.writeZeroes(0, size, { noHole: true });
      assert.ok((await writer.read(4096, 512)).equals(Buffer.alloc(512)));
      assert.equal((await writer.extents(4096, 512))[0]?.hole, false);
    } finally {
      await node.close();
      await writer.close();
    }
  });

  test('FLUSH with wait=1 waits for a replica; fails with EIO without one', t, async () => {
    const port = await freePort();
    const master = await startRedis(['--port', String(port), '--bind', '127.0.0.1']);
    const replica = await startRedis(['--replicaof', '127.0.0.1', String(port)]);
    try {
      const until = Date.now() + 10_000;
      while (!/master_link_status:up/.test(replica.cli('info', 'replication'))) {
        assert.ok(Date.now() < until, 'the replica links up');
        await new Promise((r) => setTimeout(r, 50));
      }
      const node = await open(`redis://127.0.0.1:${port}?disk=w&size=1M&wait=1&waittimeout=300&timeout=2000`);
      await node.write(0, Buffer.from('durable'), { fua: true });
      await node.flush();
      assert.equal(replica.cli('getrange', 'nbd:{w:0}:0', '0', '6'), 'durable', 'the replica has the data after FUA');
      // Another process's write is covered by this one's flush.
      const other = await open(`redis://127.0.0.1:${port}?disk=w`);
      await other.write(100, Buffer.from('other'));
      await node.flush();
      assert.equal(replica.cli('getrange', 'nbd:{w:0}:0', '100', '104'), 'other');
      await other.close();
      await replica.kill();
      await assert.rejects(node.flush(), (e: unknown) => e instanceof BlockError && e.code === 'EIO' && /WAIT: 0 of 1 replicas/.test(e.message));
      await assert.rejects(node.write(0, Buffer.from('x'), { fua: true }), /WAIT/);
      await node.close().catch(() => {});
      // WAITAOF needs Redis 7.2.
      const version = /redis_version:(\d+\.\d+)/.exec(master.cli('info', 'server'))?.[1] ?? '';
      if (Number(version.split('.')[0]) === 7 && Number(version.split('.')[1]) < 2) {
        await assert.rejects(open(`redis://127.0.0.1:${port}?disk=w&waitaof=1`), /waitaof needs Redis 7.2 or later/);
      }
    } finally {
      await replica.stop();
      await master.stop();
    }
  });

  test('rediss:// with a CA file; an untrusted certificate is refused', t, async (tt) => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbd-redis-tls-'));
    try {
      const cert = path.join(dir, 'cert.pem');
      const key = path.join(dir, 'key.pem');
      const r = spawnSync('openssl', ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', key, '-out', cert, '-days', '1',
        '-subj', '/CN=localhost', '-addext', 'subjectAltName=IP:127.0.0.1,DNS:localhost'], { encoding: 'utf8', timeout: 20_000 });
      if (r.status !== 0) {
        tt.skip('openssl cannot make a certificate here');
        return;
      }
      const port = await freePort();
      const server = await startRedis(['--tls-port', String(port), '--tls-cert-file', cert, '--tls-key-file', key, '--tls-ca-cert-file', cert, '--tls-auth-clients', 'no']);
      try {
        const node = await open(`rediss://127.0.0.1:${port}?disk=tls&size=1M&ca=${cert}&timeout=2000`);
        await node.write(1000, Buffer.from('over TLS'));
        assert.equal((await node.read(1000, 8)).toString(), 'over TLS');
        await node.close();
        await assert.rejects(open(`rediss://127.0.0.1:${port}?disk=tls&timeout=2000`), (e: unknown) =>
          e instanceof BlockError && /^cannot connect to Redis at 127\.0\.0\.1:\d+: .*certificate/.test(e.message) && !e.message.includes('\n'));
      } finally {
        await server.stop();
      }
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  test("Redis's OOM refusal is ENOSPC", t, async () => {
    const small = await startRedis(['--maxmemory', '3mb', '--maxmemory-policy', 'noeviction']);
    try {
      const node = await open(unixUrl(small, 'oom'), { size: 64 << 20 });
      let error: unknown;
      for (let i = 0; i < 64 && error === undefined; i++) {
        try {
          await node.write(i << 20, pattern(1 << 20, i));
        } catch (err) {
          error = err;
        }
      }
      assert.ok(error instanceof BlockError && error.code === 'ENOSPC', `ENOSPC, not ${String(error)}`);
      await node.close();
    } finally {
      await small.stop();
    }
  });

  test('faults: EIO within the timeout while Redis is down or hung, service resumes by itself', t, async () => {
    const server = await startRedis(['--appendonly', 'yes', '--appendfsync', 'always']);
    const warnings: string[] = [];
    try {
      const node = await RedisNode.open({ target: parseRedisUrl(unixUrl(server, 'f', '&size=1M&timeout=500')), warn: (m) => warnings.push(m) });
      const data = pattern(70000, 3);
      await node.write(1000, data);

      const expectEio = async (what: string, p: Promise<unknown>) => {
        const start = Date.now();
        await assert.rejects(p, (e: unknown) => e instanceof BlockError && e.code === 'EIO', what);
        assert.ok(Date.now() - start < 3000, `${what} failed within the bound`);
      };
      const recovers = async () => {
        const until = Date.now() + 10_000;
        for (;;) {
          try {
            return await node.read(1000, data.length);
          } catch (err) {
            if (Date.now() > until) throw err;
            await new Promise((r) => setTimeout(r, 100));
          }
        }
      };

      await server.kill();
      await expectEio('read while down', node.read(0, 4096));
      await expectEio('write while down', node.write(0, Buffer.from('lost')));
      await expectEio('flush while down', node.flush());
      await expectEio('extents while down', node.extents(0, 1 << 20));
      await server.restart();
      assert.ok((await recovers()).equals(data), 'data back after Redis restarted (AOF)');
      await node.write(0, Buffer.from('again'));
      assert.equal((await node.read(0, 5)).toString(), 'again');

      server.pause();
      await expectEio('read while hung', node.read(0, 4096));
      await expectEio('write while hung', node.write(0, Buffer.from('stale')));
      server.resume();
      assert.ok((await recovers()).equals(data), 'data back after Redis resumed');
      await node.close();
      assert.ok(warnings.some((w) => /lost the connection to Redis/.test(w)), warnings.join('\n'));
      assert.ok(warnings.some((w) => /is back/.test(w)), warnings.join('\n'));
    } finally {
      await server.stop();
    }
  });

  test('startup with Redis unreachable fails quickly with a one-line message', t, async () => {
    const start = Date.now();
    await assert.rejects(open('redis+unix:///nonexistent/redis.sock?disk=d&size=1M&timeout=1000'), (e: unknown) =>
      e instanceof BlockError && e.message === 'cannot connect to Redis at /nonexistent/redis.sock: No such file or directory');
    const port = await freePort();
    await assert.rejects(open(`redis://127.0.0.1:${port}?disk=d&timeout=1000`), (e: unknown) =>
      e instanceof BlockError && e.message === `cannot connect to Redis at 127.0.0.1:${port}: Connection refused`);
    await assert.rejects(open(`redis+cluster://127.0.0.1:${port}?disk=d&timeout=1000`), (e: unknown) =>
      e instanceof BlockError && e.message.startsWith(`cannot connect to Redis at cluster 127.0.0.1:${port}:`) && !e.message.includes('\n'));
    assert.ok(Date.now() - start < 8000);
  });
});

describe('RedisNode on a three-master cluster', { skip }, () => {
  before(async () => {
    cluster = await startCluster(3);
  });
  const clusterUrl = (disk: string, params = '') => `redis+cluster://127.0.0.1:${cluster!.ports[0]},127.0.0.1:${cluster!.ports[1]}?disk=${disk}${params}`;

  runConformance('RedisNode (cluster, 4 KiB chunks, 2 per group)', (size) => open(clusterUrl(fresh(), '&chunk=4K&group=2'), { size }), {
    trimZeroes: true,
    reportsHoles: true,
    propertyRuns: 10,
  });

  test('one disk spreads over every master; two nodes see each other', t, async () => {
    const disk = fresh();
    const a = await open(clusterUrl(disk, '&chunk=4K&group=4&wait=0'), { size: 4 << 20 });
    const b = await open(clusterUrl(disk));
    try {
      const data = pattern(4 << 20, 5);
      await a.write(0, data);
      await a.flush();
      assert.ok((await b.read(0, 4 << 20)).equals(data));
      for (const port of cluster!.ports) {
        const keys = Number(cluster!.cli(port, 'dbsize'));
        assert.ok(keys > 20, `master ${port} holds part of the disk (${keys} keys)`);
      }
      await b.trim(4096, (4 << 20) - 8192);
      assert.deepEqual(await a.extents(0, 4 << 20), [
        { length: 4096, hole: false, zero: false },
        { length: (4 << 20) - 8192, hole: true, zero: true },
        { length: 4096, hole: false, zero: false },
      ]);
    } finally {
      await a.close();
      await b.close();
    }
  });

  test('resharding while serving: requests may fail with EIO, data read is never wrong', t, async (ctx) => {
    // One group per 4 KiB chunk, so the disk's keys sit in ~2048 slots over
    // every master; redis-cli moves 1500 slots (keys and all, by MIGRATE)
    // from the first master to the second while four loops write and read.
    const disk = fresh();
    const size = 8 << 20;
    const region = 64 << 10;
    const regions = size / region;
    const node = await open(clusterUrl(disk, '&chunk=4K&group=1&timeout=2000'), { size });
    const model = pattern(size, 11);
    await node.write(0, model);
    const [from, to] = [cluster!.ports[0]!, cluster!.ports[1]!];
    const keysBefore = Number(cluster!.cli(to, 'dbsize'));
    const reshard = spawn(
      '/usr/bin/redis-cli',
      ['--cluster', 'reshard', `127.0.0.1:${from}`, '--cluster-from', cluster!.cli(from, 'cluster', 'myid'),
        '--cluster-to', cluster!.cli(to, 'cluster', 'myid'), '--cluster-slots', '1500', '--cluster-yes'],
      { stdio: ['ignore', 'ignore', 'pipe'] },
    );
    let stderr = '';
    reshard.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    let running = true;
    const done = new Promise<number | null>((resolve) => reshard.on('exit', (code) => {
      running = false;
      resolve(code);
    }));
    const counts = { reads: 0, writes: 0, eio: 0, wrong: 0 };
    const loop = async (k: number) => {
      for (let round = 0; running || round < 3; round++) {
        // Each loop owns the regions congruent to k mod 4: nobody else writes them.
        const r = k + 4 * ((round * 7 + k) % (regions / 4));
        const off = r * region;
        if (round % 3 === 0) {
          const data = pattern(region, 1000 * k + round);
          // A failed write may have landed in part: retry until one succeeds, so the model is exact again.
          for (let attempt = 0; ; attempt++) {
            try {
              await node.write(off, data);
              break;
            } catch (err) {
              assert.ok(err instanceof BlockError && err.code === 'EIO', String(err));
              counts.eio++;
              if (attempt % 20 === 0) ctx.diagnostic(`write ${off}: ${(err as Error).message} (running ${running})`);
              assert.ok(attempt < 100, 'a write succeeds again within 100 attempts');
              await new Promise((res) => setTimeout(res, 50));
            }
          }
          data.copy(model, off);
          counts.writes++;
        } else {
          try {
            const got = await node.read(off, region);
            if (!got.equals(model.subarray(off, off + region))) counts.wrong++;
            counts.reads++;
          } catch (err) {
            assert.ok(err instanceof BlockError && err.code === 'EIO', String(err));
            counts.eio++;
          }
        }
      }
    };
    try {
      await Promise.all([0, 1, 2, 3].map(loop));
      assert.equal(await done, 0, `redis-cli --cluster reshard: ${stderr}`);
      ctx.diagnostic(`during the reshard: ${counts.reads} reads, ${counts.writes} writes, ${counts.eio} EIO`);
      assert.equal(counts.wrong, 0, 'no read returned wrong data');
      assert.ok(counts.reads > 0 && counts.writes > 0);
      assert.ok(Number(cluster!.cli(to, 'dbsize')) > keysBefore, 'keys of the disk moved to the second master');
      assert.ok((await node.read(0, size)).equals(model), 'the whole disk reads back as written, after the reshard');
      const other = await open(clusterUrl(disk));
      assert.ok((await other.read(0, size)).equals(model), 'and through a node opened afterwards');
      await other.close();
    } finally {
      if (running) reshard.kill('SIGKILL');
      await node.close();
    }
  });
});
