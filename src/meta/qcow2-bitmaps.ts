// qcow2 persistent dirty bitmaps: the bitmaps extension of QEMU's
// docs/interop/qcow2.txt ("Bitmaps extension", "Bitmap directory",
// "Bitmap table", "Bitmap data"), read when the image opens and written
// back after the image node has closed (so the two never race on the
// metadata), with clusters allocated and freed through the qcow2 driver's
// refcount code.
//
// Extension data (24 bytes):   0 nb_bitmaps  4 reserved  8 directory size  16 directory offset
// Directory entry (padded to 8):
//   0 bitmap table offset   8 table size (entries)   12 flags (bit 0 in_use, 1 auto, 2 extra_data_compatible)
//  16 type (1: dirty tracking)   17 granularity bits   18 name size   20 extra data size
//  24 extra data, then the name (no terminator)
// Table entry: bits 9..55 the data cluster's offset; when 0, bit 0 set means "all ones".
// Data: bit k of the bitmap is bit k%8 of byte k/8; cluster i holds bytes [i*cs, (i+1)*cs).
//
// Consistency (autoclear bit 0, "bitmaps extension"): when it is clear, a
// program that does not keep bitmaps wrote the image and every bitmap is
// inconsistent. A bitmap flagged in_use was not stored after its last
// change (a crash) and is inconsistent too. Both kinds are kept, flagged
// in use, until removed. Storing is ordered so a crash at any point leaks
// clusters at worst: new data, tables and directory first, refcounts, then
// the header switching to the new directory, then the old clusters freed.
import { FileNode } from '../block/file.ts';
import { readQcow2Header } from '../block/qcow2-open.ts';
import {
  EXT_BITMAPS,
  EXT_END,
  HDR_AUTOCLEAR,
  HDR_REFCOUNT_TABLE_OFFSET,
  INCOMPAT_CORRUPT,
  INCOMPAT_DIRTY,
  parseHeader,
  type Qcow2Header,
} from '../block/qcow2-format.ts';
import { Refcounts } from '../block/qcow2-refcount.ts';
import { BlockError } from '../block/types.ts';
import type { BitmapStore, StoredBitmap } from './bitmap-store.ts';
import { bitmapBytes, MAX_GRANULARITY_BITS, MIN_GRANULARITY_BITS, type DirtyBitmap } from './dirty-bitmap.ts';

export const AUTOCLEAR_BITMAPS = 1n << 0n;
export const BME_FLAG_IN_USE = 1 << 0;
export const BME_FLAG_AUTO = 1 << 1;
export const BME_FLAG_EXTRA_DATA_COMPATIBLE = 1 << 2;
const BME_KNOWN_FLAGS = BME_FLAG_IN_USE | BME_FLAG_AUTO | BME_FLAG_EXTRA_DATA_COMPATIBLE;
const BT_DIRTY_TRACKING = 1;
const EXT_BITMAPS_LEN = 24;
/** qemu's limits (block/qcow2-bitmap.c): 65535 bitmaps, a 64 MiB directory, 64 MiB of data per bitmap. */
const MAX_BITMAPS = 65535;
const MAX_DIRECTORY_BYTES = 64 * 1024 * 1024;
const ENTRY_OFFSET_MASK = 0x00fffffffffffe00n;

export interface DirEntry {
  tableOffset: number;
  tableSize: number;
  flags: number;
  type: number;
  granularityBits: number;
  name: string;
  extra: Buffer;
}

export interface HeaderExtension {
  type: number;
  data: Buffer;
}

interface BitmapsExt {
  count: number;
  dirSize: number;
  dirOffset: number;
}

function corrupt(message: string): BlockError {
  return new BlockError('EINVAL', `invalid qcow2 bitmaps: ${message}`);
}

const pad8 = (n: number): number => Math.ceil(n / 8) * 8;

/** The header extensions of cluster 0, in order (qcow2-format.ts's parseHeader has checked their bounds). */
export function headerExtensions(cluster0: Buffer, header: Qcow2Header): HeaderExtension[] {
  const out: HeaderExtension[] = [];
  let at = header.headerLength;
  const limit = Math.min(header.clusterSize, cluster0.length);
  while (at + 8 <= limit) {
    const type = cluster0.readUInt32BE(at);
    const len = cluster0.readUInt32BE(at + 4);
    if (type === EXT_END) break;
    out.push({ type, data: Buffer.from(cluster0.subarray(at + 8, at + 8 + len)) });
    at += 8 + pad8(len);
  }
  return out;
}

