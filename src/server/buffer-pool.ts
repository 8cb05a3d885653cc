// Read-reply buffers of 64 KiB and more, reused once their reply has been
// written. A fresh large Buffer is fresh memory: the kernel zeroes every page
// on first touch, and the garbage collector must find it again; a profile of
// 1 MiB sequential reads spent more time there than in the reads.

const MIN_POOLED = 64 * 1024;

export class BufferPool {
  readonly #free = new Map<number, Buffer[]>();
  readonly #maxRetained: number;
  #retained = 0;

  constructor(maxRetained: number) {
    this.#maxRetained = maxRetained;
  }

  /** A buffer of exactly `length` bytes (contents undefined), or undefined below the pooled size. */
  get(length: number): Buffer | undefined {
    if (length < MIN_POOLED) return undefined;
    const size = sizeClass(length);
    const list = this.#free.get(size);
    const buf = list?.pop();
    if (buf === undefined) return Buffer.allocUnsafeSlow(size).subarray(0, length);
    this.#retained -= size;
    return buf.subarray(0, length);
  }

  /** Give back a buffer that get() returned, once nothing reads it any more. */
  release(buf: Buffer): void {
    const size = buf.buffer.byteLength;
    if (size < MIN_POOLED || size !== sizeClass(size) || this.#retained + size > this.#maxRetained) return;
    const list = this.#free.get(size) ?? [];
    list.push(Buffer.from(buf.buffer, 0, size));
    this.#free.set(size, list);
    this.#retained += size;
  }
}

/** Powers of two from 64 KiB up. */
function sizeClass(length: number): number {
  let size = MIN_POOLED;
  while (size < length) size *= 2;
  return size;
}
