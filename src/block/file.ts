// A raw file or block device, through one shared fd and positional I/O.
//
// - `offset` bytes at the start of the file are skipped (qemu-nbd -o); the
//   node's byte 0 is the file's byte `offset`.
// - The size is fixed at open: file size (or device size) minus offset,
//   served exactly, multiple of 512 or not.
// - flush is fdatasync; a FUA write is a write then fdatasync.
// - With `direct` (O_DIRECT), every transfer is 4096-aligned in offset,
//   length and memory. Unaligned reads read the aligned superset; unaligned
//   writes read-modify-write the edge blocks while holding a lock on the
//   blocks, and every other direct write and zeroing takes the same lock,
//   so no concurrent writer loses bytes. The partial block at the end of a
//   file whose size is not aligned cannot be written with O_DIRECT without
//   growing the file; that block goes through a second, buffered fd (the
//   kernel keeps the two coherent).
import fs from 'node:fs';
import { toBlockError, isNotSupported } from './errno.ts';
import { DATA, ExtentCollector, HOLE } from './extents.ts';
import {
  allocAligned,
  blockDeviceSize,
  bufferAddress,
  FALLOC_FL_KEEP_SIZE,
  FALLOC_FL_PUNCH_HOLE,
  FALLOC_FL_ZERO_RANGE,
  fadviseWillNeed,
  fallocate,
  ffiAvailable,
  seek,
  SEEK_DATA,
  SEEK_HOLE,
  filesystemType,
  preadNowait,
  RAMFS_MAGIC,
  TMPFS_MAGIC,
  cachedFully,
} from './ffi.ts';
import { DataMap } from './data-map.ts';
import { LoopWriteGuard } from './loop-write-guard.ts';
import { RunDelayClock } from './run-delay.ts';
import { RangeLock } from './range-lock.ts';
import type { BlockCapabilities, BlockNode, DiscardMode, Extent, FileSlice, WriteOptions, ZeroOptions } from './types.ts';
import { BlockError } from './types.ts';

/** Alignment of O_DIRECT transfers (offset, length, memory). */
export const DIRECT_ALIGN = 4096;
/** Zeroes are written in pieces of at most this many bytes, from one shared buffer. */
const ZERO_PIECE = 1024 * 1024;
/** extents() lets the event loop run after this many lseek pairs. */
const SEEKS_PER_YIELD = 256;
/** Largest single read()/write() call. */
const MAX_IO = 1024 * 1024 * 1024;

export interface FileNodeOptions {
  path: string;
  /** Open O_RDONLY; writes are refused by the wrapper (EPERM) and by the kernel (EBADF). */
  readOnly?: boolean;
  /** Bytes skipped at the start of the file (qemu-nbd -o). */
  offset?: number;
  /** Open with O_DIRECT (cache=none, directsync). */
  direct?: boolean;
  /** 'unmap': trim punches holes, and zeroing without noHole may too. 'ignore' (default): trim does nothing. */
  discard?: DiscardMode;
  /** Told when buffered writes leave the event loop for a while (see LoopWriteGuard). */
  warn?: (message: string) => void;
}

/** Run delay of the event loop's thread, for the LoopWriteGuard of every file (writeNow runs there). */
const runDelay = new RunDelayClock();
/** Made once: a closure per write would be garbage on the write path. */
const waitedForCpu = (end: number): number => runDelay.waitedSinceMark(end);

let sharedZeroes: Buffer | undefined;
function zeroes(): Buffer {
  sharedZeroes ??= allocAligned(ZERO_PIECE, DIRECT_ALIGN) ?? Buffer.alloc(ZERO_PIECE);
  return sharedZeroes;
}

const alignDown = (n: number): number => n - (n % DIRECT_ALIGN);
const alignUp = (n: number): number => (n % DIRECT_ALIGN === 0 ? n : n - (n % DIRECT_ALIGN) + DIRECT_ALIGN);

/** Buffered reads up to this size try the page cache on the event loop first. */
const FAST_IO_MAX = 128 * 1024;
/**
 * writeNow() takes up to this much: the caller chose to wait for the copy
 * (over TCP, 1 MiB writes done on the event loop beat the thread pool,
 * whose wake-ups preempted the event loop), and 4 MiB is about a
 * millisecond of it.
 */
