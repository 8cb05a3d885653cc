// sendfile(2) from a file into a connected socket, through koffi (Node has
// no sendfile). From a page-cache file into a Unix or TCP socket the kernel
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
}

let lib: Lib | null | undefined;
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
