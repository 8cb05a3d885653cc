// The qcow2 on-disk format (QEMU's docs/interop/qcow2.txt): the header and
// its extensions, decoded and checked into a typed value, and the table
// entry layouts. Pure functions over Buffers; all numbers are big-endian.
//
// Header (version 2 ends at byte 72; version 3 is at least 104 bytes):
//   0  magic "QFI\xfb"          4  version (2 or 3)
//   8  backing_file_offset      16 backing_file_size (<= 1023)
//  20  cluster_bits (9..21)     24 size (virtual size in bytes)
//  32  crypt_method             36 l1_size (entries)
//  40  l1_table_offset          48 refcount_table_offset
//  56  refcount_table_clusters  60 nb_snapshots
//  64  snapshots_offset
//  72  incompatible_features    80 compatible_features
//  88  autoclear_features       96 refcount_order
// 100  header_length           104 compression_type (when header_length > 104)
//
// Header extension (from header_length to the end of cluster 0, each padded to 8):
//   0 type   4 length   8 data
import { BlockError } from './types.ts';

export const QCOW2_MAGIC = 0x514649fb;
export const QCOW2_MAGIC_BYTES = Buffer.from('QFI\xfb', 'latin1');

/** Incompatible feature bits. */
export const INCOMPAT_DIRTY = 1n << 0n;
export const INCOMPAT_CORRUPT = 1n << 1n;
export const INCOMPAT_DATA_FILE = 1n << 2n;
export const INCOMPAT_COMPRESSION = 1n << 3n;
export const INCOMPAT_EXTL2 = 1n << 4n;
/** Compatible feature bits. */
export const COMPAT_LAZY_REFCOUNTS = 1n << 0n;

/** Header extension types. */
export const EXT_END = 0x00000000;
export const EXT_BACKING_FORMAT = 0xe2792aca;
export const EXT_FEATURE_TABLE = 0x6803f857;
export const EXT_BITMAPS = 0x23852875;
export const EXT_CRYPTO = 0x0537be77;
export const EXT_DATA_FILE = 0x44415441;

/** Byte offsets of the header fields this code rewrites. */
export const HDR_REFCOUNT_TABLE_OFFSET = 48;
export const HDR_INCOMPATIBLE = 72;
export const HDR_AUTOCLEAR = 88;

/** qemu's limits: the L1 table at most 32 MiB, the refcount table at most 8 MiB. */
export const MAX_L1_BYTES = 32 * 1024 * 1024;
export const MAX_REFTABLE_BYTES = 8 * 1024 * 1024;
export const MIN_CLUSTER_BITS = 9;
export const MAX_CLUSTER_BITS = 21;

/** L1/L2 entry bit 63: refcount is exactly one. */
export const OFLAG_COPIED_HI = 0x80000000;
/** L2 entry bit 62: compressed cluster. */
export const OFLAG_COMPRESSED_HI = 0x40000000;
/** L2 entry bit 0: reads as zeroes (version 3). */
export const OFLAG_ZERO_LO = 1;

export interface Qcow2Header {
  version: 2 | 3;
  clusterBits: number;
  clusterSize: number;
  /** Virtual size in bytes. */
  size: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  nbSnapshots: number;
  snapshotsOffset: number;
  incompatible: bigint;
  compatible: bigint;
  autoclear: bigint;
  refcountOrder: number;
  headerLength: number;
  /** The backing file name as stored, or null. */
  backingFile: string | null;
  /** From the backing format extension, or null when absent. */
  backingFormat: string | null;
  /** Feature names from the feature name table: "type:bit" -> name. */
  featureNames: Map<string, string>;
  /** Where header extensions end (first byte after the end marker or the last extension). */
  extensionsEnd: number;
  /** The types of the header extensions present, in order. */
  extensionTypes: number[];
}

/**
 * Metadata that cannot be right, found while serving (misaligned offsets,
 * a data cluster inside metadata, a refcount below zero). A writable node
 * marks the image corrupt on disk when it sees one, as qemu does.
 */
export class CorruptImageError extends BlockError {
  constructor(path: string, what: string) {
    super('EIO', `${path}: ${what} (corrupt image)`);
  }
}

/** A one-line refusal to open an image (errno-style code, readable message). */
export function unsupported(message: string): BlockError {
  return new BlockError('ENOTSUP', message);
}

function corrupt(message: string): BlockError {
  return new BlockError('EINVAL', `invalid qcow2 image: ${message}`);
}

