import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import {
  NBD_INFO_BLOCK_SIZE,
  NBD_INFO_DESCRIPTION,
  NBD_INFO_NAME,
  NBD_OPT_ABORT,
  NBD_OPT_EXPORT_NAME,
  NBD_OPT_GO,
  NBD_OPT_INFO,
  NBD_OPT_LIST,
  NBD_OPT_LIST_META_CONTEXT,
  NBD_OPT_SET_META_CONTEXT,
  NBD_OPT_STARTTLS,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_REP_ACK,
  NBD_REP_ERR_INVALID,
  NBD_REP_ERR_POLICY,
  NBD_REP_ERR_TOO_BIG,
  NBD_REP_ERR_UNKNOWN,
  NBD_REP_ERR_UNSUP,
  NBD_REP_META_CONTEXT,
} from '../protocol/constants.ts';
import { ByteQueue } from '../protocol/byte-queue.ts';
import { hex, lstr, requestBytes, toHex, u16, u32 } from '../protocol/test-helpers.ts';
import type { Export } from '../exports/export.ts';
import type { ExportRegistry } from '../exports/registry.ts';
import { MAX_META_QUERIES, MAX_OPTION_DATA, Negotiation } from './negotiation.ts';
import { FakeNegotiationHost, makeExport, optionBytes, parseOptionReplies, registryOf, type OptionReply } from './test-helpers.ts';

const t = { timeout: 10_000 };
const MAGIC = '0003e889045565a9';
const MiB = 1024 * 1024;

/** Client flags: FIXED_NEWSTYLE, plus NO_ZEROES when asked. */
const flags = (noZeroes = true) => u32(noZeroes ? 3 : 1);
const infoData = (name: string, ...requests: number[]) => Buffer.concat([lstr(name), u16(requests.length), ...requests.map(u16)]);
const metaData = (name: string, ...queries: string[]) => Buffer.concat([lstr(name), u32(queries.length), ...queries.map((q) => lstr(q))]);
const STRUCTURED = optionBytes(NBD_OPT_STRUCTURED_REPLY);

interface Run {
  host: FakeNegotiationHost;
  queue: ByteQueue;
  negotiation: Negotiation;
}

function run(exports: ExportRegistry, bytes: Buffer, mode: 'whole' | 'bytewise'): Run {
  const host = new FakeNegotiationHost(exports);
  const negotiation = new Negotiation(host);
  const queue = new ByteQueue();
  if (mode === 'whole') {
    queue.push(bytes);
    negotiation.feed(queue);
  } else {
    for (let i = 0; i < bytes.length; i++) {
      queue.push(bytes.subarray(i, i + 1));
      negotiation.feed(queue);
    }
  }
  return { host, queue, negotiation };
}

/** Run both ways, check they agree, return the result. */
function negotiate(exports: ExportRegistry, ...parts: Buffer[]): Run & { replies: OptionReply[] } {
  const bytes = Buffer.concat(parts);
  const whole = run(exports, bytes, 'whole');
  const bytewise = run(exports, bytes, 'bytewise');
  assert.equal(toHex(bytewise.host.output), toHex(whole.host.output), 'same output fed whole or byte by byte');
  assert.deepEqual(bytewise.host.closed, whole.host.closed);
  assert.deepEqual(bytewise.host.sessions, whole.host.sessions);
  assert.equal(bytewise.queue.length, whole.queue.length);
  return {
    ...whole,
    // Parsed on use: an EXPORT_NAME reply is not an option reply.
    get replies() {
      return parseOptionReplies(whole.host.output);
    },
  };
}

function optionReply(option: number, type: number, data = ''): string {
  const d = hex(data);
  return `${MAGIC}${toHex(u32(option))}${toHex(u32(type))}${toHex(u32(d.length))}${toHex(d)}`;
}

/** An error reply: the option, the type, and a message that is a valid string. */
function assertError(reply: OptionReply | undefined, option: number, type: number): void {
  assert.ok(reply, 'a reply');
  assert.equal(reply.option, option);
  assert.equal(reply.type >>> 0, type >>> 0, `reply type 0x${reply.type.toString(16)}`);
  assert.ok(reply.data.length <= 4096, `message of ${reply.data.length} bytes`);
  assert.ok(!reply.data.includes(0));
  new TextDecoder('utf-8', { fatal: true }).decode(reply.data);
}

