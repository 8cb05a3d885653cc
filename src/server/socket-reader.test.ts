import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { after, test } from 'node:test';
import { acceptThrough, readThrough, SocketReader } from './socket-reader.ts';
import { Wire, type ClientSocket } from './wire.ts';
import { waitFor } from './test-helpers.ts';

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbd-export-reader-'));
after(() => fs.rmSync(dir, { recursive: true, force: true }));
let counter = 0;

/** A listener that accepts paused, as the server's does; resolves with the first accepted socket and a connected client. */
async function pair(): Promise<{ accepted: net.Socket; client: net.Socket; close: () => void }> {
  const sock = path.join(dir, `s${counter++}`);
  const server = net.createServer({ pauseOnConnect: true });
  await new Promise<void>((resolve) => server.listen(sock, resolve));
  const accepted = new Promise<net.Socket>((resolve) => server.once('connection', resolve));
  const client = net.connect(sock);
  await new Promise<void>((resolve) => client.once('connect', resolve));
  const s = await accepted;
  return {
    accepted: s,
    client,
    close: () => {
      client.destroy();
      server.close();
    },
  };
}

/** pair(), with the accepted socket handed to a SocketReader; close() also destroys it. */
async function readerPair(): Promise<{ reader: SocketReader; socket: net.Socket; client: net.Socket; close: () => void }> {
  const { accepted, client, close } = await pair();
  const reader = new SocketReader();
  const socket = readThrough(accepted, reader);
  assert.ok(socket !== null, 'this Node hands the connection over');
  return {
    reader,
    socket,
    client,
    close: () => {
      socket.destroy();
      close();
    },
  };
}

test('reads reach the sink in order, a direct read fills its buffer, and the rest follows', { timeout: 20_000 }, async () => {
  const { reader, client, close } = await readerPair();
  try {
    const sent = crypto.randomBytes(3 * 1024 * 1024 + 12345);
    const chunks: Buffer[] = [];
    let got = 0;
    let direct: Buffer | undefined;
    let sinkDuringDirect = 0;
    const done = new Promise<void>((resolve) => {
      reader.sink = (chunk) => {
        if (direct !== undefined && got < 64 * 1024 + direct.length) sinkDuringDirect++;
        // Lent: the next read reuses the memory.
        chunks.push(Buffer.from(chunk));
        got += chunk.length;
        // After the first 64 KiB or so, read 2 MiB straight into one buffer,
        // starting with what the last chunk brought past the 64 KiB mark.
        if (direct === undefined && got >= 64 * 1024) {
          const extra = got - 64 * 1024;
          direct = Buffer.alloc(2 * 1024 * 1024);
          const last = chunks.pop()!;
          chunks.push(last.subarray(0, last.length - extra));
          last.copy(direct, 0, last.length - extra);
          reader.readInto(direct, extra, () => {
            chunks.push(direct!);
            got = 64 * 1024 + direct!.length;
          });
        }
        if (got === sent.length) resolve();
      };
    });
    // In pieces, with pauses, so that reads come in many sizes.
    for (let at = 0; at < sent.length; ) {
      const n = Math.min(sent.length - at, 1 + crypto.randomInt(300 * 1024));
      client.write(sent.subarray(at, at + n));
      at += n;
      if (crypto.randomInt(4) === 0) await new Promise((resolve) => setTimeout(resolve, 1));
    }
    await done;
    assert.equal(sinkDuringDirect, 0, 'nothing reaches the sink while a direct read is under way');
    assert.ok(Buffer.concat(chunks).equals(sent), 'every byte, in order');
  } finally {
    close();
  }
});

test('after a direct read, thenRead bounds the next read; later reads take what there is', { timeout: 10_000 }, async () => {
  const { reader, client, close } = await readerPair();
  try {
    const sizes: number[] = [];
    const got: Buffer[] = [];
    let filled = false;
    const target = Buffer.alloc(100_000);
    // As the transmission does: a direct read is asked for from the sink.
    reader.sink = (chunk) => {
      if (sizes.length === 0) reader.readInto(target, 0, () => (filled = true), 28);
      sizes.push(chunk.length);
      got.push(Buffer.from(chunk));
    };
    client.write('hello');
    await waitFor(() => sizes.length > 0, 2000, 'the first read');
    const sent = crypto.randomBytes(100_000 + 5_000);
    client.write(sent);
    await waitFor(() => got.reduce((n, b) => n + b.length, 0) >= 5 + 5_000, 2000, 'every byte');
    assert.ok(filled);
    assert.ok(target.equals(sent.subarray(0, 100_000)));
    assert.equal(sizes[1], 28, 'the read after the direct one takes one header');
    assert.ok(sizes.length >= 3 && sizes[2]! > 28, 'the next read is not bounded');
    assert.ok(Buffer.concat(got).equals(Buffer.concat([Buffer.from('hello'), sent.subarray(100_000)])));
  } finally {
    close();
  }
});

