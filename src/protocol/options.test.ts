import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import fc from 'fast-check';
import { decodeInfoRequest, decodeMetaContextRequest, decodeString, type Decoded } from './options.ts';
import { decodeAtEverySplit, hex, lstr, u16, u32 } from './test-helpers.ts';

const t = { timeout: 20_000 };

function assertFails<T>(got: Decoded<T>, what: string): void {
  assert.equal(got.ok, false, `${what}: expected {ok:false}, got ${JSON.stringify(got)}`);
  if (!got.ok) assert.equal(typeof got.reason, 'string');
}

/** Strings the spec allows: no NUL, at most 4096 UTF-8 bytes. */
const wireString = (maxLength = 40) =>
  fc.string({ unit: 'grapheme', maxLength }).filter((s) => !s.includes('\0') && Buffer.byteLength(s) <= 4096);

describe('decodeString ("Conventions": UTF-8, no NUL, at most 4096 bytes)', () => {
  test('accepts UTF-8 up to 4096 bytes, keeps a BOM', t, () => {
    assert.deepEqual(decodeString(Buffer.alloc(0), 's'), { ok: true, value: '' });
    assert.deepEqual(decodeString(hex('c3a9 e282ac f09f9880'), 's'), { ok: true, value: 'é€😀' });
    assert.deepEqual(decodeString(hex('efbbbf 61'), 's'), { ok: true, value: '\ufeffa' });
    assert.deepEqual(decodeString(Buffer.alloc(4096, 0x61), 's'), { ok: true, value: 'a'.repeat(4096) });
  });

  test('refuses NUL, invalid UTF-8 and more than 4096 bytes', t, () => {
    assertFails(decodeString(hex('610062'), 's'), 'NUL');
    assertFails(decodeString(hex('00'), 's'), 'lone NUL');
    assertFails(decodeString(hex('ff'), 's'), '0xff');
    assertFails(decodeString(hex('c328'), 's'), 'bad continuation');
    assertFails(decodeString(hex('c080'), 's'), 'overlong NUL');
    assertFails(decodeString(hex('eda080'), 's'), 'UTF-16 surrogate');
    assertFails(decodeString(hex('80'), 's'), 'lone continuation');
    assertFails(decodeString(hex('e282'), 's'), 'truncated sequence');
    assertFails(decodeString(hex('f4908080'), 's'), 'beyond U+10FFFF');
    assertFails(decodeString(Buffer.alloc(4097, 0x61), 's'), '4097 bytes');
  });
});

