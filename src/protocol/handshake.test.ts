import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import fc from 'fast-check';
import {
  NBD_FLAG_FIXED_NEWSTYLE,
  NBD_FLAG_NO_ZEROES,
  NBD_INFO_DESCRIPTION,
  NBD_INFO_NAME,
  NBD_OPT_GO,
  NBD_REP_ACK,
  NBD_REP_ERR_UNSUP,
} from './constants.ts';
import {
  decodeClientFlags,
  decodeOptionHeader,
  encodeExportNameReply,
  encodeGreeting,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeInfoString,
  encodeMetaContextReply,
  encodeOptionReply,
  encodeServerEntry,
} from './handshake.ts';
import { decodeAtEverySplit, hex, toHex } from './test-helpers.ts';

const t = { timeout: 10_000 };
const SERVER_FLAGS = NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES;

describe('handshake encoders match the spec byte layouts', () => {
  test('greeting: NBDMAGIC, IHAVEOPT, u16 handshake flags', t, () => {
    assert.equal(toHex(encodeGreeting(SERVER_FLAGS)), toHex(hex('4e42444d41474943 49484156454f5054 0003')));
    assert.equal(toHex(encodeGreeting(0)), toHex(hex('4e42444d41474943 49484156454f5054 0000')));
  });

  test('option reply: magic, option, type, length, data', t, () => {
    assert.equal(
      toHex(encodeOptionReply(NBD_OPT_GO, NBD_REP_ACK)),
      toHex(hex('0003e889045565a9 | 00000007 | 00000001 | 00000000')),
    );
    assert.equal(
      toHex(encodeOptionReply(99, NBD_REP_ERR_UNSUP, Buffer.from('x'))),
      toHex(hex('0003e889045565a9 | 00000063 | 80000001 | 00000001 | 78')),
    );
    // Error reply types have bit 31 set: written unsigned.
    assert.equal(toHex(encodeOptionReply(0xffffffff, 0x8000000a).subarray(8, 16)), 'ffffffff8000000a');
  });

  test('NBD_REP_SERVER data: u32 name length, name, description', t, () => {
    assert.equal(toHex(encodeServerEntry('ab', 'disk')), toHex(hex('00000002 6162 6469736b')));
    assert.equal(toHex(encodeServerEntry('', '')), '00000000');
    // Lengths count UTF-8 bytes, not characters.
    assert.equal(toHex(encodeServerEntry('é', '')), toHex(hex('00000002 c3a9')));
  });

  test('NBD_INFO_EXPORT: u16 type 0, u64 size, u16 flags (12 bytes)', t, () => {
    assert.equal(toHex(encodeInfoExport(0x123456789abcd, 0x0c6d)), toHex(hex('0000 | 000123456789abcd | 0c6d')));
    assert.equal(toHex(encodeInfoExport(2 ** 53 - 1, 1)), toHex(hex('0000 | 001fffffffffffff | 0001')));
  });

  test('NBD_INFO_NAME / NBD_INFO_DESCRIPTION: u16 type, string', t, () => {
    assert.equal(toHex(encodeInfoString(NBD_INFO_NAME, 'ab')), toHex(hex('0001 6162')));
    assert.equal(toHex(encodeInfoString(NBD_INFO_DESCRIPTION, 'é')), toHex(hex('0002 c3a9')));
    assert.equal(toHex(encodeInfoString(NBD_INFO_NAME, '')), '0001');
  });

  test('NBD_INFO_BLOCK_SIZE: u16 type 3, u32 minimum, preferred, maximum (14 bytes)', t, () => {
    assert.equal(toHex(encodeInfoBlockSize(1, 4096, 32 * 1024 * 1024)), toHex(hex('0003 | 00000001 | 00001000 | 02000000')));
  });

  test('NBD_REP_META_CONTEXT data: u32 id, name', t, () => {
    assert.equal(
      toHex(encodeMetaContextReply(0, 'base:allocation')),
      toHex(hex('00000000 | 62 61 73 65 3a 61 6c 6c 6f 63 61 74 69 6f 6e')),
    );
    assert.equal(toHex(encodeMetaContextReply(0x01020304, 'a:b')), toHex(hex('01020304 613a62')));
  });

  test('EXPORT_NAME reply: u64 size, u16 flags, then 124 zeroes unless NO_ZEROES', t, () => {
    assert.equal(toHex(encodeExportNameReply(0x100000, 0x0c6d, true)), toHex(hex('0000000000100000 0c6d')));
    const padded = encodeExportNameReply(0x100000, 0x0c6d, false);
    assert.equal(toHex(padded), toHex(Buffer.concat([hex('0000000000100000 0c6d'), Buffer.alloc(124)])));
  });
});

