// Read-reply buffers of 64 KiB and more, reused once their reply has been
// written. A fresh large Buffer is fresh memory: the kernel zeroes every page
// on first touch, and the garbage collector must find it again; a profile of
// 1 MiB sequential reads spent more time there than in the reads.
//
// A burst of large I/O fills the pool; a daemon that then sits idle or
// serves small requests should not keep that memory. Every sweep lets go of
// the buffers that no get() needed since the previous sweep, so steady
// traffic keeps what it uses and a finished burst is let go within two sweep
// intervals. Only a garbage collection frees a Buffer, and V8 ran none in
// 30 s of an idle server after a burst, so the sweep gives the pages of what
// it lets go back to the system itself (madvise, sendfile.ts). It used to
// force a full collection (gc()) instead: that deoptimized about 90 hot
// functions each time (V8 drops optimized code that refers to objects the
// collection found dead, such as the finished connections'), and the burst
// after every pause of a few seconds ran slow until V8 had optimized them
// again: nbdcopy in, 4 connections, after 4 s idle: 640-690 ms of CPU per
// GB against 470-540 (bench/README.md, session s15).

import { discardPages } from './sendfile.ts';

const MIN_POOLED = 64 * 1024;
/** How often buffers unused since the last sweep are let go. */
const SWEEP_MS = 2000;

export class BufferPool {
  readonly #free = new Map<number, Buffer[]>();
  /** Per size class, the fewest free buffers since the last sweep: that many sat unused all along. */
  readonly #unused = new Map<number, number>();
  readonly #maxRetained: number;
  readonly #sweepMs: number;
  readonly #discard: (buf: Buffer) => unknown;
  #retained = 0;
  #timer: NodeJS.Timeout | undefined;

  /**
   * `sweepMs` 0: never sweep by itself (sweep() still works). `discard`
   * is given each buffer a sweep lets go of, to return its memory.
   */
  constructor(maxRetained: number, sweepMs = SWEEP_MS, discard: (buf: Buffer) => unknown = discardPages) {
    this.#maxRetained = maxRetained;
    this.#sweepMs = sweepMs;
    this.#discard = discard;
  }

  /** Bytes held for reuse. */
  get retained(): number {
    return this.#retained;
  }

  /** A buffer of exactly `length` bytes (contents undefined), or undefined below the pooled size. */
  get(length: number): Buffer | undefined {
    if (length < MIN_POOLED) return undefined;
    const size = sizeClass(length);
    const list = this.#free.get(size);
    const buf = list?.pop();
    if (buf === undefined) return Buffer.allocUnsafeSlow(size).subarray(0, length);
    this.#retained -= size;
    const unused = this.#unused.get(size);
    if (unused !== undefined && list!.length < unused) this.#unused.set(size, list!.length);
    return buf.subarray(0, length);
  }

  /** Give back a buffer that get() returned, once nothing reads it any more. */
  release(buf: Buffer): void {
    const size = buf.buffer.byteLength;
    // Past the cap a buffer is left to the garbage collector, not discarded: the
    // pages of memory malloc hands out again would have to be faulted back in
    // (1 MiB here: 0.2 ms to discard, 3 ms to touch again).
    if (size < MIN_POOLED || size !== sizeClass(size) || this.#retained + size > this.#maxRetained) return;
    let list = this.#free.get(size);
    if (list === undefined) {
      list = [];
      this.#free.set(size, list);
      // It held none at the last sweep, so none of it has sat unused a whole interval.
      this.#unused.set(size, 0);
    }
    list.push(Buffer.from(buf.buffer, 0, size));
    this.#retained += size;
    if (this.#timer === undefined && this.#sweepMs > 0) this.#arm();
  }

  /** Let go of the buffers no get() took since the previous sweep; returns the bytes let go. */
  sweep(): number {
    let dropped = 0;
    for (const [size, list] of this.#free) {
      // get() pops from the end, so the front holds the longest unused.
      const n = Math.min(this.#unused.get(size) ?? 0, list.length);
      if (n > 0) for (const buf of list.splice(0, n)) this.#discard(buf);
      dropped += n * size;
      if (list.length === 0) {
        this.#free.delete(size);
        this.#unused.delete(size);
      } else {
        this.#unused.set(size, list.length);
      }
    }
    this.#retained -= dropped;
    return dropped;
  }

  #arm(): void {
    this.#timer = setTimeout(() => {
      this.#timer = undefined;
      this.sweep();
      if (this.#retained > 0) this.#arm();
    }, this.#sweepMs);
    // An idle pool must not keep the process alive.
    this.#timer.unref();
  }
}

/** Powers of two from 64 KiB up. */
function sizeClass(length: number): number {
  let size = MIN_POOLED;
  while (size < length) size *= 2;
  return size;
}