describe('decodeInfoRequest (NBD_OPT_INFO / NBD_OPT_GO data)', () => {
  test('well-formed data, fed at every split', t, () => {
    const cases: [string, { name: string; requests: number[] }][] = [
      ['00000003 666f6f | 0002 | 0001 0003', { name: 'foo', requests: [1, 3] }],
      ['00000000 | 0000', { name: '', requests: [] }],
      ['00000000 | 0003 | 0003 0003 ffff', { name: '', requests: [3, 3, 0xffff] }],
      ['00000002 c3a9 | 0001 | 0002', { name: 'é', requests: [2] }],
    ];
    for (const [bytes, want] of cases) {
      for (const got of decodeAtEverySplit(hex(bytes), decodeInfoRequest)) assert.deepEqual(got, { ok: true, value: want }, bytes);
    }
  });

  test('malformed data gives {ok:false}', t, () => {
    const cases: [string, Buffer][] = [
      ['empty', Buffer.alloc(0)],
      ['5 bytes', hex('00000000 00')],
      ['name length past the end', hex('00000004 666f6f 0000')],
      ['name length eats the count', hex('00000002 666f6f 00')],
      ['name length 2^32-1', hex('ffffffff 0000')],
      ['name length 2^31', hex('80000000 0000 0000')],
      ['count larger than the data', hex('00000003 666f6f 0002 0001')],
      ['count smaller than the data', hex('00000003 666f6f 0000 0001')],
      ['odd trailing byte', hex('00000000 0001 0001 00')],
      ['count 0xffff, no requests', hex('00000000 ffff')],
      ['NUL in name', hex('00000003 660066 0000')],
      ['invalid UTF-8 name', hex('00000002 c328 0000')],
      ['surrogate in name', hex('00000003 eda080 0000')],
      ['4097-byte name', Buffer.concat([lstr(Buffer.alloc(4097, 0x61)), u16(0)])],
    ];
    for (const [what, data] of cases) assertFails(decodeInfoRequest(data), what);
  });

  test('a 4096-byte name is accepted', t, () => {
    const got = decodeInfoRequest(Buffer.concat([lstr(Buffer.alloc(4096, 0x61)), u16(1), u16(3)]));
    assert.deepEqual(got, { ok: true, value: { name: 'a'.repeat(4096), requests: [3] } });
  });

  test('round trip: hand-encoded requests decode to the same fields (property)', t, () => {
    fc.assert(
      fc.property(wireString(), fc.array(fc.nat({ max: 0xffff }), { maxLength: 20 }), (name, requests) => {
        const data = Buffer.concat([lstr(name), u16(requests.length), ...requests.map(u16)]);
        assert.deepEqual(decodeInfoRequest(data), { ok: true, value: { name, requests } });
      }),
      { numRuns: 300 },
    );
  });

  test('never throws on arbitrary bytes (property)', t, () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 64 }), (raw) => {
        const got = decodeInfoRequest(Buffer.from(raw));
        assert.equal(typeof got.ok, 'boolean');
      }),
      { numRuns: 1000 },
    );
  });

  test('never throws on mutated well-formed data (property)', t, () => {
    fc.assert(
      fc.property(
        wireString(8),
        fc.array(fc.nat({ max: 0xffff }), { maxLength: 4 }),
        fc.array(fc.tuple(fc.nat(), fc.nat({ max: 255 })), { minLength: 1, maxLength: 4 }),
        fc.integer({ min: -3, max: 3 }),
        (name, requests, edits, trim) => {
          const data = Buffer.concat([lstr(name), u16(requests.length), ...requests.map(u16)]);
          for (const [at, v] of edits) data[at % data.length] = v;
          const cut = trim < 0 ? data.subarray(0, Math.max(0, data.length + trim)) : Buffer.concat([data, Buffer.alloc(trim)]);
          const got = decodeInfoRequest(cut);
          if (got.ok) assert.equal(cut.length, 6 + Buffer.byteLength(got.value.name) + 2 * got.value.requests.length);
        },
      ),
      { numRuns: 1000 },
    );
  });
});