describe('handshake decoders', () => {
  test('client flags, fed at every split', t, () => {
    const cases: [string, number, ReturnType<typeof decodeClientFlags>][] = [
      ['00000000', SERVER_FLAGS, { fixedNewstyle: false, noZeroes: false }],
      ['00000001', SERVER_FLAGS, { fixedNewstyle: true, noZeroes: false }],
      ['00000002', SERVER_FLAGS, { fixedNewstyle: false, noZeroes: true }],
      ['00000003', SERVER_FLAGS, { fixedNewstyle: true, noZeroes: true }],
      ['00000004', SERVER_FLAGS, null],
      ['00000007', SERVER_FLAGS, null],
      ['80000000', SERVER_FLAGS, null],
      ['ffffffff', SERVER_FLAGS, null],
      // "MUST NOT be set if the server did not set NBD_FLAG_NO_ZEROES"
      ['00000002', NBD_FLAG_FIXED_NEWSTYLE, null],
      ['00000003', NBD_FLAG_FIXED_NEWSTYLE, null],
      ['00000001', NBD_FLAG_FIXED_NEWSTYLE, { fixedNewstyle: true, noZeroes: false }],
    ];
    for (const [bytes, server, want] of cases) {
      for (const got of decodeAtEverySplit(hex(bytes), (b) => decodeClientFlags(b, server))) {
        assert.deepEqual(got, want, `${bytes} with server flags ${server}`);
      }
    }
  });

  test('option header, fed at every split', t, () => {
    const cases: [string, ReturnType<typeof decodeOptionHeader>][] = [
      ['49484156454f5054 00000007 0000000a', { option: 7, length: 10 }],
      ['49484156454f5054 ffffffff ffffffff', { option: 0xffffffff, length: 0xffffffff }],
      ['49484156454f5054 00000000 00000000', { option: 0, length: 0 }],
      ['49484156454f5055 00000007 0000000a', null],
      ['4e42444d41474943 00000007 0000000a', null],
    ];
    for (const [bytes, want] of cases) {
      for (const got of decodeAtEverySplit(hex(bytes), decodeOptionHeader)) assert.deepEqual(got, want, bytes);
    }
  });

  test('short option header is a caller error (RangeError)', t, () => {
    assert.throws(() => decodeOptionHeader(hex('49484156454f5054 00000007 0000')), RangeError);
  });

  test('decodeOptionHeader never throws on 16 arbitrary bytes and reads both u32s unsigned (property)', t, () => {
    fc.assert(
      fc.property(fc.uint8Array({ minLength: 16, maxLength: 16 }), fc.boolean(), (raw, magic) => {
        const b = Buffer.from(raw);
        if (magic) hex('49484156454f5054').copy(b, 0);
        const got = decodeOptionHeader(b);
        if (b.subarray(0, 8).equals(hex('49484156454f5054'))) {
          assert.deepEqual(got, { option: b.readUInt32BE(8), length: b.readUInt32BE(12) });
        } else {
          assert.equal(got, null);
        }
      }),
      { numRuns: 500 },
    );
  });

  test('decodeClientFlags never throws and refuses exactly the unknown bits (property)', t, () => {
    fc.assert(
      fc.property(fc.nat({ max: 0xffffffff }), fc.nat({ max: 3 }), (flags, server) => {
        const got = decodeClientFlags(hex(flags.toString(16).padStart(8, '0')), server);
        const known = 1 | (server & 2);
        if ((flags & ~known) >>> 0 !== 0) assert.equal(got, null);
        else assert.deepEqual(got, { fixedNewstyle: (flags & 1) !== 0, noZeroes: (flags & 2) !== 0 });
      }),
      { numRuns: 500 },
    );
  });

  test('encodeOptionReply round-trips through a hand-written parser (property)', t, () => {
    fc.assert(
      fc.property(fc.nat({ max: 0xffffffff }), fc.nat({ max: 0xffffffff }), fc.uint8Array({ maxLength: 64 }), (option, type, data) => {
        const b = encodeOptionReply(option, type, Buffer.from(data));
        assert.equal(b.length, 20 + data.length);
        assert.equal(b.readBigUInt64BE(0), 0x0003e889045565a9n);
        assert.equal(b.readUInt32BE(8), option);
        assert.equal(b.readUInt32BE(12), type);
        assert.equal(b.readUInt32BE(16), data.length);
        assert.deepEqual(b.subarray(20), Buffer.from(data));
      }),
      { numRuns: 300 },
    );
  });
});
