// A qcow2 image (QEMU's docs/interop/qcow2.txt) as a BlockNode: versions 2
// and 3, cluster sizes 512 B to 2 MiB, standard, zero and compressed
// (zlib) clusters, and a backing node (raw or qcow2, any depth) that
// unallocated clusters read through. One node per image serves every
// connection, so its L2 table cache is shared by all of them.
//
// The mapping from guest offsets to host offsets is resolved per L2 table
// into segments: runs of clusters of one kind (data with contiguous host
// offsets, zero, unallocated; compressed clusters one by one). Reads,
// extents and allocation depths all walk those segments.
//
// Writes (when opened writable) live in qcow2-write.ts.
import fs from 'node:fs';
import zlib from 'node:zlib';
import { DepthCollector, depthsOf } from './depth.ts';
import { toBlockError } from './errno.ts';
import { DATA, ExtentCollector, HOLE, type ExtentFlags } from './extents.ts';
import { TableCache } from './qcow2-cache.ts';
import { CorruptImageError, decodeL2, getRefcount, offsetOf, type ClusterKind, type L2Entry, type Qcow2Header } from './qcow2-format.ts';
import type { BlockCapabilities, BlockNode, DepthRun, DiscardMode, Extent, WriteOptions, ZeroOptions } from './types.ts';
import { BlockError } from './types.ts';

/** Bytes of L2 tables kept in memory (qemu's default l2-cache-size is 1 MiB; a little more is cheap). */
export const DEFAULT_L2_CACHE_BYTES = 4 * 1024 * 1024;
/** Reads and zero runs of a data segment may be found holes in the host file (as qemu-img map does). */
const ZERO_IN_FILE: ExtentFlags = Object.freeze({ hole: false, zero: true });

/** Part of a guest range with one mapping. */
export interface Segment {
  /** Guest offset and length. */
  offset: number;
  length: number;
  kind: ClusterKind;
  /** normal: host offset of the segment's first byte; zero: 0 or the preallocation; compressed: unused. */
  host: number;
  /** compressed: the cluster's entry. */
  entry?: L2Entry;
}

export interface Qcow2NodeInit {
  /** The image file, opened by the caller (read-only unless writable). */
  file: BlockNode;
  header: Qcow2Header;
  /** The active L1 table as read from the file. */
  l1: Buffer;
  /** The backing node (opened read-only), or null. */
  backing: BlockNode | null;
  writable: boolean;
  discard: DiscardMode;
  /** Path, for messages. */
  path: string;
  l2CacheBytes?: number;
}

function eio(message: string): BlockError {
  return new BlockError('EIO', message);
}

export class Qcow2Node implements BlockNode {
  readonly size: number;
  readonly capabilities: BlockCapabilities;
  readonly path: string;
  readonly header: Qcow2Header;
  readonly clusterSize: number;
  readonly clusterBits: number;
  /** Entries per L2 table. */
  readonly l2Entries: number;
  /** Guest bytes one L2 table maps. */
  readonly l2Span: number;
  protected readonly file: BlockNode;
  protected readonly l1: Buffer;
  protected readonly l2Cache: TableCache;
  readonly #backing: BlockNode | null;
  #preallocated: Promise<boolean> | undefined;
  #closing: Promise<void> | undefined;

  constructor(init: Qcow2NodeInit) {
    const h = init.header;
    this.file = init.file;
    this.header = h;
    this.path = init.path;
    this.size = h.size;
    this.clusterSize = h.clusterSize;
    this.clusterBits = h.clusterBits;
    this.l2Entries = h.clusterSize / 8;
    this.l2Span = this.l2Entries * h.clusterSize;
    this.l1 = init.l1;
    this.#backing = init.backing;
    this.l2Cache = new TableCache(h.clusterSize, init.l2CacheBytes ?? DEFAULT_L2_CACHE_BYTES, (offset) => this.#loadTable(offset));
    const writable = init.writable;
    this.capabilities = Object.freeze({
      writable,
      canFlush: true,
      canTrim: writable && init.discard === 'unmap',
      canFastZero: writable && h.version === 3,
      canExtents: true,
      canCache: false,
    });
  }

  get backing(): BlockNode | null {
    return this.#backing;
  }

  async #loadTable(offset: number): Promise<Buffer> {
    const buf = Buffer.alloc(this.clusterSize);
    await this.file.read(offset, this.clusterSize, buf);
    return buf;
  }

