// The few libc calls Node lacks, through koffi: lseek(SEEK_DATA/SEEK_HOLE),
// fallocate (punch hole, zero range), ioctl(BLKGETSIZE64), posix_fadvise,
// and the address of a Buffer (to align O_DIRECT buffers).
//
// koffi is loaded on first use. When it cannot load (unsupported platform,
// missing binary), ffiAvailable() is false and every caller degrades:
// extents become "all data", zeroing becomes writing zeroes.
//
// Errors are BlockErrors named by errno. koffi's async calls run on its
// worker threads, whose errno does not travel back; when an async fallocate
// fails, it is repeated synchronously to learn errno. The modes used here
// are idempotent and their failures (EOPNOTSUPP, EINVAL, ENOSPC...) return
// at once, so only the rare failing call touches the event loop.
import { createRequire } from 'node:module';
import type * as KoffiModule from 'koffi';
import { errnoMessage, errnoName } from './errno.ts';
import { BlockError } from './types.ts';

export const SEEK_DATA = 3;
export const SEEK_HOLE = 4;
export const FALLOC_FL_KEEP_SIZE = 0x01;
export const FALLOC_FL_PUNCH_HOLE = 0x02;
export const FALLOC_FL_ZERO_RANGE = 0x10;
/** _IOR(0x12, 114, size_t) on 64-bit Linux. */
const BLKGETSIZE64 = 0x80081272;
const POSIX_FADV_WILLNEED = 3;
/** At most this many koffi async calls at once (koffi throws past its own queue limit). */
const MAX_ASYNC = 32;

type Koffi = typeof KoffiModule;
type Fn = ReturnType<KoffiModule.IKoffiLib['func']>;

interface Libc {
  koffi: Koffi;
  lseek: Fn;
  fallocate: Fn;
  ioctl: Fn;
  fadvise: Fn;
  /** memmove(p, p, 0) returns p: the address of a Buffer's memory. */
  identity: Fn;
  fstatfs: Fn;
  preadv2: Fn;
  /** syscall(2) typed for cachestat: not variadic, which koffi calls at half the cost (the int and pointer arguments travel alike on x86_64 and arm64). */
  cachestat: Fn;
}

let libcState: Libc | null | undefined;
let enabled = process.platform === 'linux';

function libc(): Libc | null {
  if (!enabled) return null;
  if (libcState !== undefined) return libcState;
  try {
    const require = createRequire(import.meta.url);
    const koffi = require('koffi') as Koffi;
    const lib = koffi.load('libc.so.6');
    libcState = {
      koffi,
      lseek: lib.func('int64_t lseek(int fd, int64_t offset, int whence)'),
      fallocate: lib.func('int fallocate(int fd, int mode, int64_t offset, int64_t len)'),
      ioctl: lib.func('int ioctl(int fd, unsigned long request, ...)'),
      fadvise: lib.func('int posix_fadvise(int fd, int64_t offset, int64_t len, int advice)'),
      identity: lib.func('uintptr_t memmove(void *dst, const void *src, size_t n)'),
      fstatfs: lib.func('int fstatfs(int fd, _Out_ uint8_t *buf)'),
      // One iovec passed as a pointer to two 64-bit words { base, length }.
      preadv2: lib.func('int64_t preadv2(int fd, const uint64_t *iov, int iovcnt, int64_t offset, int flags)'),
      cachestat: lib.func('long syscall(long number, int fd, void *range, void *out, unsigned int flags)'),
    };
  } catch {
    libcState = null;
  }
  return libcState;
}

/** For tests: pretend koffi is missing (false) or use it again (true). */
export function setFfiEnabled(on: boolean): void {
  enabled = on && process.platform === 'linux';
}

/** True when the libc calls below work; false means callers degrade. */
export function ffiAvailable(): boolean {
  return libc() !== null;
}

function need(): Libc {
  const l = libc();
  if (l === null) throw new BlockError('ENOSYS', 'libc calls through koffi are not available');
  return l;
}

function fail(l: Libc, what: string): BlockError {
  const name = errnoName(l.koffi.errno());
  return new BlockError(name, `${what}: ${errnoMessage(name)}`);
}

