import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { BlockError } from '../block/types.ts';
import type { MetaContext, StatusRun } from '../meta/context.ts';
import {
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_CACHE,
  NBD_CMD_DISC,
  NBD_CMD_FLAG_DF,
  NBD_CMD_FLAG_FAST_ZERO,
  NBD_CMD_FLAG_FUA,
  NBD_CMD_FLAG_NO_HOLE,
  NBD_CMD_FLAG_REQ_ONE,
  NBD_CMD_FLUSH,
  NBD_CMD_READ,
  NBD_CMD_TRIM,
  NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES,
  NBD_EINVAL,
  NBD_EIO,
  NBD_ENOSPC,
  NBD_ENOTSUP,
  NBD_EOVERFLOW,
  NBD_EPERM,
  NBD_ESHUTDOWN,
  NBD_REPLY_TYPE_ERROR,
  NBD_REPLY_TYPE_OFFSET_DATA,
  NBD_REPLY_TYPE_OFFSET_HOLE,
} from '../protocol/constants.ts';
import { ByteQueue } from '../protocol/byte-queue.ts';
import { hex, requestBytes, toHex } from '../protocol/test-helpers.ts';
import type { Export } from '../exports/export.ts';
import { OBSERVE_DONE, OBSERVE_START, type BackendError, type RequestEvent } from './events.ts';
import { Transmission, DEFAULT_LIMITS, type TransmissionLimits } from './transmission.ts';
import { ByteBudget } from './budget.ts';
import type { MemoryRun, WriteOptions } from '../block/types.ts';
import { isAllZero } from '../block/node.ts';
import {
  deferred,
  FakeNode,
  FakeTransmissionHost,
  makeExport,
  parseChunks,
  parseSimpleReply,
  settle,
  waitFor,
  type ExportSpec,
} from './test-helpers.ts';

const t = { timeout: 10_000 };
const MiB = 1024 * 1024;
const BIG = 0xfeedface00000000n; // cookies use all 64 bits

interface Setup {
  node: FakeNode;
  exp: Export;
  host: FakeTransmissionHost;
  tx: Transmission;
  queue: ByteQueue;
  /** Push bytes and feed, whole or one byte at a time. */
  feed(bytes: Buffer, mode?: 'whole' | 'bytewise'): void;
}

function setup(
  opts: {
    structured?: boolean;
    contexts?: (exp: Export) => readonly MetaContext[];
    limits?: TransmissionLimits;
    spec?: Partial<ExportSpec>;
  } = {},
): Setup {
  const node = opts.spec?.node ?? new FakeNode(opts.spec?.size ?? MiB);
  const exp = makeExport({ name: 'e', ...opts.spec, node });
  const host = new FakeTransmissionHost();
  const tx = new Transmission(
    host,
    { export: exp, structuredReplies: opts.structured ?? false, metaContexts: [...(opts.contexts?.(exp) ?? [])], via: 'go' },
    opts.limits,
  );
  const queue = new ByteQueue();
  // As Connection does: when work drains, parse again.
  host.onProgress = () => tx.feed(queue);
  const feed = (bytes: Buffer, mode: 'whole' | 'bytewise' = 'whole') => {
    if (mode === 'whole') {
      queue.push(bytes);
      tx.feed(queue);
    } else {
      for (let i = 0; i < bytes.length; i++) {
        queue.push(bytes.subarray(i, i + 1));
        tx.feed(queue);
      }
    }
  };
  return { node, exp, host, tx, queue, feed };
}

const rq = (type: number, cookie: bigint, offset: number, length: number, flags = 0) => requestBytes({ type, cookie, offset, length, flags });
const cookiesOf = (host: FakeTransmissionHost) => host.replies.map((r) => parseSimpleReply(r).cookie);

