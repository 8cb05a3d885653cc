// Bitmaps of a raw image, kept beside it in IMAGE.bitmaps, a small file of
// ours (raw images have nowhere to keep them). The file is replaced whole
// and atomically: written to a temporary name, fsynced, renamed over the
// old one, and the folder fsynced, so a crash leaves the old or the new
// file, never a mix. A checksum catches anything else.
//
// Layout (all numbers big-endian, as in qcow2):
//   header, 32 bytes:
//     0 magic "NBDXBMAP"     8 version (1)      12 number of bitmaps
//    16 bytes covered (the image's size)
//    24 image mtime in ns when last stored cleanly (0: not known)
//   one entry per bitmap, each padded to 8 bytes:
//     0 flags: bit 0 in use, bit 1 enabled (qcow2's "auto")
//     4 granularity bits     5 reserved    6 name length
//     8 data length          16 name (UTF-8), then the bits in qcow2 order
//   trailer: CRC-32 of everything before it (4 bytes)
//
// Crash rule, as qcow2's in-use flag: bitmaps that may change are stored
// in use before the image may change. And as qcow2's autoclear bit: a
// program that writes the image without us cannot clear a flag here, so
// the image's mtime is recorded at each clean store; an enabled bitmap
// whose image has another mtime missed writes and is inconsistent.
import fs from 'node:fs';
import path from 'node:path';
import { BlockError } from '../block/types.ts';
import type { BitmapStore, StoredBitmap } from './bitmap-store.ts';
import { bitmapBytes, MAX_GRANULARITY_BITS, MIN_GRANULARITY_BITS, type DirtyBitmap } from './dirty-bitmap.ts';

const MAGIC = Buffer.from('NBDXBMAP', 'latin1');
const VERSION = 1;
const HEADER = 32;
const ENTRY = 16;
const FLAG_IN_USE = 1;
const FLAG_ENABLED = 2;
const KNOWN_FLAGS = FLAG_IN_USE | FLAG_ENABLED;
/** Far more than anyone needs; bounds what a damaged file can make us allocate. */
const MAX_BITMAPS = 65535;

/** The sidecar file of an image. */
export function sidecarPath(image: string): string {
  return `${image}.bitmaps`;
}

const CRC_TABLE = new Int32Array(256);
for (let n = 0; n < 256; n++) {
  let c = n;
  for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  CRC_TABLE[n] = c;
}

/** CRC-32 (IEEE), as zlib computes it. */
export function crc32(buf: Uint8Array): number {
  let c = -1;
  for (let i = 0; i < buf.length; i++) c = CRC_TABLE[(c ^ buf[i]!) & 0xff]! ^ (c >>> 8);
  return (c ^ -1) >>> 0;
}

const pad8 = (n: number): number => Math.ceil(n / 8) * 8;

interface Entry {
  flags: number;
  granularityBits: number;
  name: string;
  data: Uint8Array;
}

interface Parsed {
  size: number;
  mtime: bigint;
  entries: Entry[];
}

function bad(file: string, why: string): BlockError {
  return new BlockError('EINVAL', `${file}: not a valid bitmap file (${why})`);
}

/** Decode a sidecar file; every length is checked before use. */
export function decodeSidecar(buf: Buffer, file: string): Parsed {
  if (buf.length < HEADER + 4 || !buf.subarray(0, 8).equals(MAGIC)) throw bad(file, 'no magic');
  const body = buf.subarray(0, buf.length - 4);
  if (crc32(body) !== buf.readUInt32BE(buf.length - 4)) throw bad(file, 'checksum mismatch');
  const version = buf.readUInt32BE(8);
  if (version !== VERSION) throw bad(file, `version ${version}`);
  const count = buf.readUInt32BE(12);
  if (count > MAX_BITMAPS) throw bad(file, `${count} bitmaps`);
  const size = Number(buf.readBigUInt64BE(16));
  const mtime = buf.readBigUInt64BE(24);
  const entries: Entry[] = [];
  let at = HEADER;
  for (let i = 0; i < count; i++) {
    if (at + ENTRY > body.length) throw bad(file, 'truncated');
    const flags = body.readUInt32BE(at);
    const granularityBits = body.readUInt8(at + 4);
    const nameLen = body.readUInt16BE(at + 6);
    const dataLen = Number(body.readBigUInt64BE(at + 8));
    const end = at + ENTRY + nameLen + dataLen;
    if (!Number.isSafeInteger(end) || end > body.length) throw bad(file, 'truncated');
    if ((flags & ~KNOWN_FLAGS) !== 0) throw bad(file, `unknown flags 0x${flags.toString(16)}`);
    if (granularityBits < MIN_GRANULARITY_BITS || granularityBits > MAX_GRANULARITY_BITS) throw bad(file, `granularity 2^${granularityBits}`);
    const name = body.subarray(at + ENTRY, at + ENTRY + nameLen).toString('utf8');
    const data = body.subarray(at + ENTRY + nameLen, end);
    entries.push({ flags, granularityBits, name, data });
    at = pad8(end);
  }
  return { size, mtime, entries };
}

