// How long this thread has waited for a CPU while runnable: its run delay,
// the second field of /proc/thread-self/schedstat (nanoseconds; Linux with
// CONFIG_SCHED_INFO, which schedstats and delay accounting both enable).
// LoopWriteGuard takes it off a slow write's time, so that a write that
// was only descheduled does not count as one the kernel blocked.
//
// Reading it is a system call (≈ 5 µs here), too dear before every 4 KiB
// write. So mark() samples it at most every SAMPLE_MS, and waitedSinceMark()
// after a slow write reads it again: the difference covers the write and at
// most SAMPLE_MS before it, so it may excuse that much real blocking, well
// under the tens of ms dirty-page throttling pauses a writer for.
import fs from 'node:fs';

const SAMPLE_MS = 5;
const PATH = '/proc/thread-self/schedstat';

export class RunDelayClock {
  /** undefined: not opened yet; null: not available here. */
  #fd: number | null | undefined;
  readonly #buf = Buffer.alloc(96);
  /** When the baseline was read (performance.now()), and its run delay (ms). */
  #markedAt = -Infinity;
  #marked = 0;

  /** This thread's run delay in ms, or null where the kernel does not tell it. */
  read(): number | null {
    if (this.#fd === undefined) {
      try {
        // Opened on the thread that reads it: /proc/thread-self names the opener.
        this.#fd = fs.openSync(PATH, 'r');
      } catch {
        this.#fd = null;
      }
    }
    if (this.#fd === null) return null;
    try {
      const n = fs.readSync(this.#fd, this.#buf, 0, this.#buf.length, 0);
      const fields = this.#buf.toString('latin1', 0, n).split(' ');
      const ns = Number(fields[1]);
      return Number.isFinite(ns) ? ns / 1e6 : null;
    } catch {
      return null;
    }
  }

  /** At a timed write's start (`now`): refresh the baseline if it is older than SAMPLE_MS. */
  mark(now: number): void {
    if (now - this.#markedAt < SAMPLE_MS) return;
    const delay = this.read();
    if (delay === null) return;
    this.#marked = delay;
    this.#markedAt = now;
  }

  /** Run delay since the baseline (ms), 0 when unknown; what it read at `now` is the next baseline. */
  waitedSinceMark(now: number): number {
    if (this.#markedAt === -Infinity) return 0;
    const delay = this.read();
    if (delay === null) return 0;
    const waited = Math.max(0, delay - this.#marked);
    this.#marked = delay;
    this.#markedAt = now;
    return waited;
  }
}
