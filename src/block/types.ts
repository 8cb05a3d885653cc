// The block layer's contract. No NBD knowledge lives here: errors are
// errno-style (BlockError.code is an errno name such as 'EIO'), offsets and
// lengths are plain numbers of bytes (safe integers: up to 8 PiB).

/** An errno-style failure from storage. `code` is the errno name. */
export class BlockError extends Error {
  readonly code: string;
  constructor(code: string, message?: string) {
    super(message ?? code);
    this.name = 'BlockError';
    this.code = code;
  }
}

/** One run of equal allocation state. */
export interface Extent {
  /** Bytes this run covers; always > 0. */
  length: number;
  /** True when no storage backs the range (reads return zeroes). */
  hole: boolean;
  /** True when the range is known to read as all zeroes. */
  zero: boolean;
}

/** One run of equal allocation depth (qemu's "qemu:allocation-depth"). */
export interface DepthRun {
  /** Bytes this run covers; always > 0. */
  length: number;
  /** 0: allocated nowhere in the chain; 1: in the top image; 2: in its backing file; ... */
  depth: number;
}

export interface WriteOptions {
  /** Force unit access: the data is durable before the promise resolves. */
  fua?: boolean;
}

export interface ZeroOptions extends WriteOptions {
  /** Keep the range allocated (do not punch a hole). */
  noHole?: boolean;
  /** Fail with ENOTSUP rather than fall back to a slow write of zeroes. */
  fast?: boolean;
}

/** What a node can do; fixed once the node is open. */
export interface BlockCapabilities {
  /** Writes are allowed. */
  writable: boolean;
  /** flush() does something useful (false for a volatile memory disk is still allowed to flush). */
  canFlush: boolean;
  /** trim() may deallocate; when false trim() is a successful no-op. */
  canTrim: boolean;
  /** writeZeroes() with fast=true can ever succeed. */
  canFastZero: boolean;
  /** extents() reports real allocation rather than "all data". */
  canExtents: boolean;
  /** cache() prefetches. */
  canCache: boolean;
}

/**
 * A block device shared by every connection to an export. Implementations
 * hold no per-caller state: once a write's promise has resolved, every
 * later read from any caller sees it; flush() makes every write that has
 * already resolved durable.
 *
 * Callers guarantee offset >= 0, length >= 0 and offset + length <= size;
 * the checks live in one wrapper (see node.ts), not in each backend.
 */
export interface BlockNode {
  readonly size: number;
  readonly capabilities: BlockCapabilities;
  /** Read `length` bytes at `offset` into a new or supplied buffer. */
  read(offset: number, length: number, into?: Buffer): Promise<Buffer>;
  /**
   * Optional: read() done on this thread, before returning, when this node
   * can do so without waiting (a few pages of a memory-backed file, or of
   * the page cache); null, having changed nothing the caller can see, when
   * it cannot: the caller then calls read(). Throws as read() rejects. A
   * node that changes reads must not inherit this from the node it wraps.
   * When `into` is exactly `length` long and the bytes land in it, `into`
   * itself is returned (callers test that with ===).
   */
  readNow?(offset: number, length: number, into?: Buffer): Buffer | null;
  write(offset: number, data: Buffer, opts?: WriteOptions): Promise<void>;
  /**
   * Optional: write on this thread, before returning, when this node can do
   * so without waiting (a copy into tmpfs, memory or a file's page cache); then
   * `data` need not outlive the call. Returns false, having done nothing,
   * when it cannot: the caller then calls write(). Throws as write()
   * rejects. A node that changes writes (tracking, guards) must not
   * inherit this from the node it wraps.
   */
  writeNow?(offset: number, data: Buffer, opts?: WriteOptions): boolean;
  flush(): Promise<void>;
  /** Discard a range; afterwards it reads as zeroes or as before (advisory). */
  trim(offset: number, length: number, opts?: WriteOptions): Promise<void>;
  writeZeroes(offset: number, length: number, opts?: ZeroOptions): Promise<void>;
  /** Prefetch a range; advisory. */
  cache(offset: number, length: number): Promise<void>;
  /**
   * Allocation of [offset, offset+length): runs in order starting at
   * `offset`, covering at least one byte and at most `length` bytes.
   * `maxExtents` (optional) bounds the number of runs; a capped answer
   * simply covers fewer bytes.
   */
  extents(offset: number, length: number, maxExtents?: number): Promise<Extent[]>;
  /**
   * Which layer of a backing chain allocates [offset, offset+length): runs
   * in order from `offset`, covering at least one byte and at most
   * `length`. Optional: a node without layers is depth 1 throughout (as a
   * raw file is for qemu, holes included).
   */
  allocationDepth?(offset: number, length: number, maxRuns?: number): Promise<DepthRun[]>;
  /**
   * Where the bytes a read of [offset, offset+length) would return lie in
   * an open file, for a caller that moves them without copying them through
   * its own memory (sendfile). Optional, and null whenever reading that
   * file range is not exactly a read of the node (a hole to report, data
   * that is not in memory, O_DIRECT): the caller then calls read(). The
   * bytes are those of the file when the caller takes them, which may be
   * after writes that resolve later; the fd stays open until release().
   */
  fileSlice?(offset: number, length: number): FileSlice | null;
  /**
   * Times writes on the caller's thread were sent to the thread pool for a
   * spell because the kernel held one (see LoopWriteGuard). Optional: only
   * nodes that time their writes have it; wrappers pass it through.
   */
  readonly loopWriteSpells?: number;
  /**
   * The bytes a read of [offset, offset+length) would return, as views of
   * this node's own memory, for a caller that sends them without copying
   * them (a large read reply): runs in order that cover the range, each a
   * Buffer of data, or a number of bytes that hold no data and read as
   * zeroes. Optional, and null when the node cannot: the caller then calls
   * read(). As with fileSlice, the bytes are those in memory when the caller
   * takes them, which may be after writes that resolve later; the caller
   * must not change them. A node that changes reads must not inherit this
   * from the node it wraps.
   */
  readViews?(offset: number, length: number): MemoryRun[] | null;
  /** Flush (when writable) and release resources. Idempotent. */
  close(): Promise<void>;
}

/** A run of BlockNode.readViews: data in the node's memory, or this many bytes of zeroes that hold no data. */
export type MemoryRun = Buffer | number;

/** A range of an open file (see BlockNode.fileSlice). */
export interface FileSlice {
  readonly fd: number;
  /** File offset of the first byte. */
  readonly position: number;
  readonly length: number;
  /** The caller is done with fd; call once. */
  release(): void;
}

/** How the host page cache is used (qemu's -t/--cache). none/directsync open with O_DIRECT. */
export type CacheMode = 'none' | 'writeback' | 'writethrough' | 'directsync' | 'unsafe';
/** Whether trim (and zeroing without NO_HOLE) may deallocate (qemu's --discard). */
export type DiscardMode = 'ignore' | 'unmap';
/** Whether all-zero writes become zero requests (qemu's --detect-zeroes). */
export type DetectZeroesMode = 'off' | 'on' | 'unmap';
