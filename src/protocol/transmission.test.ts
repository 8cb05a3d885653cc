import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import fc from 'fast-check';
import {
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_CACHE,
  NBD_CMD_DISC,
  NBD_CMD_FLAG_DF,
  NBD_CMD_FLAG_FAST_ZERO,
  NBD_CMD_FLAG_FUA,
  NBD_CMD_FLAG_NO_HOLE,
  NBD_CMD_FLAG_PAYLOAD_LEN,
  NBD_CMD_FLAG_REQ_ONE,
  NBD_CMD_FLUSH,
  NBD_CMD_READ,
  NBD_CMD_RESIZE,
  NBD_CMD_TRIM,
  NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES,
  NBD_EINVAL,
  NBD_ENOSPC,
  NBD_EPERM,
} from './constants.ts';
import {
  decodeRequest,
  encodeChunkBlockStatus,
  encodeChunkError,
  encodeChunkNone,
  encodeChunkOffsetDataHeader,
  encodeChunkOffsetHole,
  encodeSimpleReply,
  validateRequest,
  type Request,
  type ValidationContext,
} from './transmission.ts';
import { decodeAtEverySplit, hex, requestBytes, toHex } from './test-helpers.ts';

const t = { timeout: 20_000 };
const COOKIE = 0x0102030405060708n;
const C = '0102030405060708';

describe('decodeRequest', () => {
  test('request header, fed at every split', t, () => {
    const bytes = hex('25609513 | 0001 | 0001 | 0102030405060708 | 0000000000001000 | 00000200');
    for (const got of decodeAtEverySplit(bytes, decodeRequest)) {
      assert.deepEqual(got, { flags: NBD_CMD_FLAG_FUA, type: NBD_CMD_WRITE, cookie: COOKIE, offset: 4096, length: 512 });
    }
  });

  test('all-ones fields read unsigned; offsets from 2^53 up become Infinity', t, () => {
    assert.deepEqual(decodeRequest(hex('25609513 ffff ffff ffffffffffffffff 001fffffffffffff ffffffff')), {
      flags: 0xffff,
      type: 0xffff,
      cookie: 0xffffffffffffffffn,
      offset: 2 ** 53 - 1,
      length: 0xffffffff,
    });
    assert.equal(decodeRequest(hex('25609513 0000 0000 0000000000000000 0020000000000000 00000000'))!.offset, Infinity);
    assert.equal(decodeRequest(hex('25609513 0000 0000 0000000000000000 fffffffffffffe00 00000400'))!.offset, Infinity);
  });

  test('wrong magic gives null (at every split); a short header is a RangeError', t, () => {
    for (const magic of ['25609514', '67446698', '668e33ef', '00000000']) {
      for (const got of decodeAtEverySplit(hex(`${magic} 0000 0000 0000000000000000 0000000000000000 00000000`), decodeRequest)) {
        assert.equal(got, null, magic);
      }
    }
    assert.throws(() => decodeRequest(hex('25609513 0000 0000')), RangeError);
  });

  test('round trip: a hand-encoded header decodes to its fields (property)', t, () => {
    fc.assert(
      fc.property(
        fc.nat({ max: 0xffff }),
        fc.nat({ max: 0xffff }),
        fc.bigUint(2n ** 64n - 1n),
        fc.oneof(fc.bigUint(2n ** 53n - 1n), fc.bigUint(2n ** 64n - 1n)),
        fc.nat({ max: 0xffffffff }),
        (flags, type, cookie, offset, length) => {
          const got = decodeRequest(requestBytes({ flags, type, cookie, offset, length }));
          assert.deepEqual(got, { flags, type, cookie, offset: offset < 2n ** 53n ? Number(offset) : Infinity, length });
        },
      ),
      { numRuns: 500 },
    );
  });

  test('never throws on 28 arbitrary bytes (property)', t, () => {
    fc.assert(
      fc.property(fc.uint8Array({ minLength: 28, maxLength: 28 }), (raw) => {
        const got = decodeRequest(Buffer.from(raw));
        assert.equal(got === null, Buffer.from(raw).readUInt32BE(0) !== 0x25609513);
      }),
      { numRuns: 500 },
    );
  });
});