  protected checkOpen(): void {
    if (this.#closing !== undefined) throw new BlockError('EBADF', `${this.path} is closed`);
  }

  // --- mapping ---

  /** The L2 table offset for L1 index `i` (0 when unallocated). */
  protected l2Offset(i: number): number {
    if (i >= this.header.l1Size) return 0;
    const offset = offsetOf(this.l1.readUInt32BE(i * 8), this.l1.readUInt32BE(i * 8 + 4));
    if (offset % this.clusterSize !== 0) throw new CorruptImageError(this.path, `L2 table offset ${offset} is not cluster aligned`);
    return offset;
  }

  /**
   * Segments of [offset, offset+length) inside the one L2 table that maps
   * `offset` (they may end before offset+length, at the table's end).
   */
  protected async mapTable(offset: number, length: number): Promise<Segment[]> {
    const cs = this.clusterSize;
    const l1Index = Math.floor(offset / this.l2Span);
    const tableEnd = (l1Index + 1) * this.l2Span;
    const end = Math.min(offset + length, tableEnd);
    const l2Offset = this.l2Offset(l1Index);
    if (l2Offset === 0) return [{ offset, length: end - offset, kind: 'unallocated', host: 0 }];
    const table = await this.l2Cache.get(l2Offset);
    const segs: Segment[] = [];
    let pos = offset;
    while (pos < end) {
      const index = Math.floor(pos / cs) % this.l2Entries;
      const inCluster = pos % cs;
      const n = Math.min(cs - inCluster, end - pos);
      const e = decodeL2(table, index, this.clusterBits);
      const last = segs[segs.length - 1];
      if (e.kind === 'compressed') {
        segs.push({ offset: pos, length: n, kind: 'compressed', host: 0, entry: e });
      } else if (e.kind === 'normal') {
        if (e.host % cs !== 0) throw new CorruptImageError(this.path, `cluster offset ${e.host} is not aligned`);
        const host = e.host + inCluster;
        if (last !== undefined && last.kind === 'normal' && last.host + last.length === host) last.length += n;
        else segs.push({ offset: pos, length: n, kind: 'normal', host });
      } else if (last !== undefined && last.kind === e.kind) {
        last.length += n;
      } else {
        segs.push({ offset: pos, length: n, kind: e.kind, host: e.host });
      }
      pos += n;
    }
    return segs;
  }

  /** Call visit for every segment of [offset, offset+length), in order, until it returns false. */
  protected async eachSegment(offset: number, length: number, visit: (seg: Segment) => Promise<boolean | void> | boolean | void): Promise<void> {
    const end = offset + length;
    let pos = offset;
    while (pos < end) {
      const segs = await this.mapTable(pos, end - pos);
      for (const seg of segs) {
        if ((await visit(seg)) === false) return;
        pos = seg.offset + seg.length;
      }
    }
  }

  // --- reads ---

  async read(offset: number, length: number, into?: Buffer): Promise<Buffer> {
    this.checkOpen();
    const out = into === undefined ? Buffer.allocUnsafe(length) : into.subarray(0, length);
    try {
      const jobs: Promise<unknown>[] = [];
      await this.eachSegment(offset, length, (seg) => {
        const dst = out.subarray(seg.offset - offset, seg.offset - offset + seg.length);
        jobs.push(this.readSegment(seg, dst));
      });
      await Promise.all(jobs);
      return out;
    } catch (err) {
      throw toBlockError(err);
    }
  }

  /** Fill dst (seg.length bytes) with the guest data of one segment. */
  protected async readSegment(seg: Segment, dst: Buffer): Promise<void> {
    switch (seg.kind) {
      case 'normal':
        await this.file.read(seg.host, seg.length, dst);
        return;
      case 'zero':
        dst.fill(0);
        return;
      case 'unallocated':
        await this.readBacking(seg.offset, dst);
        return;
      case 'compressed': {
        const cluster = await this.decompress(seg.entry!);
        const at = seg.offset % this.clusterSize;
        cluster.copy(dst, 0, at, at + seg.length);
        return;
      }
    }
  }

  /** What the backing node shows at [offset, offset+dst.length): its bytes, zeroes past its end or without one. */
  protected async readBacking(offset: number, dst: Buffer): Promise<void> {
    const b = this.#backing;
    const n = b === null ? 0 : Math.max(0, Math.min(dst.length, b.size - offset));
    if (n > 0) await b!.read(offset, n, dst.subarray(0, n));
    if (n < dst.length) dst.fill(0, n);
  }

  /** The whole guest cluster of a compressed entry. */
  protected async decompress(e: L2Entry): Promise<Buffer> {
    const raw = await this.file.read(e.host, e.compressedLength);
    return new Promise((resolve, reject) => {
      zlib.inflateRaw(raw, { finishFlush: zlib.constants.Z_SYNC_FLUSH, maxOutputLength: this.clusterSize }, (err, out) => {
        if (err !== null || out.length !== this.clusterSize) {
          reject(eio(`${this.path}: compressed cluster at ${e.host} does not decompress (${err?.message ?? `${out.length} bytes`})`));
        } else resolve(out);
      });
    });
  }

  // --- allocation ---

  async extents(offset: number, length: number, maxExtents?: number): Promise<Extent[]> {
    this.checkOpen();
    const c = new ExtentCollector(offset, length, maxExtents);
    try {
      await this.eachSegment(offset, length, async (seg) => {
        switch (seg.kind) {
          case 'compressed':
            return c.add(seg.offset, seg.length, DATA);
          case 'zero':
            return c.add(seg.offset, seg.length, HOLE);
          case 'normal': {
            // As qemu does for an image with metadata preallocation: data
            // clusters over holes of the host file read as zeroes.
            if (!this.file.capabilities.canExtents || !(await this.#metadataPreallocated())) return c.add(seg.offset, seg.length, DATA);
            const runs = await this.file.extents(seg.host, seg.length);
            let pos = seg.offset;
            for (const r of runs) {
              if (!c.add(pos, r.length, r.zero ? ZERO_IN_FILE : DATA)) return false;
              pos += r.length;
            }
            return c.add(pos, seg.offset + seg.length - pos, DATA);
          }
          case 'unallocated':
            return this.#backingExtents(c, seg.offset, seg.length);
        }
      });
    } catch (err) {
      throw toBlockError(err);
    }
    return c.finish();
  }

  /**
   * qemu's test for an image made with preallocation=metadata (it then
   * asks the host file about holes under data clusters): clearly more
   * clusters have a refcount than the file has blocks on disk. Once per open.
   */
  #metadataPreallocated(): Promise<boolean> {
    this.#preallocated ??= this.#detectPreallocation().catch(() => false);
    return this.#preallocated;
  }

  async #detectPreallocation(): Promise<boolean> {
    const st = await fs.promises.stat(this.path);
    const realClusters = Math.floor((st.blocks * 512) / this.clusterSize);
    const threshold = Math.max(Math.floor((realClusters * 10) / 9), realClusters + 2);
    const h = this.header;
    const order = h.refcountOrder;
    const perBlock = (this.clusterSize * 8) / 2 ** order;
    const endCluster = Math.ceil(st.size / this.clusterSize);
    const table = await this.file.read(h.refcountTableOffset, h.refcountTableClusters * this.clusterSize);
    let count = 0;
    for (let b = 0; b * perBlock < endCluster && b * 8 < table.length && count < threshold; b++) {
      const at = offsetOf(table.readUInt32BE(b * 8), table.readUInt32BE(b * 8 + 4));
      if (at === 0) continue;
      const block = await this.file.read(at, this.clusterSize);
      const n = Math.min(perBlock, endCluster - b * perBlock);
      for (let i = 0; i < n && count < threshold; i++) if (getRefcount(block, i, order) !== 0) count++;
    }
    return count >= threshold;
  }

  /** Extents of an unallocated range: the backing node's, and zeroes past its end (or without one). */
  async #backingExtents(c: ExtentCollector, offset: number, length: number): Promise<boolean> {
    const b = this.#backing;
    const n = b === null ? 0 : Math.max(0, Math.min(length, b.size - offset));
    if (n > 0) {
      let pos = offset;
      const runs = b!.capabilities.canExtents ? await b!.extents(offset, n) : [{ length: n, hole: false, zero: false }];
      for (const r of runs) {
        if (!c.add(pos, r.length, r)) return false;
        pos += r.length;
      }
      if (pos < offset + n && !c.add(pos, offset + n - pos, DATA)) return false;
    }
    return c.add(offset + n, length - n, HOLE);
  }