describe('Transmission', () => {
  for (const mode of ['whole', 'bytewise'] as const) {
    test(`pipelined requests are each answered once with their cookie (fed ${mode})`, t, async () => {
      const s = setup();
      const pattern = Buffer.alloc(512, 0x5a);
      s.node.fill(8192, pattern);
      s.feed(
        Buffer.concat([
          rq(NBD_CMD_WRITE, BIG + 1n, 0, 4),
          Buffer.from('abcd'),
          rq(NBD_CMD_READ, BIG + 2n, 8192, 512),
          rq(NBD_CMD_FLUSH, BIG + 3n, 0, 0),
          rq(NBD_CMD_TRIM, BIG + 4n, 4096, 4096),
          rq(NBD_CMD_WRITE_ZEROES, BIG + 5n, 12288, 4096, NBD_CMD_FLAG_FUA),
          rq(NBD_CMD_CACHE, BIG + 6n, 0, 4096),
          rq(NBD_CMD_READ, BIG + 7n, 0, 0),
          rq(NBD_CMD_WRITE, BIG + 8n, 16, 0),
        ]),
        mode,
      );
      await waitFor(() => s.host.replies.length >= 8, 2000, '8 replies');
      await settle();
      assert.equal(s.host.replies.length, 8);
      const replies = s.host.replies.map(parseSimpleReply);
      assert.deepEqual(
        replies.map((r) => r.cookie).sort((x, y) => (x < y ? -1 : 1)),
        [1n, 2n, 3n, 4n, 5n, 6n, 7n, 8n].map((n) => BIG + n),
      );
      for (const r of replies) {
        assert.equal(r.error, 0, `cookie ${r.cookie}`);
        assert.equal(r.data.length, r.cookie === BIG + 2n ? 512 : 0);
      }
      assert.equal(toHex(replies.find((r) => r.cookie === BIG + 2n)!.data), toHex(pattern));
      assert.equal(s.node.data.subarray(0, 4).toString(), 'abcd');
      assert.deepEqual(
        s.node.calls.map((c) => c.op),
        ['write', 'read', 'flush', 'trim', 'writeZeroes', 'cache'],
        'zero-length requests do not reach the node',
      );
      assert.equal(s.queue.length, 0);
      assert.deepEqual(s.host.closed, []);
      assert.equal(s.tx.inflight, 0);
    });
  }

  test('simple reply bytes for a read are header then data', t, async () => {
    const s = setup();
    s.node.fill(0, Buffer.from('hello!!!'));
    s.feed(rq(NBD_CMD_READ, 0x0102030405060708n, 0, 8));
    await waitFor(() => s.host.replies.length === 1);
    assert.equal(toHex(s.host.replies[0]!), toHex(hex('67446698 00000000 0102030405060708')) + toHex(Buffer.from('hello!!!')));
  });

  test('replies may complete out of order: a slow read and a fast one', t, async () => {
    const s = setup();
    const gate = deferred();
    s.node.before = (op, offset) => (op === 'read' && offset === 0 ? gate.promise : undefined);
    s.feed(Buffer.concat([rq(NBD_CMD_READ, 1n, 0, 512), rq(NBD_CMD_READ, 2n, 512, 512)]));
    await waitFor(() => s.host.replies.length === 1);
    await settle();
    assert.deepEqual(cookiesOf(s.host), [2n]);
    assert.equal(s.tx.inflight, 1);
    gate.resolve();
    await waitFor(() => s.host.replies.length === 2);
    assert.deepEqual(cookiesOf(s.host), [2n, 1n]);
  });

  for (const mode of ['whole', 'bytewise'] as const) {
    test(`a rejected WRITE has its payload drained and the next request is parsed (fed ${mode})`, t, async () => {
      const s = setup({ spec: { blockSize: { minimum: 1, preferred: 4096, maximum: 4096 } } });
      // Payloads that look like requests: if parsed, they would be answered.
      const decoy = rq(NBD_CMD_READ, 99n, 0, 4);
      const big = Buffer.alloc(8192);
      for (let i = 0; i < big.length; i += 28) decoy.copy(big, i);
      s.feed(
        Buffer.concat([
          rq(NBD_CMD_WRITE, 1n, MiB - 2, 28), // past the end: ENOSPC
          decoy,
          rq(NBD_CMD_WRITE, 2n, 0, 28, NBD_CMD_FLAG_DF), // bad flag: EINVAL
          decoy,
          rq(NBD_CMD_WRITE, 3n, 0, 8192), // over the maximum payload: EINVAL
          big,
          rq(NBD_CMD_READ, 4n, 0, 4),
        ]),
        mode,
      );
      await waitFor(() => s.host.replies.length >= 4);
      await settle();
      const replies = s.host.replies.map(parseSimpleReply);
      assert.deepEqual(
        replies.map((r) => [r.cookie, r.error]),
        [
          [1n, NBD_ENOSPC],
          [2n, NBD_EINVAL],
          [3n, NBD_EINVAL],
          [4n, 0],
        ],
      );
      assert.deepEqual(s.node.calls.map((c) => c.op), ['read']);
      assert.equal(s.queue.length, 0);
      assert.deepEqual(s.host.closed, []);
    });
  }

  test('a WRITE to a read-only export is EPERM and its payload drained', t, async () => {
    const s = setup({ spec: { readOnly: true } });
    s.feed(Buffer.concat([rq(NBD_CMD_WRITE, 1n, 0, 28), rq(NBD_CMD_FLUSH, 77n, 0, 0), rq(NBD_CMD_FLUSH, 2n, 0, 0)]));
    await waitFor(() => s.host.replies.length >= 2);
    await settle();
    assert.deepEqual(s.host.replies.map(parseSimpleReply).map((r) => [r.cookie, r.error]), [
      [1n, NBD_EPERM],
      [2n, 0],
    ]);
  });

  test('bad request magic closes, and nothing after it is parsed', t, async () => {
    const s = setup();
    const bad = rq(NBD_CMD_READ, 1n, 0, 4);
    bad.writeUInt32BE(0x25609514, 0);
    s.feed(Buffer.concat([rq(NBD_CMD_FLUSH, 1n, 0, 0), bad, rq(NBD_CMD_FLUSH, 2n, 0, 0)]));
    await settle();
    assert.deepEqual(s.host.closed, ['bad request magic']);
    assert.deepEqual(cookiesOf(s.host), [1n]);
    s.feed(rq(NBD_CMD_FLUSH, 3n, 0, 0));
    await settle();
    assert.deepEqual(cookiesOf(s.host), [1n]);
    assert.equal(s.host.closed.length, 1);
  });

  test('DISC with nothing in flight closes at once', t, async () => {
    const s = setup();
    s.feed(rq(NBD_CMD_DISC, 1n, 0, 0));
    assert.equal(s.host.closed.length, 1);
    assert.deepEqual(s.host.replies, [], 'DISC has no reply');
  });

  test('DISC waits for requests in flight, answers them, then closes; later requests are ignored', t, async () => {
    const s = setup();
    const gate = deferred();
    s.node.before = (op) => (op === 'write' ? gate.promise : undefined);
    s.feed(Buffer.concat([rq(NBD_CMD_WRITE, 1n, 0, 4), Buffer.from('wxyz'), rq(NBD_CMD_DISC, 2n, 0, 0), rq(NBD_CMD_FLUSH, 3n, 0, 0)]));
    await settle();
    assert.deepEqual(s.host.closed, []);
    assert.deepEqual(s.host.replies, []);
    gate.resolve();
    await waitFor(() => s.host.closed.length > 0);
    assert.deepEqual(cookiesOf(s.host), [1n]);
    assert.deepEqual(s.host.closedAfter, [1], 'closed after the reply was sent');
    assert.equal(s.host.closed.length, 1);
    assert.deepEqual(s.node.calls.map((c) => c.op), ['write']);
  });

  test('saturated once in-flight bytes pass maxInflightBytes: parsing stops, and resumes on progress', t, async () => {
    const s = setup({ limits: { maxInflightBytes: 1024, maxInflightRequests: 100 } });
    const gates = [deferred(), deferred()];
    let n = 0;
    s.node.before = (op) => (op === 'read' ? gates[n++]?.promise : undefined);
    s.feed(rq(NBD_CMD_READ, 1n, 0, 1000));
    assert.equal(s.tx.saturated, false);
    s.feed(rq(NBD_CMD_READ, 2n, 0, 100));
    assert.equal(s.tx.saturated, true);
    s.feed(rq(NBD_CMD_READ, 3n, 0, 4));
    await settle();
    assert.equal(s.queue.length, 28, 'the third request waits in the queue');
    assert.equal(s.tx.inflight, 2);
    gates[0]!.resolve();
    await waitFor(() => s.host.replies.length >= 2);
    await settle();
    assert.equal(s.queue.length, 0, 'progress() let parsing resume');
    assert.deepEqual(cookiesOf(s.host), [1n, 3n]);
    assert.ok(s.host.progressCalls >= 1);
    gates[1]!.resolve();
    await waitFor(() => s.host.replies.length === 3);
    assert.equal(s.tx.saturated, false);
  });

  test('the rest of a large write payload is read straight into its buffer; small ones wait in the queue', t, async () => {
    const s = setup();
    const direct: { buf: Buffer; filled: number; done: () => void; thenRead?: number }[] = [];
    s.host.readInto = (buf, filled, done, thenRead) => direct.push({ buf, filled, done, thenRead });
    const payload = Buffer.alloc(200 * 1024);
    for (let i = 0; i < payload.length; i++) payload[i] = (i * 7) & 0xff;
    s.feed(Buffer.concat([rq(NBD_CMD_WRITE, 1n, 4096, payload.length), payload.subarray(0, 10_000)]));
    assert.equal(direct.length, 1);
    assert.equal(direct[0]!.filled, 10_000);
    assert.equal(direct[0]!.thenRead, 28, 'then one request header');
    assert.equal(direct[0]!.buf.length, payload.length);
    assert.ok(direct[0]!.buf.subarray(0, 10_000).equals(payload.subarray(0, 10_000)), 'what was queued is in the buffer');
    assert.equal(s.queue.length, 0);
    // Meanwhile nothing is parsed, even if bytes were queued.
    s.feed(rq(NBD_CMD_FLUSH, 2n, 0, 0));
    assert.equal(s.node.calls.length, 0);
    payload.copy(direct[0]!.buf, 10_000, 10_000);
    direct[0]!.done();
    await waitFor(() => s.host.replies.length >= 2, 2000, '2 replies');
    assert.deepEqual(s.node.calls.map((c) => c.op), ['write', 'flush']);
    assert.ok(s.node.data.subarray(4096, 4096 + payload.length).equals(payload));
    // A small payload that has not all arrived waits in the queue.
    s.feed(Buffer.concat([rq(NBD_CMD_WRITE, 3n, 0, 60 * 1024), Buffer.alloc(1000, 1)]));
    assert.equal(direct.length, 1);
    s.feed(Buffer.alloc(60 * 1024 - 1000, 1));
    await waitFor(() => s.host.replies.length >= 3, 2000, '3 replies');
    assert.ok(s.node.data.subarray(0, 60 * 1024).equals(Buffer.alloc(60 * 1024, 1)));
    assert.deepEqual(cookiesOf(s.host), [1n, 2n, 3n]);
  });

  test('write payloads count towards the in-flight bytes', t, async () => {
    const s = setup({ limits: { maxInflightBytes: 4096, maxInflightRequests: 100 } });
    const gate = deferred();
    s.node.before = (op) => (op === 'write' ? gate.promise : undefined);
    s.feed(Buffer.concat([rq(NBD_CMD_WRITE, 1n, 0, 4096), Buffer.alloc(4096, 1), rq(NBD_CMD_FLUSH, 2n, 0, 0)]));
    assert.equal(s.tx.saturated, true);
    assert.equal(s.queue.length, 28);
    gate.resolve();
    await waitFor(() => s.host.replies.length === 2);
    assert.deepEqual(cookiesOf(s.host), [1n, 2n]);
  });

  test('saturated by the number of requests in flight too', t, async () => {
    const s = setup({ limits: { maxInflightBytes: 1 << 30, maxInflightRequests: 2 } });
    const gate = deferred();
    s.node.before = () => gate.promise;
    s.feed(Buffer.concat([rq(NBD_CMD_FLUSH, 1n, 0, 0), rq(NBD_CMD_FLUSH, 2n, 0, 0), rq(NBD_CMD_FLUSH, 3n, 0, 0)]));
    assert.equal(s.tx.inflight, 2);
    assert.equal(s.tx.saturated, true);
    assert.equal(s.queue.length, 28);
    gate.resolve();
    await waitFor(() => s.host.replies.length === 3);
  });

  test('structured read of a hole is one OFFSET_HOLE chunk; with DF one OFFSET_DATA chunk', t, async () => {
    const s = setup({ structured: true });
    const c = 'feedface00000001';
    s.feed(rq(NBD_CMD_READ, BIG + 1n, 4096, 8192));
    await waitFor(() => s.host.replies.length === 1);
    assert.equal(toHex(s.host.replies[0]!), toHex(hex(`668e33ef 0001 0002 ${c} 0000000c 0000000000001000 00002000`)));
    s.feed(rq(NBD_CMD_READ, BIG + 1n, 4096, 8192, NBD_CMD_FLAG_DF));
    await waitFor(() => s.host.replies.length === 2);
    assert.equal(
      toHex(s.host.replies[1]!),
      toHex(Buffer.concat([hex(`668e33ef 0001 0001 ${c} 00002008 0000000000001000`), Buffer.alloc(8192)])),
    );
  });

  test('structured read of data then zeroes is an OFFSET_DATA chunk then an OFFSET_HOLE chunk (4 KiB granules)', t, async () => {
    const s = setup({ structured: true });
    s.node.fill(0, Buffer.alloc(4096, 0x61));
    s.feed(rq(NBD_CMD_READ, 5n, 2048, 4096));
    await waitFor(() => s.host.replies.length === 1);
    const chunks = parseChunks(s.host.replies[0]!);
    assert.deepEqual(chunks.map((ch) => [ch.flags, ch.type, ch.cookie, ch.payload.length]), [
      [0, 1, 5n, 8 + 2048],
      [1, 2, 5n, 12],
    ]);
    assert.equal(toHex(chunks[0]!.payload), toHex(Buffer.concat([hex('0000000000000800'), Buffer.alloc(2048, 0x61)])));
    assert.equal(toHex(chunks[1]!.payload), toHex(hex('0000000000001000 00000800')));
  });

  test('with DF the same read is one OFFSET_DATA chunk with the zeroes in it', t, async () => {
    const s = setup({ structured: true });
    s.node.fill(0, Buffer.alloc(4096, 0x61));
    s.feed(rq(NBD_CMD_READ, 5n, 2048, 4096, NBD_CMD_FLAG_DF));
    await waitFor(() => s.host.replies.length === 1);
    const chunks = parseChunks(s.host.replies[0]!);
    assert.deepEqual(chunks.map((ch) => [ch.flags, ch.type, ch.payload.length]), [[1, 1, 8 + 4096]]);
    assert.equal(
      toHex(chunks[0]!.payload),
      toHex(Buffer.concat([hex('0000000000000800'), Buffer.alloc(2048, 0x61), Buffer.alloc(2048)])),
    );
  });

  test('structured read of allocated zeroes is sent as a hole too', t, async () => {
    const s = setup({ structured: true });
    s.node.fill(0, Buffer.alloc(4096));
    s.feed(rq(NBD_CMD_READ, 6n, 0, 4096));
    await waitFor(() => s.host.replies.length === 1);
    assert.equal(toHex(s.host.replies[0]!), toHex(hex('668e33ef 0001 0002 0000000000000006 0000000c 0000000000000000 00001000')));
  });

  test('structured read of all data is one OFFSET_DATA chunk; zero length is NONE', t, async () => {
    const s = setup({ structured: true });
    s.node.fill(0, Buffer.alloc(4096, 0x62));
    s.feed(Buffer.concat([rq(NBD_CMD_READ, 1n, 0, 4096), rq(NBD_CMD_READ, 2n, 0, 0)]));
    await waitFor(() => s.host.replies.length === 2);
    const byCookie = new Map(s.host.replies.map((r) => [parseChunks(r)[0]!.cookie, parseChunks(r)]));
    assert.deepEqual(byCookie.get(1n)!.map((ch) => [ch.flags, ch.type, ch.payload.length]), [[1, 1, 4104]]);
    assert.equal(toHex(s.host.replies.find((r) => r.readBigUInt64BE(8) === 2n)!), toHex(hex('668e33ef 0001 0000 0000000000000002 00000000')));
  });

  test('a rejected structured READ gets an error chunk, never a simple reply', t, async () => {
    const s = setup({ structured: true });
    s.feed(rq(NBD_CMD_READ, 9n, MiB - 1, 2));
    await waitFor(() => s.host.replies.length === 1);
    const [chunk, ...rest] = parseChunks(s.host.replies[0]!);
    assert.deepEqual(rest, []);
    assert.equal(chunk!.type, 0x8001);
    assert.equal(chunk!.flags, 1);
    assert.equal(chunk!.payload.readUInt32BE(0), NBD_EINVAL);
    assert.equal(chunk!.payload.readUInt16BE(4), chunk!.payload.length - 6);
  });

  test('BLOCK_STATUS on base:allocation: descriptors, and REQ_ONE gives one', t, async () => {
    const s = setup({ structured: true, contexts: (exp) => [exp.metaContexts[0]!] });
    s.node.fill(0, Buffer.alloc(4096, 1));
    s.feed(rq(NBD_CMD_BLOCK_STATUS, 1n, 0, 65536));
    await waitFor(() => s.host.replies.length === 1);
    assert.equal(
      toHex(s.host.replies[0]!),
      toHex(hex('668e33ef 0001 0005 0000000000000001 00000014 00000000 00001000 00000000 0000f000 00000003')),
    );
    s.feed(rq(NBD_CMD_BLOCK_STATUS, 2n, 0, 65536, NBD_CMD_FLAG_REQ_ONE));
    await waitFor(() => s.host.replies.length === 2);
    assert.equal(toHex(s.host.replies[1]!), toHex(hex('668e33ef 0001 0005 0000000000000002 0000000c 00000000 00001000 00000000')));
  });

  test('BLOCK_STATUS with REQ_ONE: one descriptor clipped to the request length, one chunk per context', t, async () => {
    // A context that reports more than asked, as the spec allows without REQ_ONE.
    const maxRunsSeen: number[] = [];
    const wide: MetaContext = {
      name: 'test:wide',
      async status(_offset: number, _length: number, maxRuns: number): Promise<StatusRun[]> {
        maxRunsSeen.push(maxRuns);
        return [
          { length: MiB, flags: 5 },
          { length: 10, flags: 0 },
        ];
      },
    };
    const s = setup({ structured: true, spec: { metaContexts: [wide] }, contexts: (exp) => [exp.metaContexts[0]!, exp.metaContexts[1]!] });
    s.feed(rq(NBD_CMD_BLOCK_STATUS, 3n, 8192, 8192, NBD_CMD_FLAG_REQ_ONE));
    await waitFor(() => s.host.replies.length === 1);
    const chunks = parseChunks(s.host.replies[0]!);
    assert.deepEqual(
      chunks.map((ch) => [ch.flags, ch.type, toHex(ch.payload)]),
      [
        [0, 5, '00000000' + '00002000' + '00000003'],
        [1, 5, '00000001' + '00002000' + '00000005'],
      ],
    );
    assert.deepEqual(maxRunsSeen, [1]);
  });

  test('BLOCK_STATUS of zero length is EINVAL as an error chunk', t, async () => {
    const s = setup({ structured: true, contexts: (exp) => [exp.metaContexts[0]!] });
    s.feed(rq(NBD_CMD_BLOCK_STATUS, 4n, 0, 0));
    await waitFor(() => s.host.replies.length === 1);
    const [chunk] = parseChunks(s.host.replies[0]!);
    assert.equal(chunk!.type, 0x8001);
    assert.equal(chunk!.payload.readUInt32BE(0), NBD_EINVAL);
  });

  test('a node error becomes the NBD errno of that request only', t, async () => {
    const s = setup();
    s.node.before = (op, offset) => {
      if (op === 'write' && offset === 4096) throw new BlockError('ENOSPC', 'disk full');
      if (op === 'trim') throw new BlockError('EDQUOT');
      if (op === 'cache') throw new Error('no code at all');
    };
    s.feed(
      Buffer.concat([
        rq(NBD_CMD_WRITE, 1n, 0, 4),
        Buffer.from('aaaa'),
        rq(NBD_CMD_WRITE, 2n, 4096, 4),
        Buffer.from('bbbb'),
        rq(NBD_CMD_WRITE, 3n, 8192, 4),
        Buffer.from('cccc'),
        rq(NBD_CMD_TRIM, 4n, 0, 512),
        rq(NBD_CMD_CACHE, 5n, 0, 512),
      ]),
    );
    await waitFor(() => s.host.replies.length === 5);
    const got = new Map(s.host.replies.map(parseSimpleReply).map((r) => [r.cookie, r.error]));
    assert.deepEqual(
      [...got.entries()].sort((a, b) => Number(a[0] - b[0])),
      [
        [1n, 0],
        [2n, NBD_ENOSPC],
        [3n, 0],
        [4n, NBD_ENOSPC],
        [5n, NBD_EIO],
      ],
    );
    assert.equal(s.node.data.subarray(8192, 8196).toString(), 'cccc');
    assert.equal(s.host.warnings.length, 3);
    assert.deepEqual(s.host.closed, []);
  });

  test('FUA, NO_HOLE and FAST_ZERO reach the node as options', t, async () => {
    const s = setup();
    s.feed(
      Buffer.concat([
        rq(NBD_CMD_WRITE, 1n, 0, 2, NBD_CMD_FLAG_FUA),
        Buffer.from('hi'),
        rq(NBD_CMD_WRITE, 2n, 8, 2),
        Buffer.from('ho'),
        rq(NBD_CMD_TRIM, 3n, 4096, 512, NBD_CMD_FLAG_FUA),
        rq(NBD_CMD_WRITE_ZEROES, 4n, 8192, 512, NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO),
        rq(NBD_CMD_WRITE_ZEROES, 5n, 8192, 512, NBD_CMD_FLAG_FUA),
      ]),
    );
    await waitFor(() => s.host.replies.length === 5);
    assert.deepEqual(
      s.node.calls.map((c) => [c.op, c.opts]),
      [
        ['write', { fua: true }],
        ['write', { fua: false }],
        ['trim', { fua: true }],
        ['writeZeroes', { fua: false, noHole: true, fast: true }],
        ['writeZeroes', { fua: true, noHole: false, fast: false }],
      ],
    );
  });

  test('ENOTSUP from the node is NBD_ENOTSUP only for a FAST_ZERO write zeroes; EOVERFLOW only for a DF read', t, async () => {
    // "Error values": SHOULD NOT return NBD_ENOTSUP except for WRITE_ZEROES
    // with FAST_ZERO, nor NBD_EOVERFLOW except for READ with DF; STYLE: the
    // errno mapping takes the request flags into account (nbdkit's nbd_errno).
    const s = setup();
    s.node.before = (op) => {
      if (op === 'writeZeroes' || op === 'trim') throw new BlockError('ENOTSUP');
      if (op === 'read') throw new BlockError('EOVERFLOW');
    };
    s.feed(
      Buffer.concat([
        rq(NBD_CMD_WRITE_ZEROES, 1n, 0, 512, NBD_CMD_FLAG_FAST_ZERO),
        rq(NBD_CMD_WRITE_ZEROES, 2n, 0, 512),
        rq(NBD_CMD_TRIM, 3n, 0, 512),
        rq(NBD_CMD_READ, 4n, 0, 512),
      ]),
    );
    await waitFor(() => s.host.replies.length === 4);
    const got = new Map(s.host.replies.map(parseSimpleReply).map((r) => [r.cookie, r.error]));
    assert.equal(got.get(1n), NBD_ENOTSUP);
    assert.notEqual(got.get(2n), NBD_ENOTSUP, 'write zeroes without FAST_ZERO must not fail with ENOTSUP');
    assert.notEqual(got.get(3n), NBD_ENOTSUP, 'trim must not fail with ENOTSUP');
    assert.notEqual(got.get(4n), NBD_EOVERFLOW, 'a read without DF must not fail with EOVERFLOW');
  });

  test('a node error on a structured READ is an error chunk', t, async () => {
    const s = setup({ structured: true });
    s.node.fill(0, Buffer.alloc(512, 1));
    s.node.before = (op) => {
      if (op === 'read') throw new BlockError('EIO', 'bad sector');
    };
    s.feed(rq(NBD_CMD_READ, 6n, 0, 512));
    await waitFor(() => s.host.replies.length === 1);
    const chunks = parseChunks(s.host.replies[0]!);
    assert.equal(chunks.length, 1);
    assert.equal(chunks[0]!.type, 0x8001);
    assert.equal(chunks[0]!.flags, 1);
    assert.equal(chunks[0]!.payload.readUInt32BE(0), NBD_EIO);
    assert.equal(chunks[0]!.payload.subarray(6).toString(), 'bad sector');
  });

  test('after shutdown() new requests get ESHUTDOWN (write payloads still drained)', t, async () => {
    const s = setup();
    s.feed(rq(NBD_CMD_FLUSH, 1n, 0, 0));
    await waitFor(() => s.host.replies.length === 1);
    s.tx.shutdown();
    s.feed(Buffer.concat([rq(NBD_CMD_WRITE, 2n, 0, 28), rq(NBD_CMD_FLUSH, 66n, 0, 0), rq(NBD_CMD_READ, 3n, 0, 4)]));
    await settle();
    assert.deepEqual(s.host.replies.map(parseSimpleReply).map((r) => [r.cookie, r.error, r.data.length]), [
      [1n, 0, 0],
      [2n, NBD_ESHUTDOWN, 0],
      [3n, NBD_ESHUTDOWN, 0],
    ]);
  });

  test('requestDone reports each request once with its errno and bytes', t, async () => {
    const s = setup();
    s.feed(Buffer.concat([rq(NBD_CMD_WRITE, 1n, 0, 4), Buffer.from('abcd'), rq(NBD_CMD_READ, 2n, 0, 16), rq(NBD_CMD_TRIM, 3n, MiB, 1)]));
    await waitFor(() => s.host.replies.length === 3);
    const events = [...s.host.events].sort((a, b) => a.command - b.command).map(({ command, error, bytes }) => ({ command, error, bytes }));
    assert.deepEqual(events, [
      { command: NBD_CMD_READ, error: 0, bytes: 16 },
      { command: NBD_CMD_WRITE, error: 0, bytes: 4 },
      { command: NBD_CMD_TRIM, error: NBD_EINVAL, bytes: 0 },
    ]);
  });

  test('observing() decides which request events are built, and they carry times', t, async () => {
    const s = setup();
    let observe = 0;
    const started: RequestEvent[] = [];
    const errors: BackendError[] = [];
    Object.assign(s.host, {
      observing: () => observe,
      requestStart: (e: RequestEvent) => started.push(e),
      backendError: (e: BackendError) => errors.push(e),
    });
    s.node.before = (op) => {
      if (op === 'flush') throw new BlockError('EIO', 'bad disk');
    };
    s.feed(rq(NBD_CMD_READ, 1n, 0, 512));
    await waitFor(() => s.host.replies.length === 1);
    assert.equal(s.host.events.length, 0, 'nobody observes: no events');
    observe = OBSERVE_DONE;
    s.feed(Buffer.concat([rq(NBD_CMD_READ, 2n, 0, 512), rq(NBD_CMD_FLUSH, 3n, 0, 0), rq(NBD_CMD_READ, 4n, 2 * MiB, 1)]));
    await waitFor(() => s.host.replies.length === 4);
    assert.equal(started.length, 0);
    observe = OBSERVE_DONE | OBSERVE_START;
    s.feed(rq(NBD_CMD_DISC, 5n, 0, 0));
    await waitFor(() => s.host.closed.length === 1);
    const byCookie = new Map(s.host.events.map((e) => [e.cookie, e]));
    assert.deepEqual([...byCookie.keys()].sort(), [2n, 3n, 4n, 5n]);
    assert.deepEqual(
      [2n, 3n, 4n, 5n].map((c) => {
        const e = byCookie.get(c)!;
        return [e.export, e.command, e.error, e.bytes, e.offset, e.length];
      }),
      [
        ['e', NBD_CMD_READ, 0, 512, 0, 512],
        ['e', NBD_CMD_FLUSH, NBD_EIO, 0, 0, 0],
        ['e', NBD_CMD_READ, NBD_EINVAL, 0, 2 * MiB, 1],
        ['e', NBD_CMD_DISC, 0, 0, 0, 0],
      ],
    );
    for (const e of s.host.events) assert.ok(e.start > 0 && e.end >= e.start, 'timed');
    assert.deepEqual(started.map((e) => [e.cookie, e.command, e.end]), [[5n, NBD_CMD_DISC, 0]]);
    assert.deepEqual(errors.map((e) => [e.export, e.command, e.errno, e.error, e.message]), [['e', NBD_CMD_FLUSH, 'EIO', NBD_EIO, 'bad disk']]);
    assert.deepEqual(s.host.closed, ['client sent NBD_CMD_DISC']);
  });
});

