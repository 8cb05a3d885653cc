import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { describe, test } from 'node:test';
import crypto from 'node:crypto';
import {
  NBD_CMD_DISC,
  NBD_CMD_FLUSH,
  NBD_CMD_READ,
  NBD_CMD_WRITE,
  NBD_OPT_GO,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_REP_ACK,
  NBD_REPLY_TYPE_OFFSET_DATA,
} from '../protocol/constants.ts';
import type { FileSlice } from '../exports/export.ts';
import { lstr, requestBytes, u16, u32 } from '../protocol/test-helpers.ts';
import { OBSERVE_DONE, subscribe } from './events.ts';
import { NbdServer } from './server.ts';
import { FakeNode, makeExport, optionBytes, parseChunks, parseOptionReplies, parseSimpleReply, registryOf, waitFor } from './test-helpers.ts';
import { sendfileAvailable } from './sendfile.ts';
import { MemoryNode } from '../block/memory.ts';
import { Export } from '../exports/export.ts';

const t = { timeout: 5_000 };
const GREETING = '4e42444d4147494349484156454f50540003';

/** A raw client that records every byte it receives. */
interface RawClient {
  socket: net.Socket;
  received(): Buffer;
  /** Resolves once at least `n` bytes have arrived; rejects after `ms`. */
  waitBytes(n: number, ms?: number): Promise<Buffer>;
  closed: Promise<void>;
}

function connect(socketPath: string): Promise<RawClient> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    const socket = net.connect({ path: socketPath });
    const closed = new Promise<void>((r) => socket.once('close', () => r()));
    socket.on('data', (c: Buffer) => chunks.push(c));
    socket.once('error', reject);
    socket.once('connect', () =>
      resolve({
        socket,
        closed,
        received: () => Buffer.concat(chunks),
        waitBytes: async (n, ms = 2000) => {
          const deadline = Date.now() + ms;
          while (Buffer.concat(chunks).length < n) {
            if (Date.now() > deadline) throw new Error(`timed out waiting for ${n} bytes`);
            await new Promise((r) => setTimeout(r, 5));
          }
          return Buffer.concat(chunks);
        },
      }),
    );
  });
}