  /**
   * Allocation depth as qemu counts it: 1 where this image allocates
   * (data, zero or compressed clusters); below, the backing node's depth
   * plus one; where a layer is shorter than the range, that layer (it
   * "allocates" the zeroes past its end); 0 where nothing does.
   */
  async allocationDepth(offset: number, length: number, maxRuns?: number): Promise<DepthRun[]> {
    this.checkOpen();
    const c = new DepthCollector(offset, length, maxRuns);
    try {
      await this.eachSegment(offset, length, async (seg) => {
        if (seg.kind !== 'unallocated') return c.add(seg.length, 1);
        const b = this.#backing;
        if (b === null) return c.add(seg.length, 0);
        const n = Math.max(0, Math.min(seg.length, b.size - seg.offset));
        if (n > 0) {
          const runs = await depthsOf(b, seg.offset, n, c.remaining);
          let covered = 0;
          for (const r of runs) covered += r.length;
          if (!c.addRuns(runs, 1)) return false;
          if (covered < n) return false; // the backing capped its answer: stop here
        }
        return c.add(seg.length - n, 2);
      });
    } catch (err) {
      throw toBlockError(err);
    }
    return c.finish();
  }

  // --- writes: not on a read-only node (Qcow2WritableNode overrides these) ---

  async write(_offset: number, _data: Buffer, _opts?: WriteOptions): Promise<void> {
    throw new BlockError('EROFS', `${this.path} is open read-only`);
  }

  async trim(_offset: number, _length: number, _opts?: WriteOptions): Promise<void> {
    throw new BlockError('EROFS', `${this.path} is open read-only`);
  }

  async writeZeroes(_offset: number, _length: number, _opts?: ZeroOptions): Promise<void> {
    throw new BlockError('EROFS', `${this.path} is open read-only`);
  }

  async flush(): Promise<void> {
    this.checkOpen();
  }

  async cache(_offset: number, _length: number): Promise<void> {}

  /** Close: the subclass writes back first (closeImage); then the file and the backing chain. */
  async close(): Promise<void> {
    this.#closing ??= (async () => {
      try {
        await this.closeImage();
      } finally {
        try {
          await this.file.close();
        } finally {
          await this.#backing?.close();
        }
      }
    })();
    return this.#closing;
  }

  /** Hook for the writable node: write everything back before the files close. */
  protected async closeImage(): Promise<void> {}
}