// Transmission flags, spelled by hand (see "Transmission flags"):
// HAS_FLAGS 0x1, READ_ONLY 0x2, SEND_FLUSH 0x4, SEND_FUA 0x8, SEND_TRIM 0x20,
// SEND_WRITE_ZEROES 0x40, SEND_DF 0x80, SEND_CACHE 0x400, SEND_FAST_ZERO 0x800.
const RW_STRUCTURED = 0x0ced;
const RW_SIMPLE = 0x0c6d;
const RO_STRUCTURED = 0x048f;
const MiB = 1024 * 1024;
const SIZE = 64 * MiB;
const MAX_PAYLOAD = 32 * MiB;

const baseCtx: ValidationContext = {
  size: SIZE,
  transmissionFlags: RW_STRUCTURED,
  structuredReplies: true,
  metaContexts: true,
  minimumBlock: 1,
  maximumPayload: MAX_PAYLOAD,
};

/** A request as the decoder would produce it from the wire (offset as u64). */
function req(type: number, offset: bigint | number, length: number, flags = 0): Request {
  return decodeRequest(requestBytes({ type, flags, cookie: 1n, offset, length }))!;
}

describe('validateRequest (one pure check, in spec order)', () => {
  const cases: [string, Request, Partial<ValidationContext>, number][] = [
    // Valid requests.
    ['read', req(NBD_CMD_READ, 0, 4096), {}, 0],
    ['read ending at the size', req(NBD_CMD_READ, SIZE - 4096, 4096), {}, 0],
    ['zero-length read at the size', req(NBD_CMD_READ, SIZE, 0), {}, 0],
    ['read of the maximum payload', req(NBD_CMD_READ, 0, MAX_PAYLOAD), {}, 0],
    ['read with DF', req(NBD_CMD_READ, 0, 512, NBD_CMD_FLAG_DF), {}, 0],
    ['read with FUA', req(NBD_CMD_READ, 0, 512, NBD_CMD_FLAG_FUA), {}, 0],
    ['write', req(NBD_CMD_WRITE, 4096, 512), {}, 0],
    ['write with FUA', req(NBD_CMD_WRITE, 0, 512, NBD_CMD_FLAG_FUA), {}, 0],
    ['flush', req(NBD_CMD_FLUSH, 0, 0), {}, 0],
    ['flush with FUA', req(NBD_CMD_FLUSH, 0, 0, NBD_CMD_FLAG_FUA), {}, 0],
    ['trim', req(NBD_CMD_TRIM, 0, SIZE), {}, 0],
    ['trim longer than the maximum payload', req(NBD_CMD_TRIM, 0, MAX_PAYLOAD + 1), {}, 0],
    ['cache', req(NBD_CMD_CACHE, 0, 4096), {}, 0],
    ['write zeroes with every flag', req(NBD_CMD_WRITE_ZEROES, 0, SIZE, NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO), {}, 0],
    ['block status with REQ_ONE', req(NBD_CMD_BLOCK_STATUS, 0, SIZE, NBD_CMD_FLAG_REQ_ONE), {}, 0],
    ['read without structured replies', req(NBD_CMD_READ, 0, 512), { transmissionFlags: RW_SIMPLE, structuredReplies: false }, 0],
    ['read on a read-only export', req(NBD_CMD_READ, 0, 512), { transmissionFlags: RO_STRUCTURED }, 0],
    ['flush on a read-only export', req(NBD_CMD_FLUSH, 0, 0), { transmissionFlags: RO_STRUCTURED }, 0],
    ['cache on a read-only export', req(NBD_CMD_CACHE, 0, 512), { transmissionFlags: RO_STRUCTURED }, 0],
    ['aligned read with minimum block 512', req(NBD_CMD_READ, 1024, 512), { minimumBlock: 512 }, 0],

    // Unknown commands.
    ['command 9', req(9, 0, 0), {}, NBD_EINVAL],
    ['NBD_CMD_RESIZE (not offered)', req(NBD_CMD_RESIZE, 0, 0), {}, NBD_EINVAL],
    ['command 0xffff', req(0xffff, 0, 0), {}, NBD_EINVAL],

    // Flags.
    ['unknown flag bit 6 on read', req(NBD_CMD_READ, 0, 512, 1 << 6), {}, NBD_EINVAL],
    ['flag bit 15 on flush', req(NBD_CMD_FLUSH, 0, 0, 0x8000), {}, NBD_EINVAL],
    ['PAYLOAD_LEN on write', req(NBD_CMD_WRITE, 0, 512, NBD_CMD_FLAG_PAYLOAD_LEN), {}, NBD_EINVAL],
    ['NO_HOLE on write', req(NBD_CMD_WRITE, 0, 512, NBD_CMD_FLAG_NO_HOLE), {}, NBD_EINVAL],
    ['REQ_ONE on read', req(NBD_CMD_READ, 0, 512, NBD_CMD_FLAG_REQ_ONE), {}, NBD_EINVAL],
    ['DF on write', req(NBD_CMD_WRITE, 0, 512, NBD_CMD_FLAG_DF), {}, NBD_EINVAL],
    ['DF on block status', req(NBD_CMD_BLOCK_STATUS, 0, 512, NBD_CMD_FLAG_DF), {}, NBD_EINVAL],
    ['FAST_ZERO on trim', req(NBD_CMD_TRIM, 0, 512, NBD_CMD_FLAG_FAST_ZERO), {}, NBD_EINVAL],
    ['FUA without SEND_FUA', req(NBD_CMD_WRITE, 0, 512, NBD_CMD_FLAG_FUA), { transmissionFlags: RW_STRUCTURED & ~0x8 }, NBD_EINVAL],
    ['DF without structured replies', req(NBD_CMD_READ, 0, 512, NBD_CMD_FLAG_DF), { transmissionFlags: RW_SIMPLE, structuredReplies: false }, NBD_EINVAL],
    ['FAST_ZERO not advertised', req(NBD_CMD_WRITE_ZEROES, 0, 512, NBD_CMD_FLAG_FAST_ZERO), { transmissionFlags: RW_STRUCTURED & ~0x800 }, NBD_EINVAL],
    // Bad flags come before read-only ("unknown command flag" is EINVAL whatever the export).
    ['bad flag on a write to a read-only export', req(NBD_CMD_WRITE, 0, 512, NBD_CMD_FLAG_DF), { transmissionFlags: RO_STRUCTURED }, NBD_EINVAL],

    // Read-only.
    ['write on read-only', req(NBD_CMD_WRITE, 0, 512), { transmissionFlags: RO_STRUCTURED }, NBD_EPERM],
    ['trim on read-only', req(NBD_CMD_TRIM, 0, 512), { transmissionFlags: RO_STRUCTURED }, NBD_EPERM],
    ['write zeroes on read-only', req(NBD_CMD_WRITE_ZEROES, 0, 512), { transmissionFlags: RO_STRUCTURED }, NBD_EPERM],

    // Payload size.
    ['read over the maximum payload', req(NBD_CMD_READ, 0, MAX_PAYLOAD + 1), {}, NBD_EINVAL],
    ['write over the maximum payload', req(NBD_CMD_WRITE, 0, MAX_PAYLOAD + 1), {}, NBD_EINVAL],
    ['read of 2^32-1 bytes', req(NBD_CMD_READ, 0, 0xffffffff), { size: 2 ** 40 }, NBD_EINVAL],

    // Alignment.
    ['unaligned offset, minimum block 512', req(NBD_CMD_READ, 1, 512), { minimumBlock: 512 }, NBD_EINVAL],
    ['unaligned length, minimum block 512', req(NBD_CMD_WRITE, 0, 511), { minimumBlock: 512 }, NBD_EINVAL],

    // Range.
    ['read one byte past the end', req(NBD_CMD_READ, SIZE - 1, 2), {}, NBD_EINVAL],
    ['zero-length read past the end', req(NBD_CMD_READ, SIZE + 1, 0), {}, NBD_EINVAL],
    ['trim past the end', req(NBD_CMD_TRIM, SIZE - 512, 1024), {}, NBD_EINVAL],
    ['cache past the end', req(NBD_CMD_CACHE, SIZE, 1), {}, NBD_EINVAL],
    ['block status past the end', req(NBD_CMD_BLOCK_STATUS, SIZE - 1, 2), {}, NBD_EINVAL],
    ['write past the end', req(NBD_CMD_WRITE, SIZE - 1, 2), {}, NBD_ENOSPC],
    ['write zeroes past the end', req(NBD_CMD_WRITE_ZEROES, SIZE, 4096), {}, NBD_ENOSPC],

    // offset + length overflowing 64 bits.
    ['read at 2^64-512, length 1024', req(NBD_CMD_READ, 2n ** 64n - 512n, 1024), {}, NBD_EINVAL],
    ['trim at 2^64-1, length 2', req(NBD_CMD_TRIM, 2n ** 64n - 1n, 2), {}, NBD_EINVAL],
    ['cache at 2^63, length 0', req(NBD_CMD_CACHE, 2n ** 63n, 0), {}, NBD_EINVAL],
    ['block status at 2^64-1, length 1', req(NBD_CMD_BLOCK_STATUS, 2n ** 64n - 1n, 1), {}, NBD_EINVAL],
    ['write at 2^64-512, length 1024', req(NBD_CMD_WRITE, 2n ** 64n - 512n, 1024), {}, NBD_ENOSPC],
    ['write zeroes at 2^64-1, length 1', req(NBD_CMD_WRITE_ZEROES, 2n ** 64n - 1n, 1), {}, NBD_ENOSPC],
    ['read at 2^53-1, length 1 (sum is exactly 2^53)', req(NBD_CMD_READ, 2n ** 53n - 1n, 1), { size: 2 ** 53 - 1 }, NBD_EINVAL],
    ['read at 2^53, length 0, on a 2^53-1 export', req(NBD_CMD_READ, 2n ** 53n, 0), { size: 2 ** 53 - 1 }, NBD_EINVAL],

    // FLUSH's offset and length are reserved.
    ['flush with offset 1', req(NBD_CMD_FLUSH, 1, 0), {}, NBD_EINVAL],
    ['flush with length 1', req(NBD_CMD_FLUSH, 0, 1), {}, NBD_EINVAL],
    ['flush with offset near 2^64', req(NBD_CMD_FLUSH, 2n ** 64n - 1n, 0), {}, NBD_EINVAL],

    // BLOCK_STATUS needs a selected context (and so structured replies).
    ['block status without meta contexts', req(NBD_CMD_BLOCK_STATUS, 0, 512), { metaContexts: false }, NBD_EINVAL],
    [
      'block status without structured replies',
      req(NBD_CMD_BLOCK_STATUS, 0, 512),
      { structuredReplies: false, transmissionFlags: RW_SIMPLE },
      NBD_EINVAL,
    ],
  ];

  for (const [name, request, ctx, want] of cases) {
    test(`${name} -> ${want}`, t, () => {
      assert.equal(validateRequest(request, { ...baseCtx, ...ctx }), want);
    });
  }

  test('never throws, always returns 0 or a spec errno, and accepts only in-range requests (property)', t, () => {
    fc.assert(
      fc.property(
        fc.nat({ max: 0xffff }),
        fc.constantFrom(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0xffff),
        fc.oneof(fc.bigUint(2n ** 64n - 1n), fc.bigUint(BigInt(SIZE) + 4096n)),
        fc.oneof(fc.nat({ max: 0xffffffff }), fc.nat({ max: 8192 })),
        fc.constantFrom(RW_STRUCTURED, RW_SIMPLE, RO_STRUCTURED),
        (flags, type, offset, length, tflags) => {
          const r = req(type, offset, length, flags);
          const structured = tflags !== RW_SIMPLE;
          const got = validateRequest(r, { ...baseCtx, transmissionFlags: tflags, structuredReplies: structured, metaContexts: structured });
          assert.ok([0, NBD_EINVAL, NBD_EPERM, NBD_ENOSPC].includes(got), `got ${got}`);
          if (got === 0 && type !== NBD_CMD_DISC) {
            assert.ok(Number(offset) + length <= SIZE, 'accepted requests lie inside the export');
            if (type !== NBD_CMD_FLUSH) assert.ok(offset < 2n ** 53n);
          }
        },
      ),
      { numRuns: 2000 },
    );
  });
});

