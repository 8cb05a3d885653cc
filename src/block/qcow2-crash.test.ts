// Crash safety of qcow2 writes under power loss, simulated: every write,
// trim and flush the node sends to its image file is logged; a "crash" at
// any point of the log keeps what the flushes made durable plus a random
// subset of the 512-byte sectors written since (torn and reordered writes,
// as a disk's volatile cache may lose them). Each such image must pass
// `qemu-img check` with no errors and no corruption (leaked clusters are
// allowed), and must still hold every byte the node had made durable with
// its last completed flush. This checks the metadata ordering of
// qcow2-write.ts (refcounts before the L2 entries that use them, L2 tables
// before the L1 entries naming them, frees last), not just a process crash.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { describe, test } from 'node:test';
import fc from 'fast-check';
import { FileNode } from './file.ts';
import { ForwardingNode } from './node.ts';
import { openImage, readQcow2Header } from './qcow2-open.ts';
import { Qcow2WritableNode } from './qcow2-write.ts';
import { createQcow2, HAVE_QEMU, pattern, qemuCheck, qemuIo, qemuRaw, SKIP_NO_QEMU, tmp } from './qcow2-testlib.ts';
import type { BlockNode, WriteOptions, ZeroOptions } from './types.ts';
import { BlockError } from './types.ts';

const t = { timeout: 600_000, skip: SKIP_NO_QEMU };
const K = 1024;
const M = 1024 * 1024;
const SECTOR = 512;

/** One change the node made to its file: the bytes as they are after it. */
interface LoggedWrite {
  offset: number;
  data: Buffer;
}

/**
 * The image file, logging every change. A flush records which changes had
 * completed when it was called: those are durable once it returns.
 */
class RecordingFile extends ForwardingNode {
  readonly writes: LoggedWrite[] = [];
  /** Per write (by index): completed. */
  readonly #done: boolean[] = [];
  /** Durable prefix information: after log position `at`, every write in `covers` is durable. */
  readonly flushes: { at: number; covers: number[] }[] = [];

  /** Log a change (its bytes as the file holds them afterwards) once it is issued. */
  async #logged(offset: number, length: number, run: () => Promise<void>, after: () => Promise<Buffer> | Buffer): Promise<void> {
    const i = this.writes.length;
    this.writes.push({ offset, data: Buffer.alloc(0) });
    this.#done.push(false);
    await run();
    this.writes[i] = { offset, data: Buffer.from(await after()) };
    assert.equal(this.writes[i]!.data.length, length);
    this.#done[i] = true;
  }

  override async write(offset: number, data: Buffer, opts?: WriteOptions): Promise<void> {
    await this.#logged(offset, data.length, () => this.inner.write(offset, data, opts), () => data);
    if (opts?.fua === true) this.#recordFlush();
  }

  override async trim(offset: number, length: number, opts?: WriteOptions): Promise<void> {
    // A punched range reads back as zeroes, a partial block may stay: log what the file shows.
    await this.#logged(offset, length, () => this.inner.trim(offset, length, opts), () => this.inner.read(offset, length));
  }

  override async writeZeroes(offset: number, length: number, opts?: ZeroOptions): Promise<void> {
    await this.#logged(offset, length, () => this.inner.writeZeroes(offset, length, opts), () => Buffer.alloc(length));
  }

  override async flush(): Promise<void> {
    const covers: number[] = [];
    for (let i = 0; i < this.#done.length; i++) if (this.#done[i]) covers.push(i);
    await this.inner.flush();
    this.flushes.push({ at: this.writes.length, covers });
  }

  #recordFlush(): void {
    this.flushes.push({ at: this.writes.length, covers: [this.writes.length - 1] });
  }

}

/** Open `file` writable with its file node wrapped in a recorder (as openImage would, minus probing). */
async function openRecorded(file: string): Promise<{ node: Qcow2WritableNode; rec: RecordingFile }> {
  const rec = new RecordingFile(await FileNode.open({ path: file, readOnly: false, discard: 'unmap' }));
  const header = await readQcow2Header(rec);
  const l1 = Buffer.alloc(header.l1Size * 8);
  if (l1.length > 0) await rec.read(header.l1TableOffset, l1.length, l1);
  const backing =
    header.backingFile === null
      ? null
      : await openImage({ path: path.resolve(path.dirname(file), header.backingFile), format: (header.backingFormat ?? undefined) as 'raw' | 'qcow2' | undefined, readOnly: true });
  const node = await Qcow2WritableNode.open({ file: rec, header, l1, backing, writable: true, discard: 'unmap', path: file });
  return { node, rec };
}

