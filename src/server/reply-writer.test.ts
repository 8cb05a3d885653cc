import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { after, test } from 'node:test';
import type { FileSlice } from '../exports/export.ts';
import { coalesceSmall, mergeAdjacent, ReplyWriter, type ReplyPart } from './reply-writer.ts';
import { freeReplyBlocks, inReplySpace, REPLY_SPACE_MAX, ReplySpace } from './reply-space.ts';
import { sendfileAvailable, setSendfileEnabled } from './sendfile.ts';
import { waitFor } from './test-helpers.ts';

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbd-export-writer-'));
after(() => fs.rmSync(dir, { recursive: true, force: true }));
let counter = 0;

const FILE_SIZE = 8 * 1024 * 1024;
const fileBytes = crypto.randomBytes(FILE_SIZE);
const filePath = path.join(dir, 'data');
fs.writeFileSync(filePath, fileBytes);
const fileFd = fs.openSync(filePath, 'r');
after(() => fs.closeSync(fileFd));

/** A connected pair over a Unix socket: `server` is ours, `client` reads what we write. */
async function pair(): Promise<{ server: net.Socket; client: net.Socket; close: () => void }> {
  const sock = path.join(dir, `s${counter++}`);
  const listener = net.createServer();
  await new Promise<void>((resolve) => listener.listen(sock, resolve));
  const accepted = new Promise<net.Socket>((resolve) => listener.once('connection', resolve));
  const client = net.connect(sock);
  await new Promise<void>((resolve) => client.once('connect', resolve));
  const server = await accepted;
  return {
    server,
    client,
    close: () => {
      server.destroy();
      client.destroy();
      listener.close();
    },
  };
}

/** A slice of the test file (the writer never releases slices: its callers do, from `done`). */
function slice(position: number, length: number): FileSlice {
  return { fd: fileFd, position, length, release: () => assert.fail('the writer released a slice') };
}

/** Everything the client receives until the server ends the stream. */
function collect(client: net.Socket): Promise<Buffer> {
  const chunks: Buffer[] = [];
  client.on('data', (c: Buffer) => chunks.push(c));
  return new Promise((resolve) => client.once('end', () => resolve(Buffer.concat(chunks))));
}

/**
 * Batches of small buffers, large buffers and slices (up to 3 MiB, more than
 * any socket buffer), written while the client is not reading, so that
 * sendfile finds the socket full and must wait for room.
 */
function batches(): { batches: ReplyPart[][]; expected: Buffer } {
  const rand = (n: number): number => crypto.randomInt(n);
  const out: ReplyPart[][] = [];
  const expected: Buffer[] = [];
  for (let b = 0; b < 12; b++) {
    const parts: ReplyPart[] = [];
    for (let i = 0, n = 1 + rand(4); i < n; i++) {
      const kind = rand(3);
      if (kind === 0) {
        const header = crypto.randomBytes(1 + rand(40));
        parts.push(header);
        expected.push(header);
      } else if (kind === 1) {
        const big = crypto.randomBytes(16 * 1024 + rand(200_000));
        parts.push(big);
        expected.push(big);
      } else {
        const length = 1 + rand(3 * 1024 * 1024);
        const position = rand(FILE_SIZE - length);
        parts.push(slice(position, length));
        expected.push(fileBytes.subarray(position, position + length));
      }
    }
    out.push(parts);
  }
  return { batches: out, expected: Buffer.concat(expected) };
}

async function writesInOrder(viaSendfile: boolean): Promise<void> {
  const { server, client, close } = await pair();
  try {
    client.pause();
    const writer = new ReplyWriter(server);
    assert.equal(writer.sendsFiles, viaSendfile);
    writer.widenSendBufferForLargeReplies();
    const { batches: all, expected } = batches();
    const received = collect(client);
    let done = 0;
    for (const parts of all) writer.write(parts, [() => done++]);
    // Nothing was read yet: most bytes are still held, none is lost.
    assert.ok(writer.backlog > 0);
    writer.whenIdle(() => server.end());
    client.resume();
    const got = await received;
    assert.equal(got.length, expected.length);
    assert.ok(got.equals(expected), 'the client receives every part, in order');
    await waitFor(() => done === all.length, 5000, 'every batch reported written');
    assert.equal(writer.backlog, 0);
    const sliced = all.flat().reduce((n, p) => n + (Buffer.isBuffer(p) ? 0 : p.length), 0);
    // A full socket costs one byte through Node per wait; the rest goes by sendfile.
    if (viaSendfile) assert.ok(writer.bytesByFile > sliced * 0.99, `${writer.bytesByFile} of ${sliced} slice bytes by sendfile`);
    else assert.equal(writer.bytesByFile, 0);
  } finally {
    close();
  }
}

test('buffers and file slices reach the client whole and in order, with sendfile', { timeout: 30_000 }, async (ctx) => {
  if (!sendfileAvailable()) return ctx.skip('sendfile through koffi is not available here');
  await writesInOrder(true);
});

test('the same stream without sendfile: slices are read and written as buffers', { timeout: 30_000 }, async () => {
  setSendfileEnabled(false);
  try {
    await writesInOrder(false);
  } finally {
    setSendfileEnabled(true);
  }
});

test('a client that hangs up mid-stream: every callback runs, nothing throws, the idle hook runs', { timeout: 30_000 }, async () => {
  const { server, client, close } = await pair();
  try {
    client.pause();
    server.on('error', () => {}); // EPIPE/ECONNRESET are what we expect here
    const writer = new ReplyWriter(server);
    let done = 0;
    for (let i = 0; i < 8; i++) {
      writer.write([Buffer.from([i]), slice(i * 1024 * 1024, 1024 * 1024)], [() => done++]);
    }
    let idle = false;
    writer.whenIdle(() => (idle = true));
    client.destroy();
    await waitFor(() => done === 8 && idle, 5000, 'every callback after the hang-up');
    // Writes after the socket died are dropped at once.
    let late = false;
    writer.write([slice(0, 100_000)], [() => (late = true)]);
    await waitFor(() => late, 2000, 'the late callback');
    assert.equal(writer.backlog, 0);
  } finally {
    close();
  }
});