function decodeExt(data: Buffer): BitmapsExt {
  if (data.length < EXT_BITMAPS_LEN) throw corrupt('extension is too short');
  const count = data.readUInt32BE(0);
  const dirSize = Number(data.readBigUInt64BE(8));
  const dirOffset = Number(data.readBigUInt64BE(16));
  if (count === 0 || count > MAX_BITMAPS) throw corrupt(`${count} bitmaps`);
  if (dirSize > MAX_DIRECTORY_BYTES || dirSize < count * 24) throw corrupt(`directory of ${dirSize} bytes`);
  return { count, dirSize, dirOffset };
}

function encodeExt(e: BitmapsExt): Buffer {
  const b = Buffer.alloc(EXT_BITMAPS_LEN);
  b.writeUInt32BE(e.count, 0);
  b.writeBigUInt64BE(BigInt(e.dirSize), 8);
  b.writeBigUInt64BE(BigInt(e.dirOffset), 16);
  return b;
}

/** Decode `count` directory entries; each entry's fields are checked against the directory's bounds. */
export function decodeDirectory(dir: Buffer, count: number): DirEntry[] {
  const out: DirEntry[] = [];
  let at = 0;
  for (let i = 0; i < count; i++) {
    if (at + 24 > dir.length) throw corrupt('directory is truncated');
    const extraSize = dir.readUInt32BE(at + 20);
    const nameSize = dir.readUInt16BE(at + 18);
    const end = at + 24 + extraSize + nameSize;
    if (end > dir.length) throw corrupt('directory entry runs past the directory');
    out.push({
      tableOffset: Number(dir.readBigUInt64BE(at)),
      tableSize: dir.readUInt32BE(at + 8),
      flags: dir.readUInt32BE(at + 12),
      type: dir.readUInt8(at + 16),
      granularityBits: dir.readUInt8(at + 17),
      extra: Buffer.from(dir.subarray(at + 24, at + 24 + extraSize)),
      name: dir.subarray(at + 24 + extraSize, end).toString('utf8'),
    });
    at = pad8(end);
  }
  return out;
}

export function encodeDirectory(entries: readonly DirEntry[]): Buffer {
  const names = entries.map((e) => Buffer.from(e.name, 'utf8'));
  let size = 0;
  entries.forEach((e, i) => (size = pad8(size + 24 + e.extra.length + names[i]!.length)));
  const dir = Buffer.alloc(size);
  let at = 0;
  entries.forEach((e, i) => {
    dir.writeBigUInt64BE(BigInt(e.tableOffset), at);
    dir.writeUInt32BE(e.tableSize, at + 8);
    dir.writeUInt32BE(e.flags, at + 12);
    dir.writeUInt8(e.type, at + 16);
    dir.writeUInt8(e.granularityBits, at + 17);
    dir.writeUInt16BE(names[i]!.length, at + 18);
    dir.writeUInt32BE(e.extra.length, at + 20);
    e.extra.copy(dir, at + 24);
    names[i]!.copy(dir, at + 24 + e.extra.length);
    at = pad8(at + 24 + e.extra.length + names[i]!.length);
  });
  return dir;
}

/** Why an entry cannot be used as a dirty bitmap of this image, or null. */
function entryProblem(e: DirEntry, header: Qcow2Header, fileSize: number): string | null {
  if (e.flags & BME_FLAG_IN_USE) return 'it was in use when its writer stopped (crash?)';
  if ((e.flags & ~BME_KNOWN_FLAGS) !== 0) return `unknown flags 0x${e.flags.toString(16)}`;
  if (e.type !== BT_DIRTY_TRACKING) return `unknown type ${e.type}`;
  if (e.extra.length > 0 && !(e.flags & BME_FLAG_EXTRA_DATA_COMPATIBLE)) return 'it has extra data this server does not understand';
  if (e.granularityBits < MIN_GRANULARITY_BITS || e.granularityBits > MAX_GRANULARITY_BITS) return `granularity 2^${e.granularityBits}`;
  const need = Math.ceil(bitmapBytes(header.size, 2 ** e.granularityBits) / header.clusterSize);
  if (e.tableSize !== need) return `its table has ${e.tableSize} entries, the image needs ${need}`;
  if (e.tableOffset % header.clusterSize !== 0 || e.tableOffset + e.tableSize * 8 > fileSize) return 'its table is outside the file';
  return null;
}