/** A small deterministic random source (the crash images must be reproducible from fast-check's seed). */
function rng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x / 0x100000000;
  };
}

/**
 * The file as a crash after the first `at` logged writes may leave it: the
 * initial bytes, every write a completed flush covered, and of the other
 * issued writes each 512-byte sector kept or lost at random.
 */
function crashImage(initial: Buffer, rec: RecordingFile, at: number, rand: () => number): Buffer {
  const durable = new Set<number>();
  for (const f of rec.flushes) if (f.at <= at) for (const i of f.covers) durable.add(i);
  let img = Buffer.from(initial);
  const put = (offset: number, data: Buffer): void => {
    if (offset + data.length > img.length) {
      const bigger = Buffer.alloc(offset + data.length);
      img.copy(bigger);
      img = bigger;
    }
    data.copy(img, offset);
  };
  for (let i = 0; i < at; i++) {
    const w = rec.writes[i]!;
    if (w.data.length === 0 && !durable.has(i)) continue; // issued, not completed: its bytes are not known yet
    if (durable.has(i)) {
      put(w.offset, w.data);
      continue;
    }
    let pos = w.offset;
    const end = w.offset + w.data.length;
    while (pos < end) {
      const next = Math.min(end, (Math.floor(pos / SECTOR) + 1) * SECTOR);
      if (rand() < 0.5) put(pos, w.data.subarray(pos - w.offset, next - w.offset));
      pos = next;
    }
  }
  return img;
}

type Op = { kind: 'write'; offset: number; length: number; seed: number } | { kind: 'zero'; offset: number; length: number; noHole: boolean } | { kind: 'trim'; offset: number; length: number } | { kind: 'flush' };

function opArb(size: number, cs: number, big: number): fc.Arbitrary<Op> {
  const offset = fc.oneof(fc.integer({ min: 0, max: size - 1 }), fc.integer({ min: 0, max: Math.floor((size - 1) / cs) }).map((c) => c * cs));
  const length = fc.oneof(fc.integer({ min: 1, max: 3 * cs }), fc.integer({ min: 1, max: big }));
  return fc.oneof(
    { weight: 6, arbitrary: fc.record({ kind: fc.constant('write' as const), offset, length, seed: fc.nat() }) },
    { weight: 2, arbitrary: fc.record({ kind: fc.constant('zero' as const), offset, length, noHole: fc.boolean() }) },
    { weight: 2, arbitrary: fc.record({ kind: fc.constant('trim' as const), offset, length }) },
    { weight: 2, arbitrary: fc.constant({ kind: 'flush' as const }) },
  );
}

interface Case {
  name: string;
  opts: string[];
  size: number;
  cs: number;
  /** Make a raw backing file with data, so partial writes copy up and trims leave zero clusters. */
  backing: boolean;
  /** Largest random op length. */
  big: number;
  /** Writes made before the random ops (to force refcount table growth, say). */
  prelude?: (size: number) => { offset: number; length: number }[];
  runs: number;
  crashPoints: number;
  /** The refcount table must have grown by the end. */
  grows?: boolean;
}

const cases: Case[] = [
  { name: '64 KiB clusters, no backing file', opts: [], size: 4 * M, cs: 64 * K, backing: false, big: 300 * K, runs: 4, crashPoints: 20 },
  { name: '4 KiB clusters over a raw backing file (copy-up, zero clusters)', opts: ['cluster_size=4096'], size: 2 * M, cs: 4 * K, backing: true, big: 64 * K, runs: 4, crashPoints: 20 },
  { name: 'version 2, 1 KiB clusters', opts: ['compat=0.10', 'cluster_size=1024'], size: M, cs: K, backing: false, big: 40 * K, runs: 3, crashPoints: 15 },
  {
    // 512 B clusters, 16-bit refcounts: one refcount table cluster covers 64 blocks of 256 clusters (8 MiB of file).
    name: '512 B clusters: the refcount table grows and moves',
    opts: ['cluster_size=512'],
    size: 16 * M,
    cs: 512,
    backing: false,
    big: 16 * K,
    grows: true,
    prelude: () => Array.from({ length: 10 }, (_, i) => ({ offset: i * 1536 * K + 7, length: 1024 * K })),
    runs: 2,
    crashPoints: 25,
  },
];

