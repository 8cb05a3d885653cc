// A byte budget shared by every connection of a server: request payloads
// and read replies hold part of it from the moment their request is parsed
// until the reply has been handed to the kernel. A connection that cannot
// take what it needs stops parsing (its socket pauses) and is woken when
// bytes come back, so the server's memory stays bounded whatever its
// clients send or fail to read.

export class ByteBudget {
  readonly max: number;
  #used = 0;
  readonly #waiters = new Set<() => void>();

  constructor(max: number) {
    this.max = max;
  }

  get used(): number {
    return this.#used;
  }

  /**
   * Take `bytes` if they fit. A request larger than the whole budget is let
   * through when nothing else holds any, so it is slow, never stuck.
   */
  tryTake(bytes: number): boolean {
    if (bytes === 0) return true;
    if (this.#used + bytes > this.max && this.#used > 0) return false;
    this.#used += bytes;
    return true;
  }

  give(bytes: number): void {
    if (bytes === 0) return;
    this.#used -= bytes;
    if (this.#waiters.size === 0) return;
    const waiters = [...this.#waiters];
    this.#waiters.clear();
    // Woken from a fresh stack: the giver may be in the middle of a reply.
    setImmediate(() => {
      for (const wake of waiters) wake();
    });
  }

  /** Call `wake` once, the next time bytes are given back. */
  waitFor(wake: () => void): void {
    this.#waiters.add(wake);
  }

  forget(wake: () => void): void {
    this.#waiters.delete(wake);
  }
}
