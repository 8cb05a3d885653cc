import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { once } from 'node:events';
import { acceptThrough, type SocketReader } from './socket-reader.ts';
import { Wire, wireAvailable } from './wire.ts';

let dir = '';
let counter = 0;
before(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbd-wire-'));
});
after(() => fs.rmSync(dir, { recursive: true, force: true }));

interface Pair {
  wire: Wire;
  reader: SocketReader;
  /** What the wire's reader was lent, copied. */
  received: Buffer[];
  client: net.Socket;
  close(): Promise<void>;
}

/** A listener whose accepts become Wires, and one client connected to it (Unix socket, or TCP on loopback). */
async function pair(tcp = false): Promise<Pair> {
  const server = net.createServer({ pauseOnConnect: true, allowHalfOpen: true });
  const sock = path.join(dir, `w${counter++}`);
  if (tcp) server.listen(0, '127.0.0.1');
  else server.listen(sock);
  await once(server, 'listening');
  const accepted = new Promise<{ wire: Wire; reader: SocketReader }>((resolve) => {
    assert.ok(acceptThrough(server, (socket, reader) => resolve({ wire: socket as Wire, reader }), true));
  });
  // Half-open, as NBD clients are: the client's side stays open after ours ends.
  const client = tcp
    ? net.connect({ port: (server.address() as net.AddressInfo).port, host: '127.0.0.1', allowHalfOpen: true })
    : net.connect({ path: sock, allowHalfOpen: true });
  client.on('error', () => {});
  await once(client, 'connect');
  const { wire, reader } = await accepted;
  assert.ok(wire instanceof Wire);
  const received: Buffer[] = [];
  reader.sink = (chunk) => received.push(Buffer.from(chunk));
  return {
    wire,
    reader,
    received,
    client,
    async close() {
      client.destroy();
      if (!wire.destroyed) wire.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

/** Run `fn` with a fresh pair, and close it whatever happens. */
async function withPair(tcp: boolean, fn: (p: Pair) => Promise<void>): Promise<void> {
  const p = await pair(tcp);
  try {
    await fn(p);
  } finally {
    await p.close();
  }
}

/** Resolves once `cond()` holds (the test's timeout bounds the wait). */
function until(cond: () => boolean): Promise<void> {
  return new Promise((resolve) => {
    const poll = (): void => (cond() ? resolve() : void setTimeout(poll, 5));
    poll();
  });
}

/** Read everything the client gets until the server's side ends. */
function readAll(client: net.Socket): Promise<Buffer> {
  const chunks: Buffer[] = [];
  client.on('data', (d: Buffer) => chunks.push(d));
  return new Promise((resolve) => client.once('end', () => resolve(Buffer.concat(chunks))));
}

function pattern(length: number, seed: number): Buffer {
  const buf = Buffer.allocUnsafe(length);
  for (let i = 0; i < length; i++) buf[i] = (i * 31 + seed) & 0xff;
  return buf;
}

const t = { timeout: 20_000 };

test('this Node lets us drive accepted handles (the server falls back to net.Socket otherwise)', () => {
  assert.equal(wireAvailable(), true);
});

test('a write callback never runs inside write(); corked writes arrive whole and in order', t, () =>
  withPair(false, async (p) => {
    const all = readAll(p.client);
    let called = 0;
    p.wire.write(Buffer.from('greeting'), (err) => {
      assert.equal(err, null);
      called++;
    });
    assert.equal(called, 0, 'not synchronously');
    p.wire.cork();
    p.wire.write(Buffer.from('-a'));
    p.wire.write(Buffer.from('-bc'), () => called++);
    assert.equal(p.wire.writableLength, 5, 'corked bytes count as not yet with the kernel');
    p.wire.uncork();
    await new Promise((resolve) => setImmediate(resolve));
    assert.equal(called, 2);
    assert.equal(p.wire.writableLength, 0);
    p.wire.end();
    assert.equal(p.wire.writableEnded, true);
    assert.equal((await all).toString(), 'greeting-a-bc');
  }));

test('a client that does not read holds writes back: writableLength counts them, then drain, and every byte arrives', t, () =>
  withPair(false, async (p) => {
    p.client.pause();
    const blocks = Array.from({ length: 32 }, (_, i) => pattern(256 * 1024, i));
    let done = 0;
    for (const b of blocks) p.wire.write(b, (err) => (assert.equal(err, null), done++));
    assert.ok(p.wire.writableLength > 0, 'the kernel cannot take 8 MiB at once');
    const drained = once(p.wire, 'drain');
    const all = readAll(p.client);
    p.client.resume();
    await drained;
    assert.equal(p.wire.writableLength, 0);
    assert.equal(done, blocks.length);
    p.wire.end();
    assert.ok((await all).equals(Buffer.concat(blocks)));
  }));

test('end() waits for pending writes, then shuts down our side only: the client can still send', t, () =>
  withPair(false, async (p) => {
    p.client.pause();
    const big = pattern(4 * 1024 * 1024, 7);
    p.wire.write(big);
    p.wire.end();
    const all = readAll(p.client);
    p.client.resume();
    assert.ok((await all).equals(big));
    p.client.write('after');
    await until(() => Buffer.concat(p.received).toString() === 'after');
    assert.equal(p.wire.destroyed, false);
  }));

test('destroySoon() closes once the shutdown is done; the client reads everything first', t, () =>
  withPair(false, async (p) => {
    const all = readAll(p.client);
    p.wire.write(pattern(1024 * 1024, 3));
    p.wire.destroySoon();
    await once(p.wire, 'close');
    assert.equal(p.wire.destroyed, true);
    assert.ok((await all).equals(pattern(1024 * 1024, 3)));
  }));

test('destroy() fails the writes the kernel has not taken; writing afterwards fails with EPIPE', t, () =>
  withPair(false, async (p) => {
    p.client.pause();
    const errors: (Error | null | undefined)[] = [];
    for (let i = 0; i < 32; i++) p.wire.write(pattern(256 * 1024, i), (err) => errors.push(err));
    await new Promise((resolve) => setImmediate(resolve));
    const closed = once(p.wire, 'close');
    p.wire.destroy();
    assert.equal(p.wire.destroyed, true);
    await closed;
    assert.equal(errors.length, 32, 'every callback ran');
    assert.ok(errors.some((e) => e instanceof Error), 'the pending ones with an error');
    let late: Error | null | undefined;
    assert.equal(p.wire.write(Buffer.from('x'), (err) => (late = err)), false);
    await new Promise((resolve) => setImmediate(resolve));
    assert.equal((late as NodeJS.ErrnoException | undefined)?.code, 'EPIPE');
  }));

test("the client's end of stream is one 'end'; resume() after it reads no more", t, () =>
  withPair(false, async (p) => {
    let ends = 0;
    p.wire.on('end', () => ends++);
    p.client.end('last words');
    await once(p.wire, 'end');
    assert.equal(Buffer.concat(p.received).toString(), 'last words');
    p.wire.resume();
    p.wire.resume();
    await new Promise((resolve) => setTimeout(resolve, 20));
    assert.equal(ends, 1);
    assert.equal(p.wire.destroyed, false, 'half-open: our side may still write');
  }));

test('pause() stops reads until resume()', t, () =>
  withPair(false, async (p) => {
    p.wire.pause();
    assert.equal(p.wire.isPaused(), true);
    p.client.write('held');
    await new Promise((resolve) => setTimeout(resolve, 30));
    assert.equal(p.received.length, 0);
    p.wire.resume();
    assert.equal(p.wire.isPaused(), false);
    await until(() => p.received.length > 0);
    assert.equal(Buffer.concat(p.received).toString(), 'held');
  }));

test('TCP: the peer address and fd are known; a reset is an error, then close', t, () =>
  withPair(true, async (p) => {
    assert.equal(p.wire.remoteAddress, '127.0.0.1');
    assert.equal(p.wire.remotePort, p.client.localPort);
    assert.ok(p.wire.fd >= 0);
    const errored = once(p.wire, 'error');
    const closed = new Promise((resolve) => p.wire.once('close', resolve));
    p.client.resetAndDestroy();
    const [err] = (await errored) as [NodeJS.ErrnoException];
    assert.equal(err.code, 'ECONNRESET');
    await closed;
    assert.equal(p.wire.destroyed, true);
  }));

test('Unix socket: no peer address (the server reports the transport as unix)', t, () =>
  withPair(false, async (p) => {
    assert.equal(p.wire.remoteAddress, undefined);
    assert.ok(p.wire.fd >= 0);
  }));