describe('decodeMetaContextRequest (NBD_OPT_LIST/SET_META_CONTEXT data)', () => {
  test('well-formed data, fed at every split', t, () => {
    const cases: [string, { exportName: string; queries: string[] }][] = [
      [
        '00000003 666f6f | 00000001 | 0000000f 62 61 73 65 3a 61 6c 6c 6f 63 61 74 69 6f 6e',
        { exportName: 'foo', queries: ['base:allocation'] },
      ],
      ['00000000 | 00000000', { exportName: '', queries: [] }],
      ['00000000 | 00000002 | 00000005 626173653a | 00000000', { exportName: '', queries: ['base:', ''] }],
    ];
    for (const [bytes, want] of cases) {
      for (const got of decodeAtEverySplit(hex(bytes), (b) => decodeMetaContextRequest(b, 128))) {
        assert.deepEqual(got, { ok: true, value: want }, bytes);
      }
    }
  });

  test('malformed data gives {ok:false}', t, () => {
    const q = (s: string | Buffer) => lstr(s);
    const cases: [string, Buffer][] = [
      ['empty', Buffer.alloc(0)],
      ['7 bytes', hex('00000000 000000')],
      ['name length past the end', hex('00000005 666f6f 00000000')],
      ['name length eats the count', hex('00000003 666f6f 000000')],
      ['name length 2^32-1', hex('ffffffff 00000000')],
      ['query count 2^32-1 with no queries', hex('00000000 ffffffff')],
      ['query count larger than could fit', hex('00000000 00000003 00000001 61 00000000')],
      ['second query length missing', hex('00000000 00000002 00000004 61626364')],
      ['query length past the end', hex('00000000 00000001 00000005 6162')],
      ['query length 2^32-1', hex('00000000 00000001 ffffffff 6162')],
      ['trailing bytes after the last query', hex('00000000 00000001 00000001 61 ff')],
      ['trailing bytes with zero queries', hex('00000000 00000000 00')],
      ['NUL in export name', hex('00000001 00 00000000')],
      ['NUL in query', hex('00000000 00000001 00000003 610062')],
      ['invalid UTF-8 export name', hex('00000001 ff 00000000')],
      ['invalid UTF-8 query', hex('00000000 00000001 00000002 c328')],
      ['4097-byte export name', Buffer.concat([q(Buffer.alloc(4097, 0x61)), u32(0)])],
      ['4097-byte query', Buffer.concat([q(''), u32(1), q(Buffer.alloc(4097, 0x61))])],
    ];
    for (const [what, data] of cases) assertFails(decodeMetaContextRequest(data, 128), what);
  });

  test('more queries than maxQueries is refused with a "more than" reason', t, () => {
    const data = Buffer.concat([lstr('x'), u32(3), lstr('a:'), lstr('b:'), lstr('c:')]);
    const got = decodeMetaContextRequest(data, 2);
    assertFails(got, 'three queries, max two');
    if (!got.ok) assert.match(got.reason, /^more than 2 queries/);
    assert.equal(decodeMetaContextRequest(data, 3).ok, true);
  });

  test('a huge query count is refused at once, without work proportional to the count', t, () => {
    // 2^32-1 queries claimed, with enough bytes that a per-query loop would run long.
    const data = Buffer.concat([lstr(''), u32(0xffffffff), Buffer.alloc(64 * 1024)]);
    const start = process.hrtime.bigint();
    assertFails(decodeMetaContextRequest(data, 0xffffffff), 'count 2^32-1');
    assertFails(decodeMetaContextRequest(data, 128), 'count 2^32-1, max 128');
    assert.ok(process.hrtime.bigint() - start < 1_000_000_000n);
  });

  test('4096-byte export name and query are accepted', t, () => {
    const long = 'q'.repeat(4096);
    const data = Buffer.concat([lstr(long), u32(1), lstr(long)]);
    assert.deepEqual(decodeMetaContextRequest(data, 1), { ok: true, value: { exportName: long, queries: [long] } });
  });

  test('round trip: hand-encoded requests decode to the same fields (property)', t, () => {
    fc.assert(
      fc.property(wireString(), fc.array(wireString(), { maxLength: 10 }), (exportName, queries) => {
        const data = Buffer.concat([lstr(exportName), u32(queries.length), ...queries.map((s) => lstr(s))]);
        assert.deepEqual(decodeMetaContextRequest(data, 10), { ok: true, value: { exportName, queries } });
      }),
      { numRuns: 300 },
    );
  });

  test('never throws on arbitrary bytes (property)', t, () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 64 }), fc.nat({ max: 0xffffffff }), (raw, max) => {
        const got = decodeMetaContextRequest(Buffer.from(raw), max);
        assert.equal(typeof got.ok, 'boolean');
      }),
      { numRuns: 1000 },
    );
  });

  test('never throws on mutated well-formed data (property)', t, () => {
    fc.assert(
      fc.property(
        wireString(8),
        fc.array(wireString(8), { maxLength: 4 }),
        fc.array(fc.tuple(fc.nat(), fc.nat({ max: 255 })), { minLength: 1, maxLength: 4 }),
        fc.integer({ min: -3, max: 3 }),
        (name, queries, edits, trim) => {
          const data = Buffer.concat([lstr(name), u32(queries.length), ...queries.map((s) => lstr(s))]);
          for (const [at, v] of edits) data[at % data.length] = v;
          const cut = trim < 0 ? data.subarray(0, Math.max(0, data.length + trim)) : Buffer.concat([data, Buffer.alloc(trim)]);
          const got = decodeMetaContextRequest(cut, 128);
          if (got.ok) {
            const want = 8 + Buffer.byteLength(got.value.exportName) + got.value.queries.reduce((n, s) => n + 4 + Buffer.byteLength(s), 0);
            assert.equal(cut.length, want, 'an accepted request accounts for every byte');
          }
        },
      ),
      { numRuns: 1000 },
    );
  });
});