/** Host offset of a table entry (0: not allocated). */
function entryOffset(table: Buffer, i: number): number {
  return Number(table.readBigUInt64BE(i * 8) & ENTRY_OFFSET_MASK);
}

export class Qcow2BitmapStore implements BitmapStore {
  readonly where = 'qcow2 image';
  readonly #path: string;
  /** Entries loaded as consistent, by name: save() may reuse their clusters while their bits are unchanged. */
  #loaded = new Map<string, DirEntry>();

  constructor(path: string) {
    this.#path = path;
  }

  async #open(readOnly: boolean): Promise<FileNode> {
    return FileNode.open({ path: this.#path, readOnly, offset: 0, direct: false, discard: 'ignore' });
  }

  async #cluster0(f: FileNode): Promise<{ cluster0: Buffer; header: Qcow2Header }> {
    const header0 = await readQcow2Header(f);
    const cluster0 = Buffer.alloc(header0.clusterSize);
    await f.read(0, Math.min(header0.clusterSize, f.size), cluster0);
    return { cluster0, header: parseHeader(cluster0) };
  }

  /** The directory as on disk, or null when there is no bitmaps extension. */
  async #directory(f: FileNode, cluster0: Buffer, header: Qcow2Header): Promise<{ ext: BitmapsExt; entries: DirEntry[] } | null> {
    if (header.version !== 3) return null;
    const found = headerExtensions(cluster0, header).find((e) => e.type === EXT_BITMAPS);
    if (found === undefined) return null;
    const ext = decodeExt(found.data);
    if (ext.dirOffset % header.clusterSize !== 0 || ext.dirOffset + ext.dirSize > f.size) throw corrupt('directory is outside the file');
    const dir = Buffer.alloc(ext.dirSize);
    await f.read(ext.dirOffset, ext.dirSize, dir);
    return { ext, entries: decodeDirectory(dir, ext.count) };
  }

  async load(): Promise<StoredBitmap[]> {
    const f = await this.#open(true);
    try {
      const { cluster0, header } = await this.#cluster0(f);
      const d = await this.#directory(f, cluster0, header);
      this.#loaded = new Map();
      if (d === null) return [];
      const extConsistent = (header.autoclear & AUTOCLEAR_BITMAPS) !== 0n;
      const out: StoredBitmap[] = [];
      for (const e of d.entries) {
        const granularity = 2 ** Math.min(Math.max(e.granularityBits, MIN_GRANULARITY_BITS), MAX_GRANULARITY_BITS);
        const info = { name: e.name, granularity, enabled: (e.flags & BME_FLAG_AUTO) !== 0 };
        const problem = extConsistent ? entryProblem(e, header, f.size) : 'the image was written by a program that does not keep bitmaps';
        if (problem !== null) {
          out.push({ info, inconsistent: problem });
          continue;
        }
        let data: Uint8Array;
        try {
          data = await this.#readData(f, header, e);
        } catch (err) {
          // One damaged bitmap is unusable; the others still are.
          out.push({ info, inconsistent: err instanceof Error ? err.message : String(err) });
          continue;
        }
        out.push({ info, inconsistent: null, data });
        this.#loaded.set(e.name, e);
      }
      return out;
    } finally {
      await f.close();
    }
  }

  async #readData(f: FileNode, header: Qcow2Header, e: DirEntry): Promise<Uint8Array> {
    const cs = header.clusterSize;
    const n = bitmapBytes(header.size, 2 ** e.granularityBits);
    const data = Buffer.alloc(n);
    const table = Buffer.alloc(e.tableSize * 8);
    await f.read(e.tableOffset, table.length, table);
    for (let i = 0; i < e.tableSize; i++) {
      const from = i * cs;
      const len = Math.min(cs, n - from);
      const off = entryOffset(table, i);
      if (off === 0) {
        if (table.readUInt8(i * 8 + 7) & 1) data.fill(0xff, from, from + len);
        continue;
      }
      if (off % cs !== 0 || off >= f.size) throw corrupt(`a data cluster of bitmap '${e.name}' is outside the file`);
      await f.read(off, Math.min(len, f.size - off), data.subarray(from, from + len));
    }
    return data;
  }

  async markInUse(names: readonly string[]): Promise<void> {
    if (names.length === 0) return;
    const f = await this.#open(false);
    try {
      const { cluster0, header } = await this.#cluster0(f);
      const d = await this.#directory(f, cluster0, header);
      if (d === null) return;
      for (const e of d.entries) if (names.includes(e.name)) e.flags |= BME_FLAG_IN_USE;
      const dir = encodeDirectory(d.entries);
      if (dir.length !== d.ext.dirSize) throw corrupt('directory does not round-trip');
      await f.write(d.ext.dirOffset, dir);
      await f.flush();
    } finally {
      await f.close();
    }
  }

  async save(bitmaps: readonly DirtyBitmap[], inconsistent: readonly string[]): Promise<void> {
    const f = await this.#open(false);
    try {
      await this.#save(f, bitmaps, inconsistent);
    } finally {
      await f.close();
    }
  }

  async #save(f: FileNode, bitmaps: readonly DirtyBitmap[], inconsistent: readonly string[]): Promise<void> {
    const { cluster0, header } = await this.#cluster0(f);
    const cs = header.clusterSize;
    if (header.version !== 3) {
      if (bitmaps.length > 0) throw new BlockError('ENOTSUP', 'qcow2 version 2 images (compat=0.10) cannot store bitmaps; use compat=1.1');
      return;
    }
    if (header.incompatible & (INCOMPAT_DIRTY | INCOMPAT_CORRUPT)) {
      throw new BlockError('EIO', "the qcow2 image is dirty or corrupt; repair it with 'qemu-img check -r all' first");
    }
    const old = await this.#directory(f, cluster0, header);
    const oldEntries = old?.entries ?? [];
    const table = Buffer.alloc(header.refcountTableClusters * cs);
    await f.read(header.refcountTableOffset, table.length, table);
    const refs = new Refcounts({
      file: f,
      clusterSize: cs,
      refcountOrder: header.refcountOrder,
      tableOffset: header.refcountTableOffset,
      tableClusters: header.refcountTableClusters,
      table,
      fileSize: f.size,
      path: this.#path,
    });
    const contiguous = async (n: number): Promise<number> => {
      for (;;) {
        const a = await refs.allocate(n);
        if (a.count === n) return a.offset;
        refs.free(a.offset, a.count * cs);
      }
    };

    const entries: DirEntry[] = [];
    const kept = new Set<DirEntry>();
    for (const e of oldEntries) {
      if (!inconsistent.includes(e.name)) continue;
      entries.push({ ...e, flags: e.flags | BME_FLAG_IN_USE });
      kept.add(e);
    }
    for (const b of bitmaps) {
      const flags = b.enabled ? BME_FLAG_AUTO : 0;
      const prev = oldEntries.find((e) => e.name === b.name);
      const loaded = this.#loaded.get(b.name);
      if (prev !== undefined && loaded !== undefined && !b.modified && prev.tableOffset === loaded.tableOffset && prev.granularityBits === b.granularityBits) {
        // Bits unchanged since load: the stored table and data still hold them.
        entries.push({ ...prev, flags: flags | (prev.flags & BME_FLAG_EXTRA_DATA_COMPATIBLE) });
        kept.add(prev);
        continue;
      }
      const data = b.bytes;
      const tableSize = Math.ceil(data.length / cs);
      const t = Buffer.alloc(Math.ceil((tableSize * 8) / cs) * cs);
      for (let i = 0; i < tableSize; i++) {
        const chunk = data.subarray(i * cs, Math.min(data.length, (i + 1) * cs));
        if (chunk.every((x) => x === 0)) continue;
        const at = await contiguous(1);
        const full = Buffer.alloc(cs);
        full.set(chunk);
        await f.write(at, full);
        t.writeBigUInt64BE(BigInt(at), i * 8);
      }
      const tableOffset = tableSize === 0 ? 0 : await contiguous(t.length / cs);
      if (tableSize > 0) await f.write(tableOffset, t);
      entries.push({ tableOffset, tableSize, flags, type: BT_DIRTY_TRACKING, granularityBits: b.granularityBits, name: b.name, extra: Buffer.alloc(0) });
    }
    if (entries.length > MAX_BITMAPS) throw new BlockError('ENOSPC', `more than ${MAX_BITMAPS} bitmaps`);

    let ext: BitmapsExt | null = null;
    if (entries.length > 0) {
      const dir = encodeDirectory(entries);
      if (dir.length > MAX_DIRECTORY_BYTES) throw new BlockError('ENOSPC', 'the bitmap directory would pass 64 MiB');
      const clusters = Math.ceil(dir.length / cs);
      const at = await contiguous(clusters);
      const padded = Buffer.alloc(clusters * cs);
      dir.copy(padded);
      await f.write(at, padded);
      ext = { count: entries.length, dirSize: dir.length, dirOffset: at };
    }
    // Old clusters no longer referenced: freed once the header names the new directory.
    for (const e of oldEntries) if (!kept.has(e)) await this.#freeBitmap(f, refs, header, e);
    if (old !== null) refs.free(old.ext.dirOffset, old.ext.dirSize);

    // 1. new data, tables, directory; 2. their refcounts; 3. a moved refcount table.
    await f.flush();
    if (await refs.writeBlocks()) await f.flush();
    if (refs.tableDirty) {
      const moved = await refs.writeTable();
      await f.flush();
      if (moved !== null) {
        cluster0.writeBigUInt64BE(BigInt(moved.offset), HDR_REFCOUNT_TABLE_OFFSET);
        cluster0.writeUInt32BE(moved.clusters, HDR_REFCOUNT_TABLE_OFFSET + 8);
        await f.write(HDR_REFCOUNT_TABLE_OFFSET, cluster0.subarray(HDR_REFCOUNT_TABLE_OFFSET, HDR_REFCOUNT_TABLE_OFFSET + 12));
        await f.flush();
      }
    }
    // 4. the header: the extension naming the new directory, and the autoclear bit saying it is consistent.
    const head = rewriteExtensions(cluster0, header, ext === null ? null : encodeExt(ext));
    const autoclear = ext === null ? header.autoclear & ~AUTOCLEAR_BITMAPS : header.autoclear | AUTOCLEAR_BITMAPS;
    head.writeBigUInt64BE(autoclear, HDR_AUTOCLEAR);
    await f.write(0, head);
    await f.flush();
    // 5. the old clusters.
    if (refs.hasPendingFrees) {
      await refs.applyFrees();
      await refs.writeBlocks();
      await f.flush();
    }
    this.#loaded = new Map(entries.filter((e) => !(e.flags & BME_FLAG_IN_USE)).map((e) => [e.name, e]));
  }

  /** Queue the clusters of a bitmap (its data clusters and its table) to be freed; damaged offsets are skipped (leaked). */
  async #freeBitmap(f: FileNode, refs: Refcounts, header: Qcow2Header, e: DirEntry): Promise<void> {
    const cs = header.clusterSize;
    const bytes = e.tableSize * 8;
    if (e.tableOffset === 0 || e.tableOffset % cs !== 0 || e.tableOffset + bytes > f.size || bytes > MAX_DIRECTORY_BYTES) return;
    const table = Buffer.alloc(bytes);
    await f.read(e.tableOffset, bytes, table);
    for (let i = 0; i < e.tableSize; i++) {
      const off = entryOffset(table, i);
      if (off !== 0 && off % cs === 0 && off < f.size) refs.free(off, cs);
    }
    refs.free(e.tableOffset, bytes);
  }
}