async function withServer(
  opts: { maxConnections: number; persistent: boolean; socketReader?: boolean },
  body: (server: NbdServer, socketPath: string, clients: RawClient[]) => Promise<void>,
): Promise<void> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbd-export-server-test-'));
  const socketPath = path.join(dir, 'nbd.sock');
  const server = new NbdServer({
    exports: registryOf(makeExport({ name: 'a' })),
    maxConnections: opts.maxConnections,
    persistent: opts.persistent,
    handshakeLimitMs: 0,
    socketReader: opts.socketReader,
  });
  const clients: RawClient[] = [];
  try {
    await server.listenUnix(socketPath);
    await body(server, socketPath, clients);
  } finally {
    for (const c of clients) c.socket.destroy();
    await server.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** A server of export 'a' on `node` and a client past NBD_OPT_GO; both gone, with their files, once `body` ends. */
async function withGoClient(node: FakeNode, socketReader: boolean, body: (client: RawClient) => Promise<void>): Promise<void> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbd-export-server-test-'));
  const socketPath = path.join(dir, 'nbd.sock');
  const server = new NbdServer({ exports: registryOf(makeExport({ name: 'a', node })), maxConnections: 0, persistent: true, handshakeLimitMs: 0, socketReader });
  let client: RawClient | undefined;
  try {
    await server.listenUnix(socketPath);
    client = await connect(socketPath);
    await client.waitBytes(18);
    client.socket.write(Buffer.concat([u32(3), optionBytes(NBD_OPT_GO, Buffer.concat([lstr('a'), u16(0)]))]));
    await client.waitBytes(18 + 86);
    await body(client);
  } finally {
    client?.socket.destroy();
    await server.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

/** What a non-blocking socket descriptor holds now, without waiting. */
function readReady(fd: number): Buffer {
  const buf = Buffer.alloc(64 * 1024);
  try {
    return buf.subarray(0, fs.readSync(fd, buf));
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'EAGAIN') return Buffer.alloc(0);
    throw err;
  }
}

describe('NbdServer on a Unix socket', () => {
  test('maxConnections 1: a second client gets no greeting until the first leaves', t, async () => {
    await withServer({ maxConnections: 1, persistent: true }, async (server, socketPath, clients) => {
      const first = await connect(socketPath);
      clients.push(first);
      assert.equal((await first.waitBytes(18)).toString('hex'), GREETING);

      const second = await connect(socketPath);
      clients.push(second);
      await sleep(300);
      assert.equal(second.received().length, 0, 'held before the greeting');
      assert.equal(server.connections.size, 1);

      first.socket.end();
      await first.closed;
      assert.equal((await second.waitBytes(18)).toString('hex'), GREETING);
      assert.equal(server.connections.size, 1);
    });
  });

  test('a waiting client that gives up does not take the slot', t, async () => {
    await withServer({ maxConnections: 1, persistent: true }, async (_server, socketPath, clients) => {
      const first = await connect(socketPath);
      const quitter = await connect(socketPath);
      const third = await connect(socketPath);
      clients.push(first, quitter, third);
      await first.waitBytes(18);
      quitter.socket.destroy();
      await quitter.closed;
      await sleep(50);
      first.socket.end();
      assert.equal((await third.waitBytes(18)).toString('hex'), GREETING);
    });
  });

  for (const socketReader of [true, false]) {
    const how = socketReader ? 'socket reader' : "'data' events";
    test(`a waiting client that gives up leaves the queue at once (${how})`, t, async () => {
      await withServer({ maxConnections: 1, persistent: true, socketReader }, async (server, socketPath, clients) => {
        const first = await connect(socketPath);
        const quitter = await connect(socketPath);
        clients.push(first, quitter);
        await first.waitBytes(18);
        await waitFor(() => server.waiting === 1, 2000, 'one client waiting');
        quitter.socket.destroy();
        await waitFor(() => server.waiting === 0, 2000, 'the quitter gone from the queue');
      });
    });

    test(`what a waiting client sends before its greeting is parsed once it is admitted (${how})`, t, async () => {
      await withServer({ maxConnections: 1, persistent: true, socketReader }, async (server, socketPath, clients) => {
        const first = await connect(socketPath);
        const eager = await connect(socketPath);
        clients.push(first, eager);
        await first.waitBytes(18);
        await waitFor(() => server.waiting === 1, 2000, 'one client waiting');
        // Flags and NBD_OPT_GO before any greeting (a client that does not wait for it).
        eager.socket.write(Buffer.concat([u32(3), optionBytes(NBD_OPT_GO, Buffer.concat([lstr('a'), u16(0)]))]));
        await sleep(50);
        assert.equal(eager.received().length, 0, 'no greeting while waiting');
        first.socket.end();
        const got = await eager.waitBytes(18 + 86);
        assert.equal(got.subarray(0, 18).toString('hex'), GREETING);
        assert.deepEqual(parseOptionReplies(got.subarray(18, 18 + 86)).map((r) => r.type), [3, 3, 1]);
      });
    });
  }

  test('a waiting client that sends more than 64 KiB before its greeting is dropped', t, async () => {
    await withServer({ maxConnections: 1, persistent: true }, async (server, socketPath, clients) => {
      const first = await connect(socketPath);
      const flood = await connect(socketPath);
      clients.push(first, flood);
      await first.waitBytes(18);
      await waitFor(() => server.waiting === 1, 2000, 'one client waiting');
      flood.socket.write(Buffer.alloc(100 * 1024));
      await Promise.race([flood.closed, sleep(2000).then(() => assert.fail('the flooding client was not dropped'))]);
      assert.equal(server.waiting, 0);
    });
  });

  test("persistent: false emits 'idle' after the last client leaves", t, async () => {
    await withServer({ maxConnections: 0, persistent: false }, async (server, socketPath, clients) => {
      let idle = 0;
      server.on('idle', () => idle++);
      const a = await connect(socketPath);
      const b = await connect(socketPath);
      clients.push(a, b);
      await a.waitBytes(18);
      await b.waitBytes(18);
      assert.equal(idle, 0, 'not before any client has left');
      a.socket.end();
      await a.closed;
      await sleep(50);
      assert.equal(idle, 0, 'not while a client remains');
      const gotIdle = new Promise<void>((r) => server.once('idle', () => r()));
      b.socket.end();
      await Promise.race([gotIdle, sleep(2000).then(() => assert.fail("no 'idle' event"))]);
      assert.equal(idle, 1);
    });
  });

  test("persistent: true never emits 'idle'", t, async () => {
    await withServer({ maxConnections: 0, persistent: true }, async (server, socketPath) => {
      let idle = 0;
      server.on('idle', () => idle++);
      const a = await connect(socketPath);
      await a.waitBytes(18);
      a.socket.end();
      await a.closed;
      await sleep(100);
      assert.equal(idle, 0);
    });
  });

  test('close() removes the socket file and drops connected and waiting clients', t, async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbd-export-server-test-'));
    const socketPath = path.join(dir, 'nbd.sock');
    const server = new NbdServer({ exports: registryOf(makeExport({ name: 'a' })), maxConnections: 1, persistent: true, handshakeLimitMs: 0 });
    const clients: RawClient[] = [];
    try {
      await server.listenUnix(socketPath);
      assert.ok(fs.statSync(socketPath).isSocket());
      clients.push(await connect(socketPath), await connect(socketPath));
      await clients[0]!.waitBytes(18);
      await server.close();
      assert.equal(fs.existsSync(socketPath), false, 'socket file removed');
      await Promise.race([Promise.all(clients.map((c) => c.closed)), sleep(2000).then(() => assert.fail('clients not dropped'))]);
      assert.equal(server.connections.size, 0);
    } finally {
      for (const c of clients) c.socket.destroy();
      await server.close();
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  test('end to end: GO, pipelined WRITE and READ, DISC; the server then closes', t, async () => {
    const node = new FakeNode(1024 * 1024);
    node.fill(4096, Buffer.from('wxyz'));
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbd-export-server-test-'));
    const socketPath = path.join(dir, 'nbd.sock');
    const server = new NbdServer({ exports: registryOf(makeExport({ name: 'a', node })), maxConnections: 0, persistent: true, handshakeLimitMs: 0 });
    let client: RawClient | undefined;
    try {
      await server.listenUnix(socketPath);
      client = await connect(socketPath);
      await client.waitBytes(18);
      client.socket.write(
        Buffer.concat([
          u32(3),
          optionBytes(NBD_OPT_GO, Buffer.concat([lstr('a'), u16(0)])),
          requestBytes({ type: NBD_CMD_WRITE, cookie: 1n, offset: 0, length: 4 }),
          Buffer.from('abcd'),
          requestBytes({ type: NBD_CMD_READ, cookie: 2n, offset: 4096, length: 4 }),
          requestBytes({ type: NBD_CMD_DISC, cookie: 3n, offset: 0, length: 0 }),
        ]),
      );
      await Promise.race([client.closed, sleep(2000).then(() => assert.fail('server did not close after DISC'))]);
      const got = client.received();
      assert.equal(got.subarray(0, 18).toString('hex'), GREETING);
      const options = got.subarray(18, 18 + 86);
      assert.deepEqual(
        parseOptionReplies(options).map((r) => [r.option, r.type, r.data.toString('hex')]),
        [
          [NBD_OPT_GO, 3, '0003' + '00000001' + '00001000' + '02000000'],
          [NBD_OPT_GO, 3, '0000' + '0000000000100000' + '0c6d'],
          [NBD_OPT_GO, 1, ''],
        ],
      );
      // Two simple replies, in either order; the read's carries 4 bytes.
      const rest = got.subarray(18 + 86);
      assert.equal(rest.length, 16 + 16 + 4);
      const first = parseSimpleReply(rest.subarray(0, rest.readBigUInt64BE(8) === 2n ? 20 : 16));
      const second = parseSimpleReply(rest.subarray(first.cookie === 2n ? 20 : 16));
      const byCookie = new Map([first, second].map((r) => [r.cookie, r]));
      assert.deepEqual([...byCookie.keys()].sort(), [1n, 2n]);
      assert.equal(byCookie.get(1n)!.error, 0);
      assert.equal(byCookie.get(1n)!.data.length, 0);
      assert.equal(byCookie.get(2n)!.error, 0);
      assert.equal(byCookie.get(2n)!.data.toString(), 'wxyz');
      assert.equal(node.data.subarray(0, 4).toString(), 'abcd');
    } finally {
      client?.socket.destroy();
      await server.close();
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  for (const socketReader of [true, false]) {
    test(`large and small pipelined writes arrive intact (${socketReader ? 'socket reader' : "'data' events"})`, t, async () => {
      const node = new FakeNode(4 * 1024 * 1024);
      await withGoClient(node, socketReader, async (client) => {
        const expected = Buffer.alloc(node.size);
        const sizes = [300 * 1024, 4096, 1, 1024 * 1024 + 7, 65536, 512, 2 * 1024 * 1024 - 13, 100];
        let offset = 0;
        const stream: Buffer[] = [];
        sizes.forEach((length, i) => {
          const payload = Buffer.alloc(length);
          for (let j = 0; j < length; j++) payload[j] = (j * 31 + i) & 0xff;
          payload.copy(expected, offset);
          stream.push(requestBytes({ type: NBD_CMD_WRITE, cookie: BigInt(i + 1), offset, length }), payload);
          offset += length;
        });
        // In uneven pieces, so payloads straddle socket reads.
        const all = Buffer.concat(stream);
        for (let at = 0; at < all.length; at += 77_777) client.socket.write(all.subarray(at, at + 77_777));
        await client.waitBytes(18 + 86 + 16 * sizes.length, 4000);
        const replies = client.received().subarray(18 + 86);
        for (let i = 0; i < sizes.length; i++) assert.equal(parseSimpleReply(replies.subarray(i * 16, i * 16 + 16)).error, 0);
        assert.ok(node.data.equals(expected), 'every byte where it was written');
      });
    });
  }

  // Writes and reads the node does at once (writeNow, readNow) all run in
  // one turn of the event loop; the client must not wait for that turn's
  // end to see the first replies to a run of writes.
  const batches = [
    { kinds: 'wwwwwwwwwwww', seen: 8 * 16, why: 'the first eight replies were with the client before the twelfth write' },
    { kinds: 'wwwwwwwrwwww', seen: 0, why: 'a reply with data starts the count of status replies again' },
  ];
  for (const socketReader of [true, false]) {
    for (const { kinds, seen, why } of batches) {
      test(`status replies leave in eights while the rest of a batch is parsed: ${kinds} (${socketReader ? 'socket reader' : "'data' events"})`, t, async () => {
        const last = (kinds.length - 1) * 512;
        let seenAtLast: Buffer | undefined;
        let clientFd = -1;
        class NowNode extends FakeNode {
          writeNow(offset: number, data: Buffer): boolean {
            if (offset === last) seenAtLast = readReady(clientFd);
            this.fill(offset, data);
            return true;
          }
          readNow(offset: number, length: number): Buffer {
            return Buffer.from(this.data.subarray(offset, offset + length));
          }
        }
        const node = new NowNode(64 * 1024);
        await withGoClient(node, socketReader, async (client) => {
          // From here the test reads the client's socket itself, without blocking.
          // (pause() alone lets Node read on up to its high-water mark.)
          client.socket.pause();
          const handle = (client.socket as unknown as { _handle: { fd: number; readStop(): number } })._handle;
          handle.readStop();
          clientFd = handle.fd;
          const requests: Buffer[] = [];
          [...kinds].forEach((kind, i) => {
            const offset = i * 512;
            if (kind === 'w') requests.push(requestBytes({ type: NBD_CMD_WRITE, cookie: BigInt(i + 1), offset, length: 512 }), Buffer.alloc(512, i + 1));
            else requests.push(requestBytes({ type: NBD_CMD_READ, cookie: BigInt(i + 1), offset, length: 512 }));
          });
          client.socket.write(Buffer.concat(requests));
          await waitFor(() => seenAtLast !== undefined);
          const total = kinds.length * 16 + kinds.replaceAll('w', '').length * 512;
          let replies = seenAtLast!;
          const deadline = Date.now() + 2000;
          while (replies.length < total && Date.now() < deadline) {
            replies = Buffer.concat([replies, readReady(clientFd)]);
            await sleep(5);
          }
          assert.equal(seenAtLast!.length, seen, why);
          assert.equal(replies.length, total);
          let at = 0;
          [...kinds].forEach((kind, i) => {
            const length = kind === 'w' ? 16 : 16 + 512;
            const r = parseSimpleReply(replies.subarray(at, at + length));
            assert.deepEqual([r.cookie, r.error, r.data.length], [BigInt(i + 1), 0, length - 16]);
            at += length;
          });
          assert.equal(node.data[last], kinds.length);
        });
      });
    }
  }

  test('listenUnix replaces a stale socket file', t, async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbd-export-server-test-'));
    const socketPath = path.join(dir, 'nbd.sock');
    // A socket file nobody listens on: bind, then drop the listener without unlinking.
    const stale = net.createServer();
    const server = new NbdServer({ exports: registryOf(makeExport({ name: 'a' })), maxConnections: 0, persistent: true, handshakeLimitMs: 0 });
    try {
      await new Promise<void>((r) => stale.listen(socketPath, () => r()));
      // Rename away and back, so closing the listener does not unlink our path.
      fs.renameSync(socketPath, socketPath + '.tmp');
      await new Promise<void>((r) => stale.close(() => r()));
      fs.renameSync(socketPath + '.tmp', socketPath);
      assert.ok(fs.statSync(socketPath).isSocket());
      await server.listenUnix(socketPath);
      const c = await connect(socketPath);
      try {
        assert.equal((await c.waitBytes(18)).toString('hex'), GREETING);
      } finally {
        c.socket.destroy();
      }
    } finally {
      await server.close();
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  test('events: accepted, refused (limit, protocol error), negotiation results, requests, closes', t, async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbd-export-server-test-'));
    const socketPath = path.join(dir, 'nbd.sock');
    const server = new NbdServer({
      exports: registryOf(makeExport({ name: 'a' })),
      maxConnections: 1,
      maxWaiting: 0,
      persistent: true,
      handshakeLimitMs: 0,
    });
    // Channels are process-wide: let the connections of earlier tests finish closing.
    await sleep(200);
    const seen: string[] = [];
    const stops = [
      subscribe('accepted', (m) => seen.push(`accepted ${m.transport}`)),
      subscribe('refused', (m) => seen.push(`refused ${m.reason}`)),
      subscribe('negotiation', (m) => seen.push(`negotiation ${m.result} ${m.export ?? '-'}`)),
      subscribe('requestDone', (m) => seen.push(`request ${m.command} ${m.error} ${m.bytes} ${m.start > 0 && m.end >= m.start}`)),
      subscribe('closed', (m) => seen.push(`closed ${m.cause} ${m.export ?? '-'}`)),
    ];
    const clients: RawClient[] = [];
    try {
      await server.listenUnix(socketPath);
      assert.equal(server.observing(), OBSERVE_DONE);
      // GO, a write, DISC; while it is connected a second client is refused (no waiting room).
      const a = await connect(socketPath);
      clients.push(a);
      await a.waitBytes(18);
      const b = await connect(socketPath);
      clients.push(b);
      await Promise.race([b.closed, sleep(2000).then(() => assert.fail('second client not refused'))]);
      a.socket.write(
        Buffer.concat([
          u32(3),
          optionBytes(NBD_OPT_GO, Buffer.concat([lstr('a'), u16(0)])),
          requestBytes({ type: NBD_CMD_WRITE, cookie: 1n, offset: 0, length: 4 }),
          Buffer.from('abcd'),
          requestBytes({ type: NBD_CMD_DISC, cookie: 2n, offset: 0, length: 0 }),
        ]),
      );
      await a.closed;
      // A bad option magic is a protocol error.
      const c = await connect(socketPath);
      clients.push(c);
      await c.waitBytes(18);
      c.socket.write(Buffer.concat([u32(3), Buffer.from('IHAVEOPX'), u32(3), u32(0)]));
      await c.closed;
      await waitFor(() => seen.filter((e) => e.startsWith('closed')).length === 2);
      assert.deepEqual(seen, [
        'accepted unix',
        'accepted unix',
        'refused limit',
        'negotiation go a',
        // DISC is reported as it is parsed; the write once the node has it.
        `request ${NBD_CMD_DISC} 0 0 true`,
        `request ${NBD_CMD_WRITE} 0 4 true`,
        'closed disc a',
        'accepted unix',
        'negotiation failed -',
        'refused protocol_error',
        'closed protocol_error -',
      ]);
    } finally {
      for (const stop of stops) stop();
      for (const c of clients) c.socket.destroy();
      await server.close();
      fs.rmSync(dir, { recursive: true, force: true });
    }
    assert.equal(server.observing(), 0, 'nobody listens any more');
  });
});

/** A FakeNode whose bytes are also in a file, which it offers as file slices (as FileNode does for cached data). */
class SlicingNode extends FakeNode {
  readonly fd: number;
  slices = 0;
  released = 0;
  constructor(file: string, size: number) {
    super(size);
    this.fill(0, crypto.randomBytes(size));
    fs.writeFileSync(file, this.data);
    this.fd = fs.openSync(file, 'r');
  }
  fileSlice(offset: number, length: number): FileSlice {
    this.slices++;
    let done = false;
    return {
      fd: this.fd,
      position: offset,
      length,
      release: () => {
        assert.equal(done, false, 'released once');
        done = true;
        this.released++;
      },
    };
  }
}

/** Read replies from `buf` (after negotiation): cookie -> data, for simple or structured replies of known lengths. */
function readReplies(buf: Buffer, lengths: Map<bigint, number>, structured: boolean): Map<bigint, Buffer> {
  const out = new Map<bigint, Buffer>();
  let at = 0;
  while (at < buf.length) {
    if (structured) {
      const [chunk] = parseChunks(buf.subarray(at, at + 20 + buf.readUInt32BE(at + 16)));
      assert.equal(chunk!.type, NBD_REPLY_TYPE_OFFSET_DATA, 'one data chunk per read');
      out.set(chunk!.cookie, chunk!.payload.subarray(8));
      at += 20 + chunk!.payload.length;
    } else {
      const cookie = buf.readBigUInt64BE(at + 8);
      const length = lengths.get(cookie)!;
      const reply = parseSimpleReply(buf.subarray(at, at + 16 + length));
      assert.equal(reply.error, 0);
      out.set(cookie, reply.data);
      at += 16 + length;
    }
  }
  return out;
}

describe('reply space, shared by every connection', () => {
  for (const rawSockets of [true, false]) {
    test(`small reads on four connections, one of them not reading for a while: every reply carries its own bytes (${rawSockets ? 'Wire' : 'net.Socket'})`, { timeout: 20_000 }, async () => {
      // Replies to small reads are built in blocks that a connection hands
      // back once its replies are with the kernel; the others then build in
      // them. The stalled client's replies wait in its socket meanwhile, and
      // must not be overwritten before they are sent.
      const SIZE = 4 * 1024 * 1024;
      const node = new MemoryNode(SIZE);
      const data = crypto.randomBytes(SIZE);
      await node.write(0, data);
      const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbd-export-server-test-'));
      const socketPath = path.join(dir, 'nbd.sock');
      const server = new NbdServer({ exports: registryOf(new Export({ name: 'a', node, multiConn: true })), maxConnections: 0, persistent: true, handshakeLimitMs: 0, rawSockets });
      const clients: RawClient[] = [];
      try {
        await server.listenUnix(socketPath);
        for (let i = 0; i < 4; i++) {
          const c = await connect(socketPath);
          clients.push(c);
          await c.waitBytes(18);
          c.socket.write(Buffer.concat([u32(3), optionBytes(NBD_OPT_GO, Buffer.concat([lstr('a'), u16(0)]))]));
          await c.waitBytes(18 + 86);
        }
        const base = clients.map((c) => c.received().length);
        const READS = 1500;
        const plans = clients.map(() =>
          Array.from({ length: READS }, (_, i) => ({ cookie: BigInt(i), offset: crypto.randomInt(SIZE / 512 - 16) * 512, length: 512 * (1 + crypto.randomInt(16)) })),
        );
        clients[0]!.socket.pause();
        plans.forEach((plan, i) => clients[i]!.socket.write(Buffer.concat(plan.map((r) => requestBytes({ type: NBD_CMD_READ, ...r })))));
        const expected = plans.map((plan) => plan.reduce((n, r) => n + 16 + r.length, 0));
        await Promise.all([1, 2, 3].map((i) => clients[i]!.waitBytes(base[i]! + expected[i]!, 15_000)));
        await sleep(50);
        clients[0]!.socket.resume();
        await clients[0]!.waitBytes(base[0]! + expected[0]!, 15_000);
        clients.forEach((c, i) => {
          const replies = readReplies(c.received().subarray(base[i]!), new Map(plans[i]!.map((r) => [r.cookie, r.length])), false);
          assert.equal(replies.size, READS);
          for (const r of plans[i]!) assert.ok(replies.get(r.cookie)!.equals(data.subarray(r.offset, r.offset + r.length)), `client ${i} read ${r.cookie}`);
        });
      } finally {
        for (const c of clients) c.socket.destroy();
        await server.close();
        fs.rmSync(dir, { recursive: true, force: true });
      }
    });
  }
});

describe('large reads by sendfile', () => {
  for (const structured of [false, true]) {
    test(`${structured ? 'structured' : 'simple'} replies carry the file's bytes; small reads stay buffers`, t, async (ctx) => {
      if (!sendfileAvailable()) return ctx.skip('sendfile through koffi is not available here');
      const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbd-export-server-test-'));
      const socketPath = path.join(dir, 'nbd.sock');
      const node = new SlicingNode(path.join(dir, 'img'), 8 * 1024 * 1024);
      const server = new NbdServer({ exports: registryOf(makeExport({ name: 'a', node })), maxConnections: 0, persistent: true, handshakeLimitMs: 0 });
      const clients: RawClient[] = [];
      try {
        await server.listenUnix(socketPath);
        const negotiate = async (): Promise<{ c: RawClient; base: number }> => {
          const c = await connect(socketPath);
          clients.push(c);
          await c.waitBytes(18);
          const opts = [u32(3)];
          if (structured) opts.push(optionBytes(NBD_OPT_STRUCTURED_REPLY));
          opts.push(optionBytes(NBD_OPT_GO, Buffer.concat([lstr('a'), u16(0)])));
          c.socket.write(Buffer.concat(opts));
          // Option replies end with GO's ACK.
          for (;;) {
            const got = c.received().subarray(18);
            try {
              const replies = parseOptionReplies(got);
              const last = replies[replies.length - 1];
              if (last?.option === NBD_OPT_GO && last.type === NBD_REP_ACK) return { c, base: 18 + got.length };
            } catch {
              // torn: more is coming
            }
            await sleep(5);
          }
        };
        const { c, base } = await negotiate();
        const reads = [
          { cookie: 1n, offset: 0, length: 1024 * 1024 },
          { cookie: 2n, offset: 12345, length: 4096 },
          { cookie: 3n, offset: 3 * 1024 * 1024 + 7, length: 300 * 1024 },
          { cookie: 4n, offset: 5 * 1024 * 1024, length: 3 * 1024 * 1024 },
        ];
        c.socket.write(Buffer.concat(reads.map((r) => requestBytes({ type: NBD_CMD_READ, ...r }))));
        const total = reads.reduce((n, r) => n + r.length + (structured ? 28 : 16), 0);
        const replies = readReplies((await c.waitBytes(base + total, 4000)).subarray(base), new Map(reads.map((r) => [r.cookie, r.length])), structured);
        for (const r of reads) assert.ok(replies.get(r.cookie)!.equals(node.data.subarray(r.offset, r.offset + r.length)), `read ${r.cookie}`);
        assert.equal(node.slices, 3, 'the three reads of 64 KiB or more were slices');
        await waitFor(() => node.released === 3, 2000, 'every slice released');
        const conn = [...server.connections][0]!;
        assert.ok(conn.bytesByFile > 4 * 1024 * 1024, 'and went by sendfile');

        // A client that asks for 16 MiB and hangs up unread: every slice is released, and others are served.
        const { c: quitter } = await negotiate();
        for (let i = 0; i < 16; i++) quitter.socket.write(requestBytes({ type: NBD_CMD_READ, cookie: BigInt(i), offset: (i % 8) * 1024 * 1024, length: 1024 * 1024 }));
        await waitFor(() => node.slices >= 4, 2000, 'the quitter is served');
        quitter.socket.destroy();
        await quitter.closed;
        await waitFor(() => node.released === node.slices && server.connections.size === 1, 4000, 'the quitter released its slices');
        const before = c.received().length;
        c.socket.write(requestBytes({ type: NBD_CMD_READ, cookie: 9n, offset: 1024, length: 128 * 1024 }));
        const again = readReplies((await c.waitBytes(before + 128 * 1024 + (structured ? 28 : 16))).subarray(before), new Map([[9n, 128 * 1024]]), structured);
        assert.ok(again.get(9n)!.equals(node.data.subarray(1024, 1024 + 128 * 1024)));
      } finally {
        for (const c of clients) c.socket.destroy();
        await server.close();
        fs.closeSync(node.fd);
        fs.rmSync(dir, { recursive: true, force: true });
      }
    });
  }
});

describe('a client that shuts down its side', () => {
  for (const disc of [true, false]) {
    test(`still gets the replies to what it sent (${disc ? 'with' : 'without'} NBD_CMD_DISC), then the server closes`, t, async () => {
      const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbd-export-server-test-'));
      const socketPath = path.join(dir, 'nbd.sock');
      const node = new FakeNode(1024 * 1024);
      node.fill(4096, Buffer.from('half-open'));
      // Slow storage: the client's FIN arrives long before the replies are ready.
      node.before = async () => {
        await sleep(100);
      };
      const server = new NbdServer({ exports: registryOf(makeExport({ name: 'a', node })), maxConnections: 0, persistent: true, handshakeLimitMs: 0 });
      const clients: RawClient[] = [];
      try {
        await server.listenUnix(socketPath);
        const c = await connect(socketPath);
        clients.push(c);
        await c.waitBytes(18);
        c.socket.write(Buffer.concat([u32(3), optionBytes(NBD_OPT_GO, Buffer.concat([lstr('a'), u16(0)]))]));
        await c.waitBytes(18 + 86);
        const requests = [requestBytes({ type: NBD_CMD_FLUSH, cookie: 1n, offset: 0, length: 0 }), requestBytes({ type: NBD_CMD_READ, cookie: 2n, offset: 4096, length: 9 })];
        if (disc) requests.push(requestBytes({ type: NBD_CMD_DISC, cookie: 3n, offset: 0, length: 0 }));
        c.socket.end(Buffer.concat(requests));
        await c.closed;
        const replies = c.received().subarray(18 + 86);
        assert.equal(replies.length, 16 + 16 + 9, 'both replies, whole');
        const byCookie = new Map<bigint, Buffer>();
        for (let at = 0; at < replies.length; ) {
          const cookie = replies.readBigUInt64BE(at + 8);
          assert.equal(replies.readUInt32BE(at + 4), 0);
          const length = cookie === 2n ? 9 : 0;
          byCookie.set(cookie, replies.subarray(at + 16, at + 16 + length));
          at += 16 + length;
        }
        assert.deepEqual([...byCookie.keys()].sort(), [1n, 2n]);
        assert.equal(byCookie.get(2n)!.toString(), 'half-open');
        await waitFor(() => server.connections.size === 0, 2000, 'the connection closed');
      } finally {
        for (const c of clients) c.socket.destroy();
        await server.close();
        fs.rmSync(dir, { recursive: true, force: true });
      }
    });
  }
});
