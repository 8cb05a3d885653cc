// When a buffered write into a disk file may run on the event loop.
//
// Such a write is a copy into the page cache, usually as quick as on tmpfs
// (tens of µs for 128 KiB). But it can block: the kernel throttles a writer
// that dirties pages faster than writeback cleans them (balance_dirty_pages
// pauses it for up to 200 ms, and a container's memory cgroup has its own,
// lower dirty limit), a timestamp update can wait for a journal commit, an
// allocation can wait for reclaim. On the event loop such a wait stalls
// every connection, so FileNode times each write it does there. Throttling
// slows write after write; a lone slow write is more likely this thread
// being descheduled (a busy or virtual machine). So once two writes within
// a second are slow, or one is very slow, writes go to the thread pool for
// a spell, which doubles while that keeps happening and starts short again
// after a quiet minute.

/** Slow = more than this... */
const SLOW_BASE_MS = 2;
/** ...plus the time a slow copy (1 GB/s) of the bytes would take. */
const SLOW_BYTES_PER_MS = 1e6;
/** Two slow writes this close together... */
const SLOW_PAIR_MS = 1_000;
/** ...or one this slow, send writes to the pool. */
const VERY_SLOW_MS = 20;
const FIRST_SPELL_MS = 1_000;
const LONGEST_SPELL_MS = 64_000;
/** A slow write this long after the last one starts again at FIRST_SPELL_MS. */
const FORGIVE_MS = 60_000;

export class LoopWriteGuard {
  /** No writes on the event loop before this time (performance.now()). */
  #poolUntil = 0;
  #spell = FIRST_SPELL_MS;
  /** When the last slow write ended. */
  #lastSlow = -Infinity;
  /** When the last spell in the pool began. */
  #lastSpell = -Infinity;
  /** Slow writes seen, for tests and diagnostics. */
  slowWrites = 0;

  /** May a write start on the event loop at `now`? */
  allows(now: number): boolean {
    return now >= this.#poolUntil;
  }

  /** A write of `bytes` that began at `start` took `ms`. */
  took(start: number, ms: number, bytes: number): void {
    if (ms <= SLOW_BASE_MS + bytes / SLOW_BYTES_PER_MS) return;
    const end = start + ms;
    this.slowWrites++;
    const pair = end - this.#lastSlow <= SLOW_PAIR_MS;
    this.#lastSlow = end;
    if (!pair && ms < VERY_SLOW_MS) return;
    this.#spell = end - this.#lastSpell > FORGIVE_MS ? FIRST_SPELL_MS : Math.min(this.#spell * 2, LONGEST_SPELL_MS);
    this.#lastSpell = end;
    this.#poolUntil = end + this.#spell;
  }
}