describe('reply encoders match the spec byte layouts', () => {
  test('simple reply: magic, error, cookie', t, () => {
    assert.equal(toHex(encodeSimpleReply(COOKIE, 22)), toHex(hex(`67446698 | 00000016 | ${C}`)));
    assert.equal(toHex(encodeSimpleReply(0xffffffffffffffffn, 0)), toHex(hex('67446698 | 00000000 | ffffffffffffffff')));
  });

  test('NBD_REPLY_TYPE_NONE: DONE flag, type 0, length 0', t, () => {
    assert.equal(toHex(encodeChunkNone(COOKIE)), toHex(hex(`668e33ef | 0001 | 0000 | ${C} | 00000000`)));
  });

  test('NBD_REPLY_TYPE_OFFSET_DATA header: length counts the offset and the data', t, () => {
    assert.equal(
      toHex(encodeChunkOffsetDataHeader(COOKIE, true, 4096, 512)),
      toHex(hex(`668e33ef | 0001 | 0001 | ${C} | 00000208 | 0000000000001000`)),
    );
    assert.equal(
      toHex(encodeChunkOffsetDataHeader(COOKIE, false, 2 ** 53 - 1, 1)),
      toHex(hex(`668e33ef | 0000 | 0001 | ${C} | 00000009 | 001fffffffffffff`)),
    );
  });

  test('NBD_REPLY_TYPE_OFFSET_HOLE: u64 offset, u32 size, length 12', t, () => {
    assert.equal(
      toHex(encodeChunkOffsetHole(COOKIE, false, 0, 65536)),
      toHex(hex(`668e33ef | 0000 | 0002 | ${C} | 0000000c | 0000000000000000 | 00010000`)),
    );
    assert.equal(
      toHex(encodeChunkOffsetHole(COOKIE, true, 4096, 0xffffffff)),
      toHex(hex(`668e33ef | 0001 | 0002 | ${C} | 0000000c | 0000000000001000 | ffffffff`)),
    );
    assert.equal(
      toHex(encodeChunkOffsetHole(COOKIE, true, 2 ** 32 + 4096, 512)),
      toHex(hex(`668e33ef | 0001 | 0002 | ${C} | 0000000c | 0000000100001000 | 00000200`)),
    );
  });

  test('NBD_REPLY_TYPE_BLOCK_STATUS: context id, then length/flags pairs', t, () => {
    assert.equal(
      toHex(encodeChunkBlockStatus(COOKIE, true, 0, [{ length: 4096, flags: 3 }, { length: 512, flags: 0 }])),
      toHex(hex(`668e33ef | 0001 | 0005 | ${C} | 00000014 | 00000000 | 00001000 00000003 | 00000200 00000000`)),
    );
    assert.equal(
      toHex(encodeChunkBlockStatus(COOKIE, false, 7, [{ length: 0xffffffff, flags: 0x80000001 }])),
      toHex(hex(`668e33ef | 0000 | 0005 | ${C} | 0000000c | 00000007 | ffffffff 80000001`)),
    );
  });

  test('NBD_REPLY_TYPE_ERROR and ERROR_OFFSET: errno, u16 message length, message (, offset)', t, () => {
    assert.equal(
      toHex(encodeChunkError(COOKIE, true, 22, 'bad')),
      toHex(hex(`668e33ef | 0001 | 8001 | ${C} | 00000009 | 00000016 | 0003 | 626164`)),
    );
    assert.equal(
      toHex(encodeChunkError(COOKIE, false, 5, '', 4096)),
      toHex(hex(`668e33ef | 0000 | 8002 | ${C} | 0000000e | 00000005 | 0000 | 0000000000001000`)),
    );
  });

  test('error messages are cut to 4096 bytes', t, () => {
    const b = encodeChunkError(COOKIE, true, 5, 'x'.repeat(5000));
    assert.equal(b.readUInt32BE(16), 6 + 4096);
    assert.equal(b.readUInt16BE(24), 4096);
    assert.equal(b.length, 20 + 6 + 4096);
  });

  test('a cut error message is still valid UTF-8 ("Conventions": strings are UTF-8)', t, () => {
    // 2000 x U+20AC is 6000 bytes; 4096 is not a multiple of 3.
    const b = encodeChunkError(COOKIE, true, 5, '€'.repeat(2000));
    const length = b.readUInt16BE(24);
    assert.ok(length <= 4096);
    assert.equal(b.readUInt32BE(16), 6 + length, 'chunk length matches the message length');
    const message = b.subarray(26, 26 + length);
    assert.doesNotThrow(() => new TextDecoder('utf-8', { fatal: true }).decode(message), 'message must not end inside a character');
    assert.equal(length, 4095);
  });
});
