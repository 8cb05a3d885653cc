// Room for small replies built in place: a read's header and data side by
// side, in blocks shared by every connection and handed out in order, never
// reused. A connection's replies built one after another are then adjacent
// in memory, and the reply writer sends such a run as one view of the block
// (see mergeAdjacent in reply-writer.ts): no buffer allocated per read and
// no copy gathering a batch of replies. A 4 KiB random-read profile had
// about a tenth of the server's CPU in those allocations and that copy.
// A block lives while any reply in it waits to be sent; the writer copies
// runs under 16 KiB out of it, so a client that reads nothing pins at most
// 2 block bytes per reply byte.

/** Under glibc's mmap threshold (128 KiB): freed blocks are reused heap, not fresh pages. */
const BLOCK_BYTES = 32 * 1024;
/** Larger replies get their own buffers. */
export const REPLY_SPACE_MAX = 16 * 1024;

let block: Buffer | null = null;
let used = 0;
const blocks = new WeakSet<ArrayBufferLike>();

/** `length` bytes right after the last ones handed out, or undefined above REPLY_SPACE_MAX. */
export function replySpace(length: number): Buffer | undefined {
  if (length > REPLY_SPACE_MAX) return undefined;
  if (block === null || used + length > BLOCK_BYTES) {
    block = Buffer.allocUnsafeSlow(BLOCK_BYTES);
    blocks.add(block.buffer);
    used = 0;
  }
  const space = block.subarray(used, used + length);
  used += length;
  return space;
}

/** Hand back the space replySpace() gave last, when it went unused. */
export function unusedReplySpace(space: Buffer): void {
  if (block !== null && space.buffer === block.buffer && space.byteOffset + space.length === used) used = space.byteOffset;
}

/** Whether `buf` lies in reply space (a small one is copied out before it is queued). */
export function inReplySpace(buf: Buffer): boolean {
  return blocks.has(buf.buffer);
}