describe('qcow2 crash safety: a power loss at any point leaves a consistent image', () => {
  for (const c of cases) {
    test(c.name, t, async () => {
      let raw: string | undefined;
      if (c.backing) {
        raw = tmp('crash-base.raw');
        fs.writeFileSync(raw, Buffer.alloc(0));
        fs.truncateSync(raw, c.size);
        qemuIo(raw, 'raw', `write -P 0x11 0 ${c.size}`);
      }
      let checked = 0;
      await fc.assert(
        fc.asyncProperty(fc.array(opArb(c.size, c.cs, c.big), { minLength: 5, maxLength: 25 }), fc.nat(), async (ops, seed) => {
          const file = createQcow2(tmp('crash.qcow2'), c.size, c.opts, raw === undefined ? undefined : [raw, 'raw']);
          const initial = fs.readFileSync(file);
          const { node, rec } = await openRecorded(file);
          const model = qemuRaw(file, 'qcow2');
          // After each completed node flush: where the log stood, and the contents it made durable.
          const durable: { at: number; contents: Buffer; touchedAfter: [number, number][] }[] = [{ at: 0, contents: Buffer.from(model), touchedAfter: [] }];
          const touch = (a: number, b: number): void => {
            for (const d of durable) d.touchedAfter.push([a, b]);
          };
          const all: Op[] = [...(c.prelude?.(c.size) ?? []).map((w, i) => ({ kind: 'write' as const, ...w, seed: 1000 + i })), ...ops, { kind: 'flush' }];
          try {
            for (const o of all) {
              if (o.kind === 'flush') {
                await node.flush();
                durable.push({ at: rec.writes.length, contents: Buffer.from(model), touchedAfter: [] });
                continue;
              }
              const len = Math.min(o.length, c.size - o.offset);
              touch(o.offset, o.offset + len);
              if (o.kind === 'write') {
                const data = pattern(len, o.seed);
                await node.write(o.offset, data);
                data.copy(model, o.offset);
              } else if (o.kind === 'zero') {
                try {
                  await node.writeZeroes(o.offset, len, { noHole: o.noHole });
                } catch (err) {
                  // Version 2 has no zero clusters: the node wrapper would write zeroes.
                  if (!(err instanceof BlockError && err.code === 'ENOTSUP')) throw err;
                  await node.write(o.offset, Buffer.alloc(len));
                }
                model.fill(0, o.offset, o.offset + len);
              } else {
                await node.trim(o.offset, len);
                (await node.read(o.offset, len)).copy(model, o.offset);
              }
            }
          } finally {
            await node.close();
          }
          // The clean result first: nothing leaked, qemu reads the model.
          const clean = qemuCheck(file);
          assert.ok(clean.errors === 0 && clean.leaks === 0 && clean.corruptions === 0, `clean close: ${clean.raw}`);
          assert.ok(qemuRaw(file, 'qcow2').equals(model), 'qemu reads the model after a clean close');
          if (c.grows === true) assert.ok(fs.readFileSync(file).readUInt32BE(56) > initial.readUInt32BE(56), 'the refcount table grew');

          // Crash points: random ones, and the ones right before and after each file flush.
          const rand = rng(seed);
          const n = rec.writes.length;
          const points = new Set<number>([n]);
          for (const f of rec.flushes) for (const p of [f.at - 1, f.at, f.at + 1]) if (p >= 0 && p <= n) points.add(p);
          const chosen = [...points].sort(() => rand() - 0.5).slice(0, Math.ceil(c.crashPoints / 2));
          while (chosen.length < c.crashPoints) chosen.push(Math.floor(rand() * (n + 1)));
          const img = tmp('crashed.qcow2');
          for (const at of chosen) {
            fs.writeFileSync(img, crashImage(initial, rec, at, rand));
            const r = qemuCheck(img);
            assert.ok(r.errors === 0 && r.corruptions === 0, `crash after ${at} of ${n} file writes: ${r.raw}`);
            // Every byte the last completed node flush made durable, and no later op touched, is there.
            let last = durable[0]!;
            for (const d of durable) if (d.at <= at) last = d;
            const got = qemuRaw(img, 'qcow2');
            const expect = Buffer.from(last.contents);
            for (const [a, b] of last.touchedAfter) got.copy(expect, a, a, b);
            assert.ok(got.equals(expect), `crash after ${at} of ${n} file writes: durable data lost`);
            checked++;
          }
          fs.rmSync(img, { force: true });
          fs.rmSync(file);
        }),
        { numRuns: c.runs },
      );
      assert.ok(checked > 0);
    });
  }
});

if (!HAVE_QEMU) test('qcow2 crash safety', { skip: SKIP_NO_QEMU }, () => {});