/** A u64 as a safe integer, or an error naming the field. */
function u64(buf: Buffer, at: number, field: string): number {
  const v = buf.readBigUInt64BE(at);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw corrupt(`${field} ${v} is too large`);
  return Number(v);
}

/** True when the buffer starts with the qcow2 magic. */
export function isQcow2(head: Buffer): boolean {
  return head.length >= 4 && head.readUInt32BE(0) === QCOW2_MAGIC;
}

/**
 * Decode and check the header in `cluster0` (at least the first cluster of
 * the file, or the whole file when it is shorter). Refuses what this code
 * does not implement with a one-line message.
 */
export function parseHeader(cluster0: Buffer): Qcow2Header {
  if (cluster0.length < 72 || !isQcow2(cluster0)) throw corrupt('no qcow2 magic');
  const version = cluster0.readUInt32BE(4);
  if (version !== 2 && version !== 3) throw unsupported(`qcow2 version ${version} is not supported (only 2 and 3)`);
  const clusterBits = cluster0.readUInt32BE(20);
  if (clusterBits < MIN_CLUSTER_BITS || clusterBits > MAX_CLUSTER_BITS) {
    throw unsupported(`qcow2 cluster size 2^${clusterBits} is not supported (512 bytes to 2 MiB)`);
  }
  const clusterSize = 2 ** clusterBits;
  const crypt = cluster0.readUInt32BE(32);
  if (crypt !== 0) throw unsupported(`encrypted qcow2 images are not supported (crypt_method ${crypt})`);

  let incompatible = 0n;
  let compatible = 0n;
  let autoclear = 0n;
  let refcountOrder = 4;
  let headerLength = 72;
  let compressionType = 0;
  if (version === 3) {
    if (cluster0.length < 104) throw corrupt('header is truncated');
    incompatible = cluster0.readBigUInt64BE(72);
    compatible = cluster0.readBigUInt64BE(80);
    autoclear = cluster0.readBigUInt64BE(88);
    refcountOrder = cluster0.readUInt32BE(96);
    headerLength = cluster0.readUInt32BE(100);
    if (headerLength < 104 || headerLength % 8 !== 0 || headerLength > clusterSize || headerLength > cluster0.length) {
      throw corrupt(`header_length ${headerLength}`);
    }
    if (headerLength > 104) compressionType = cluster0.readUInt8(104);
  }
  if (refcountOrder > 6) throw corrupt(`refcount_order ${refcountOrder}`);

  const backingFileOffset = u64(cluster0, 8, 'backing_file_offset');
  const backingFileSize = cluster0.readUInt32BE(16);
  const size = u64(cluster0, 24, 'size');
  const l1Size = cluster0.readUInt32BE(36);
  const l1TableOffset = u64(cluster0, 40, 'l1_table_offset');
  const refcountTableOffset = u64(cluster0, 48, 'refcount_table_offset');
  const refcountTableClusters = cluster0.readUInt32BE(56);
  const nbSnapshots = cluster0.readUInt32BE(60);
  const snapshotsOffset = u64(cluster0, 64, 'snapshots_offset');

  // Header extensions: their feature names make the refusal below readable.
  const featureNames = new Map<string, string>();
  let backingFormat: string | null = null;
  let extensionsEnd = headerLength;
  const extensionTypes: number[] = [];
  let at = headerLength;
  const limit = Math.min(clusterSize, cluster0.length);
  while (at + 8 <= limit) {
    const type = cluster0.readUInt32BE(at);
    const len = cluster0.readUInt32BE(at + 4);
    if (type === EXT_END) {
      extensionsEnd = at + 8;
      break;
    }
    const data = at + 8;
    if (data + len > limit) throw corrupt('header extension runs past the first cluster');
    const body = cluster0.subarray(data, data + len);
    extensionTypes.push(type);
    if (type === EXT_BACKING_FORMAT) {
      backingFormat = body.toString('latin1');
    } else if (type === EXT_FEATURE_TABLE) {
      for (let i = 0; i + 48 <= body.length; i += 48) {
        const name = body.subarray(i + 2, i + 48);
        const nul = name.indexOf(0);
        featureNames.set(`${body[i]}:${body[i + 1]}`, name.subarray(0, nul < 0 ? name.length : nul).toString('latin1'));
      }
    }
    at = data + Math.ceil(len / 8) * 8;
    extensionsEnd = at;
  }

  const name = (bit: bigint): string => featureNames.get(`0:${bit}`) ?? `bit ${bit}`;
  if (incompatible & INCOMPAT_DATA_FILE) throw unsupported('qcow2 images with an external data file are not supported');
  if (incompatible & INCOMPAT_EXTL2) throw unsupported('qcow2 images with extended L2 entries (subclusters) are not supported');
  if (incompatible & INCOMPAT_COMPRESSION || compressionType !== 0) {
    const kind = compressionType === 1 ? 'zstd' : `type ${compressionType}`;
    throw unsupported(`qcow2 compression ${kind} is not supported (only zlib)`);
  }
  const known = INCOMPAT_DIRTY | INCOMPAT_CORRUPT;
  const unknown = incompatible & ~known;
  if (unknown !== 0n) {
    const names: string[] = [];
    for (let bit = 0n; bit < 64n; bit++) if (unknown & (1n << bit)) names.push(name(bit));
    throw unsupported(`unsupported qcow2 feature(s): ${names.join(', ')}`);
  }

  let backingFile: string | null = null;
  if (backingFileOffset !== 0) {
    if (backingFileSize > 1023 || backingFileSize === 0) throw corrupt(`backing file name of ${backingFileSize} bytes`);
    if (backingFileOffset + backingFileSize > cluster0.length) throw corrupt('backing file name is outside the first cluster');
    backingFile = cluster0.subarray(backingFileOffset, backingFileOffset + backingFileSize).toString('utf8');
  }

  const l2Entries = clusterSize / 8;
  const needL1 = Math.ceil(size / (clusterSize * l2Entries));
  if (l1Size < needL1) throw corrupt(`L1 table of ${l1Size} entries is too small for ${size} bytes`);
  if (l1Size * 8 > MAX_L1_BYTES) throw unsupported(`qcow2 L1 table of ${l1Size} entries is too large`);
  if (l1TableOffset % clusterSize !== 0 || (l1Size > 0 && l1TableOffset === 0)) throw corrupt('L1 table offset is not aligned');
  if (refcountTableOffset % clusterSize !== 0 || refcountTableOffset === 0) throw corrupt('refcount table offset is invalid');
  if (refcountTableClusters * clusterSize > MAX_REFTABLE_BYTES) throw corrupt('refcount table is too large');

  return {
    version,
    clusterBits,
    clusterSize,
    size,
    l1Size,
    l1TableOffset,
    refcountTableOffset,
    refcountTableClusters,
    nbSnapshots,
    snapshotsOffset,
    incompatible,
    compatible,
    autoclear,
    refcountOrder,
    headerLength,
    backingFile,
    backingFormat,
    featureNames,
    extensionsEnd,
    extensionTypes,
  };
}

