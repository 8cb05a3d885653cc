// Exclusive locks on byte ranges: acquiring waits until no held range
// overlaps. Used around read-modify-write cycles, so two writes touching
// the same block never lose each other's bytes.

interface Held {
  start: number;
  end: number;
  released: Promise<void>;
}

export class RangeLock {
  readonly #held = new Set<Held>();

  /** Hold [start, end) exclusively; call the returned function to release. */
  async acquire(start: number, end: number): Promise<() => void> {
    for (;;) {
      let blocker: Held | undefined;
      for (const h of this.#held) {
        if (h.start < end && start < h.end) {
          blocker = h;
          break;
        }
      }
      if (blocker === undefined) break;
      await blocker.released;
    }
    // No await between the check above and taking the lock.
    let release!: () => void;
    const entry: Held = { start, end, released: new Promise<void>((resolve) => (release = resolve)) };
    this.#held.add(entry);
    return () => {
      if (this.#held.delete(entry)) release();
    };
  }

  /** Run fn while holding [start, end). */
  async with<T>(start: number, end: number, fn: () => Promise<T>): Promise<T> {
    const release = await this.acquire(start, end);
    try {
      return await fn();
    } finally {
      release();
    }
  }

  /** Ranges held right now (for tests). */
  get heldCount(): number {
    return this.#held.size;
  }
}