function setup(): { a: Export; b: Export; exports: ExportRegistry } {
  const a = makeExport({ name: 'a', description: 'disk A', size: MiB });
  const b = makeExport({ name: 'b', size: 2 * MiB, multiConn: true });
  return { a, b, exports: registryOf(a, b) };
}

describe('Negotiation', () => {
  test('greeting is NBDMAGIC, IHAVEOPT, FIXED_NEWSTYLE|NO_ZEROES', t, () => {
    const n = new Negotiation(new FakeNegotiationHost(registryOf()));
    assert.equal(toHex(n.greeting()), '4e42444d4147494349484156454f50540003');
    assert.equal(n.finished, false);
  });

  test('client flags with unknown bits close the connection without a reply', t, () => {
    const { exports } = setup();
    for (const bad of [4, 0x80000000, 0xffffffff]) {
      const r = negotiate(exports, u32(bad), optionBytes(NBD_OPT_LIST));
      assert.equal(r.host.closed.length, 1);
      assert.equal(r.host.sent.length, 0);
      assert.equal(r.negotiation.finished, true);
    }
    for (const ok of [0, 1, 2, 3]) {
      const r = negotiate(exports, u32(ok), optionBytes(NBD_OPT_LIST));
      assert.deepEqual(r.host.closed, [], `client flags ${ok}`);
    }
  });

  test('nothing happens until the client flags are complete', t, () => {
    const { exports } = setup();
    const r = negotiate(exports, hex('000000'));
    assert.equal(r.host.sent.length, 0);
    assert.equal(r.queue.length, 3);
  });

  test('LIST: one NBD_REP_SERVER per export, then ACK (exact bytes)', t, () => {
    const { exports } = setup();
    const r = negotiate(exports, flags(), optionBytes(NBD_OPT_LIST));
    assert.equal(
      toHex(r.host.output),
      optionReply(NBD_OPT_LIST, 2, '00000001 61 6469736b2041') + optionReply(NBD_OPT_LIST, 2, '00000001 62') + optionReply(NBD_OPT_LIST, NBD_REP_ACK),
    );
    assert.deepEqual(r.host.closed, []);
  });

  test('LIST with data is INVALID, and the data is consumed', t, () => {
    const { exports } = setup();
    const r = negotiate(exports, flags(), optionBytes(NBD_OPT_LIST, hex('0102')), optionBytes(NBD_OPT_LIST));
    assertError(r.replies[0], NBD_OPT_LIST, NBD_REP_ERR_INVALID);
    assert.deepEqual(r.replies.slice(1).map((x) => x.type), [2, 2, NBD_REP_ACK]);
  });

  test('INFO with NAME, DESCRIPTION, BLOCK_SIZE: exact replies, no transmission', t, () => {
    const { exports } = setup();
    const r = negotiate(exports, flags(), optionBytes(NBD_OPT_INFO, infoData('a', NBD_INFO_NAME, NBD_INFO_DESCRIPTION, NBD_INFO_BLOCK_SIZE)));
    assert.equal(
      toHex(r.host.output),
      optionReply(NBD_OPT_INFO, 3, '0001 61') +
        optionReply(NBD_OPT_INFO, 3, '0002 6469736b2041') +
        optionReply(NBD_OPT_INFO, 3, '0003 00000001 00001000 02000000') +
        optionReply(NBD_OPT_INFO, 3, '0000 0000000000100000 0c6d') +
        optionReply(NBD_OPT_INFO, NBD_REP_ACK),
    );
    assert.deepEqual(r.host.sessions, []);
    assert.equal(r.negotiation.finished, false);
  });

  test('INFO with no requests: BLOCK_SIZE and EXPORT only; no DESCRIPTION for an export without one', t, () => {
    const { exports } = setup();
    const r = negotiate(exports, flags(), optionBytes(NBD_OPT_INFO, infoData('b')), optionBytes(NBD_OPT_INFO, infoData('b', NBD_INFO_DESCRIPTION)));
    const one =
      optionReply(NBD_OPT_INFO, 3, '0003 00000001 00001000 02000000') +
      optionReply(NBD_OPT_INFO, 3, '0000 0000000000200000 0d6d') +
      optionReply(NBD_OPT_INFO, NBD_REP_ACK);
    assert.equal(toHex(r.host.output), one + one);
  });

  test('GO: the same replies as INFO, then transmission with a Session; later bytes stay queued', t, () => {
    const { a, exports } = setup();
    const next = requestBytes({ type: 0, cookie: 1n, offset: 0, length: 512 });
    const r = negotiate(exports, flags(), optionBytes(NBD_OPT_GO, infoData('a', NBD_INFO_NAME, NBD_INFO_DESCRIPTION, NBD_INFO_BLOCK_SIZE)), next);
    assert.equal(
      toHex(r.host.output),
      optionReply(NBD_OPT_GO, 3, '0001 61') +
        optionReply(NBD_OPT_GO, 3, '0002 6469736b2041') +
        optionReply(NBD_OPT_GO, 3, '0003 00000001 00001000 02000000') +
        optionReply(NBD_OPT_GO, 3, '0000 0000000000100000 0c6d') +
        optionReply(NBD_OPT_GO, NBD_REP_ACK),
    );
    assert.equal(r.host.sessions.length, 1);
    assert.deepEqual(r.host.sessions[0], { export: a, structuredReplies: false, metaContexts: [], via: 'go' });
    assert.equal(r.host.sessions[0]!.export, a);
    assert.equal(r.negotiation.finished, true);
    assert.deepEqual(r.host.closed, []);
    assert.equal(r.queue.length, 28, 'the request after GO is left for the transmission phase');
    assert.equal(toHex(r.queue.take(28)), toHex(next));
  });

  test('INFO/GO for an unknown export: ERR_UNKNOWN, negotiation continues', t, () => {
    const { exports } = setup();
    const r = negotiate(
      exports,
      flags(),
      optionBytes(NBD_OPT_INFO, infoData('nope')),
      optionBytes(NBD_OPT_GO, infoData('nope', NBD_INFO_NAME)),
      optionBytes(NBD_OPT_GO, infoData('b')),
    );
    assert.equal(r.replies.length, 5);
    assertError(r.replies[0], NBD_OPT_INFO, NBD_REP_ERR_UNKNOWN);
    assertError(r.replies[1], NBD_OPT_GO, NBD_REP_ERR_UNKNOWN);
    assert.equal(r.replies[4]!.type, NBD_REP_ACK);
    assert.equal(r.host.sessions.length, 1);
    assert.equal(r.host.sessions[0]!.export.name, 'b');
  });

  test('GO with malformed data is INVALID', t, () => {
    const { exports } = setup();
    const r = negotiate(exports, flags(), optionBytes(NBD_OPT_GO, hex('00000009 61 0000')), optionBytes(NBD_OPT_GO, hex('00000001 61 0001')));
    assertError(r.replies[0], NBD_OPT_GO, NBD_REP_ERR_INVALID);
    assertError(r.replies[1], NBD_OPT_GO, NBD_REP_ERR_INVALID);
    assert.deepEqual(r.host.sessions, []);
  });

  test('the error message for an unknown 4096-byte export name is still a string of at most 4096 bytes', t, () => {
    const { exports } = setup();
    const long = 'x'.repeat(4096);
    const r = negotiate(
      exports,
      flags(),
      optionBytes(NBD_OPT_GO, infoData(long)),
      STRUCTURED,
      optionBytes(NBD_OPT_LIST_META_CONTEXT, metaData(long)),
    );
    assertError(r.replies[0], NBD_OPT_GO, NBD_REP_ERR_UNKNOWN);
    assertError(r.replies[2], NBD_OPT_LIST_META_CONTEXT, NBD_REP_ERR_UNKNOWN);
  });

  test('EXPORT_NAME for an unknown export closes without a reply', t, () => {
    const { exports } = setup();
    const r = negotiate(exports, flags(), optionBytes(NBD_OPT_EXPORT_NAME, Buffer.from('nope')), optionBytes(NBD_OPT_LIST));
    assert.equal(r.host.sent.length, 0);
    assert.equal(r.host.closed.length, 1);
    assert.deepEqual(r.host.sessions, []);
    assert.equal(r.negotiation.finished, true);
  });

  test('EXPORT_NAME with an invalid name closes', t, () => {
    const { exports } = setup();
    for (const bad of [hex('ff'), hex('6100'), Buffer.alloc(4097, 0x61)]) {
      const r = negotiate(exports, flags(), optionBytes(NBD_OPT_EXPORT_NAME, bad));
      assert.equal(r.host.sent.length, 0);
      assert.equal(r.host.closed.length, 1);
    }
  });

  test('EXPORT_NAME for a known export: 10 bytes with NO_ZEROES, 134 without', t, () => {
    const { a, b, exports } = setup();
    const short = negotiate(exports, flags(true), optionBytes(NBD_OPT_EXPORT_NAME, Buffer.from('a')));
    assert.equal(toHex(short.host.output), '00000000001000000c6d');
    assert.deepEqual(short.host.sessions, [{ export: a, structuredReplies: false, metaContexts: [], via: 'export_name' }]);
    const long = negotiate(exports, flags(false), optionBytes(NBD_OPT_EXPORT_NAME, Buffer.from('b')));
    assert.equal(toHex(long.host.output), '00000000002000000d6d' + '00'.repeat(124));
    assert.deepEqual(long.host.sessions, [{ export: b, structuredReplies: false, metaContexts: [], via: 'export_name' }]);
    assert.deepEqual(long.host.closed, []);
  });

  test('unknown options get UNSUP, their data consumed', t, () => {
    const { exports } = setup();
    for (const option of [0, 4, 11, 99, 0xffffffff]) {
      const r = negotiate(exports, flags(), optionBytes(option, Buffer.from('IHAVEOPT')), optionBytes(NBD_OPT_LIST));
      assertError(r.replies[0], option, NBD_REP_ERR_UNSUP);
      assert.deepEqual(r.replies.slice(1).map((x) => x.type), [2, 2, NBD_REP_ACK], `option ${option}`);
    }
  });

  test('option data over MAX_OPTION_DATA is drained as it arrives, then TOO_BIG (known) or UNSUP (unknown)', t, () => {
    const { exports } = setup();
    for (const [option, want] of [
      [NBD_OPT_INFO, NBD_REP_ERR_TOO_BIG],
      [NBD_OPT_SET_META_CONTEXT, NBD_REP_ERR_TOO_BIG],
      [NBD_OPT_LIST, NBD_REP_ERR_TOO_BIG],
      [99, NBD_REP_ERR_UNSUP],
    ] as const) {
      const host = new FakeNegotiationHost(exports);
      const n = new Negotiation(host);
      const q = new ByteQueue();
      const length = MAX_OPTION_DATA + 1;
      q.push(Buffer.concat([flags(), u32(0x49484156), u32(0x454f5054), u32(option), u32(length)]));
      n.feed(q);
      // The data looks like option headers: none of it may be parsed as one.
      const junk = optionBytes(NBD_OPT_ABORT);
      let left = length;
      while (left > 0) {
        const chunk = Buffer.alloc(Math.min(4096, left));
        for (let i = 0; i < chunk.length; i += junk.length) junk.copy(chunk, i);
        q.push(chunk);
        n.feed(q);
        left -= chunk.length;
        assert.equal(q.length, 0, 'nothing accumulates while draining');
        if (left > 0) assert.equal(host.sent.length, 0, 'no reply before the data is drained');
      }
      q.push(optionBytes(NBD_OPT_LIST));
      n.feed(q);
      const replies = parseOptionReplies(host.output);
      assertError(replies[0], option, want);
      assert.deepEqual(replies.slice(1).map((x) => x.type), [2, 2, NBD_REP_ACK]);
      assert.deepEqual(host.closed, []);
    }
  });

  test('a 4 GiB option is drained without buffering or replying early', t, () => {
    const { exports } = setup();
    const host = new FakeNegotiationHost(exports);
    const n = new Negotiation(host);
    const q = new ByteQueue();
    q.push(Buffer.concat([flags(), Buffer.from('IHAVEOPT'), u32(NBD_OPT_GO), u32(0xffffffff)]));
    n.feed(q);
    for (let i = 0; i < 64; i++) {
      q.push(Buffer.alloc(65536, 0x41));
      n.feed(q);
      assert.equal(q.length, 0);
    }
    assert.deepEqual(host.sent, []);
    assert.deepEqual(host.closed, []);
  });

  test('EXPORT_NAME over MAX_OPTION_DATA closes at once', t, () => {
    const { exports } = setup();
    const r = negotiate(exports, flags(), Buffer.from('IHAVEOPT'), u32(NBD_OPT_EXPORT_NAME), u32(MAX_OPTION_DATA + 1));
    assert.equal(r.host.closed.length, 1);
    assert.equal(r.host.sent.length, 0);
  });

  test('option exactly MAX_OPTION_DATA long is read and answered normally', t, () => {
    const { exports } = setup();
    const r = negotiate(exports, flags(), optionBytes(NBD_OPT_STRUCTURED_REPLY, Buffer.alloc(MAX_OPTION_DATA)));
    assertError(r.replies[0], NBD_OPT_STRUCTURED_REPLY, NBD_REP_ERR_INVALID);
  });

  test('bad option magic closes', t, () => {
    const { exports } = setup();
    const r = negotiate(exports, flags(), Buffer.from('IHAVEOPX'), u32(NBD_OPT_LIST), u32(0), optionBytes(NBD_OPT_LIST));
    assert.equal(r.host.closed.length, 1);
    assert.equal(r.host.sent.length, 0);
  });

  test('STRUCTURED_REPLY: ACK, then INVALID the second time; with data INVALID', t, () => {
    const { exports } = setup();
    const r = negotiate(exports, flags(), STRUCTURED, STRUCTURED);
    assert.equal(toHex(r.host.sent[0]!), optionReply(NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK));
    assertError(r.replies[1], NBD_OPT_STRUCTURED_REPLY, NBD_REP_ERR_INVALID);
    const d = negotiate(exports, flags(), optionBytes(NBD_OPT_STRUCTURED_REPLY, hex('00')), STRUCTURED);
    assertError(d.replies[0], NBD_OPT_STRUCTURED_REPLY, NBD_REP_ERR_INVALID);
    assert.equal(d.replies[1]!.type, NBD_REP_ACK, 'a refused request did not enable structured replies');
  });

  test('structured replies add DF to the transmission flags', t, () => {
    const { a, exports } = setup();
    const r = negotiate(exports, flags(), STRUCTURED, optionBytes(NBD_OPT_GO, infoData('a')));
    // INFO_EXPORT (type 0, 12 bytes), wherever it comes among the INFO replies.
    const infoExport = r.replies.find((rep) => rep.data.length === 12 && rep.data.readUInt16BE(0) === 0);
    assert.equal(toHex(infoExport!.data), '000000000000001000000ced');
    assert.deepEqual(r.host.sessions, [{ export: a, structuredReplies: true, metaContexts: [], via: 'go' }]);
  });

  test('SET_META_CONTEXT and LIST_META_CONTEXT before STRUCTURED_REPLY: INVALID', t, () => {
    const { exports } = setup();
    const r = negotiate(
      exports,
      flags(),
      optionBytes(NBD_OPT_SET_META_CONTEXT, metaData('a', 'base:allocation')),
      optionBytes(NBD_OPT_LIST_META_CONTEXT, metaData('a')),
      STRUCTURED,
      optionBytes(NBD_OPT_GO, infoData('a')),
    );
    assertError(r.replies[0], NBD_OPT_SET_META_CONTEXT, NBD_REP_ERR_INVALID);
    assertError(r.replies[1], NBD_OPT_LIST_META_CONTEXT, NBD_REP_ERR_INVALID);
    assert.deepEqual(r.host.sessions[0]!.metaContexts, [], 'the refused SET selected nothing');
  });

  test('LIST_META_CONTEXT with zero queries or "base:" lists base:allocation with id 0', t, () => {
    const { exports } = setup();
    const want = optionReply(NBD_OPT_LIST_META_CONTEXT, NBD_REP_META_CONTEXT, '00000000 626173653a616c6c6f636174696f6e') + optionReply(NBD_OPT_LIST_META_CONTEXT, NBD_REP_ACK);
    for (const queries of [[], ['base:'], ['base:allocation'], ['qemu:', 'base:'], ['base:allocation', 'base:']]) {
      const r = negotiate(exports, flags(), STRUCTURED, optionBytes(NBD_OPT_LIST_META_CONTEXT, metaData('a', ...queries)));
      assert.equal(toHex(Buffer.concat(r.host.sent.slice(1))), want, JSON.stringify(queries));
    }
    for (const queries of [['qemu:'], ['base:alloc'], ['nope:'], ['']]) {
      const r = negotiate(exports, flags(), STRUCTURED, optionBytes(NBD_OPT_LIST_META_CONTEXT, metaData('a', ...queries)));
      assert.equal(toHex(Buffer.concat(r.host.sent.slice(1))), optionReply(NBD_OPT_LIST_META_CONTEXT, NBD_REP_ACK), JSON.stringify(queries));
    }
  });

  test('LIST/SET_META_CONTEXT: unknown export is UNKNOWN, malformed data INVALID, too many queries TOO_BIG', t, () => {
    const { exports } = setup();
    const many = metaData('a', ...Array.from({ length: MAX_META_QUERIES + 1 }, () => 'base:allocation'));
    const r = negotiate(
      exports,
      flags(),
      STRUCTURED,
      optionBytes(NBD_OPT_LIST_META_CONTEXT, metaData('nope')),
      optionBytes(NBD_OPT_SET_META_CONTEXT, hex('00000001 61 00000001 00000009 62')),
      optionBytes(NBD_OPT_SET_META_CONTEXT, many),
    );
    assertError(r.replies[1], NBD_OPT_LIST_META_CONTEXT, NBD_REP_ERR_UNKNOWN);
    assertError(r.replies[2], NBD_OPT_SET_META_CONTEXT, NBD_REP_ERR_INVALID);
    assertError(r.replies[3], NBD_OPT_SET_META_CONTEXT, NBD_REP_ERR_TOO_BIG);
    assert.equal(r.replies.length, 4);
  });

  test('SET_META_CONTEXT base:allocation: id 0, and the next GO carries it', t, () => {
    const { a, exports } = setup();
    const r = negotiate(
      exports,
      flags(),
      STRUCTURED,
      optionBytes(NBD_OPT_SET_META_CONTEXT, metaData('a', 'base:allocation')),
      optionBytes(NBD_OPT_GO, infoData('a')),
    );
    assert.equal(
      toHex(Buffer.concat(r.host.sent.slice(1, 3))),
      optionReply(NBD_OPT_SET_META_CONTEXT, NBD_REP_META_CONTEXT, '00000000 626173653a616c6c6f636174696f6e') +
        optionReply(NBD_OPT_SET_META_CONTEXT, NBD_REP_ACK),
    );
    assert.equal(r.host.sessions.length, 1);
    const session = r.host.sessions[0]!;
    assert.equal(session.structuredReplies, true);
    assert.equal(session.metaContexts.length, 1);
    assert.equal(session.metaContexts[0], a.metaContexts[0]);
    assert.equal(session.metaContexts[0]!.name, 'base:allocation');
  });

  test('SET selects exact names only: "base:" selects nothing', t, () => {
    const { exports } = setup();
    const r = negotiate(exports, flags(), STRUCTURED, optionBytes(NBD_OPT_SET_META_CONTEXT, metaData('a', 'base:')), optionBytes(NBD_OPT_GO, infoData('a')));
    assert.equal(toHex(r.host.sent[1]!), optionReply(NBD_OPT_SET_META_CONTEXT, NBD_REP_ACK));
    assert.deepEqual(r.host.sessions[0]!.metaContexts, []);
  });

  test('SET for export A then GO to export B: no contexts', t, () => {
    const { b, exports } = setup();
    const r = negotiate(
      exports,
      flags(),
      STRUCTURED,
      optionBytes(NBD_OPT_SET_META_CONTEXT, metaData('a', 'base:allocation')),
      optionBytes(NBD_OPT_GO, infoData('b')),
    );
    assert.deepEqual(r.host.sessions, [{ export: b, structuredReplies: true, metaContexts: [], via: 'go' }]);
  });

  test('a later SET replaces the selection, even when it fails; LIST does not change it', t, () => {
    const { a, exports } = setup();
    const set = (name: string, ...q: string[]) => optionBytes(NBD_OPT_SET_META_CONTEXT, metaData(name, ...q));
    const go = optionBytes(NBD_OPT_GO, infoData('a'));
    const empty = negotiate(exports, flags(), STRUCTURED, set('a', 'base:allocation'), set('a'), go);
    assert.deepEqual(empty.host.sessions[0]!.metaContexts, []);
    const failed = negotiate(exports, flags(), STRUCTURED, set('a', 'base:allocation'), set('nope', 'base:allocation'), go);
    assert.deepEqual(failed.host.sessions[0]!.metaContexts, []);
    const listed = negotiate(exports, flags(), STRUCTURED, set('a', 'base:allocation'), optionBytes(NBD_OPT_LIST_META_CONTEXT, metaData('b')), go);
    assert.deepEqual(listed.host.sessions[0]!.metaContexts, [a.metaContexts[0]]);
  });

  test('EXPORT_NAME after SET carries the contexts too', t, () => {
    const { a, exports } = setup();
    const r = negotiate(
      exports,
      flags(),
      STRUCTURED,
      optionBytes(NBD_OPT_SET_META_CONTEXT, metaData('a', 'base:allocation')),
      optionBytes(NBD_OPT_EXPORT_NAME, Buffer.from('a')),
    );
    assert.deepEqual(r.host.sessions, [{ export: a, structuredReplies: true, metaContexts: [a.metaContexts[0]], via: 'export_name' }]);
    assert.equal(toHex(r.host.sent[3]!), '00000000001000000ced');
  });

  test('ABORT: ACK, then close; any data ignored', t, () => {
    const { exports } = setup();
    for (const data of [Buffer.alloc(0), hex('0102030405')]) {
      const r = negotiate(exports, flags(), optionBytes(NBD_OPT_ABORT, data), optionBytes(NBD_OPT_LIST));
      assert.equal(toHex(r.host.output), optionReply(NBD_OPT_ABORT, NBD_REP_ACK));
      assert.equal(r.host.closed.length, 1);
      assert.equal(r.negotiation.finished, true);
      assert.deepEqual(r.host.sessions, []);
    }
  });

  test('STARTTLS: POLICY (no TLS configured); with data INVALID', t, () => {
    const { exports } = setup();
    const r = negotiate(exports, flags(), optionBytes(NBD_OPT_STARTTLS), optionBytes(NBD_OPT_STARTTLS, hex('00')));
    assertError(r.replies[0], NBD_OPT_STARTTLS, NBD_REP_ERR_POLICY);
    assertError(r.replies[1], NBD_OPT_STARTTLS, NBD_REP_ERR_INVALID);
    assert.deepEqual(r.host.closed, []);
  });

  test('after GO nothing more is consumed or answered', t, () => {
    const { exports } = setup();
    const r = negotiate(exports, flags(), optionBytes(NBD_OPT_GO, infoData('a')), optionBytes(NBD_OPT_LIST));
    // DESCRIPTION (export a has one), BLOCK_SIZE, EXPORT, ACK.
    assert.equal(r.replies.length, 4);
    assert.equal(r.queue.length, 16);
    r.negotiation.feed(r.queue);
    assert.equal(r.queue.length, 16);
    assert.equal(r.host.sessions.length, 1);
  });
});