const WRITE_NOW_MAX = 4 * 1024 * 1024;

/**
 * 'memory': the file lives on tmpfs or ramfs, so a read never waits for a
 * disk and is served synchronously. 'nowait': preadv2(RWF_NOWAIT) returns
 * what the page cache holds and refuses the rest. 'none': always the pool.
 */
type FastIo = 'memory' | 'nowait' | 'none';

function probeFastIo(fd: number, fileEnd: number): FastIo {
  if (!ffiAvailable()) return 'none';
  const type = filesystemType(fd);
  if (type === TMPFS_MAGIC || type === RAMFS_MAGIC) return 'memory';
  try {
    // At the end of the file: a probe inside it could fill the page cache
    // over an unwritten extent (a RWF_NOWAIT read needs no I/O there).
    preadNowait(fd, Buffer.alloc(1), fileEnd);
    return 'nowait';
  } catch {
    return 'none';
  }
}

function preadOnce(fd: number, buf: Buffer, at: number, length: number, position: number): Promise<number> {
  return new Promise((resolve, reject) => {
    fs.read(fd, buf, at, length, position, (err, n) => (err ? reject(err) : resolve(n)));
  });
}

function pwriteOnce(fd: number, buf: Buffer, at: number, length: number, position: number): Promise<number> {
  return new Promise((resolve, reject) => {
    fs.write(fd, buf, at, length, position, (err, n) => (err ? reject(err) : resolve(n)));
  });
}

function fdatasync(fd: number): Promise<void> {
  return new Promise((resolve, reject) => fs.fdatasync(fd, (err) => (err ? reject(err) : resolve())));
}

function closeFd(fd: number): Promise<void> {
  return new Promise((resolve, reject) => fs.close(fd, (err) => (err ? reject(err) : resolve())));
}

function openFd(path: string, flags: number): Promise<number> {
  return new Promise((resolve, reject) => fs.open(path, flags, (err, fd) => (err ? reject(err) : resolve(fd))));
}

function fstat(fd: number): Promise<fs.BigIntStats> {
  return new Promise((resolve, reject) => fs.fstat(fd, { bigint: true }, (err, st) => (err ? reject(err) : resolve(st))));
}

/** Device size from sysfs, when the ioctl is not available. */
function sysfsDeviceSize(rdev: bigint): number {
  const major = Number(((rdev >> 8n) & 0xfffn) | ((rdev >> 32n) & ~0xfffn));
  const minor = Number((rdev & 0xffn) | ((rdev >> 12n) & ~0xffn));
  const sectors = fs.readFileSync(`/sys/dev/block/${major}:${minor}/size`, 'utf8').trim();
  return Number(sectors) * 512;
}

export class FileNode implements BlockNode {
  readonly size: number;
  readonly capabilities: BlockCapabilities;
  /** The path given at open. */
  readonly path: string;
  /** True when the fd really uses O_DIRECT (false if it was asked but koffi is missing). */
  readonly direct: boolean;
  readonly isBlockDevice: boolean;
  readonly #fd: number;
  /** Buffered fd for the partial last block in direct mode, else null. */
  readonly #tailFd: number | null;
  /** File offset of the partial last block (direct mode); Infinity when none. */
  readonly #tailStart: number;
  readonly #base: number;
  readonly #discard: DiscardMode;
  readonly #ffi: boolean;
  readonly #locks = new RangeLock();
  /** Set when reads skip holes instead of reading them (see #readAroundHoles): where the file is known to be data. */
  readonly #dataMap: DataMap | null;
  /** How small buffered I/O may skip the thread pool (see FastIo). */
  #fastIo: FastIo;
  /** When buffered writes into a disk file may run on the caller's thread (writeNow). */
  readonly #loopWrites: LoopWriteGuard;
  #closing: Promise<void> | undefined;
  /** File slices handed out and not yet released: the fd stays open for them. */
  #slices = 0;
  #slicesReleased: (() => void) | undefined;

