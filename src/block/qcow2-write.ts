// Writing a qcow2 image: cluster allocation (with refcounts), L2 table
// allocation, copy-on-write of partial clusters from whatever they showed
// before (backing chain, compressed data, zeroes), zero clusters for
// write-zeroes, and trim that frees clusters (leaving zero clusters where
// a backing file would otherwise show through), as qemu does.
//
// Crash safety: metadata changes stay in memory (the L2 cache, the L1
// table, the refcount blocks and table) and reach the file only in sync(),
// in an order that can leak clusters but never corrupts data, each step
// made durable before the next:
//   1. guest data (fdatasync)
//   2. refcount blocks (increments only)
//   3. refcount table entries; a moved table, then the header pointing at it
//   4. L2 tables
//   5. L1 entries
//   6. frees: clusters unreferenced by the now durable tables get their
//      refcounts decremented; only then may they be handed out again.
// A freed cluster is never reused before step 6, so no durable table can
// point at a cluster that holds someone else's data.
//
// Concurrency (one node shared by every connection): a write, zero or trim
// holds a lock on its guest clusters (so two writers never copy-on-write
// the same cluster twice), and a shared lock on the metadata; sync holds it
// exclusively, so it writes a consistent state. Allocation runs under one
// mutex. Reads take no lock: they see a cluster's new mapping only once its
// data is written, and a freed cluster waits for reads already under way.
import { toBlockError } from './errno.ts';
import { Qcow2Node, type Qcow2NodeInit, type Segment } from './qcow2.ts';
import { COMPAT_LAZY_REFCOUNTS, compressedSpan, CorruptImageError, EXT_BITMAPS, unsupported, decodeL2, encodeStandard, HDR_AUTOCLEAR, HDR_INCOMPATIBLE, HDR_REFCOUNT_TABLE_OFFSET, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, OFLAG_COPIED_HI, type L2Entry } from './qcow2-format.ts';
import { Refcounts } from './qcow2-refcount.ts';
import { countReferences } from './qcow2-repair.ts';
import { RangeLock } from './range-lock.ts';
import type { WriteOptions, ZeroOptions } from './types.ts';
import { BlockError } from './types.ts';

/** Sync by itself once this many metadata tables are dirty (bounds memory and the work a crash loses). */
const DIRTY_TABLES_LIMIT = 512;

/** One holder at a time, in call order. */
class Mutex {
  #tail: Promise<unknown> = Promise.resolve();
  run<T>(fn: () => Promise<T>): Promise<T> {
    const p = this.#tail.then(fn);
    this.#tail = p.catch(() => {});
    return p;
  }
}

/** Many shared holders or one exclusive holder; a waiting exclusive holder goes before new shared ones. */
class SharedLock {
  #shared = 0;
  #exclusive = false;
  #waitingExclusive = 0;
  #wakeups: (() => void)[] = [];

  async shared<T>(fn: () => Promise<T>): Promise<T> {
    while (this.#exclusive || this.#waitingExclusive > 0) await this.#wait();
    this.#shared++;
    try {
      return await fn();
    } finally {
      this.#shared--;
      this.#wake();
    }
  }

  async exclusive<T>(fn: () => Promise<T>): Promise<T> {
    this.#waitingExclusive++;
    try {
      while (this.#exclusive || this.#shared > 0) await this.#wait();
    } finally {
      this.#waitingExclusive--;
    }
    this.#exclusive = true;
    try {
      return await fn();
    } finally {
      this.#exclusive = false;
      this.#wake();
    }
  }

  #wait(): Promise<void> {
    return new Promise((resolve) => this.#wakeups.push(resolve));
  }

  #wake(): void {
    const w = this.#wakeups;
    this.#wakeups = [];
    for (const resolve of w) resolve();
  }
}

export class Qcow2WritableNode extends Qcow2Node {
  readonly #refcounts: Refcounts;
  readonly #clusterLocks = new RangeLock();
  readonly #meta = new SharedLock();
  readonly #alloc = new Mutex();
  /** L1 indexes changed since the last sync. */
  readonly #dirtyL1 = new Set<number>();
  /** Reads under way (a freed cluster waits for them). */
  readonly #reads = new Set<Promise<unknown>>();
  readonly #punch: boolean;
  #prepared: Promise<void> | undefined;
  #dirtyBitSet = false;
  /** Set when writing metadata failed: the in-memory state is ahead of the file, so no more writes. */
  #failed: BlockError | null = null;
  #syncRunning: Promise<void> | null = null;
  #syncQueued: Promise<void> | null = null;

