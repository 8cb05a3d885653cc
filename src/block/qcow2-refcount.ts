// qcow2 refcounts for a writable image: the refcount table and blocks,
// allocation of host clusters (first fit from a hint, refcount blocks and
// a bigger refcount table made when needed), and frees deferred until the
// metadata that stopped referencing the clusters is on disk.
//
// Nothing here writes to the file by itself: changes stay in memory
// (dirty blocks, dirty table entries, a pending table switch, pending
// frees) until the node's metadata sync writes them out in order (see
// qcow2-write.ts). Every call runs under the node's allocation mutex or
// under its exclusive sync, so there is one caller at a time.
import { TableCache } from './qcow2-cache.ts';
import { CorruptImageError, getRefcount, maxRefcount, MAX_REFTABLE_BYTES, offsetOf, setRefcount } from './qcow2-format.ts';
import type { BlockNode } from './types.ts';
import { BlockError } from './types.ts';

/** Refcount blocks kept in memory beyond the dirty ones. */
const REFBLOCK_CACHE_BYTES = 4 * 1024 * 1024;

export interface RefcountInit {
  file: BlockNode;
  clusterSize: number;
  refcountOrder: number;
  tableOffset: number;
  tableClusters: number;
  /** The refcount table as read from the file. */
  table: Buffer;
  /** The file's size at open. */
  fileSize: number;
  path: string;
}

/** A run of newly allocated clusters. */
export interface Allocation {
  /** Host offset of the first cluster. */
  offset: number;
  /** Clusters in the run (at least 1). */
  count: number;
  /** Nothing was ever written there: the clusters read as zeroes already. */
  fresh: boolean;
}

export class Refcounts {
  readonly #file: BlockNode;
  readonly #cs: number;
  readonly #order: number;
  /** Entries per refcount block. */
  readonly #perBlock: number;
  readonly #max: number;
  readonly #path: string;
  readonly #blocks: TableCache;
  #table: Buffer;
  #tableOffset: number;
  #tableClusters: number;
  /** Table entries changed since the last sync (indexes). */
  readonly #dirtyEntries = new Set<number>();
  /** The whole table is new (grown): written in full, then the header switches to it. */
  #tableMoved = false;
  /** Clusters whose refcount drops by one at the next sync, after the metadata no longer points at them. */
  readonly #pendingFrees = new Map<number, number>();
  /** No free cluster below this index (a hint, never wrong the other way). */
  #hint = 0;
  /** Clusters at or past this index are being handed out by the current allocate(): skip them. */
  #reservedEnd = 0;
  /**
   * Clusters at or past this index were never handed out since open and
   * lie past the file's end then: they read as zeroes (nothing wrote them).
   */
  #highWater: number;

