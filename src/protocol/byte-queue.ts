// An accumulating read buffer for a stream parser (the idea of ws's
// receiver): chunks are kept as they arrived and copied only when a field
// spans two of them, so a write payload that came in one chunk is used in
// place. Pure: the server pushes bytes, the parsers pull.
//
// A chunk may also be lent (pushBorrowed): memory the owner will reuse
// once release() has run. Views that take() returns of it are valid until
// then; what must outlive it is taken with takeKept(), and release()
// copies out what is left unread.

export class ByteQueue {
  #chunks: Buffer[] = [];
  /** Parallel to #chunks: true for a lent chunk. */
  #borrowed: boolean[] = [];
  #head = 0; // bytes already consumed from #chunks[0]
  #length = 0;

  get length(): number {
    return this.#length;
  }

  push(chunk: Buffer): void {
    if (chunk.length === 0) return;
    this.#chunks.push(chunk);
    this.#borrowed.push(false);
    this.#length += chunk.length;
  }

  /** Queue memory that is only lent until the next release(). */
  pushBorrowed(chunk: Buffer): void {
    if (chunk.length === 0) return;
    this.#chunks.push(chunk);
    this.#borrowed.push(true);
    this.#length += chunk.length;
  }

  /** Copy the unread rest of lent chunks into memory of our own, so their owner may reuse them. */
  release(): void {
    for (let i = 0; i < this.#chunks.length; i++) {
      if (!this.#borrowed[i]) continue;
      const from = i === 0 ? this.#head : 0;
      const chunk = this.#chunks[i]!;
      const own = Buffer.allocUnsafe(chunk.length - from);
      chunk.copy(own, 0, from);
      this.#chunks[i] = own;
      this.#borrowed[i] = false;
      if (i === 0) this.#head = 0;
    }
  }

  /** The next `n` bytes without consuming them; caller checks length first. */
  peek(n: number): Buffer {
    if (n > this.#length) throw new RangeError(`peek(${n}) with ${this.#length} buffered`);
    const first = this.#chunks[0];
    if (first !== undefined && first.length - this.#head >= n) {
      return first.subarray(this.#head, this.#head + n);
    }
    return this.#gather(n, false);
  }

  /** Consume and return the next `n` bytes (in place when they lie in one chunk). */
  take(n: number): Buffer {
    if (n > this.#length) throw new RangeError(`take(${n}) with ${this.#length} buffered`);
    const first = this.#chunks[0];
    if (first !== undefined && first.length - this.#head >= n) {
      const out = first.subarray(this.#head, this.#head + n);
      this.#advance(n);
      return out;
    }
    return this.#gather(n, true);
  }

  /**
   * take(), for bytes kept past the next release(): in place only when
   * they lie in one chunk of our own, else copied.
   */
  takeKept(n: number): Buffer {
    if (this.#borrowed[0] === true) {
      if (n > this.#length) throw new RangeError(`takeKept(${n}) with ${this.#length} buffered`);
      return this.#gather(n, true);
    }
    return this.take(n);
  }

  /** True when the next `n` bytes lie in one chunk of our own (takeKept() would not copy them). */
  contiguous(n: number): boolean {
    const first = this.#chunks[0];
    return first !== undefined && this.#borrowed[0] === false && first.length - this.#head >= n;
  }

  /** Consume the next `out.length` bytes by copying them into `out`; caller checks length first. */
  takeInto(out: Buffer): Buffer {
    if (out.length > this.#length) throw new RangeError(`takeInto(${out.length}) with ${this.#length} buffered`);
    this.#copyOut(out);
    this.#advance(out.length);
    return out;
  }

  /** Consume up to `n` bytes, returning how many were dropped. */
  skip(n: number): number {
    const count = Math.min(n, this.#length);
    this.#advance(count);
    return count;
  }

  #gather(n: number, consume: boolean): Buffer {
    const out = this.#copyOut(Buffer.allocUnsafe(n));
    if (consume) this.#advance(n);
    return out;
  }

  /** Copy the next `out.length` bytes into `out` without consuming them. */
  #copyOut(out: Buffer): Buffer {
    const n = out.length;
    let copied = 0;
    let head = this.#head;
    for (const chunk of this.#chunks) {
      if (copied === n) break;
      const part = Math.min(chunk.length - head, n - copied);
      chunk.copy(out, copied, head, head + part);
      copied += part;
      head = 0;
    }
    return out;
  }

  #advance(n: number): void {
    this.#length -= n;
    while (n > 0) {
      const first = this.#chunks[0]!;
      const left = first.length - this.#head;
      if (n < left) {
        this.#head += n;
        return;
      }
      n -= left;
      this.#chunks.shift();
      this.#borrowed.shift();
      this.#head = 0;
    }
  }
}