/** A node that writes small payloads on the caller's thread (BlockNode.writeNow), as a tmpfs file does. */
class SyncWriteNode extends FakeNode {
  readonly now: number[] = [];
  /** From this offset on writeNow says no, as a closing node does. */
  refuseFrom = Infinity;
  writeNow(offset: number, data: Buffer, opts?: WriteOptions): boolean {
    if (opts?.fua === true || offset >= this.refuseFrom) return false; // FUA needs a flush: the async path
    if (offset === 4096) throw new BlockError('ENOSPC', 'disk full');
    this.now.push(offset);
    this.fill(offset, data);
    return true;
  }
}

describe('Transmission: writes done on the spot (BlockNode.writeNow)', () => {
  for (const mode of ['whole', 'bytewise'] as const) {
    test(`small writes are written from the socket's bytes and answered at once; FUA takes the async path, large ones later turns (fed ${mode})`, t, async () => {
      const node = new SyncWriteNode(MiB);
      const budget = new ByteBudget(8 * MiB);
      const s = setup({ spec: { node }, limits: { ...DEFAULT_LIMITS, budget } });
      // Fed a byte at a time, the payloads stay small (each byte is a feed).
      const small = Buffer.alloc(mode === 'whole' ? 60 * 1024 : 3000, 0x11);
      const large = Buffer.alloc(64 * 1024, 0x22);
      s.feed(
        Buffer.concat([
          rq(NBD_CMD_WRITE, 1n, 0, 4),
          Buffer.from('abcd'),
          rq(NBD_CMD_WRITE, 2n, 8192, small.length),
          small,
          rq(NBD_CMD_WRITE, 3n, 4096, 4),
          Buffer.from('full'),
          rq(NBD_CMD_WRITE, 4n, 100, 4, NBD_CMD_FLAG_FUA),
          Buffer.from('wxyz'),
        ]),
        mode,
      );
      s.feed(Buffer.concat([rq(NBD_CMD_WRITE, 5n, 128 * 1024, large.length), large]));
      await waitFor(() => s.host.replies.length === 5, 2000, '5 replies');
      const got = new Map(s.host.replies.map(parseSimpleReply).map((r) => [r.cookie, r.error]));
      assert.deepEqual([1n, 2n, 3n, 4n, 5n].map((c) => got.get(c)), [0, 0, NBD_ENOSPC, 0, 0]);
      assert.deepEqual(node.now, [0, 8192, 128 * 1024], 'the two small writes without FUA, then the 64 KiB one');
      assert.deepEqual(
        node.calls.filter((c) => c.op === 'write').map((c) => c.offset),
        [100],
        'FUA went through write()',
      );
      assert.equal(node.data.subarray(0, 4).toString(), 'abcd');
      assert.ok(node.data.subarray(8192, 8192 + small.length).equals(small));
      assert.equal(node.data.subarray(100, 104).toString(), 'wxyz');
      assert.ok(node.data.subarray(128 * 1024, 128 * 1024 + large.length).equals(large));
      assert.equal(s.host.warnings.length, 1, 'the failed write is logged');
      await waitFor(() => budget.used === 0, 2000, 'every byte of the budget back');
      assert.equal(s.queue.length, 0);
      assert.equal(s.tx.inflight, 0);
    });
  }
});

