// Image locking compatible with QEMU's (block/file-posix.c, "raw_apply_lock_bytes"
// and "raw_check_lock_bytes"): open file description (OFD) locks on single
// bytes of the image. A user holds a shared lock on byte 100+P for each
// permission P it has (0 consistent read, 1 write, 2 write unchanged,
// 3 resize) and on byte 200+P for each permission it does not share with
// others. It may go on only if no one else holds 200+P for a permission it
// wants, nor 100+P for one it refuses to share. So qemu-img, qemu-nbd,
// QEMU and nbd-export exclude each other exactly as QEMU processes do.
//
// OFD locks belong to the open file description: this code opens its own
// read-only descriptor and keeps it until release(); a crash releases them.
import fs from 'node:fs';
import { createRequire } from 'node:module';
import type * as KoffiModule from 'koffi';
import { BlockError } from './types.ts';

export const PERM_CONSISTENT_READ = 0;
export const PERM_WRITE = 1;
export const PERM_WRITE_UNCHANGED = 2;
export const PERM_RESIZE = 3;
const PERM_NAMES = ['consistent read', 'write', 'write unchanged', 'resize'];
const LOCK_BASE = 100;
const SHARED_BASE = 200;

const F_OFD_GETLK = 36;
const F_OFD_SETLK = 37;
const F_RDLCK = 0;
const F_WRLCK = 1;
const F_UNLCK = 2;
const SEEK_SET = 0;

export interface LockPerms {
  /** Permissions this user has. */
  perm: readonly number[];
  /** Permissions this user does not share with others. */
  unshared: readonly number[];
}

/**
 * What qemu-nbd holds for an image (as /proc/locks shows for qemu 7.2):
 * raw shares writing, qcow2 (whose metadata the writer owns) does not,
 * and neither shares resizing. `ownsMetadata` makes a raw image behave as
 * qcow2: we keep its bitmaps beside it and no other writer may change it.
 */
export function servePerms(format: 'raw' | 'qcow2', writable: boolean, ownsMetadata = false): LockPerms {
  const perm = writable ? [PERM_CONSISTENT_READ, PERM_WRITE, ...(format === 'qcow2' ? [PERM_RESIZE] : [])] : [PERM_CONSISTENT_READ];
  const unshared = format === 'qcow2' || ownsMetadata ? [PERM_WRITE, PERM_RESIZE] : [PERM_RESIZE];
  return { perm, unshared };
}

/** What `qemu-img bitmap` holds: a read-write qcow2 open. */
export const EDIT_PERMS: LockPerms = { perm: [PERM_CONSISTENT_READ, PERM_WRITE, PERM_RESIZE], unshared: [PERM_WRITE, PERM_RESIZE] };

type Fn = ReturnType<KoffiModule.IKoffiLib['func']>;
let fcntlFn: Fn | null | undefined;

function fcntl(): Fn | null {
  if (fcntlFn !== undefined) return fcntlFn;
  try {
    if (process.platform !== 'linux') throw new Error('not Linux');
    const require = createRequire(import.meta.url);
    const koffi = require('koffi') as typeof KoffiModule;
    fcntlFn = koffi.load('libc.so.6').func('int fcntl(int fd, int cmd, ...)');
  } catch {
    fcntlFn = null;
  }
  return fcntlFn;
}

/** struct flock on 64-bit Linux: l_type@0 (short), l_whence@2, l_start@8, l_len@16, l_pid@24; 32 bytes. */
function flock(type: number, start: number): Buffer {
  const b = Buffer.alloc(32);
  b.writeInt16LE(type, 0);
  b.writeInt16LE(SEEK_SET, 2);
  b.writeBigInt64LE(BigInt(start), 8);
  b.writeBigInt64LE(1n, 16);
  return b;
}

export class ImageLock {
  readonly path: string;
  #fd: number | null;

  private constructor(path: string, fd: number | null) {
    this.path = path;
    this.#fd = fd;
  }

  /** True when this platform can lock (Linux with koffi); elsewhere acquire() locks nothing. */
  static get available(): boolean {
    return fcntl() !== null;
  }

  /**
   * Take the locks for `perms` on `path`, or fail with EAGAIN and QEMU's
   * wording when another process's permissions conflict.
   */
  static acquire(path: string, perms: LockPerms, opts: { direct?: boolean } = {}): ImageLock {
    const fn = fcntl();
    if (fn === null) return new ImageLock(path, null);
    const fd = openForLock(path, opts.direct === true);
    try {
      const set = (byte: number): void => {
        if (fn(fd, F_OFD_SETLK, 'void *', flock(F_RDLCK, byte)) !== 0) throw conflict(path, byte);
      };
      for (const p of perms.perm) set(LOCK_BASE + p);
      for (const p of perms.unshared) set(SHARED_BASE + p);
      const free = (byte: number): boolean => {
        const q = flock(F_WRLCK, byte);
        if (fn(fd, F_OFD_GETLK, 'void *', q) !== 0) return true;
        return q.readInt16LE(0) === F_UNLCK;
      };
      // Someone refuses to share what we want; someone has what we refuse to share.
      for (const p of perms.perm) if (!free(SHARED_BASE + p)) throw conflict(path, SHARED_BASE + p);
      for (const p of perms.unshared) if (!free(LOCK_BASE + p)) throw conflict(path, LOCK_BASE + p);
    } catch (err) {
      fs.closeSync(fd);
      throw err;
    }
    return new ImageLock(path, fd);
  }

  /** Drop every lock (closing the descriptor). Idempotent. */
  release(): void {
    if (this.#fd === null) return;
    fs.closeSync(this.#fd);
    this.#fd = null;
  }
}

/**
 * A read-only descriptor for the locks, opened like the image's own (with
 * O_DIRECT under cache=none), so every descriptor of the image looks
 * alike; where O_DIRECT is refused, the node reports that in its words.
 */
function openForLock(path: string, direct: boolean): number {
  if (direct) {
    try {
      return fs.openSync(path, fs.constants.O_RDONLY | fs.constants.O_DIRECT);
    } catch {
      // fall through
    }
  }
  return fs.openSync(path, 'r');
}

/** QEMU's messages: 'Failed to get "write" lock' / 'Failed to get shared "write" lock'. */
function conflict(path: string, byte: number): BlockError {
  const shared = byte >= SHARED_BASE;
  const name = PERM_NAMES[byte - (shared ? SHARED_BASE : LOCK_BASE)] ?? `byte ${byte}`;
  return new BlockError('EAGAIN', `Failed to get ${shared ? '' : 'shared '}"${name}" lock; is another process using the image [${path}]?`);
}