// --- table entries ---

export type ClusterKind = 'unallocated' | 'zero' | 'normal' | 'compressed';

/** One decoded L2 entry. */
export interface L2Entry {
  kind: ClusterKind;
  /** Host offset: the cluster (normal, or zero with a preallocation), or the compressed data's first byte. */
  host: number;
  /** Compressed data length in bytes (from the offset to the end of its last sector). */
  compressedLength: number;
  /** Bit 63: refcount is exactly one. */
  copied: boolean;
}

/** Host offset bits 9..55 of an L1 entry or a standard L2 entry, from its two halves. */
export function offsetOf(hi: number, lo: number): number {
  return (hi & 0x00ffffff) * 0x100000000 + ((lo & 0xfffffe00) >>> 0);
}

/** Decode the L2 entry at `index` of `table`. */
export function decodeL2(table: Buffer, index: number, clusterBits: number): L2Entry {
  const hi = table.readUInt32BE(index * 8);
  const lo = table.readUInt32BE(index * 8 + 4);
  const copied = (hi & OFLAG_COPIED_HI) !== 0;
  if (hi & OFLAG_COMPRESSED_HI) {
    // x = 62 - (cluster_bits - 8) bits of byte offset, then (cluster_bits - 8) bits of extra sectors.
    const x = 62 - (clusterBits - 8);
    const v = (BigInt(hi & 0x3fffffff) << 32n) | BigInt(lo >>> 0);
    const host = Number(v & ((1n << BigInt(x)) - 1n));
    const sectors = Number((v >> BigInt(x)) & ((1n << BigInt(clusterBits - 8)) - 1n)) + 1;
    return { kind: 'compressed', host, compressedLength: sectors * 512 - (host % 512), copied: false };
  }
  const host = offsetOf(hi, lo);
  if (lo & OFLAG_ZERO_LO) return { kind: 'zero', host, compressedLength: 0, copied };
  if (host === 0) return { kind: 'unallocated', host: 0, compressedLength: 0, copied };
  return { kind: 'normal', host, compressedLength: 0, copied };
}