describe('Transmission: large writes on the spot where the host asks (writesLargeNow, as over TCP)', () => {
  test('gathered from the queue or read straight into their buffer, they are offered to writeNow; FUA and refused ones take write()', t, async () => {
    const node = new SyncWriteNode(4 * MiB);
    const budget = new ByteBudget(16 * MiB);
    const s = setup({ spec: { node }, limits: { ...DEFAULT_LIMITS, budget } });
    s.host.writesLargeNow = true;
    const a = Buffer.alloc(200 * 1024, 0x0a);
    const b = Buffer.alloc(200 * 1024, 0x0b);
    const c = Buffer.alloc(100 * 1024, 0x0c);
    s.feed(Buffer.concat([rq(NBD_CMD_WRITE, 1n, MiB, a.length), a]));
    assert.equal(s.host.replies.length, 1, 'answered at once');
    const direct: { buf: Buffer; done: () => void }[] = [];
    s.host.readInto = (buf, filled, done) => direct.push({ buf, done });
    s.feed(Buffer.concat([rq(NBD_CMD_WRITE, 2n, 2 * MiB, b.length), b.subarray(0, 1000)]));
    b.copy(direct[0]!.buf);
    direct[0]!.done();
    assert.equal(s.host.replies.length, 2, 'answered once its payload is in');
    s.host.readInto = undefined;
    s.feed(Buffer.concat([rq(NBD_CMD_WRITE, 3n, 3 * MiB, c.length, NBD_CMD_FLAG_FUA), c]));
    await waitFor(() => s.host.replies.length === 3, 2000, '3 replies');
    assert.deepEqual(s.host.replies.map(parseSimpleReply).map((r) => [r.cookie, r.error]), [[1n, 0], [2n, 0], [3n, 0]]);
    assert.deepEqual(node.now, [MiB, 2 * MiB]);
    assert.deepEqual(node.calls.filter((x) => x.op === 'write').map((x) => x.offset), [3 * MiB], 'FUA went through write()');
    assert.ok(node.data.subarray(MiB, MiB + a.length).equals(a));
    assert.ok(node.data.subarray(2 * MiB, 2 * MiB + b.length).equals(b));
    assert.ok(node.data.subarray(3 * MiB, 3 * MiB + c.length).equals(c));
    // A large write that fails on the spot gets its error, and the connection goes on.
    s.feed(Buffer.concat([rq(NBD_CMD_WRITE, 4n, 4096, a.length), a]));
    assert.deepEqual(parseSimpleReply(s.host.replies[3]!).error, NBD_ENOSPC);
    s.feed(rq(NBD_CMD_FLUSH, 5n, 0, 0));
    await waitFor(() => s.host.replies.length === 5, 2000, '5 replies');
    await waitFor(() => budget.used === 0, 2000, 'every byte of the budget back');
    assert.equal(s.tx.inflight, 0);
  });
});