/**
 * lseek(fd, offset, SEEK_DATA | SEEK_HOLE): the resulting offset. Throws a
 * BlockError; ENXIO means "no more data after offset" (or past EOF).
 * Synchronous: it only looks at extent maps.
 */
export function seek(fd: number, offset: number, whence: typeof SEEK_DATA | typeof SEEK_HOLE): number {
  const l = need();
  const r = Number(l.lseek(fd, offset, whence));
  if (r < 0) throw fail(l, whence === SEEK_DATA ? 'lseek(SEEK_DATA)' : 'lseek(SEEK_HOLE)');
  return r;
}

/** Size in bytes of the block device open on fd. */
export function blockDeviceSize(fd: number): number {
  const l = need();
  const out = Buffer.alloc(8);
  if (l.ioctl(fd, BLKGETSIZE64, 'void *', out) !== 0) throw fail(l, 'ioctl(BLKGETSIZE64)');
  return Number(out.readBigUInt64LE(0));
}

// A small gate so no more than MAX_ASYNC koffi async calls are queued.
let running = 0;
const waiting: (() => void)[] = [];
async function gated<T>(run: () => Promise<T>): Promise<T> {
  if (running >= MAX_ASYNC) await new Promise<void>((resolve) => waiting.push(resolve));
  running++;
  try {
    return await run();
  } finally {
    running--;
    waiting.shift()?.();
  }
}

function callAsync(fn: Fn, args: unknown[]): Promise<number> {
  return new Promise((resolve, reject) => {
    fn.async(...args, (err: unknown, res: unknown) => {
      if (err) reject(err instanceof Error ? new BlockError('EIO', err.message) : new BlockError('EIO'));
      else resolve(Number(res));
    });
  });
}

/** fallocate(fd, mode, offset, length) on a koffi worker thread. */
export async function fallocate(fd: number, mode: number, offset: number, length: number): Promise<void> {
  const l = need();
  const r = await gated(() => callAsync(l.fallocate, [fd, mode, offset, length]));
  if (r === 0) return;
  // Learn errno: repeat the (idempotent) call on this thread.
  if (l.fallocate(fd, mode, offset, length) === 0) return;
  throw fail(l, 'fallocate');
}

/** posix_fadvise(WILLNEED) on a worker thread: start reading a range into the page cache. */
export async function fadviseWillNeed(fd: number, offset: number, length: number): Promise<void> {
  const l = need();
  // posix_fadvise returns the error number instead of setting errno.
  const r = await gated(() => callAsync(l.fadvise, [fd, offset, length, POSIX_FADV_WILLNEED]));
  if (r !== 0) {
    const name = errnoName(r);
    throw new BlockError(name, `posix_fadvise: ${errnoMessage(name)}`);
  }
}

/**
 * Base addresses of the ArrayBuffers bufferAddress() was asked about. A
 * backing store never moves once it exists (reading `.buffer` gives even a
 * small on-heap typed array one), so one FFI call per ArrayBuffer does:
 * reads land in slices of a few (reply space, pooled buffers).
 */
const addresses = new WeakMap<ArrayBufferLike, number>();

/** The address of a Buffer's first byte, or null without FFI. */
export function bufferAddress(buf: Buffer): number | null {
  const l = libc();
  if (l === null) return null;
  const store = buf.buffer;
  let base = addresses.get(store);
  if (base === undefined) {
    const whole = new Uint8Array(store);
    base = Number(l.identity(whole, whole, 0));
    addresses.set(store, base);
  }
  return base + buf.byteOffset;
}

/**
 * A zero-filled Buffer of `length` bytes whose memory starts on an `align`
 * boundary (for O_DIRECT), or null without FFI.
 */
export function allocAligned(length: number, align: number): Buffer | null {
  const raw = Buffer.alloc(length + align);
  const address = bufferAddress(raw);
  if (address === null) return null;
  const pad = (align - (address % align)) % align;
  return raw.subarray(pad, pad + length);
}

/** statfs.f_type of tmpfs and ramfs: memory-backed, reads never wait for a disk. */
export const TMPFS_MAGIC = 0x01021994;
export const RAMFS_MAGIC = 0x858458f6;
const RWF_NOWAIT = 0x08;