/** Encode a standard L2 (or L1) entry: host offset, COPIED, zero flag. */
export function encodeStandard(table: Buffer, index: number, host: number, copied: boolean, zero = false): void {
  const hi = Math.floor(host / 0x100000000) & 0x00ffffff;
  const lo = (host % 0x100000000) & 0xfffffe00;
  table.writeUInt32BE((hi | (copied ? OFLAG_COPIED_HI : 0)) >>> 0, index * 8);
  table.writeUInt32BE((lo | (zero ? OFLAG_ZERO_LO : 0)) >>> 0, index * 8 + 4);
}

/** The host clusters touched by a compressed entry, as [first byte, end) for refcounting (qemu frees whole sectors). */
export function compressedSpan(e: L2Entry): { start: number; end: number } {
  const start = e.host - (e.host % 512);
  return { start, end: e.host + e.compressedLength };
}

// --- refcount blocks ---

/** Refcount at `index` of a refcount block with 2^order-bit entries. */
export function getRefcount(block: Buffer, index: number, order: number): number {
  switch (order) {
    case 0:
    case 1:
    case 2: {
      const bits = 1 << order;
      const perByte = 8 / bits;
      const byte = block[Math.floor(index / perByte)]!;
      return (byte >> ((index % perByte) * bits)) & ((1 << bits) - 1);
    }
    case 3:
      return block[index]!;
    case 4:
      return block.readUInt16BE(index * 2);
    case 5:
      return block.readUInt32BE(index * 4);
    default: {
      const v = block.readBigUInt64BE(index * 8);
      return v > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(v);
    }
  }
}

/** The largest refcount a 2^order-bit entry holds (capped at 2^53 - 1). */
export function maxRefcount(order: number): number {
  return order >= 6 ? Number.MAX_SAFE_INTEGER : 2 ** (1 << order) - 1;
}

export function setRefcount(block: Buffer, index: number, order: number, value: number): void {
  switch (order) {
    case 0:
    case 1:
    case 2: {
      const bits = 1 << order;
      const perByte = 8 / bits;
      const at = Math.floor(index / perByte);
      const shift = (index % perByte) * bits;
      const mask = ((1 << bits) - 1) << shift;
      block[at] = (block[at]! & ~mask) | ((value << shift) & mask);
      return;
    }
    case 3:
      block[index] = value;
      return;
    case 4:
      block.writeUInt16BE(value, index * 2);
      return;
    case 5:
      block.writeUInt32BE(value, index * 4);
      return;
    default:
      block.writeBigUInt64BE(BigInt(value), index * 8);
  }
}

// --- new images ---

/**
 * A new, empty version 3 image of `size` bytes without a backing file name
 * (its caller passes the backing node itself): clusters 0 header, 1
 * refcount table, 2 refcount block (16-bit refcounts), then the L1 table.
 * Everything the image needs later (L2 tables, more refcount blocks, a
 * bigger refcount table) the writer allocates.
 */
export function emptyImage(size: number, clusterBits = 16): Buffer {
  const cs = 2 ** clusterBits;
  const l1Size = Math.ceil(size / ((cs / 8) * cs));
  if (l1Size * 8 > MAX_L1_BYTES) throw unsupported(`an image of ${size} bytes needs an L1 table larger than ${MAX_L1_BYTES} bytes`);
  const l1Clusters = Math.max(1, Math.ceil((l1Size * 8) / cs));
  const used = 3 + l1Clusters; // one refcount block covers cs / 2 clusters: always enough here
  const img = Buffer.alloc(used * cs);
  QCOW2_MAGIC_BYTES.copy(img, 0);
  img.writeUInt32BE(3, 4);
  img.writeUInt32BE(clusterBits, 20);
  img.writeBigUInt64BE(BigInt(size), 24);
  img.writeUInt32BE(l1Size, 36);
  img.writeBigUInt64BE(BigInt(3 * cs), 40);
  img.writeBigUInt64BE(BigInt(cs), HDR_REFCOUNT_TABLE_OFFSET);
  img.writeUInt32BE(1, 56);
  img.writeUInt32BE(4, 96);
  img.writeUInt32BE(104, 100);
  // (the header extensions end at once: bytes 104..111 are zero)
  img.writeBigUInt64BE(BigInt(2 * cs), cs);
  for (let c = 0; c < used; c++) setRefcount(img.subarray(2 * cs, 3 * cs), c, 4, 1);
  return img;
}