const turn = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));

describe('Transmission: large writes in slices, one per turn of the event loop (WRITE_SLICE)', () => {
  test('gathered from the queue or read straight into their buffer, they go to writeNow 128 KiB a turn and are answered after the last; FUA takes write()', t, async () => {
    const node = new SyncWriteNode(4 * MiB);
    const budget = new ByteBudget(16 * MiB);
    const s = setup({ spec: { node }, limits: { ...DEFAULT_LIMITS, budget } });
    const a = Buffer.alloc(200 * 1024, 0x0a);
    const b = Buffer.alloc(200 * 1024, 0x0b);
    const c = Buffer.alloc(100 * 1024, 0x0c);
    s.feed(Buffer.concat([rq(NBD_CMD_WRITE, 1n, MiB, a.length), a]));
    assert.equal(s.host.replies.length, 0, 'nothing written while the socket is being read');
    assert.equal(s.tx.inflight, 1, 'the queued write is in flight');
    await turn();
    assert.deepEqual(node.now, [MiB], 'one slice in the first turn');
    assert.equal(s.host.replies.length, 0, 'not answered before its last slice');
    await turn();
    assert.deepEqual(node.now, [MiB, MiB + 128 * 1024]);
    assert.equal(s.host.replies.length, 1, 'answered with its last slice');
    const direct: { buf: Buffer; done: () => void }[] = [];
    s.host.readInto = (buf, filled, done) => direct.push({ buf, done });
    s.feed(Buffer.concat([rq(NBD_CMD_WRITE, 2n, 2 * MiB, b.length), b.subarray(0, 1000)]));
    b.copy(direct[0]!.buf);
    direct[0]!.done();
    s.host.readInto = undefined;
    s.feed(Buffer.concat([rq(NBD_CMD_WRITE, 3n, 3 * MiB, c.length, NBD_CMD_FLAG_FUA), c]));
    await waitFor(() => s.host.replies.length === 3, 2000, '3 replies');
    assert.deepEqual(s.host.replies.map(parseSimpleReply).map((r) => [r.cookie, r.error]).sort(), [[1n, 0], [2n, 0], [3n, 0]]);
    assert.deepEqual(node.now, [MiB, MiB + 128 * 1024, 2 * MiB, 2 * MiB + 128 * 1024]);
    assert.deepEqual(node.calls.filter((x) => x.op === 'write').map((x) => x.offset), [3 * MiB], 'FUA went through write()');
    assert.ok(node.data.subarray(MiB, MiB + a.length).equals(a));
    assert.ok(node.data.subarray(2 * MiB, 2 * MiB + b.length).equals(b));
    assert.ok(node.data.subarray(3 * MiB, 3 * MiB + c.length).equals(c));
    // A slice that fails gets the write its error, and the connection goes on.
    s.feed(Buffer.concat([rq(NBD_CMD_WRITE, 4n, 4096, a.length), a]));
    await waitFor(() => s.host.replies.length === 4, 2000, '4 replies');
    assert.deepEqual(parseSimpleReply(s.host.replies[3]!).error, NBD_ENOSPC);
    s.feed(rq(NBD_CMD_FLUSH, 5n, 0, 0));
    await waitFor(() => s.host.replies.length === 5, 2000, '5 replies');
    await waitFor(() => budget.used === 0, 2000, 'every byte of the budget back');
    assert.equal(s.tx.inflight, 0);
  });

  test('a node that stops writing on this thread partway gets the rest through write(); one reply, all bytes, the budget back', t, async () => {
    const node = new SyncWriteNode(4 * MiB);
    const budget = new ByteBudget(16 * MiB);
    const s = setup({ spec: { node }, limits: { ...DEFAULT_LIMITS, budget } });
    const a = Buffer.alloc(300 * 1024);
    for (let i = 0; i < a.length; i++) a[i] = i % 251;
    node.refuseFrom = MiB + 128 * 1024;
    s.feed(Buffer.concat([rq(NBD_CMD_WRITE, 1n, MiB, a.length), a]));
    await waitFor(() => s.host.replies.length === 1, 2000, 'the reply');
    assert.deepEqual(parseSimpleReply(s.host.replies[0]!).error, 0);
    assert.deepEqual(node.now, [MiB], 'one slice on this thread');
    assert.deepEqual(node.calls.filter((x) => x.op === 'write').map((x) => [x.offset, x.length]), [[MiB + 128 * 1024, a.length - 128 * 1024]], 'the rest through write()');
    assert.ok(node.data.subarray(MiB, MiB + a.length).equals(a));
    // Its event is the client's request, with every byte it wrote, not the rest's.
    const done = s.host.events.filter((e) => e.cookie === 1n);
    assert.deepEqual(done.map((e) => [e.offset, e.length, e.bytes, e.error]), [[MiB, a.length, a.length, 0]]);
    await waitFor(() => budget.used === 0, 2000, 'every byte of the budget back');
    assert.equal(s.tx.inflight, 0);
  });

  test('parsing pauses while 2 MiB of one connection wait for their slices, and resumes as they are written', t, async () => {
    const node = new SyncWriteNode(8 * MiB);
    const s = setup({ spec: { node } });
    const payloads = [1, 2, 3].map((i) => Buffer.alloc(MiB, i));
    s.feed(Buffer.concat(payloads.flatMap((p, i) => [rq(NBD_CMD_WRITE, BigInt(i + 1), i * MiB, MiB), p])));
    assert.equal(s.tx.inflight, 2, 'two queued');
    assert.equal(s.tx.saturated, true, 'at the bound, below maxInflightBytes');
    assert.equal(s.queue.length, 28 + MiB, 'the third waits in the socket queue');
    await turn();
    assert.equal(s.queue.length, 28 + MiB, 'still waiting while 2 MiB are queued');
    await waitFor(() => s.host.replies.length === 1, 2000, 'the first reply');
    assert.equal(s.queue.length, 0, 'parsed once the first write was answered');
    await waitFor(() => s.host.replies.length === 3, 2000, '3 replies');
    assert.deepEqual(cookiesOf(s.host), [1n, 2n, 3n]);
    for (const [i, p] of payloads.entries()) assert.ok(node.data.subarray(i * MiB, (i + 1) * MiB).equals(p));
    assert.equal(s.tx.saturated, false);
    assert.equal(s.tx.inflight, 0);
  });

  test('NBD_CMD_DISC waits for the writes still being sliced', t, async () => {
    const node = new SyncWriteNode(4 * MiB);
    const s = setup({ spec: { node } });
    const a = Buffer.alloc(512 * 1024, 0x5a);
    s.feed(Buffer.concat([rq(NBD_CMD_WRITE, 1n, 0, a.length), a, rq(NBD_CMD_DISC, 2n, 0, 0)]));
    assert.deepEqual(s.host.closed, [], 'not closed with a write in flight');
    await waitFor(() => s.host.closed.length === 1, 2000, 'the close');
    assert.equal(node.now.length, 4, 'all four slices written first');
    assert.deepEqual(s.host.closedAfter, [1], 'after the write was answered');
    assert.ok(node.data.subarray(0, a.length).equals(a));
  });
});