export function encodeSidecar(p: Parsed): Buffer {
  let total = HEADER;
  const names = p.entries.map((e) => Buffer.from(e.name, 'utf8'));
  p.entries.forEach((e, i) => (total = pad8(total + ENTRY + names[i]!.length + e.data.length)));
  const buf = Buffer.alloc(total + 4);
  MAGIC.copy(buf, 0);
  buf.writeUInt32BE(VERSION, 8);
  buf.writeUInt32BE(p.entries.length, 12);
  buf.writeBigUInt64BE(BigInt(p.size), 16);
  buf.writeBigUInt64BE(p.mtime, 24);
  let at = HEADER;
  p.entries.forEach((e, i) => {
    const name = names[i]!;
    buf.writeUInt32BE(e.flags, at);
    buf.writeUInt8(e.granularityBits, at + 4);
    buf.writeUInt16BE(name.length, at + 6);
    buf.writeBigUInt64BE(BigInt(e.data.length), at + 8);
    name.copy(buf, at + ENTRY);
    buf.set(e.data, at + ENTRY + name.length);
    at = pad8(at + ENTRY + name.length + e.data.length);
  });
  buf.writeUInt32BE(crc32(buf.subarray(0, total)), total);
  return buf;
}

/** Replace `file` with `data` atomically and durably. */
export function writeFileAtomic(file: string, data: Buffer): void {
  const tmp = `${file}.tmp-${process.pid}`;
  const fd = fs.openSync(tmp, 'w', 0o644);
  try {
    fs.writeSync(fd, data, 0, data.length, 0);
    fs.fsyncSync(fd);
  } catch (err) {
    fs.closeSync(fd);
    fs.rmSync(tmp, { force: true });
    throw err;
  }
  fs.closeSync(fd);
  try {
    fs.renameSync(tmp, file);
  } catch (err) {
    fs.rmSync(tmp, { force: true });
    throw err;
  }
  const dir = fs.openSync(path.dirname(file), 'r');
  try {
    fs.fsyncSync(dir);
  } finally {
    fs.closeSync(dir);
  }
}

export class RawBitmapStore implements BitmapStore {
  readonly where: string;
  readonly #image: string;
  readonly #file: string;
  readonly #size: number;
  /** The entries as last read or written (inconsistent ones are kept from here). */
  #entries: Entry[] = [];

  constructor(image: string, size: number) {
    this.#image = image;
    this.#file = sidecarPath(image);
    this.#size = size;
    this.where = `bitmap file '${this.#file}'`;
  }

  /** True when the image has a sidecar file. */
  static exists(image: string): boolean {
    return fs.existsSync(sidecarPath(image));
  }

  /** The image's mtime in ns (0 for block devices, whose mtime says nothing about writes). */
  #imageMtime(): bigint {
    const st = fs.statSync(this.#image, { bigint: true });
    return st.isFile() ? st.mtimeNs : 0n;
  }

  async load(): Promise<StoredBitmap[]> {
    let buf: Buffer;
    try {
      buf = fs.readFileSync(this.#file);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') {
        this.#entries = [];
        return [];
      }
      throw err;
    }
    const p = decodeSidecar(buf, this.#file);
    this.#entries = p.entries;
    const mtime = this.#imageMtime();
    const changedBehind = p.mtime !== 0n && mtime !== 0n && p.mtime !== mtime;
    return p.entries.map((e) => {
      const info = { name: e.name, granularity: 2 ** e.granularityBits, enabled: (e.flags & FLAG_ENABLED) !== 0 };
      let inconsistent: string | null = null;
      if (e.flags & FLAG_IN_USE) inconsistent = 'it was in use when its writer stopped (crash?)';
      else if (p.size !== this.#size) inconsistent = `it covers ${p.size} bytes, the image has ${this.#size}`;
      else if (e.data.length !== bitmapBytes(this.#size, info.granularity)) inconsistent = 'its data has the wrong length';
      // A disabled bitmap records a past interval: later writes do not concern it.
      else if (changedBehind && info.enabled) inconsistent = 'the image was written by another program since the bitmap was stored';
      return inconsistent === null ? { info, inconsistent, data: e.data } : { info, inconsistent };
    });
  }

  async markInUse(names: readonly string[]): Promise<void> {
    if (names.length === 0) return;
    const entries = this.#entries.map((e) => (names.includes(e.name) ? { ...e, flags: e.flags | FLAG_IN_USE } : e));
    writeFileAtomic(this.#file, encodeSidecar({ size: this.#size, mtime: 0n, entries }));
    this.#entries = entries;
  }

  async save(bitmaps: readonly DirtyBitmap[], inconsistent: readonly string[]): Promise<void> {
    const entries: Entry[] = [];
    for (const e of this.#entries) if (inconsistent.includes(e.name)) entries.push({ ...e, flags: e.flags | FLAG_IN_USE, data: new Uint8Array(0) });
    for (const b of bitmaps) {
      entries.push({ flags: b.enabled ? FLAG_ENABLED : 0, granularityBits: b.granularityBits, name: b.name, data: b.bytes });
    }
    if (entries.length === 0) {
      fs.rmSync(this.#file, { force: true });
      this.#entries = [];
      return;
    }
    writeFileAtomic(this.#file, encodeSidecar({ size: this.#size, mtime: this.#imageMtime(), entries }));
    this.#entries = entries;
  }
}