  private constructor(init: {
    path: string;
    fd: number;
    tailFd: number | null;
    size: number;
    base: number;
    direct: boolean;
    readOnly: boolean;
    blockDevice: boolean;
    discard: DiscardMode;
    warn: ((message: string) => void) | undefined;
  }) {
    this.path = init.path;
    const warn = init.warn;
    this.#loopWrites = new LoopWriteGuard(
      warn === undefined
        ? undefined
        : (spellMs, blockedMs, waitedMs) =>
            warn(`a write into ${init.path} held the event loop for ${blockedMs.toFixed(1)} ms in the kernel (dirty-page throttling or a journal commit, most likely${waitedMs >= 0.05 ? `; ${waitedMs.toFixed(1)} ms more waiting for a CPU` : ''}); writes go through the thread pool for the next ${spellMs / 1000} s`),
    );
    this.#fd = init.fd;
    this.#tailFd = init.tailFd;
    this.size = init.size;
    this.#base = init.base;
    this.direct = init.direct;
    this.isBlockDevice = init.blockDevice;
    this.#discard = init.discard;
    this.#ffi = ffiAvailable();
    const fileEnd = init.base + init.size;
    this.#fastIo = init.direct ? 'none' : probeFastIo(init.fd, fileEnd);
    // lseek(SEEK_HOLE) is cheap on disk filesystems but walks the page
    // cache on tmpfs, where reading a hole changes nothing anyway.
    this.#dataMap = this.#ffi && !init.blockDevice && this.#fastIo !== 'memory' ? new DataMap(fileEnd) : null;
    this.#tailStart = init.tailFd === null ? Infinity : alignDown(fileEnd);
    const writable = !init.readOnly;
    this.capabilities = Object.freeze({
      writable,
      canFlush: true,
      canTrim: writable && this.#ffi && init.discard === 'unmap',
      // Block devices can only zero fast by punching (discard=unmap, no NO_HOLE).
      canFastZero: writable && this.#ffi,
      canExtents: this.#ffi && !init.blockDevice,
      canCache: this.#ffi && !init.direct,
    });
  }

  /** Open a file or block device. Failures are BlockErrors named by errno, with a readable message. */
  static async open(opts: FileNodeOptions): Promise<FileNode> {
    const readOnly = opts.readOnly ?? false;
    const base = opts.offset ?? 0;
    const discard = opts.discard ?? 'ignore';
    if (!Number.isSafeInteger(base) || base < 0) throw new BlockError('EINVAL', `invalid offset ${base}`);
    // Aligned buffers need the FFI; without it, O_DIRECT is not used.
    const direct = (opts.direct ?? false) && ffiAvailable();
    const access = readOnly ? fs.constants.O_RDONLY : fs.constants.O_RDWR;

    let fd: number;
    try {
      fd = await openFd(opts.path, access | (direct ? fs.constants.O_DIRECT : 0));
    } catch (err) {
      const e = toBlockError(err);
      if (direct && e.code === 'EINVAL') {
        throw new BlockError('EINVAL', 'O_DIRECT not supported by this filesystem (use a cache mode other than none or directsync)');
      }
      throw e;
    }

    let tailFd: number | null = null;
    try {
      const st = await fstat(fd);
      let fileSize: number;
      const blockDevice = st.isBlockDevice();
      if (st.isFile()) {
        fileSize = Number(st.size);
      } else if (blockDevice) {
        fileSize = ffiAvailable() ? blockDeviceSize(fd) : sysfsDeviceSize(st.rdev);
      } else if (st.isDirectory()) {
        throw new BlockError('EISDIR', 'Is a directory');
      } else {
        throw new BlockError('EINVAL', 'not a regular file or block device');
      }
      if (base > fileSize) {
        throw new BlockError('EINVAL', `offset ${base} is past the end of the image (${fileSize} bytes)`);
      }
      if (direct && fileSize % DIRECT_ALIGN !== 0) tailFd = await openFd(opts.path, access);
      return new FileNode({ path: opts.path, fd, tailFd, size: fileSize - base, base, direct, readOnly, blockDevice, discard, warn: opts.warn });
    } catch (err) {
      await closeFd(fd).catch(() => {});
      if (tailFd !== null) await closeFd(tailFd).catch(() => {});
      throw toBlockError(err);
    }
  }

  #checkOpen(): void {
    if (this.#closing !== undefined) throw new BlockError('EBADF', `${this.path} is closed`);
  }

  /**
   * Holes and unwritten extents are not read but filled with zeroes, as
   * qemu does: reading them would fill the page cache, after which ext4
   * reports those ranges as data. Returns false when the range has no hole
   * (the caller reads it as usual). Node coordinates.
   */
  async #readAroundHoles(out: Buffer, offset: number): Promise<boolean> {
    // From the chunk's start, so that the scan can mark the whole chunk as data.
    const from = Math.max(0, this.#dataMap!.chunkStart(this.#base + offset) - this.#base);
    const runs = await this.extents(from, offset + out.length - from);
    let skip = offset - from;
    while (skip > 0) {
      const first = runs[0]!;
      if (first.length > skip) {
        runs[0] = { ...first, length: first.length - skip };
        break;
      }
      skip -= first.length;
      runs.shift();
    }
    if (!runs.some((r) => r.hole)) return false;
    let at = 0;
    for (const run of runs) {
      const part = out.subarray(at, at + run.length);
      if (run.hole) part.fill(0);
      else await this.#readFull(this.#fd, part, this.#base + offset + at, false);
      at += run.length;
    }
    if (at < out.length) await this.#readFull(this.#fd, out.subarray(at), this.#base + offset + at, false);
    return true;
  }

  // --- plain positional I/O (file coordinates) ---

  #writeNow(data: Buffer, position: number): void {
    let done = 0;
    while (done < data.length) {
      const n = fs.writeSync(this.#fd, data, done, data.length - done, position + done);
      if (n === 0) throw new BlockError('ENOSPC', 'No space left on device');
      done += n;
    }
  }

  /**
   * Read what can be read without waiting for a disk, on this thread: a
   * thread-pool round trip costs far more than copying a few pages out of
   * the page cache. Returns the bytes placed in buf (the rest goes async).
   */
  #readNow(buf: Buffer, position: number): number {
    try {
      if (this.#fastIo === 'memory') {
        let done = 0;
        while (done < buf.length) {
          const n = fs.readSync(this.#fd, buf, done, buf.length - done, position + done);
          if (n === 0) {
            buf.fill(0, done); // past the end of the file
            return buf.length;
          }
          done += n;
        }
        return done;
      }
      if (this.#fastIo === 'nowait') return Math.max(0, preadNowait(this.#fd, buf, position));
    } catch {
      this.#fastIo = 'none'; // never again; the thread pool path reports real errors
    }
    return 0;
  }

  /** Fill buf from `position`; bytes past the end of the file read as zeroes. */
  async #readFull(fd: number, buf: Buffer, position: number, direct: boolean): Promise<void> {
    let done = 0;
    while (done < buf.length) {
      const n = await preadOnce(fd, buf, done, Math.min(buf.length - done, MAX_IO), position + done);
      done += n;
      // At end of file (an O_DIRECT read ends short there and cannot go on unaligned).
      if (n === 0 || (direct && n % DIRECT_ALIGN !== 0)) {
        buf.fill(0, done);
        return;
      }
    }
  }

  async #writeFull(fd: number, buf: Buffer, position: number): Promise<void> {
    let done = 0;
    while (done < buf.length) {
      const n = await pwriteOnce(fd, buf, done, Math.min(buf.length - done, MAX_IO), position + done);
      if (n === 0) throw new BlockError('ENOSPC', 'No space left on device');
      done += n;
    }
  }

  // --- reads ---

  /** The synchronous case of read(): buffered, known data, small, and all of it in memory now. */
  readNow(offset: number, length: number, into?: Buffer): Buffer | null {
    if (this.#closing !== undefined || this.direct || length > FAST_IO_MAX || this.#fastIo === 'none') return null;
    const p = this.#base + offset;
    // As in read(): a range the data map does not know may hold holes, whose reads go around them.
    if (this.#dataMap !== null && !this.#dataMap.covers(p, p + length)) return null;
    const out = into === undefined ? Buffer.allocUnsafe(length) : into.length === length ? into : into.subarray(0, length);
    // A short read (pages not cached) is read again, whole, by read().
    return this.#readNow(out, p) === length ? out : null;
  }

  async read(offset: number, length: number, into?: Buffer): Promise<Buffer> {
    this.#checkOpen();
    try {
      const p = this.#base + offset;
      if (!this.direct) {
        const out = into === undefined ? Buffer.allocUnsafe(length) : into.subarray(0, length);
        // Where the file is known to be data, no lseek: a pair of them per
        // read cost 4 KiB reads on disk 40 % of their rate.
        const known = this.#dataMap === null || this.#dataMap.covers(p, p + length);
        if (!known && (await this.#readAroundHoles(out, offset))) return out;
        const now = length <= FAST_IO_MAX ? this.#readNow(out, p) : 0;
        if (now < length) await this.#readFull(this.#fd, out.subarray(now), p + now, false);
        return out;
      }
      const end = p + length;
      const directEnd = Math.min(end, this.#tailStart);
      // Direct part [p, directEnd), buffered tail part [max(p, tailStart), end).
      let out: Buffer | undefined = into?.subarray(0, length);
      if (directEnd > p) {
        const got = await this.#readDirect(p, directEnd, out);
        out ??= got.length === length ? got : undefined;
        if (out === undefined) {
          out = Buffer.allocUnsafe(length);
          got.copy(out, 0);
        }
      }
      out ??= Buffer.allocUnsafe(length);
      if (end > this.#tailStart && this.#tailFd !== null) {
        const from = Math.max(p, this.#tailStart);
        await this.#readFull(this.#tailFd, out.subarray(from - p, length), from, false);
      }
      return out;
    } catch (err) {
      throw toBlockError(err);
    }
  }

  /**
   * The file range a read would copy, when that read would be a plain copy
   * of memory: buffered I/O, no hole or unwritten extent in the range (the
   * data map on disk filesystems; on tmpfs a hole has no page, which the
   * cache check sees), and every page in the page cache, so that whoever
   * sends it never waits for a disk.
   */
  fileSlice(offset: number, length: number): FileSlice | null {
    if (this.#closing !== undefined || this.direct || length === 0) return null;
    const p = this.#base + offset;
    if (this.#dataMap !== null ? !this.#dataMap.covers(p, p + length) : this.#fastIo !== 'memory' && !this.isBlockDevice) return null;
    if (cachedFully(this.#fd, p, length) !== true) return null;
    this.#slices++;
    let released = false;
    return {
      fd: this.#fd,
      position: p,
      length,
      release: () => {
        if (released) return;
        released = true;
        if (--this.#slices === 0) this.#slicesReleased?.();
      },
    };
  }

  /**
   * O_DIRECT read of [p, e) (file coordinates). Reads straight into `out`
   * when everything is aligned; otherwise through an aligned bounce buffer.
   * Returns the bytes of [p, e) (out, or a fresh buffer when out is undefined).
   */
  async #readDirect(p: number, e: number, out: Buffer | undefined): Promise<Buffer> {
    const n = e - p;
    if (out !== undefined && p % DIRECT_ALIGN === 0 && n % DIRECT_ALIGN === 0 && (bufferAddress(out) ?? 1) % DIRECT_ALIGN === 0) {
      await this.#readFull(this.#fd, out.subarray(0, n), p, true);
      return out;
    }
    const a = alignDown(p);
    const bounce = this.#aligned(alignUp(e) - a);
    await this.#readFull(this.#fd, bounce, a, true);
    const bytes = bounce.subarray(p - a, p - a + n);
    if (out === undefined) return bytes;
    bytes.copy(out, 0);
    return out;
  }

  #aligned(length: number): Buffer {
    const b = allocAligned(length, DIRECT_ALIGN);
    if (b === null) throw new BlockError('EIO', 'aligned buffers are not available');
    return b;
  }

  // --- writes ---

  async write(offset: number, data: Buffer, opts: WriteOptions = {}): Promise<void> {
    this.#checkOpen();
    try {
      await this.#write(this.#base + offset, data);
      if (opts.fua) await fdatasync(this.#fd);
    } catch (err) {
      throw toBlockError(err);
    }
  }

  /**
   * The synchronous case of write(): buffered, up to WRITE_NOW_MAX, no FUA;
   * on tmpfs always, into a disk file's page cache while such writes are
   * quick (see LoopWriteGuard).
   */
  writeNow(offset: number, data: Buffer, opts: WriteOptions = {}): boolean {
    if (this.#closing !== undefined || this.direct || this.#fastIo === 'none' || data.length > WRITE_NOW_MAX || opts.fua === true) return false;
    try {
      if (this.#fastIo === 'memory') {
        this.#writeNow(data, this.#base + offset);
        return true;
      }
      const start = performance.now();
      if (!this.#loopWrites.allows(start)) return false;
      runDelay.mark(start);
      try {
        this.#writeNow(data, this.#base + offset);
      } finally {
        this.#loopWrites.took(start, performance.now() - start, data.length, waitedForCpu);
      }
    } catch (err) {
      throw toBlockError(err);
    }
    return true;
  }

  /** Slow writes seen on the caller's thread (see LoopWriteGuard). */
  get slowLoopWrites(): number {
    return this.#loopWrites.slowWrites;
  }

  /** Times writes were sent to the thread pool for a while (see LoopWriteGuard). */
  get loopWriteSpells(): number {
    return this.#loopWrites.spells;
  }

  /** Write data at file position p (no FUA). */
  async #write(p: number, data: Buffer): Promise<void> {
    if (!this.direct) {
      // On tmpfs a write is a copy into memory: do it here, not in the pool.
      if (this.#fastIo === 'memory' && data.length <= FAST_IO_MAX) return this.#writeNow(data, p);
      return this.#writeFull(this.#fd, data, p);
    }
    const e = p + data.length;
    await this.#locks.with(alignDown(p), alignUp(e), async () => {
      const directEnd = Math.min(e, this.#tailStart);
      if (directEnd > p) await this.#writeDirectLocked(p, data.subarray(0, directEnd - p));
      if (e > this.#tailStart && this.#tailFd !== null) {
        const from = Math.max(p, this.#tailStart);
        await this.#writeFull(this.#tailFd, data.subarray(from - p), from);
      }
    });
  }

  /** O_DIRECT write of data at p; the caller holds the lock on the aligned blocks. */
  async #writeDirectLocked(p: number, data: Buffer): Promise<void> {
    const e = p + data.length;
    if (p % DIRECT_ALIGN === 0 && e % DIRECT_ALIGN === 0 && (bufferAddress(data) ?? 1) % DIRECT_ALIGN === 0) {
      return this.#writeFull(this.#fd, data, p);
    }
    const a = alignDown(p);
    const b = alignUp(e);
    const bounce = this.#aligned(b - a);
    // Read-modify-write of the partial edge blocks.
    if (p !== a) await this.#readFull(this.#fd, bounce.subarray(0, DIRECT_ALIGN), a, true);
    if (e !== b && (b - DIRECT_ALIGN >= a + DIRECT_ALIGN || p === a)) {
      await this.#readFull(this.#fd, bounce.subarray(b - a - DIRECT_ALIGN), b - DIRECT_ALIGN, true);
    }
    data.copy(bounce, p - a);
    await this.#writeFull(this.#fd, bounce, a);
  }

  async flush(): Promise<void> {
    this.#checkOpen();
    try {
      await fdatasync(this.#fd);
    } catch (err) {
      throw toBlockError(err);
    }
  }

  // --- trim and zeroes ---

  async trim(offset: number, length: number, opts: WriteOptions = {}): Promise<void> {
    this.#checkOpen();
    if (this.#discard !== 'unmap' || !this.#ffi || length === 0) return;
    try {
      const ok = await this.#fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, this.#base + offset, length);
      if (ok && opts.fua) await fdatasync(this.#fd);
    } catch (err) {
      throw toBlockError(err);
    }
  }

  async writeZeroes(offset: number, length: number, opts: ZeroOptions = {}): Promise<void> {
    this.#checkOpen();
    if (length === 0) return;
    const p = this.#base + offset;
    try {
      const punch = !opts.noHole && this.#discard === 'unmap';
      const modes: number[] = [];
      if (this.#ffi) {
        if (punch) modes.push(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE);
        // On a block device the kernel may emulate ZERO_RANGE by writing: not fast.
        if (!(this.isBlockDevice && opts.fast)) modes.push(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE);
      }
      for (const mode of modes) {
        if (await this.#fallocate(mode, p, length)) {
          if (opts.fua) await fdatasync(this.#fd);
          return;
        }
      }
      if (opts.fast) throw new BlockError('ENOTSUP', 'fast zeroing is not supported here');
      await this.#writeZeroBytes(p, length);
      if (opts.fua) await fdatasync(this.#fd);
    } catch (err) {
      throw toBlockError(err);
    }
  }

  /**
   * fallocate over [p, p+length) (file coordinates). False when the mode is
   * not supported here; other failures throw. On a block device only the
   * aligned interior is given to the kernel and the edges are written.
   */
  async #fallocate(mode: number, p: number, length: number): Promise<boolean> {
    let from = p;
    let to = p + length;
    if (this.isBlockDevice) {
      from = alignUp(p);
      to = Math.max(from, alignDown(p + length));
    }
    // Before the change, so that no read takes the range for data meanwhile.
    this.#dataMap?.forget(p, p + length);
    const run = async (): Promise<boolean> => {
      if (to > from) {
        try {
          await fallocate(this.#fd, mode, from, to - from);
        } catch (err) {
          const e = toBlockError(err);
          // Block devices answer EINVAL for modes they lack.
          if (isNotSupported(e.code) || e.code === 'ENOSYS' || (this.isBlockDevice && e.code === 'EINVAL')) return false;
          throw e;
        }
      }
      return true;
    };
    if (!(await (this.direct ? this.#locks.with(alignDown(p), alignUp(p + length), run) : run()))) return false;
    // Unaligned edges of a block device range.
    if (from > p) await this.#writeZeroBytes(p, Math.min(from, p + length) - p);
    if (to < p + length && to >= from) await this.#writeZeroBytes(Math.max(to, p), p + length - Math.max(to, p));
    return true;
  }

  /** Write zeroes over [p, p+length) in bounded pieces from one shared buffer. */
  async #writeZeroBytes(p: number, length: number): Promise<void> {
    const z = zeroes();
    const end = p + length;
    let pos = p;
    while (pos < end) {
      const n = Math.min(ZERO_PIECE - (pos % ZERO_PIECE), end - pos);
      await this.#write(pos, z.subarray(0, n));
      pos += n;
    }
  }

  // --- cache and extents ---

  async cache(offset: number, length: number): Promise<void> {
    this.#checkOpen();
    if (!this.capabilities.canCache || length === 0) return;
    // Advisory: a failure to prefetch is not an error.
    await fadviseWillNeed(this.#fd, this.#base + offset, length).catch(() => {});
  }

  async extents(offset: number, length: number, maxExtents?: number): Promise<Extent[]> {
    this.#checkOpen();
    const c = new ExtentCollector(offset, length, maxExtents);
    if (!this.capabilities.canExtents || length === 0) return c.finish();
    const base = this.#base;
    let pos = base + offset;
    const end = pos + length;
    const generation = this.#dataMap?.generation ?? 0;
    // File coordinates in the loop; the collector takes node coordinates.
    // lseek is synchronous: let other work run between long stretches of it.
    for (let round = 1; pos < end && !c.done; round++) {
      if (round % SEEKS_PER_YIELD === 0) {
        await new Promise<void>((resolve) => setImmediate(resolve));
        this.#checkOpen();
      }
      let data: number;
      try {
        data = seek(this.#fd, pos, SEEK_DATA);
      } catch (err) {
        // ENXIO: no data at or after pos (or pos is past the end of the file).
        c.add(pos - base, end - pos, (err as BlockError).code === 'ENXIO' ? HOLE : DATA);
        break;
      }
      if (data > pos) {
        if (!c.add(pos - base, Math.min(data, end) - pos, HOLE)) break;
        pos = data;
        if (pos >= end) break;
      }
      let hole: number;
      try {
        hole = seek(this.#fd, pos, SEEK_HOLE);
      } catch {
        hole = end; // the file changed under us: call the rest data
      }
      if (hole <= pos) hole = end;
      else this.#dataMap?.mark(pos, hole, generation);
      c.add(pos - base, Math.min(hole, end) - pos, DATA);
      pos = hole;
    }
    return c.finish();
  }

  async close(): Promise<void> {
    this.#closing ??= (async () => {
      try {
        if (this.capabilities.writable) await fdatasync(this.#fd);
      } finally {
        // Not before every slice is released: its fd number could be reused by then.
        if (this.#slices > 0) await new Promise<void>((resolve) => (this.#slicesReleased = resolve));
        if (this.#tailFd !== null) await closeFd(this.#tailFd).catch(() => {});
        await closeFd(this.#fd);
      }
    })().catch((err) => {
      throw toBlockError(err);
    });
    return this.#closing;
  }
}
