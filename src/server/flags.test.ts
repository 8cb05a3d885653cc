import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import {
  NBD_FLAG_CAN_MULTI_CONN,
  NBD_FLAG_HAS_FLAGS,
  NBD_FLAG_READ_ONLY,
  NBD_FLAG_SEND_DF,
  NBD_FLAG_SEND_FAST_ZERO,
  NBD_FLAG_SEND_TRIM,
  NBD_FLAG_SEND_WRITE_ZEROES,
} from '../protocol/constants.ts';
import { exportFlags, transmissionFlags } from './flags.ts';
import { FakeNode, makeExport } from './test-helpers.ts';

const t = { timeout: 5_000 };
const bools = [false, true] as const;

describe('transmissionFlags', () => {
  test('exact values for every combination', t, () => {
    // HAS_FLAGS|SEND_FLUSH|SEND_FUA|SEND_CACHE = 0x040d; writable adds
    // SEND_TRIM|SEND_WRITE_ZEROES|SEND_FAST_ZERO = 0x0860, read-only adds 0x0002;
    // DF = 0x0080; CAN_MULTI_CONN = 0x0100.
    const want = new Map<string, number>([
      ['rw simple single', 0x0c6d],
      ['rw structured single', 0x0ced],
      ['rw simple multi', 0x0d6d],
      ['rw structured multi', 0x0ded],
      ['ro simple single', 0x040f],
      ['ro structured single', 0x048f],
      ['ro simple multi', 0x050f],
      ['ro structured multi', 0x058f],
    ]);
    for (const readOnly of bools) {
      for (const structuredReplies of bools) {
        for (const multiConn of bools) {
          const key = `${readOnly ? 'ro' : 'rw'} ${structuredReplies ? 'structured' : 'simple'} ${multiConn ? 'multi' : 'single'}`;
          assert.equal(transmissionFlags({ readOnly, multiConn, structuredReplies }), want.get(key), key);
        }
      }
    }
  });

  test('CAN_MULTI_CONN exactly when multiConn', t, () => {
    for (const readOnly of bools) {
      for (const structuredReplies of bools) {
        for (const multiConn of bools) {
          const f = transmissionFlags({ readOnly, multiConn, structuredReplies });
          assert.equal((f & NBD_FLAG_CAN_MULTI_CONN) !== 0, multiConn);
          assert.equal(f & NBD_FLAG_HAS_FLAGS, NBD_FLAG_HAS_FLAGS);
        }
      }
    }
  });

  test('READ_ONLY hides TRIM, WRITE_ZEROES and FAST_ZERO', t, () => {
    const hidden = NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_FAST_ZERO;
    for (const structuredReplies of bools) {
      for (const multiConn of bools) {
        const ro = transmissionFlags({ readOnly: true, multiConn, structuredReplies });
        const rw = transmissionFlags({ readOnly: false, multiConn, structuredReplies });
        assert.equal(ro & NBD_FLAG_READ_ONLY, NBD_FLAG_READ_ONLY);
        assert.equal(ro & hidden, 0);
        assert.equal(rw & NBD_FLAG_READ_ONLY, 0);
        assert.equal(rw & hidden, hidden);
        // FAST_ZERO never without WRITE_ZEROES ("NBD_FLAG_SEND_FAST_ZERO").
        for (const f of [ro, rw]) if (f & NBD_FLAG_SEND_FAST_ZERO) assert.ok(f & NBD_FLAG_SEND_WRITE_ZEROES);
      }
    }
  });

  test('DF only with structured replies', t, () => {
    for (const readOnly of bools) {
      for (const multiConn of bools) {
        assert.equal(transmissionFlags({ readOnly, multiConn, structuredReplies: false }) & NBD_FLAG_SEND_DF, 0);
        assert.equal(transmissionFlags({ readOnly, multiConn, structuredReplies: true }) & NBD_FLAG_SEND_DF, NBD_FLAG_SEND_DF);
      }
    }
  });

  test('exportFlags reads the export: read-only option, read-only node, multi-conn', t, () => {
    assert.equal(exportFlags(makeExport({ name: 'a' }), false), 0x0c6d);
    assert.equal(exportFlags(makeExport({ name: 'a', readOnly: true, multiConn: true }), true), 0x058f);
    assert.equal(exportFlags(makeExport({ name: 'a', node: new FakeNode(4096, { writable: false }) }), false), 0x040f);
  });
});