  constructor(init: RefcountInit) {
    this.#file = init.file;
    this.#cs = init.clusterSize;
    this.#order = init.refcountOrder;
    this.#perBlock = (init.clusterSize * 8) / 2 ** init.refcountOrder;
    this.#max = maxRefcount(init.refcountOrder);
    this.#path = init.path;
    this.#table = init.table;
    this.#tableOffset = init.tableOffset;
    this.#tableClusters = init.tableClusters;
    this.#highWater = Math.ceil(init.fileSize / init.clusterSize);
    this.#blocks = new TableCache(init.clusterSize, REFBLOCK_CACHE_BYTES, async (offset) => {
      const buf = Buffer.alloc(this.#cs);
      await this.#file.read(offset, this.#cs, buf);
      return buf;
    });
  }

  get tableOffset(): number {
    return this.#tableOffset;
  }

  get tableClusters(): number {
    return this.#tableClusters;
  }

  get hasPendingFrees(): boolean {
    return this.#pendingFrees.size > 0;
  }

  get dirtyBlocks(): number {
    return this.#blocks.dirtyCount;
  }

  #entries(): number {
    return this.#table.length / 8;
  }

  #blockOffset(b: number): number {
    if (b >= this.#entries()) return 0;
    const off = offsetOf(this.#table.readUInt32BE(b * 8), this.#table.readUInt32BE(b * 8 + 4));
    if (off % this.#cs !== 0) throw new CorruptImageError(this.#path, `refcount block offset ${off} is not aligned`);
    return off;
  }

  #setBlockOffset(b: number, off: number): void {
    this.#table.writeUInt32BE(Math.floor(off / 0x100000000), b * 8);
    this.#table.writeUInt32BE(off % 0x100000000, b * 8 + 4);
    this.#dirtyEntries.add(b);
  }

  /** The refcount of host cluster `c`. */
  async get(c: number): Promise<number> {
    const off = this.#blockOffset(Math.floor(c / this.#perBlock));
    if (off === 0) return 0;
    return getRefcount(await this.#blocks.get(off), c % this.#perBlock, this.#order);
  }

  /**
   * Up to `max` contiguous free clusters: the first free cluster at or
   * after the hint and the free ones right after it. Their refcounts are
   * set to 1 (in memory). First fit from a hint that only moves forward
   * (until a free), so scanning costs little over the image's life.
   */
  async allocate(max: number): Promise<Allocation> {
    const start = await this.#findFree(this.#hint, 1);
    let count = 1;
    while (count < max && (await this.get(start + count)) === 0) count++;
    const fresh = start >= this.#highWater;
    this.#hint = start + count;
    await this.#take(start, count);
    return { offset: start * this.#cs, count, fresh };
  }

  /** Set the refcounts of [start, start+count) to 1, keeping other allocations out of the run meanwhile. */
  async #take(start: number, count: number): Promise<void> {
    this.#highWater = Math.max(this.#highWater, start + count);
    const saved = this.#reservedEnd;
    this.#reservedEnd = Math.max(saved, start + count);
    try {
      for (let c = start; c < start + count; c++) await this.#set(c, 1);
    } finally {
      this.#reservedEnd = saved;
    }
  }

  /** The first run of n clusters with refcount 0 at or after `from` (and after any reserved run). */
  async #findFree(from: number, n: number): Promise<number> {
    let c = Math.max(from, this.#reservedEnd);
    let runStart = c;
    for (;;) {
      const b = Math.floor(c / this.#perBlock);
      const off = this.#blockOffset(b);
      const blockEnd = (b + 1) * this.#perBlock;
      if (off === 0) {
        // No block: every cluster it would cover is free.
        if (blockEnd - runStart >= n) return runStart;
        c = blockEnd;
        continue;
      }
      const block = await this.#blocks.get(off);
      for (; c < blockEnd; c++) {
        if (getRefcount(block, c % this.#perBlock, this.#order) !== 0) runStart = c + 1;
        else if (c + 1 - runStart >= n) return runStart;
      }
    }
  }

  /** Set the refcount of cluster c (in memory), making its refcount block if needed. */
  async #set(c: number, value: number): Promise<void> {
    if (value > this.#max) throw new BlockError('EIO', `${this.#path}: refcount of cluster ${c} would overflow`);
    const block = await this.#block(Math.floor(c / this.#perBlock));
    setRefcount(block.buf, c % this.#perBlock, this.#order, value);
    this.#blocks.markDirty(block.offset, block.buf);
  }

  /** Refcount block b, made (and the table grown) when it does not exist yet. */
  async #block(b: number): Promise<{ offset: number; buf: Buffer }> {
    let off = this.#blockOffset(b);
    if (off === 0 && b >= this.#entries()) {
      await this.#growTable(b);
      off = this.#blockOffset(b); // growing may have made it
    }
    if (off !== 0) return { offset: off, buf: await this.#blocks.get(off) };
    // A cluster for the new block, past anything reserved.
    const x = await this.#findFree(this.#hint, 1);
    const at = x * this.#cs;
    const buf = Buffer.alloc(this.#cs);
    if (Math.floor(x / this.#perBlock) === b) {
      // The block describes itself.
      this.#highWater = Math.max(this.#highWater, x + 1);
      setRefcount(buf, x % this.#perBlock, this.#order, 1);
    } else {
      await this.#take(x, 1);
    }
    this.#blocks.put(at, buf);
    this.#setBlockOffset(b, at);
    return { offset: at, buf };
  }

  /** Grow the refcount table to cover block index `need` (and leave room): a new, larger table elsewhere. */
  async #growTable(need: number): Promise<void> {
    const entries = Math.max(need + 1, this.#entries() * 2, this.#cs / 8);
    const clusters = Math.ceil((entries * 8) / this.#cs);
    if (clusters * this.#cs > MAX_REFTABLE_BYTES) throw new BlockError('EFBIG', `${this.#path}: the refcount table would pass ${MAX_REFTABLE_BYTES} bytes`);
    const start = await this.#findFree(this.#hint, clusters);
    const table = Buffer.alloc(clusters * this.#cs);
    this.#table.copy(table);
    const old = { offset: this.#tableOffset, clusters: this.#tableClusters };
    this.#table = table;
    this.#tableOffset = start * this.#cs;
    this.#tableClusters = clusters;
    this.#tableMoved = true;
    await this.#take(start, clusters);
    // The old table is freed once the header points at the new one.
    this.free(old.offset, old.clusters * this.#cs);
  }

  /** Drop one reference from every cluster overlapping [offset, offset+length), at the next sync. */
  free(offset: number, length: number): void {
    if (length <= 0) return;
    const first = Math.floor(offset / this.#cs);
    const last = Math.floor((offset + length - 1) / this.#cs);
    for (let c = first; c <= last; c++) this.#pendingFrees.set(c, (this.#pendingFrees.get(c) ?? 0) + 1);
  }

  // --- repair (a dirty image; see qcow2-repair.ts) ---

  /** Host offsets of the refcount blocks the table names. */
  blockOffsets(): number[] {
    const out: number[] = [];
    for (let b = 0; b < this.#entries(); b++) {
      const off = offsetOf(this.#table.readUInt32BE(b * 8), this.#table.readUInt32BE(b * 8 + 4));
      if (off !== 0) out.push(off);
    }
    return out;
  }

  /** Allocate nothing below cluster `c` from now on (space the repair has not counted yet). */
  allocateFrom(c: number): void {
    this.#hint = Math.max(this.#hint, c);
    this.#highWater = Math.max(this.#highWater, c);
  }

  /** Set the refcount of cluster c to exactly `value` (in memory, written at the next sync). */
  async setExact(c: number, value: number): Promise<void> {
    await this.#set(c, value);
  }

  // --- the sync steps, in the order the node runs them ---

  /** Write dirty refcount blocks (increments only: decrements happen in applyFrees). True if any. */
  async writeBlocks(): Promise<boolean> {
    const dirty = this.#blocks.dirtyTables();
    for (const [offset, buf] of dirty) {
      await this.#file.write(offset, buf);
      this.#blocks.markClean(offset);
    }
    return dirty.length > 0;
  }

  /**
   * Write the refcount table: the whole of a new one, or the changed
   * entries. Returns the header switch to make (new offset and clusters)
   * when the table moved, after these writes are durable.
   */
  async writeTable(): Promise<{ offset: number; clusters: number } | null> {
    if (this.#tableMoved) {
      await this.#file.write(this.#tableOffset, this.#table);
      this.#dirtyEntries.clear();
      this.#tableMoved = false;
      return { offset: this.#tableOffset, clusters: this.#tableClusters };
    }
    if (this.#dirtyEntries.size === 0) return null;
    // Whole 512-byte sectors of the table, each written once.
    const sectors = new Set<number>();
    for (const i of this.#dirtyEntries) sectors.add(Math.floor((i * 8) / 512));
    this.#dirtyEntries.clear();
    for (const s of [...sectors].sort((a, b) => a - b)) {
      await this.#file.write(this.#tableOffset + s * 512, this.#table.subarray(s * 512, s * 512 + 512));
    }
    return null;
  }

  get tableDirty(): boolean {
    return this.#tableMoved || this.#dirtyEntries.size > 0;
  }

  /**
   * Apply the pending frees (in memory; the blocks become dirty). Returns
   * the host offsets of clusters that became free.
   */
  async applyFrees(): Promise<number[]> {
    const freed: number[] = [];
    const frees = [...this.#pendingFrees].sort((a, b) => a[0] - b[0]);
    this.#pendingFrees.clear();
    for (const [c, n] of frees) {
      const now = await this.get(c);
      if (now < n) throw new CorruptImageError(this.#path, `refcount of cluster ${c} would drop below zero`);
      await this.#set(c, now - n);
      if (now === n) {
        freed.push(c * this.#cs);
        if (c < this.#hint) this.#hint = c;
      }
    }
    return freed;
  }
}