test('a direct read asked for between reads takes the next bytes, even those already bound for the staging buffer', { timeout: 10_000 }, async () => {
  // As when a write waited for the memory budget: the socket had been given
  // the staging buffer for its next read before the direct read was asked for.
  const { reader, client, close } = await readerPair();
  try {
    const got: Buffer[] = [];
    reader.sink = (chunk) => got.push(Buffer.from(chunk));
    client.write('abc');
    await waitFor(() => got.length > 0, 2000, 'the first read');
    const target = Buffer.alloc(1000);
    let filled = false;
    reader.readInto(target, 0, () => (filled = true));
    const sent = crypto.randomBytes(1010);
    client.write(sent);
    await waitFor(() => got.reduce((n, b) => n + b.length, 0) >= 3 + 10, 2000, 'every byte');
    assert.ok(filled);
    assert.ok(target.equals(sent.subarray(0, 1000)), 'the payload is the next 1000 bytes');
    assert.ok(Buffer.concat(got).equals(Buffer.concat([Buffer.from('abc'), sent.subarray(1000)])), 'and only what follows it reaches the sink');
  } finally {
    close();
  }
});

test('the adopted socket ends and closes when the client hangs up, and can write', { timeout: 10_000 }, async () => {
  const { reader, socket, client, close } = await readerPair();
  try {
    const received: Buffer[] = [];
    reader.sink = (chunk) => received.push(Buffer.from(chunk));
    const ended = new Promise<void>((resolve) => socket.once('end', resolve));
    const closed = new Promise<void>((resolve) => socket.once('close', resolve));
    socket.on('end', () => socket.end());
    const echoed = new Promise<Buffer>((resolve) => client.once('data', resolve));
    socket.write('hello');
    assert.equal((await echoed).toString(), 'hello');
    client.end('bye');
    await ended;
    await closed;
    assert.equal(Buffer.concat(received).toString(), 'bye');
  } finally {
    close();
  }
});

test('pause() stops reads into the reader and resume() starts them again', { timeout: 10_000 }, async () => {
  const { reader, socket, client, close } = await readerPair();
  try {
    let got = 0;
    reader.sink = (chunk) => {
      got += chunk.length;
    };
    client.write(Buffer.alloc(1000));
    await waitFor(() => got >= 1000, 2000, 'the first 1000 bytes');
    socket.pause();
    client.write(Buffer.alloc(1000));
    await new Promise((resolve) => setTimeout(resolve, 100));
    assert.equal(got, 1000, 'nothing read while paused');
    socket.resume();
    await waitFor(() => got >= 2000, 2000, 'the rest after resume()');
  } finally {
    close();
  }
});

test('a socket that is already gone is not adopted', { timeout: 10_000 }, async () => {
  const { accepted, close } = await pair();
  try {
    accepted.destroy();
    assert.equal(readThrough(accepted, new SocketReader()), null);
  } finally {
    close();
  }
});

for (const raw of [false, true]) {
  test(`acceptThrough${raw ? ' (raw, Wire)' : ''}: the listener builds each socket reading through its own reader; replies and half-close work`, { timeout: 20_000 }, async () => {
    const sock = path.join(dir, `s${counter++}`);
    const server = net.createServer({ pauseOnConnect: true, allowHalfOpen: true }, () => assert.fail('no connection event once accepts go through'));
    assert.equal(acceptThrough(server, () => {}), false, 'no handle before listening');
    await new Promise<void>((resolve) => server.listen(sock, resolve));
    const accepted: { socket: ClientSocket; reader: SocketReader }[] = [];
    assert.equal(
      acceptThrough(server, (socket, reader) => {
        accepted.push({ socket, reader });
        // Echo what the reader lends, upper-cased; answer a half-close with the rest.
        reader.sink = (chunk) => socket.write(Buffer.from(chunk.toString('latin1').toUpperCase(), 'latin1'));
        socket.on('end', () => {
          socket.write(Buffer.from('.'));
          socket.end();
        });
        if (raw) assert.ok(socket instanceof Wire, 'a Wire, not a net.Socket');
      }, raw),
      true,
    );
    const clients: net.Socket[] = [];
    try {
      const talk = async (word: string): Promise<string> => {
        const client = net.connect(sock);
        clients.push(client);
        let got = '';
        client.on('data', (d: Buffer) => (got += d.toString('latin1')));
        await new Promise<void>((resolve) => client.once('connect', resolve));
        client.end(word);
        await new Promise<void>((resolve) => client.once('end', resolve));
        return got;
      };
      assert.deepEqual(await Promise.all([talk('one'), talk('two')]), ['ONE.', 'TWO.']);
      assert.equal(accepted.length, 2);
      assert.notEqual(accepted[0]!.reader, accepted[1]!.reader, 'a reader per connection');
    } finally {
      for (const c of clients) c.destroy();
      for (const a of accepted) a.socket.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    }
  });
}