test('a slice waits for earlier buffered writes, and later writes wait for the slice', { timeout: 30_000 }, async () => {
  const { server, client, close } = await pair();
  try {
    client.pause();
    const writer = new ReplyWriter(server);
    const received = collect(client);
    // Enough buffered bytes to fill the socket, so that they are still queued in Node.
    const first = crypto.randomBytes(2 * 1024 * 1024);
    writer.write([first]);
    assert.ok(server.writableLength > 0, 'the first write is still queued');
    writer.write([Buffer.from('hdr'), slice(4096, 1024 * 1024)]);
    const last = Buffer.from('after');
    writer.write([last]);
    writer.whenIdle(() => server.end());
    client.resume();
    const got = await received;
    assert.ok(got.equals(Buffer.concat([first, Buffer.from('hdr'), fileBytes.subarray(4096, 4096 + 1024 * 1024), last])));
    if (writer.sendsFiles) assert.ok(writer.bytesByFile > 1000 * 1024, 'the slice went by sendfile once the socket had taken the first write');
  } finally {
    close();
  }
});

test('replies built one after another in reply space go as one view of it, with no copy', () => {
  const space = new ReplySpace();
  const parts = [4112, 16, 4112, 4112, 16].map((n, i) => space.take(n)!.fill(i + 1));
  const joined = mergeAdjacent(parts);
  if (joined.length === 1) {
    assert.equal(joined[0]!.buffer, parts[0]!.buffer, 'a view, not a copy');
  } else {
    // A new block began somewhere in the middle: two views, still no copy.
    assert.equal(joined.length, 2);
    for (const j of joined) assert.ok(j.buffer === parts[0]!.buffer || j.buffer === parts[4]!.buffer);
  }
  assert.ok(Buffer.concat(joined).equals(Buffer.concat(parts)), 'the same bytes in the same order');
  const out = coalesceSmall(parts);
  assert.ok(Buffer.concat(out).equals(Buffer.concat(parts)));
  // Runs of 16 KiB and more are sent as views; shorter ones are copied out, so they pin no block.
  for (const o of out) if (o.length < 16 * 1024) assert.ok(o.buffer !== parts[0]!.buffer && o.buffer !== parts[4]!.buffer);
});

test('mergeAdjacent keeps parts apart unless one starts where the one before ends', () => {
  const a = Buffer.from('abcdefgh');
  const separate = [a.subarray(0, 2), a.subarray(4, 6), a.subarray(6, 8), a.subarray(2, 4), Buffer.from('xy')];
  const got = mergeAdjacent(separate);
  assert.deepEqual(got.map(String), ['ab', 'efgh', 'cd', 'xy']);
  assert.equal(got[1]!.buffer, a.buffer);
  assert.deepEqual(mergeAdjacent([]), []);
  const one = [Buffer.from('z')];
  assert.equal(mergeAdjacent(one)[0], one[0]);
});

test('reply space: in order within a block, never above REPLY_SPACE_MAX; the last unused piece can be handed back', () => {
  const space = new ReplySpace();
  assert.equal(space.take(REPLY_SPACE_MAX + 1), undefined);
  const a = space.take(100)!;
  const b = space.take(100)!;
  assert.equal(b.buffer, a.buffer);
  assert.equal(b.byteOffset, a.byteOffset + 100);
  space.giveBack(b);
  const c = space.take(50)!;
  assert.equal(c.byteOffset, a.byteOffset + 100, 'b was handed back');
  space.giveBack(a); // not the last one: nothing happens
  const d = space.take(10)!;
  assert.equal(d.byteOffset, c.byteOffset + 50);
  assert.ok(inReplySpace(d) && !inReplySpace(Buffer.alloc(10)));
});

test('reply space: blocks are written again only after recycle(), by any connection; a connection forgets blocks past eight', () => {
  const one = new ReplySpace();
  const two = new ReplySpace();
  // Fill three blocks of one connection with a pattern, as unsent replies.
  const sent = Array.from({ length: 3 * 4 }, (_, i) => one.take(8 * 1024)!.fill(i));
  const blocksOfOne = new Set(sent.map((v) => v.buffer));
  assert.equal(blocksOfOne.size, 3);
  // Until one recycles, nothing else is built in its blocks.
  for (let i = 0; i < 40; i++) assert.ok(!blocksOfOne.has(two.take(8 * 1024)!.buffer));
  sent.forEach((v, i) => assert.ok(v.every((x) => x === i), 'unsent replies untouched'));
  const before = freeReplyBlocks();
  one.recycle();
  assert.equal(freeReplyBlocks(), Math.min(64, before + 3), 'its three blocks are free');
  // The next replies, of either connection, are built in them again, the last one freed first.
  const again = one.take(100)!;
  assert.ok(blocksOfOne.has(again.buffer));
  assert.ok(blocksOfOne.has(two.take(REPLY_SPACE_MAX)!.buffer));
  one.recycle();
  two.recycle();
  // A connection that never recycles keeps at most eight blocks for the free list; older ones go to the GC.
  const never = new ReplySpace();
  const taken = new Set(Array.from({ length: 12 * 4 }, () => never.take(8 * 1024)!.buffer));
  assert.equal(taken.size, 12);
  const freeBefore = freeReplyBlocks();
  never.recycle();
  assert.equal(freeReplyBlocks(), Math.min(64, freeBefore + 8));
});
