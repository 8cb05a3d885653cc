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
//
// Time the thread spent waiting for a CPU during a write (its run delay,
// see run-delay.ts) is not the kernel blocking it, and the pool would not
// help: on a machine whose cores are all busy every write waits a slice of
// a few ms now and then. Counted as slow, that sent 4 KiB writes to the
// pool in ever longer spells, at twice their CPU, while the machine was
// short of CPU (bench/README.md, `s13`). So a slow write's run delay is
// taken off its time first.

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
  /** Told when writes go to the pool: for how long, how long the kernel held the write that sent them, and how long it waited for a CPU besides. */
  readonly #onSpell: ((spellMs: number, blockedMs: number, waitedMs: number) => void) | undefined;
  /** No writes on the event loop before this time (performance.now()). */
  #poolUntil = 0;
  #spell = FIRST_SPELL_MS;
  /** When the last slow write ended. */
  #lastSlow = -Infinity;
  /** When the last spell in the pool began. */
  #lastSpell = -Infinity;
  /** Slow writes seen, for tests and diagnostics. */
  slowWrites = 0;
  /** Times writes were sent to the pool. */
  spells = 0;

  constructor(onSpell?: (spellMs: number, blockedMs: number, waitedMs: number) => void) {
    this.#onSpell = onSpell;
  }

  /** May a write start on the event loop at `now`? */
  allows(now: number): boolean {
    return now >= this.#poolUntil;
  }

  /**
   * A write of `bytes` that began at `start` took `ms`. `waited`, asked
   * (with the write's end) only when the write looks slow, says how much of
   * that the thread spent waiting for a CPU.
   */
  took(start: number, ms: number, bytes: number, waited?: (end: number) => number): void {
    const slow = SLOW_BASE_MS + bytes / SLOW_BYTES_PER_MS;
    if (ms <= slow) return;
    const end = start + ms;
    const blocked = waited === undefined ? ms : ms - waited(end);
    if (blocked <= slow) return;
    this.slowWrites++;
    const pair = end - this.#lastSlow <= SLOW_PAIR_MS;
    this.#lastSlow = end;
    if (!pair && blocked < VERY_SLOW_MS) return;
    this.#spell = end - this.#lastSpell > FORGIVE_MS ? FIRST_SPELL_MS : Math.min(this.#spell * 2, LONGEST_SPELL_MS);
    this.#lastSpell = end;
    this.#poolUntil = end + this.#spell;
    this.spells++;
    this.#onSpell?.(this.#spell, blocked, ms - blocked);
  }
}