/** A node that reads small ranges on the caller's thread (BlockNode.readNow), as a tmpfs file does. */
class SyncReadNode extends FakeNode {
  readonly now: number[] = [];
  /** Ranges from here on are "not in memory": readNow says no. */
  slowFrom = 512 * 1024;
  readNow(offset: number, length: number, into?: Buffer): Buffer | null {
    if (offset >= this.slowFrom) return null;
    this.now.push(offset);
    if (offset === 4096) throw new BlockError('EIO', 'bad sector');
    const out = into ?? Buffer.alloc(length);
    this.data.copy(out, 0, offset, offset + length);
    return out;
  }
}

describe('Transmission: reads done on the spot (BlockNode.readNow)', () => {
  for (const mode of ['whole', 'bytewise'] as const) {
    test(`small reads are answered at once; a failing one gets its error; ranges the node cannot read now and 64 KiB ones take read() (fed ${mode})`, t, async () => {
      const node = new SyncReadNode(MiB);
      const budget = new ByteBudget(8 * MiB);
      const s = setup({ spec: { node }, limits: { ...DEFAULT_LIMITS, budget } });
      const small = Buffer.alloc(3000, 0x11);
      node.fill(0, Buffer.from('abcd'));
      node.fill(8192, small);
      node.fill(600 * 1024, Buffer.from('slow'));
      s.feed(
        Buffer.concat([
          rq(NBD_CMD_READ, 1n, 0, 4),
          rq(NBD_CMD_READ, 2n, 8192, small.length),
          rq(NBD_CMD_READ, 3n, 4096, 4),
          rq(NBD_CMD_READ, 4n, 600 * 1024, 4),
          rq(NBD_CMD_READ, 5n, 128 * 1024, 64 * 1024),
        ]),
        mode,
      );
      // The three tried on the spot were answered before anything was awaited.
      assert.equal(s.host.replies.length, 3);
      await waitFor(() => s.host.replies.length === 5, 2000, '5 replies');
      const got = new Map(s.host.replies.map(parseSimpleReply).map((r) => [r.cookie, r]));
      assert.deepEqual([1n, 2n, 3n, 4n, 5n].map((c) => got.get(c)!.error), [0, 0, NBD_EIO, 0, 0]);
      assert.equal(got.get(1n)!.data.toString(), 'abcd');
      assert.ok(got.get(2n)!.data.equals(small));
      assert.equal(got.get(3n)!.data.length, 0, 'an error reply carries no data');
      assert.equal(got.get(4n)!.data.toString(), 'slow');
      assert.equal(got.get(5n)!.data.length, 64 * 1024);
      assert.deepEqual(node.now, [0, 8192, 4096]);
      assert.deepEqual(
        node.calls.filter((c) => c.op === 'read').map((c) => c.offset),
        [600 * 1024, 128 * 1024],
      );
      assert.equal(s.host.warnings.length, 1, 'the failed read is logged');
      assert.equal(budget.used, 0, 'every byte of the budget back');
      assert.equal(s.queue.length, 0);
      assert.equal(s.tx.inflight, 0);
      // Still serving after the error.
      s.feed(rq(NBD_CMD_READ, 6n, 0, 2));
      assert.equal(parseSimpleReply(s.host.replies[5]!).data.toString(), 'ab');
    });
  }

  test('structured replies: data as one data chunk, zeroes as a hole, an error as an error chunk', t, async () => {
    const node = new SyncReadNode(MiB);
    const s = setup({ spec: { node }, structured: true });
    node.fill(0, Buffer.from('data'));
    s.feed(Buffer.concat([rq(NBD_CMD_READ, 1n, 0, 4), rq(NBD_CMD_READ, 2n, 65536, 4096), rq(NBD_CMD_READ, 3n, 4096, 512)]));
    assert.equal(s.host.replies.length, 3);
    const [data, hole, error] = s.host.replies.map(parseChunks);
    assert.deepEqual(data!.map((c) => [c.cookie, c.type, c.flags]), [[1n, NBD_REPLY_TYPE_OFFSET_DATA, 1]]);
    assert.equal(data![0]!.payload.subarray(8).toString(), 'data');
    assert.deepEqual(hole!.map((c) => [c.cookie, c.type, c.payload.readBigUInt64BE(0), c.payload.readUInt32BE(8)]), [[2n, NBD_REPLY_TYPE_OFFSET_HOLE, 65536n, 4096]]);
    assert.deepEqual(error!.map((c) => [c.cookie, c.type, c.payload.readUInt32BE(0)]), [[3n, NBD_REPLY_TYPE_ERROR, NBD_EIO]]);
    // Zeroes, then data: a hole chunk and a data chunk, the data read in place.
    node.fill(200 * 1024 + 4096, Buffer.alloc(4096, 0x77));
    s.feed(rq(NBD_CMD_READ, 4n, 200 * 1024, 8192));
    const mixed = parseChunks(s.host.replies[3]!);
    assert.deepEqual(mixed.map((c) => [c.type, c.flags, c.payload.readBigUInt64BE(0)]), [
      [NBD_REPLY_TYPE_OFFSET_HOLE, 0, 200n * 1024n],
      [NBD_REPLY_TYPE_OFFSET_DATA, 1, 200n * 1024n + 4096n],
    ]);
    assert.ok(mixed[1]!.payload.subarray(8).equals(Buffer.alloc(4096, 0x77)));
  });

  test('an answered read holds its bytes until its reply is sent: parsing stops at maxInflightBytes', t, async () => {
    const node = new SyncReadNode(MiB);
    const s = setup({ spec: { node }, limits: { maxInflightBytes: 8192, maxInflightRequests: 100 } });
    const pending: (() => void)[] = [];
    s.host.sendReply = (parts, sent) => {
      s.host.replies.push(Buffer.concat(parts.map((p) => Buffer.from(p))));
      if (sent !== undefined) pending.push(sent);
    };
    s.feed(Buffer.concat([1n, 2n, 3n, 4n].map((c) => rq(NBD_CMD_READ, c, 0, 4096))));
    assert.equal(s.host.replies.length, 2, 'two 4 KiB replies fill the 8 KiB bound');
    assert.ok(s.tx.saturated);
    for (const sent of pending.splice(0)) sent();
    assert.equal(s.host.replies.length, 4, 'sending them lets the rest through');
    for (const sent of pending.splice(0)) sent();
    assert.ok(!s.tx.saturated);
  });
});