/** The filesystem type (statfs f_type) holding fd, or null without FFI. */
export function filesystemType(fd: number): number | null {
  const l = libc();
  if (l === null) return null;
  const buf = Buffer.alloc(256); // struct statfs is 120 bytes on x86_64 and arm64
  if (l.fstatfs(fd, buf) !== 0) return null;
  return Number(buf.readBigInt64LE(0));
}

/**
 * preadNowait's one iovec, reused (the call is synchronous). With a new
 * array and an FFI call for the address per read, a 4 KiB read from the
 * page cache cost 2.6 µs against 1.6 µs now and 1.5 µs for fs.readSync.
 */
const nowaitIov = new BigUint64Array(2);

/**
 * preadv2(RWF_NOWAIT): read only what the page cache holds right now, never
 * waiting for a disk. Returns the bytes read (0 at end of file), or -1 when
 * the data is not cached (EAGAIN). Throws a BlockError otherwise
 * (EOPNOTSUPP where the filesystem lacks RWF_NOWAIT).
 */
export function preadNowait(fd: number, buf: Buffer, position: number): number {
  const l = need();
  nowaitIov[0] = BigInt(bufferAddress(buf)!);
  nowaitIov[1] = BigInt(buf.length);
  const n = Number(l.preadv2(fd, nowaitIov, 1, position, RWF_NOWAIT));
  if (n >= 0) return n;
  const name = errnoName(l.koffi.errno());
  if (name === 'EAGAIN' || name === 'EWOULDBLOCK') return -1;
  throw new BlockError(name, `preadv2: ${errnoMessage(name)}`);
}

/** cachestat(2) (Linux 6.5): the same number on x86_64 and arm64. */
const SYS_CACHESTAT = 451;
const PAGE = 4096;
let cachestatWorks = true;
const cachestatRange = new BigUint64Array(2);
const cachestatOut = new BigUint64Array(5);

/**
 * True when every page of [position, position+length) of fd is in the page
 * cache now (cachestat(2): one walk of the file's page tree, no I/O), so
 * reading the range cannot wait for a disk. False when some page is not;
 * null where cachestat is missing (an older kernel, or no FFI). On tmpfs a
 * hole has no page, so a range with a hole is not cached either.
 */
export function cachedFully(fd: number, position: number, length: number): boolean | null {
  const l = cachestatWorks ? libc() : null;
  if (l === null) return null;
  const first = Math.floor(position / PAGE);
  const pages = Math.ceil((position + length) / PAGE) - first;
  cachestatRange[0] = BigInt(first * PAGE);
  cachestatRange[1] = BigInt(pages * PAGE);
  const r = Number(l.cachestat(SYS_CACHESTAT, fd, cachestatRange, cachestatOut, 0));
  if (r !== 0) {
    const name = errnoName(l.koffi.errno());
    // Not this kernel (or a seccomp filter): never ask again. Other errors say nothing about the range.
    if (name === 'ENOSYS' || name === 'EPERM') cachestatWorks = false;
    return null;
  }
  return Number(cachestatOut[0]) >= pages;
}

/** glibc's mallopt() parameter for the mmap threshold. */
const M_MMAP_THRESHOLD = -3;

/**
 * Serve every allocation of at least `bytes` with its own mmap, returned to
 * the system when freed. glibc otherwise raises the threshold each time a
 * large block is freed (up to 32 MiB), after which 1-32 MiB request buffers
 * come from the heap and, freed, stay in the process: RSS then keeps the
 * high-water mark of every burst (the fuzzer saw 500 MiB held with 110 MiB
 * live). Our hot large buffers are pooled, so the extra mmaps are rare.
 * False where there is no glibc mallopt.
 */
export function fixMmapThreshold(bytes: number): boolean {
  const l = libc();
  if (l === null) return false;
  try {
    const mallopt = l.koffi.load('libc.so.6').func('int mallopt(int param, int value)');
    return mallopt(M_MMAP_THRESHOLD, bytes) === 1;
  } catch {
    return false;
  }
}