  private constructor(init: Qcow2NodeInit, refcountTable: Buffer) {
    super(init);
    const h = init.header;
    this.#punch = init.discard === 'unmap';
    this.#refcounts = new Refcounts({
      file: init.file,
      clusterSize: h.clusterSize,
      refcountOrder: h.refcountOrder,
      tableOffset: h.refcountTableOffset,
      tableClusters: h.refcountTableClusters,
      table: refcountTable,
      fileSize: init.file.size,
      path: init.path,
    });
  }

  /** Open for writing (the caller checked the header: not corrupt, no snapshots). A dirty image is repaired first. */
  static async open(init: Qcow2NodeInit): Promise<Qcow2WritableNode> {
    const h = init.header;
    const table = Buffer.alloc(h.refcountTableClusters * h.clusterSize);
    await init.file.read(h.refcountTableOffset, table.length, table);
    const node = new Qcow2WritableNode(init, table);
    if ((h.incompatible & INCOMPAT_DIRTY) !== 0n) await node.#repair();
    return node;
  }

  /**
   * An image left dirty (lazy refcounts: its writer stopped before it
   * brought the refcounts up to date) gets its refcounts recounted from
   * its metadata, as qemu repairs one it opens read/write: a referenced
   * cluster gets as many as it has references, an unreferenced one
   * (leaked) none. New refcount blocks go past everything counted. The
   * ordered sync writes them; only then is the dirty bit cleared, so a
   * crash meanwhile leaves an image that is still dirty and repaired again.
   */
  async #repair(): Promise<void> {
    const h = this.header;
    if (h.extensionTypes.includes(EXT_BITMAPS)) {
      throw unsupported("qcow2 image was not closed cleanly (dirty) and has persistent bitmaps; repair it with 'qemu-img check -r all' or serve it read-only (-r)");
    }
    const refs = await countReferences({
      header: h,
      l1: this.l1,
      refcountBlocks: this.#refcounts.blockOffsets(),
      readTable: (offset) => this.l2Cache.get(offset),
      path: this.path,
    });
    let end = Math.ceil(this.file.size / this.clusterSize);
    for (const c of refs.keys()) end = Math.max(end, c + 1);
    this.#refcounts.allocateFrom(end);
    for (let c = 0; c < end; c++) {
      const want = refs.get(c) ?? 0;
      if ((await this.#refcounts.get(c)) !== want) await this.#refcounts.setExact(c, want);
    }
    await this.#meta.exclusive(() => this.#sync());
    await this.#writeIncompatible(h.incompatible & ~INCOMPAT_DIRTY);
    await this.file.flush();
  }

  #usable(): void {
    this.checkOpen();
    if (this.#failed !== null) throw new BlockError('EIO', `${this.path}: no more writes after an earlier failure (${this.#failed.message}); the image is read-only now`);
  }

  override async read(offset: number, length: number, into?: Buffer): Promise<Buffer> {
    const p = super.read(offset, length, into);
    this.#reads.add(p);
    try {
      return await p;
    } finally {
      this.#reads.delete(p);
    }
  }

  /**
   * Before the first change: clear auto-clear feature bits (we do not keep
   * bitmaps up to date), and with lazy refcounts set the dirty bit (as
   * qemu does); otherwise the header stays clean.
   */
  #prepare(): Promise<void> {
    this.#prepared ??= (async () => {
      const h = this.header;
      let changed = false;
      if (h.version === 3 && h.autoclear !== 0n) {
        // Clear the bits in h.autoclear only: the opener may have left out bits someone else keeps valid.
        const b = await this.file.read(HDR_AUTOCLEAR, 8);
        b.writeBigUInt64BE(b.readBigUInt64BE(0) & ~h.autoclear);
        await this.file.write(HDR_AUTOCLEAR, b);
        h.autoclear = 0n;
        changed = true;
      }
      if (h.version === 3 && (h.compatible & COMPAT_LAZY_REFCOUNTS) !== 0n) {
        await this.#writeIncompatible(h.incompatible | INCOMPAT_DIRTY);
        this.#dirtyBitSet = true;
        changed = true;
      }
      if (changed) await this.file.flush();
    })();
    this.#prepared.catch(() => {
      this.#prepared = undefined;
    });
    return this.#prepared;
  }

  async #writeIncompatible(bits: bigint): Promise<void> {
    const b = Buffer.alloc(8);
    b.writeBigUInt64BE(bits);
    await this.file.write(HDR_INCOMPATIBLE, b);
    this.header.incompatible = bits;
  }

  /**
   * Run a change of [offset, offset+length): its clusters locked, the
   * metadata shared; then FUA or a sync when much metadata is dirty.
   */
  async #change(offset: number, length: number, fua: boolean, fn: () => Promise<void>): Promise<void> {
    this.#usable();
    const cs = this.clusterSize;
    const a = Math.floor(offset / cs) * cs;
    const b = Math.ceil((offset + length) / cs) * cs;
    try {
      await this.#prepare();
      await this.#clusterLocks.with(a, b, () => this.#meta.shared(fn));
      if (fua || this.l2Cache.dirtyCount + this.#refcounts.dirtyBlocks > DIRTY_TABLES_LIMIT) await this.flush();
    } catch (err) {
      if (err instanceof CorruptImageError) await this.#markCorrupt(err);
      throw toBlockError(err);
    }
  }

  /**
   * Metadata is wrong: stop writing (nothing more may make it worse) and
   * set the corrupt bit in the header, as qemu does, so that no writer
   * opens the image again before 'qemu-img check -r all' repaired it.
   */
  async #markCorrupt(err: CorruptImageError): Promise<void> {
    if (this.#failed !== null) return;
    this.#failed = err;
    try {
      await this.#writeIncompatible(this.header.incompatible | INCOMPAT_CORRUPT);
      await this.file.flush();
    } catch {
      // the image stays unwritable in this process either way
    }
  }

  /** A data cluster or an L2 table must not lie in the header, the L1 table or the refcount table (qemu's overlap check). */
  #checkNotMetadata(host: number, length: number, what: string): void {
    const h = this.header;
    const overlaps = (start: number, len: number): boolean => len > 0 && host < start + len && start < host + length;
    if (
      overlaps(0, this.clusterSize) ||
      overlaps(h.l1TableOffset, h.l1Size * 8) ||
      overlaps(this.#refcounts.tableOffset, this.#refcounts.tableClusters * this.clusterSize)
    ) {
      throw new CorruptImageError(this.path, `${what} at ${host} overlaps the image's metadata`);
    }
  }

  /** Split [offset, offset+length) at L2 table borders. */
  async #perTable(offset: number, length: number, fn: (offset: number, length: number) => Promise<void>): Promise<void> {
    let pos = offset;
    const end = offset + length;
    while (pos < end) {
      const n = Math.min(end, (Math.floor(pos / this.l2Span) + 1) * this.l2Span) - pos;
      await fn(pos, n);
      pos += n;
    }
  }

  // --- L2 tables ---

  /** The L2 table for L1 index i, allocated (empty) when there is none. */
  async #ensureL2(i: number): Promise<number> {
    // The common case needs no allocation, so no mutex.
    const present = this.l2Offset(i);
    if (present !== 0 && (this.l1.readUInt32BE(i * 8) & OFLAG_COPIED_HI) !== 0) {
      this.#checkNotMetadata(present, this.clusterSize, 'L2 table');
      return present;
    }
    return this.#alloc.run(async () => {
      const off = this.l2Offset(i);
      if (off !== 0) {
        this.#checkNotMetadata(off, this.clusterSize, 'L2 table');
        if ((this.l1.readUInt32BE(i * 8) & OFLAG_COPIED_HI) === 0) {
          // Without snapshots this is just a missing flag; a shared table would need copying.
          if ((await this.#refcounts.get(off / this.clusterSize)) !== 1) {
            throw new BlockError('EIO', `${this.path}: L2 table at ${off} is shared (internal snapshots?)`);
          }
          encodeStandard(this.l1, i, off, true);
          this.#dirtyL1.add(i);
        }
        return off;
      }
      const a = await this.#refcounts.allocate(1);
      this.l2Cache.put(a.offset, Buffer.alloc(this.clusterSize));
      encodeStandard(this.l1, i, a.offset, true);
      this.#dirtyL1.add(i);
      return a.offset;
    });
  }

  /** Give up the clusters an old entry held (at the next sync). */
  #release(e: L2Entry): void {
    if (e.kind === 'compressed') {
      const span = compressedSpan(e);
      this.#refcounts.free(span.start, span.end - span.start);
    } else if ((e.kind === 'normal' || e.kind === 'zero') && e.host !== 0) {
      this.#refcounts.free(e.host, this.clusterSize);
    }
  }

  /** Fill dst with guest bytes [from, from+dst.length) of cluster c as its old entry e shows them. */
  async #readOld(c: number, e: L2Entry, from: number, dst: Buffer): Promise<void> {
    const offset = c * this.clusterSize + from;
    const n = Math.max(0, Math.min(dst.length, this.size - offset));
    if (n < dst.length) dst.fill(0, n);
    if (n === 0) return;
    const seg: Segment = { offset, length: n, kind: e.kind, host: e.kind === 'normal' ? e.host + from : e.host, entry: e };
    await this.readSegment(seg, dst.subarray(0, n));
  }

  /** True when the old entry shows zeroes for the whole cluster c without reading anything. */
  #readsZero(c: number, e: L2Entry): boolean {
    if (e.kind === 'zero') return true;
    if (e.kind !== 'unallocated') return false;
    const b = this.backing;
    return b === null || b.size <= c * this.clusterSize;
  }

  // --- writes ---

  override async write(offset: number, data: Buffer, opts: WriteOptions = {}): Promise<void> {
    if (data.length === 0) return;
    await this.#change(offset, data.length, opts.fua === true, () =>
      this.#perTable(offset, data.length, (pos, n) => this.#writeInTable(pos, data.subarray(pos - offset, pos - offset + n))),
    );
  }

  /** Write data at pos, all inside one L2 table. */
  async #writeInTable(pos: number, data: Buffer): Promise<void> {
    const cs = this.clusterSize;
    const end = pos + data.length;
    const first = Math.floor(pos / cs);
    const last = Math.floor((end - 1) / cs);
    const l2 = await this.#ensureL2(Math.floor(pos / this.l2Span));
    const table = await this.l2Cache.get(l2);
    const entries: L2Entry[] = [];
    for (let c = first; c <= last; c++) {
      const e = decodeL2(table, c % this.l2Entries, this.clusterBits);
      if (e.kind === 'normal' && e.host % cs !== 0) throw new CorruptImageError(this.path, `cluster offset ${e.host} is not aligned`);
      entries.push(e);
    }
    const inPlace = (e: L2Entry): boolean => e.kind === 'normal' && e.copied;

    let i = 0;
    while (i < entries.length) {
      const e = entries[i]!;
      let j = i + 1;
      if (inPlace(e)) {
        while (j < entries.length && inPlace(entries[j]!) && entries[j]!.host === e.host + (j - i) * cs) j++;
        const from = Math.max(pos, (first + i) * cs);
        const to = Math.min(end, (first + j) * cs);
        this.#checkNotMetadata(e.host, (j - i) * cs, 'data cluster');
        await this.file.write(e.host + (from - (first + i) * cs), data.subarray(from - pos, to - pos));
      } else {
        while (j < entries.length && !inPlace(entries[j]!)) j++;
        await this.#allocateAndWrite(l2, first + i, entries.slice(i, j), pos, data);
      }
      i = j;
    }
  }

  /**
   * Give guest clusters [c0, c0 + olds.length) new host clusters holding
   * the written bytes and, around them, what the clusters showed before;
   * then point the L2 entries at them and release the old clusters.
   */
  async #allocateAndWrite(l2: number, c0: number, olds: L2Entry[], pos: number, data: Buffer): Promise<void> {
    const cs = this.clusterSize;
    const end = pos + data.length;
    let k = 0;
    while (k < olds.length) {
      const a = await this.#alloc.run(() => this.#refcounts.allocate(olds.length - k));
      const g0 = (c0 + k) * cs;
      const g1 = g0 + a.count * cs;
      const from = Math.max(pos, g0);
      const to = Math.min(end, g1);
      try {
        if (from === g0 && to === g1) {
          await this.file.write(a.offset, data.subarray(from - pos, to - pos));
        } else {
          const headOld = olds[k]!;
          const tailOld = olds[k + a.count - 1]!;
          const headZero = from === g0 || this.#readsZero(c0 + k, headOld);
          const tailZero = to === g1 || this.#readsZero(c0 + k + a.count - 1, tailOld);
          if (a.fresh && headZero && tailZero) {
            // Fresh space past the file's end reads as zeroes: write only the data, and the last byte to set the file's size.
            await this.file.write(a.offset + (from - g0), data.subarray(from - pos, to - pos));
            if (to < g1) await this.file.write(a.offset + a.count * cs - 1, Buffer.alloc(1));
          } else {
            const buf = Buffer.allocUnsafe(g1 - g0);
            if (from > g0) await this.#readOld(c0 + k, headOld, 0, buf.subarray(0, from - g0));
            if (to < g1) {
              const lastStart = g1 - cs;
              await this.#readOld(c0 + k + a.count - 1, tailOld, to - lastStart, buf.subarray(to - g0));
            }
            data.copy(buf, from - g0, from - pos, to - pos);
            await this.file.write(a.offset, buf);
          }
        }
      } catch (err) {
        this.#refcounts.free(a.offset, a.count * cs);
        throw err;
      }
      // The data is written: now the mapping may show it.
      const table = await this.l2Cache.get(l2);
      for (let n = 0; n < a.count; n++) {
        encodeStandard(table, (c0 + k + n) % this.l2Entries, a.offset + n * cs, true);
        this.#release(olds[k + n]!);
      }
      this.l2Cache.markDirty(l2, table);
      k += a.count;
    }
  }

  // --- zeroes and trim ---

  override async writeZeroes(offset: number, length: number, opts: ZeroOptions = {}): Promise<void> {
    // Version 2 has no zero clusters: the wrapper writes zeroes instead.
    if (this.header.version !== 3) throw new BlockError('ENOTSUP', 'qcow2 version 2 has no zero clusters');
    if (length === 0) return;
    await this.#change(offset, length, opts.fua === true, async () => {
      const cs = this.clusterSize;
      const end = offset + length;
      // Partial clusters at either end: zeroed as whole clusters when they read as zeroes anyway (as qemu does), else written.
      const parts: { c: number; from: number; to: number }[] = [];
      const firstC = Math.floor(offset / cs);
      const lastC = Math.floor((end - 1) / cs);
      if (!this.#coversCluster(offset, end, firstC)) parts.push({ c: firstC, from: offset, to: Math.min(end, (firstC + 1) * cs) });
      if (lastC !== firstC && !this.#coversCluster(offset, end, lastC)) parts.push({ c: lastC, from: lastC * cs, to: end });
      const write: { from: number; to: number }[] = [];
      let zFrom = offset;
      let zTo = end;
      for (const p of parts) {
        const e = await this.#entryOf(p.c);
        if (this.#readsZero(p.c, e)) {
          // Widen the zeroed range over the whole cluster.
          if (p.c === firstC) zFrom = firstC * cs;
          if (p.c === lastC) zTo = Math.min(this.size, (lastC + 1) * cs);
        } else {
          if (opts.fast) throw new BlockError('ENOTSUP', 'zeroing part of a cluster needs a write');
          write.push({ from: p.from, to: p.to });
          if (p.c === firstC) zFrom = Math.min(end, (firstC + 1) * cs);
          if (p.c === lastC) zTo = Math.max(zFrom, lastC * cs);
        }
      }
      for (const w of write) {
        await this.#perTable(w.from, w.to - w.from, (pos, n) => this.#writeInTable(pos, Buffer.alloc(n)));
      }
      if (zTo > zFrom) await this.#perTable(zFrom, zTo - zFrom, (pos, n) => this.#zeroClusters(pos, n, opts.noHole === true ? 'keep' : 'unmap'));
    });
  }

  /** Trim: whole clusters are freed (zero clusters where a backing file would show through, as qemu does); partial ones are left. */
  override async trim(offset: number, length: number, opts: WriteOptions = {}): Promise<void> {
    if (length === 0) return;
    const cs = this.clusterSize;
    const end = offset + length;
    const from = Math.ceil(offset / cs) * cs;
    const to = end >= this.size ? end : Math.floor(end / cs) * cs;
    if (from >= to) return;
    await this.#change(from, to - from, opts.fua === true, () => this.#perTable(from, to - from, (pos, n) => this.#zeroClusters(pos, n, 'discard')));
  }

  /** Does [from, to) cover cluster c (to the end of the disk for the last one)? */
  #coversCluster(from: number, to: number, c: number): boolean {
    const cs = this.clusterSize;
    return from <= c * cs && to >= Math.min(this.size, (c + 1) * cs);
  }

  async #entryOf(c: number): Promise<L2Entry> {
    const off = this.l2Offset(Math.floor((c * this.clusterSize) / this.l2Span));
    if (off === 0) return { kind: 'unallocated', host: 0, compressedLength: 0, copied: false };
    return decodeL2(await this.l2Cache.get(off), c % this.l2Entries, this.clusterBits);
  }

  /**
   * Whole clusters of [pos, pos+length) (one L2 table) read as zeroes from now on:
   *  - keep: zero clusters; a data cluster keeps its host cluster (preallocated zero)
   *  - unmap: zero clusters; host clusters are freed
   *  - discard: as unmap, but clusters that are unallocated without a backing file stay so;
   *    on version 2 images (no zero clusters) only where no backing file shows through.
   */
  async #zeroClusters(pos: number, length: number, mode: 'keep' | 'unmap' | 'discard'): Promise<void> {
    const cs = this.clusterSize;
    const first = Math.floor(pos / cs);
    const last = Math.floor((pos + length - 1) / cs);
    const l1i = Math.floor(pos / this.l2Span);
    const v3 = this.header.version === 3;
    if (mode === 'discard') {
      if (!v3 && this.backing !== null) return; // version 2 cannot hide the backing file
      if (this.l2Offset(l1i) === 0 && this.backing === null) return; // nothing allocated, nothing shows through
    }
    const l2 = await this.#ensureL2(l1i);
    const table = await this.l2Cache.get(l2);
    let changed = false;
    for (let c = first; c <= last; c++) {
      const index = c % this.l2Entries;
      const e = decodeL2(table, index, this.clusterBits);
      if (mode === 'discard' && e.kind === 'unallocated' && this.backing === null) continue;
      if (mode === 'keep' && e.kind === 'normal' && e.copied) {
        encodeStandard(table, index, e.host, true, true);
      } else if (mode === 'keep' && e.kind === 'zero' && e.host !== 0) {
        continue;
      } else if (v3) {
        if (e.kind === 'zero' && e.host === 0) continue;
        encodeStandard(table, index, 0, false, true);
        this.#release(e);
      } else {
        if (e.kind === 'unallocated') continue;
        table.writeBigUInt64BE(0n, index * 8);
        this.#release(e);
      }
      changed = true;
    }
    if (changed) this.l2Cache.markDirty(l2, table);
  }

  // --- sync ---

  /** Make every write that completed before this call durable, metadata included (the ordered sync above). */
  override flush(): Promise<void> {
    this.checkOpen();
    if (this.#syncQueued !== null) return this.#syncQueued;
    const run = async (): Promise<void> => {
      await this.#syncRunning?.catch(() => {});
      this.#syncQueued = null;
      const p = this.#meta.exclusive(() => this.#sync());
      this.#syncRunning = p;
      try {
        await p;
      } finally {
        if (this.#syncRunning === p) this.#syncRunning = null;
      }
    };
    const q = run();
    this.#syncQueued = q;
    return q;
  }

  async #sync(): Promise<void> {
    if (this.#failed !== null) throw this.#failed;
    const file = this.file;
    try {
      // 1. data
      await file.flush();
      // 2. refcount blocks
      if (await this.#refcounts.writeBlocks()) await file.flush();
      // 3. refcount table, then the header naming a moved one
      if (this.#refcounts.tableDirty) {
        const moved = await this.#refcounts.writeTable();
        await file.flush();
        if (moved !== null) {
          const b = Buffer.alloc(12);
          b.writeBigUInt64BE(BigInt(moved.offset), 0);
          b.writeUInt32BE(moved.clusters, 8);
          await file.write(HDR_REFCOUNT_TABLE_OFFSET, b);
          this.header.refcountTableOffset = moved.offset;
          this.header.refcountTableClusters = moved.clusters;
          await file.flush();
        }
      }
      // 4. L2 tables
      const tables = this.l2Cache.dirtyTables();
      for (const [offset, buf] of tables) {
        await file.write(offset, buf);
        this.l2Cache.markClean(offset);
      }
      if (tables.length > 0) await file.flush();
      // 5. L1 entries (whole 512-byte sectors)
      if (this.#dirtyL1.size > 0) {
        const sectors = new Set<number>();
        for (const i of this.#dirtyL1) sectors.add(Math.floor((i * 8) / 512));
        this.#dirtyL1.clear();
        for (const s of [...sectors].sort((a, b) => a - b)) {
          const from = s * 512;
          const to = Math.min(this.l1.length, from + 512);
          await file.write(this.header.l1TableOffset + from, this.l1.subarray(from, to));
        }
        await file.flush();
      }
      // 6. frees, once reads that may still use the old clusters are done
      if (this.#refcounts.hasPendingFrees) {
        await Promise.allSettled([...this.#reads]);
        const freed = await this.#refcounts.applyFrees();
        await this.#refcounts.writeBlocks();
        await file.flush();
        if (this.#punch) for (const at of freed) await file.trim(at, this.clusterSize).catch(() => {});
      }
    } catch (err) {
      if (err instanceof CorruptImageError) await this.#markCorrupt(err);
      this.#failed ??= toBlockError(err);
      throw this.#failed;
    }
  }

  /** Write everything back; with lazy refcounts, clear the dirty bit once all is durable. */
  protected override async closeImage(): Promise<void> {
    if (this.#failed !== null) return;
    await this.#meta.exclusive(() => this.#sync());
    if (this.#dirtyBitSet) {
      await this.#writeIncompatible(this.header.incompatible & ~INCOMPAT_DIRTY);
      await this.file.flush();
      this.#dirtyBitSet = false;
    }
  }
}