/** Offers its bytes as views of its memory (BlockNode.readViews): 64 KiB pieces, all-zero ones as holes. */
class ViewNode extends FakeNode {
  readonly viewed: number[] = [];
  readViews(offset: number, length: number): MemoryRun[] {
    this.viewed.push(offset);
    const runs: MemoryRun[] = [];
    for (let pos = offset; pos < offset + length; ) {
      const n = Math.min(64 * 1024 - (pos % (64 * 1024)), offset + length - pos);
      const piece = this.data.subarray(pos, pos + n);
      const last = runs.length - 1;
      if (!isAllZero(piece)) runs.push(piece);
      else if (last >= 0 && typeof runs[last] === 'number') (runs[last] as number) += n;
      else runs.push(n);
      pos += n;
    }
    return runs;
  }
}

describe('Transmission: large reads sent as views of the node memory (BlockNode.readViews)', () => {
  const KiB = 1024;
  const a = Buffer.alloc(64 * KiB, 0x61);
  const b = Buffer.alloc(64 * KiB, 0x62);
  const viewSetup = (structured: boolean) => {
    const node = new ViewNode(MiB);
    node.fill(64 * KiB, a);
    node.fill(128 * KiB, b);
    return { node, s: setup({ spec: { node }, structured }) };
  };

  test('structured: holes as hole chunks, data side by side as one data chunk, uncopied by read()', t, async () => {
    const { node, s } = viewSetup(true);
    s.feed(rq(NBD_CMD_READ, 1n, 32 * KiB, 224 * KiB));
    await waitFor(() => s.host.replies.length === 1);
    const chunks = parseChunks(s.host.replies[0]!);
    assert.deepEqual(chunks.map((c) => [c.type, c.flags, c.payload.readBigUInt64BE(0)]), [
      [NBD_REPLY_TYPE_OFFSET_HOLE, 0, 32n * 1024n],
      [NBD_REPLY_TYPE_OFFSET_DATA, 0, 64n * 1024n],
      [NBD_REPLY_TYPE_OFFSET_HOLE, 1, 192n * 1024n],
    ]);
    assert.equal(chunks[0]!.payload.readUInt32BE(8), 32 * KiB);
    assert.ok(chunks[1]!.payload.subarray(8).equals(Buffer.concat([a, b])));
    assert.equal(chunks[2]!.payload.readUInt32BE(8), 64 * KiB);
    assert.deepEqual(node.viewed, [32 * KiB]);
    assert.deepEqual(node.calls.filter((c) => c.op === 'read'), [], 'no read() copied the data');
    // Ending on data: the data chunk is the last.
    s.feed(rq(NBD_CMD_READ, 2n, 0, 192 * KiB));
    await waitFor(() => s.host.replies.length === 2);
    assert.deepEqual(parseChunks(s.host.replies[1]!).map((c) => [c.type, c.flags, c.payload.length]), [
      [NBD_REPLY_TYPE_OFFSET_HOLE, 0, 12],
      [NBD_REPLY_TYPE_OFFSET_DATA, 1, 8 + 128 * KiB],
    ]);
  });

  test('with DF, and with simple replies, holes go as zeroes in one piece of data', t, async () => {
    const want = Buffer.concat([Buffer.alloc(32 * KiB), a, b, Buffer.alloc(200 * KiB)]);
    const structured = viewSetup(true).s;
    structured.feed(rq(NBD_CMD_READ, 3n, 32 * KiB, want.length, NBD_CMD_FLAG_DF));
    await waitFor(() => structured.host.replies.length === 1);
    const chunks = parseChunks(structured.host.replies[0]!);
    assert.deepEqual(chunks.map((c) => [c.type, c.flags, c.payload.readBigUInt64BE(0)]), [[NBD_REPLY_TYPE_OFFSET_DATA, 1, 32n * 1024n]]);
    assert.ok(chunks[0]!.payload.subarray(8).equals(want));
    const simple = viewSetup(false);
    simple.s.feed(rq(NBD_CMD_READ, 4n, 32 * KiB, want.length));
    await waitFor(() => simple.s.host.replies.length === 1);
    const reply = parseSimpleReply(simple.s.host.replies[0]!);
    assert.equal(reply.error, 0);
    assert.ok(reply.data.equals(want));
    assert.deepEqual(simple.node.calls.filter((c) => c.op === 'read'), []);
    // Under 64 KiB a read is copied as before; the views are for large replies.
    simple.s.feed(rq(NBD_CMD_READ, 5n, 64 * KiB, 4 * KiB));
    await waitFor(() => simple.s.host.replies.length === 2);
    assert.ok(parseSimpleReply(simple.s.host.replies[1]!).data.equals(a.subarray(0, 4 * KiB)));
    assert.deepEqual(simple.node.viewed, [32 * KiB]);
  });
});
