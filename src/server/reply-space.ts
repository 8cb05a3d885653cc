// Room for small replies built in place: a read's header and data side by
// side, in blocks handed out in order. A connection's replies built one
// after another are then adjacent in memory, and the reply writer sends
// such a run as one view of the block (see mergeAdjacent in
// reply-writer.ts): no buffer allocated per read and no copy gathering a
// batch of replies. A 4 KiB random-read profile had about a tenth of the
// server's CPU in those allocations and that copy. The writer copies runs
// under 16 KiB out of a block, so a client that reads nothing pins at most
// 2 block bytes per reply byte.
//
// Each connection builds in its own ReplySpace. When the connection knows
// that every reply it built is with the kernel (nothing queued, nothing
// held by its writer or its socket), recycle() hands its blocks back to a
// free list shared by all connections, and the next replies are built in
// them again. Until then a block is only ever written where no reply has
// been: a view the socket still has to send is never overwritten. Without
// recycling, a 4 KiB random read allocated a fresh 32 KiB block every
// eighth reply (five mallocs each, and the frees after a scavenge), and
// those blocks, memory outside V8's heap, piled up between scavenges.

/** Under glibc's mmap threshold (128 KiB): blocks are heap, not fresh pages. */
const BLOCK_BYTES = 32 * 1024;
/** Larger replies get their own buffers. */
export const REPLY_SPACE_MAX = 16 * 1024;
/** At most this many blocks wait in the free list (2 MiB). */
const FREE_MAX = 64;
/**
 * A connection remembers at most this many blocks taken since it last
 * recycled; older ones are forgotten (left to the garbage collector, as a
 * block of a connection that never recycles is).
 */
const HELD_MAX = 8;

const free: Buffer[] = [];
const blocks = new WeakSet<ArrayBufferLike>();

export class ReplySpace {
  /** Blocks taken since the last recycle(), #block among them. */
  #held: Buffer[] = [];
  /** The block being filled, and how much of it is handed out. */
  #block: Buffer | undefined;
  #used = 0;

  /** `length` bytes right after the last ones handed out, or undefined above REPLY_SPACE_MAX. */
  take(length: number): Buffer | undefined {
    if (length > REPLY_SPACE_MAX) return undefined;
    let block = this.#block;
    if (block === undefined || this.#used + length > BLOCK_BYTES) {
      block = free.pop();
      if (block === undefined) {
        block = Buffer.allocUnsafeSlow(BLOCK_BYTES);
        blocks.add(block.buffer);
      }
      if (this.#held.length === HELD_MAX) this.#held.shift();
      this.#held.push(block);
      this.#block = block;
      this.#used = 0;
    }
    const space = block.subarray(this.#used, this.#used + length);
    this.#used += length;
    return space;
  }

  /** Hand back the space take() gave last, when it went unused. */
  giveBack(space: Buffer): void {
    const block = this.#block;
    if (block !== undefined && space.buffer === block.buffer && space.byteOffset + space.length === this.#used) this.#used = space.byteOffset;
  }

  /**
   * Every reply built here so far is with the kernel (or will never be
   * sent): the blocks go to the free list, to be written again. The next
   * take() gets the one put there last, still in the CPU's cache; an idle
   * connection holds none. Only between replies: Transmission queues each
   * reply in the same call that took its space, and Connection recycles
   * only from its flush, never from the hooks (events, logs) that run
   * while a reply is being built.
   */
  recycle(): void {
    const held = this.#held;
    if (held.length === 0) return;
    for (const block of held) if (free.length < FREE_MAX) free.push(block);
    held.length = 0;
    this.#block = undefined;
    this.#used = 0;
  }
}

/** Whether `buf` lies in reply space (a small one is copied out before it is queued). */
export function inReplySpace(buf: Buffer): boolean {
  return blocks.has(buf.buffer);
}

/** Blocks in the free list, for tests. */
export function freeReplyBlocks(): number {
  return free.length;
}
