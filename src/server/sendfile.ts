// sendfile(2) from a file into a connected socket, the socket options Node
// does not offer, and madvise(2) for the buffer pool, through koffi (Node
// has no sendfile). From a page-cache file into a Unix or TCP socket the kernel
// hands the socket references to the cached pages instead of copying them
// (Linux 6.5+: MSG_SPLICE_PAGES), so a large read reply costs neither a
// copy into our buffer nor one out of it. Loaded on first use; where koffi
// cannot load, sendfileAvailable() is false and replies carry buffers.
import { createRequire } from 'node:module';
import type * as KoffiModule from 'koffi';

type Fn = ReturnType<KoffiModule.IKoffiLib['func']>;

interface Lib {
  koffi: typeof KoffiModule;
  sendfile: Fn;
  setsockopt: Fn;
  getsockopt: Fn;
  madvise: Fn;
  pageSize: number;
}

let lib: Lib | null | undefined;
const SC_PAGESIZE = 30;
let enabled = process.platform === 'linux';

function load(): Lib | null {
  if (!enabled) return null;
  if (lib !== undefined) return lib;
  try {
    const koffi = createRequire(import.meta.url)('koffi') as typeof KoffiModule;
    const libc = koffi.load('libc.so.6');
    lib = {
      koffi,
      // The offset pointer is an in-out 64-bit word; we pass our own each call.
      sendfile: libc.func('int64_t sendfile(int out_fd, int in_fd, int64_t *offset, size_t count)'),
      setsockopt: libc.func('int setsockopt(int fd, int level, int name, const void *value, uint32_t length)'),
      getsockopt: libc.func('int getsockopt(int fd, int level, int name, _Out_ uint8_t *value, _Inout_ uint32_t *length)'),
      madvise: libc.func('int madvise(void *addr, size_t length, int advice)'),
      pageSize: Number(libc.func('long sysconf(int name)')(SC_PAGESIZE)),
    };
  } catch {
    lib = null;
  }
  return lib;
}

/** For tests: behave as if sendfile were missing (false), or use it again. */
export function setSendfileEnabled(on: boolean): void {
  enabled = on && process.platform === 'linux';
}

export function sendfileAvailable(): boolean {
  return load() !== null;
}

/** errno values sendFile() tells apart. */
const EAGAIN = 11;
const EINTR = 4;

const offsetWord = new BigInt64Array(1);

/**
 * Send up to `length` bytes of `fileFd` from `position` into the
 * non-blocking socket `socketFd`. Returns the bytes sent (> 0; 0 at end
 * of file), 'again' when the socket has no room now, or a negated errno
 * (-EPIPE, -ECONNRESET, -EINVAL where this pair cannot sendfile...).
 */
export function sendFile(socketFd: number, fileFd: number, position: number, length: number): number | 'again' {
  const l = load();
  if (l === null) return -38; // -ENOSYS
  for (;;) {
    offsetWord[0] = BigInt(position);
    const n = Number(l.sendfile(socketFd, fileFd, offsetWord, length));
    if (n >= 0) return n;
    const errno = l.koffi.errno();
    if (errno === EINTR) continue;
    return errno === EAGAIN ? 'again' : -errno;
  }
}

const SOL_SOCKET = 1;
const optionWord = new Int32Array(1);
const SO_SNDBUF = 7;

/**
 * Ask for a send buffer of `bytes` on a socket (SO_SNDBUF; Linux caps it at
 * net.core.wmem_max). False when it could not be set.
 */
export function setSendBuffer(socketFd: number, bytes: number): boolean {
  const l = load();
  if (l === null) return false;
  optionWord[0] = bytes;
  return Number(l.setsockopt(socketFd, SOL_SOCKET, SO_SNDBUF, optionWord, 4)) === 0;
}

const IPPROTO_TCP = 6;
const TCP_CONGESTION = 13;
/** TCP_CA_NAME_MAX: a congestion control's name, NUL included, fits in this. */
const CA_NAME_MAX = 16;
const nameBuffer = Buffer.alloc(CA_NAME_MAX);
const lengthWord = new Uint32Array(1);

/** The TCP congestion control of a socket ("cubic", "bbr"...), or null when it cannot be read. */
export function congestionControl(socketFd: number): string | null {
  const l = load();
  if (l === null) return null;
  nameBuffer.fill(0);
  lengthWord[0] = CA_NAME_MAX;
  if (Number(l.getsockopt(socketFd, IPPROTO_TCP, TCP_CONGESTION, nameBuffer, lengthWord)) !== 0) return null;
  const end = nameBuffer.indexOf(0);
  return nameBuffer.toString('latin1', 0, end < 0 ? Math.min(lengthWord[0]!, CA_NAME_MAX) : end);
}

/**
 * Set a socket's TCP congestion control. False when it could not be set
 * (not loaded, or not allowed: net.ipv4.tcp_allowed_congestion_control
 * bounds what an unprivileged process may pick; "reno" is always allowed).
 */
export function setCongestionControl(socketFd: number, name: string): boolean {
  const l = load();
  if (l === null) return false;
  const value = Buffer.from(name, 'latin1');
  return Number(l.setsockopt(socketFd, IPPROTO_TCP, TCP_CONGESTION, value, value.length)) === 0;
}

const MADV_DONTNEED = 4;

/**
 * Give the memory of the whole pages inside `buf` back to the system
 * (madvise MADV_DONTNEED): they read as zeroes afterwards, and cost memory
 * again only once written. For a buffer nothing will read any more whose
 * object the garbage collector has yet to find. False when nothing was
 * given back (not loaded, or no whole page inside).
 */
export function discardPages(buf: Buffer): boolean {
  const l = load();
  if (l === null) return false;
  const page = l.pageSize;
  const misaligned = Number((l.koffi.address(buf) as bigint) % BigInt(page));
  const head = (page - misaligned) % page;
  const length = Math.floor((buf.length - head) / page) * page;
  if (length <= 0) return false;
  return Number(l.madvise(buf.subarray(head, head + length), length, MADV_DONTNEED)) === 0;
}
