// Writes one connection's replies to its socket, in order, each reply whole.
// Buffers go through the socket, corked, so a batch of replies leaves in one
// writev. A file slice (a large read served straight from the page cache,
// see BlockNode.fileSlice) goes with sendfile(2) from the file into the
// socket, skipping both copies a read reply otherwise costs: page cache
// into our buffer, and our buffer into the socket. sendfile bypasses
// Node's write queue, so a slice waits until every write before it is with
// the kernel, and writes after it wait for the slice.
import fs from 'node:fs';
import type { FileSlice } from '../exports/export.ts';
import { inReplySpace } from './reply-space.ts';
import { sendFile, sendfileAvailable, setSendBuffer } from './sendfile.ts';
import { socketFd, type ClientSocket } from './wire.ts';

export type ReplyPart = Buffer | FileSlice;

/** Parts at least this long are written as they are; smaller ones are copied together. */
const COALESCE_BELOW = 16 * 1024;

/** A part at least this long makes a reply large (see widenSendBufferForLargeReplies). */
const LARGE_REPLY = 64 * 1024;

/** SO_SNDBUF asked for on Unix sockets that send large replies (see widenSendBufferForLargeReplies). */
const UNIX_SEND_BUFFER = 4 * 1024 * 1024;

const EPIPE = 32;
const ECONNRESET = 104;
const ENOTCONN = 107;

interface Batch {
  readonly parts: ReplyPart[];
  /** The next part to write... */
  index: number;
  /** ...and how many of its bytes have gone already (slices go in pieces). */
  sent: number;
  readonly done: (() => void)[];
}

export class ReplyWriter {
  readonly #socket: ClientSocket;
  /** Where sendfile writes; -1 when slices are read into buffers instead. */
  #fd: number;
  /** Batches holding a slice, and every batch queued after one. */
  readonly #batches: Batch[] = [];
  /** Socket writes whose callback has not run: a slice waits for them. */
  #writing = 0;
  /** A slice waits for #writing to reach 0 (or for the socket to take more). */
  #blocked = false;
  /** Bytes of #batches not yet handed to the socket. */
  #held = 0;
  #onIdle: (() => void) | undefined;
  #bytesByFile = 0;
  /** Set SO_SNDBUF at the next large reply (see widenSendBufferForLargeReplies). */
  #widen = false;
  /** The socket's fd, for SO_SNDBUF; -1 when it has none. */
  readonly #socketFd: number;

  constructor(socket: ClientSocket) {
    this.#socket = socket;
    this.#socketFd = socketFd(socket);
    this.#fd = sendfileAvailable() ? this.#socketFd : -1;
  }

  /** Whether slices go by sendfile (else they are read, which works but gains nothing). */
  get sendsFiles(): boolean {
    return this.#fd >= 0;
  }

  /**
   * Give this (Unix) socket a larger send buffer before its first large
   * reply (a file slice, or buffers of at least LARGE_REPLY bytes). Linux
   * gives a Unix socket 208 KiB (net.core.wmem_default) and never grows it,
   * so a reader of 1 MiB replies stalled the sender five times per reply;
   * 4 MiB (capped by net.core.wmem_max) made sequential reads 1.45x and
   * nbdcopy 1.25-1.5x faster on this machine. TCP grows its buffer itself,
   * and setting one would switch that off. Asked for at the first large
   * reply, so that short connections and small I/O do not pay the syscall.
   */
  widenSendBufferForLargeReplies(): void {
    this.#widen = true;
  }

  /** Bytes sendfile has moved (the rest of each slice was read and written). */
  get bytesByFile(): number {
    return this.#bytesByFile;
  }

  /** Reply bytes not yet with the kernel. */
  get backlog(): number {
    return this.#socket.writableLength + this.#held;
  }