/**
 * Cluster 0 with its extensions rebuilt: the bitmaps extension replaced,
 * added or dropped; the others kept in order; the backing file name moved
 * to follow them (as qemu lays the header out).
 */
export function rewriteExtensions(cluster0: Buffer, header: Qcow2Header, bitmapsExt: Buffer | null): Buffer {
  const exts = headerExtensions(cluster0, header);
  const out: HeaderExtension[] = [];
  let placed = false;
  for (const e of exts) {
    if (e.type !== EXT_BITMAPS) out.push(e);
    else if (bitmapsExt !== null) {
      out.push({ type: EXT_BITMAPS, data: bitmapsExt });
      placed = true;
    }
  }
  if (bitmapsExt !== null && !placed) out.push({ type: EXT_BITMAPS, data: bitmapsExt });
  const head = Buffer.alloc(cluster0.length);
  cluster0.copy(head, 0, 0, header.headerLength);
  let at = header.headerLength;
  for (const e of out) {
    if (at + 8 + pad8(e.data.length) > head.length) throw new BlockError('ENOSPC', 'qcow2 header extensions do not fit in the first cluster');
    head.writeUInt32BE(e.type, at);
    head.writeUInt32BE(e.data.length, at + 4);
    e.data.copy(head, at + 8);
    at += 8 + pad8(e.data.length);
  }
  at += 8; // end of extensions (zeroes)
  if (header.backingFile !== null) {
    const name = Buffer.from(header.backingFile, 'utf8');
    if (at + name.length > head.length) throw new BlockError('ENOSPC', 'qcow2 header extensions do not fit in the first cluster');
    name.copy(head, at);
    head.writeBigUInt64BE(BigInt(at), 8);
    head.writeUInt32BE(name.length, 16);
  }
  return head;
}