  /**
   * Write `parts` after everything written before. `done` runs once they
   * are all with the kernel, or were dropped because the socket died.
   */
  write(parts: ReplyPart[], done: (() => void)[] = []): void {
    if (this.#socket.destroyed || this.#socket.writableEnded) {
      for (const cb of done) cb();
      return;
    }
    if (this.#batches.length === 0 && allBuffers(parts)) {
      this.#writeBuffers(parts, done);
      return;
    }
    for (const part of parts) this.#held += part.length;
    this.#batches.push({ parts, index: 0, sent: 0, done });
    if (this.#batches.length === 1 && !this.#blocked) this.#drive();
  }

  /**
   * write(parts) would hand them to the socket now, all Buffers, and the
   * socket runs their callbacks later, never from inside write().
   */
  takesAtOnce(parts: ReplyPart[]): boolean {
    return this.#batches.length === 0 && !this.#socket.destroyed && !this.#socket.writableEnded && allBuffers(parts);
  }

  /** Run `fn` once every batch has been handed to the socket (at once if none is left). */
  whenIdle(fn: () => void): void {
    if (this.#batches.length === 0) fn();
    else this.#onIdle = fn;
  }

  /** The socket is gone: every queued reply is dropped and its callbacks run. */
  dropAll(): void {
    const batches = this.#batches.splice(0);
    this.#held = 0;
    for (const b of batches) for (const cb of b.done) cb();
    this.#idle();
  }

  #idle(): void {
    const fn = this.#onIdle;
    this.#onIdle = undefined;
    fn?.();
  }

  readonly #written = (): void => {
    this.#writing--;
    if (this.#writing === 0 && this.#blocked) {
      this.#blocked = false;
      this.#drive();
    }
  };

  #widenNow(): void {
    this.#widen = false;
    if (this.#socketFd >= 0) setSendBuffer(this.#socketFd, UNIX_SEND_BUFFER);
  }

  #writeBuffers(buffers: Buffer[], done: (() => void)[]): void {
    if (this.#widen && hasLargePart(buffers)) this.#widenNow();
    const parts = coalesceSmall(buffers);
    if (parts.length === 0) {
      for (const cb of done) cb();
      return;
    }
    const socket = this.#socket;
    this.#writing++;
    socket.cork();
    for (let i = 0; i < parts.length - 1; i++) socket.write(parts[i]!);
    // The callback runs when the batch is with the kernel, or with an error when the socket dies.
    socket.write(
      parts[parts.length - 1]!,
      done.length === 0
        ? this.#written
        : () => {
            for (const cb of done) cb();
            this.#written();
          },
    );
    socket.uncork();
  }

  #drive(): void {
    const batches = this.#batches;
    while (batches.length > 0) {
      if (this.#socket.destroyed) {
        this.dropAll();
        return;
      }
      const b = batches[0]!;
      if (b.index === b.parts.length) {
        // Everything of this batch is with the kernel: sendfile is synchronous.
        batches.shift();
        for (const cb of b.done) cb();
        continue;
      }
      const part = b.parts[b.index]!;
      if (Buffer.isBuffer(part)) {
        let end = b.index;
        while (end < b.parts.length && Buffer.isBuffer(b.parts[end])) end++;
        const run = b.parts.slice(b.index, end) as Buffer[];
        for (const r of run) this.#held -= r.length;
        b.index = end;
        if (end === b.parts.length) {
          batches.shift();
          this.#writeBuffers(run, b.done);
        } else {
          this.#writeBuffers(run, []);
        }
        continue;
      }
      if (this.#writing > 0) {
        this.#blocked = true;
        return;
      }
      if (!this.#sendSlice(b, part)) return;
    }
    this.#idle();
  }

  /** Send what the socket takes of the slice now; false when the drive must wait. */
  #sendSlice(b: Batch, slice: FileSlice): boolean {
    // Nothing may be queued in Node when sendfile writes; every write goes
    // through this class, so only a write that bypassed it could be.
    if (this.#fd >= 0 && this.#socket.writableLength === 0) {
      if (this.#widen) this.#widenNow();
      while (b.sent < slice.length) {
        const n = sendFile(this.#fd, slice.fd, slice.position + b.sent, slice.length - b.sent);
        if (n === 'again') {
          // The socket is full. Its next byte goes through Node, which
          // waits for room; that write's callback resumes us.
          const byte = this.#readSlice(slice, b.sent, 1);
          this.#advance(b, slice, 1);
          this.#blocked = true;
          this.#writeBuffers([byte], []);
          return false;
        }
        if (n === -EPIPE || n === -ECONNRESET || n === -ENOTCONN) {
          this.#socket.destroy();
          this.dropAll();
          return false;
        }
        if (n === 0) break; // the file shrank: the read below pads with zeroes
        if (n < 0) {
          this.#fd = -1; // this pair cannot sendfile: read from now on
          break;
        }
        this.#bytesByFile += n;
        if (this.#advance(b, slice, n)) return true;
      }
    }
    const rest = this.#readSlice(slice, b.sent, slice.length - b.sent);
    this.#advance(b, slice, rest.length);
    this.#writeBuffers([rest], []);
    return true;
  }

  /** Count n more bytes of the slice as sent; true when it is all sent. */
  #advance(b: Batch, slice: FileSlice, n: number): boolean {
    b.sent += n;
    this.#held -= n;
    if (b.sent < slice.length) return false;
    b.index++;
    b.sent = 0;
    return true;
  }

  /** Bytes of a slice, read on this thread: the node promised they are in memory. */
  #readSlice(slice: FileSlice, from: number, length: number): Buffer {
    const buf = Buffer.allocUnsafe(length);
    let done = 0;
    while (done < length) {
      const n = fs.readSync(slice.fd, buf, done, length - done, slice.position + from + done);
      if (n === 0) {
        buf.fill(0, done); // the file shrank under us
        break;
      }
      done += n;
    }
    return buf;
  }
}

function hasLargePart(buffers: Buffer[]): boolean {
  for (const b of buffers) if (b.length >= LARGE_REPLY) return true;
  return false;
}

/** True when no part is a slice (the common batch: one check per part, no closure per batch). */
function allBuffers(parts: ReplyPart[]): parts is Buffer[] {
  for (const part of parts) if (!Buffer.isBuffer(part)) return false;
  return true;
}

/**
 * Runs of small reply parts (headers, error and block-status chunks) become
 * one buffer: a client that never reads could otherwise pin millions of tiny
 * buffers in the socket's queue, each costing far more than its bytes.
 * Parts that lie one after another in memory (replies built in reply
 * space, see reply-space.ts) are first joined into one view, without a copy.
 */
export function coalesceSmall(parts: Buffer[]): Buffer[] {
  // The common batch of one part (a handshake reply, one large read) costs no arrays or closures.
  if (parts.length === 1 && (parts[0]!.length >= COALESCE_BELOW || !inReplySpace(parts[0]!))) return parts;
  const out: Buffer[] = [];
  let run: Buffer[] = [];
  let runBytes = 0;
  const endRun = (): void => {
    // A lone small part goes as it is, unless it would pin a block of reply space.
    if (run.length === 1 && !inReplySpace(run[0]!)) out.push(run[0]!);
    else if (run.length > 0) out.push(Buffer.concat(run, runBytes));
    run = [];
    runBytes = 0;
  };
  for (const part of mergeAdjacent(parts)) {
    if (part.length >= COALESCE_BELOW) {
      endRun();
      out.push(part);
    } else {
      run.push(part);
      runBytes += part.length;
    }
  }
  endRun();
  return out;
}

/** Consecutive parts where each starts in memory where the one before ends, as one view each. */
export function mergeAdjacent(parts: Buffer[]): Buffer[] {
  if (parts.length < 2) return parts;
  const out: Buffer[] = [];
  let first = parts[0]!;
  let end = first.byteOffset + first.length;
  let joined = false;
  const endRun = (): void => {
    out.push(joined ? Buffer.from(first.buffer, first.byteOffset, end - first.byteOffset) : first);
  };
  for (let i = 1; i < parts.length; i++) {
    const part = parts[i]!;
    const at = part.byteOffset;
    // Offsets first: the buffer is compared only where they line up.
    if (at === end && part.buffer === first.buffer) {
      end += part.length;
      joined = true;
      continue;
    }
    endRun();
    first = part;
    end = at + part.length;
    joined = false;
  }
  endRun();
  return out;
}
