// Dirty bitmaps of a Redis disk (src/block/redis-bitmaps.ts keeps them in
// Redis and the node's scripts mark them): the `-B NAME` sources, read from
// Redis at every query so that every instance reports the same bits, and
// management with qemu-img bitmap's rules and messages.
//
// qemu's rules for -B apply as for files: a missing bitmap refuses the
// export; an enabled bitmap cannot be offered read-only by an instance
// that writes (a read-only instance may offer it: others may be writing,
// as with any shared disk).
import { RedisBitmapOpError, type RedisBitmapInfo, type RedisBitmapOp, type RedisBitmaps } from '../block/redis-bitmaps.ts';
import { BlockError } from '../block/types.ts';
import { BitmapError } from './bitmaps.ts';
import { DirtyBitmapContext, type DirtyBitmapSource } from './dirty-bitmap-context.ts';
import { checkBitmapParams, type BitmapRun } from './dirty-bitmap.ts';

/** How stale the metrics' dirty byte count may be before a scrape starts a recount. */
const DIRTY_BYTES_MAX_AGE_MS = 5_000;

/**
 * One Redis bitmap as a context source. runs() reads Redis each time;
 * dirtyBytes() is for metrics, which ask synchronously at scrape time: it
 * answers the last count and starts a recount (a BITCOUNT per group) when
 * that is older than a few seconds, so the gauge lags by one scrape.
 */
export class RedisDirtyBitmap implements DirtyBitmapSource {
  readonly name: string;
  readonly #store: RedisBitmaps;
  #dirty = 0;
  #countedAt = -Infinity;
  #counting = false;

  constructor(store: RedisBitmaps, name: string) {
    this.#store = store;
    this.name = name;
  }

  runs(offset: number, length: number, maxRuns: number): Promise<BitmapRun[]> {
    return this.#store.runs(this.name, offset, length, maxRuns);
  }

  dirtyBytes(): number {
    if (!this.#counting && performance.now() - this.#countedAt > DIRTY_BYTES_MAX_AGE_MS) {
      this.#counting = true;
      this.#store
        .dirtyBytes(this.name)
        .then((n) => {
          this.#dirty = n;
        })
        .catch(() => {})
        .finally(() => {
          this.#counting = false;
          this.#countedAt = performance.now();
        });
    }
    return this.#dirty;
  }

  /** The count now, from Redis (tests, --list). */
  countNow(): Promise<number> {
    return this.#store.dirtyBytes(this.name);
  }
}

/**
 * The -B contexts of a Redis disk, in the order given (bitmap-serve.ts
 * passes them in qemu-nbd's order). `writable`: this instance writes.
 */
export async function redisBitmapContexts(
  store: RedisBitmaps,
  names: readonly string[],
  exportReadOnly: boolean,
  writable: boolean,
): Promise<DirtyBitmapContext<RedisDirtyBitmap>[]> {
  if (names.length === 0) return [];
  const all = new Map((await store.list()).map((b) => [b.name, b]));
  return names.map((name) => {
    const b = all.get(name);
    if (b === undefined) throw new BitmapError(`Bitmap '${name}' is not found`);
    if (exportReadOnly && writable && b.enabled) throw new BitmapError(`Enabled bitmap '${name}' incompatible with readonly export`);
    return new DirtyBitmapContext(new RedisDirtyBitmap(store, name));
  });
}

/** A listing line's facts. */
export interface RedisBitmapListing extends RedisBitmapInfo {
  dirtyBytes: number;
}

export async function listRedisBitmaps(store: RedisBitmaps): Promise<RedisBitmapListing[]> {
  const out: RedisBitmapListing[] = [];
  for (const b of await store.list()) out.push({ ...b, dirtyBytes: await store.dirtyBytes(b.name).catch(() => 0) });
  return out;
}

/**
 * Apply operations (all or none, see src/block/redis-bitmaps.ts). Names and
 * granularities are checked as qemu does, then against the disk's chunk
 * groups. A refusal is a RedisBitmapOpError with the operation's index.
 */
export async function applyRedisBitmapOps(store: RedisBitmaps, ops: readonly RedisBitmapOp[]): Promise<void> {
  ops.forEach((o, i) => {
    if (o.kind !== 'add' && o.kind !== 'checkpoint') return;
    try {
      checkBitmapParams(o.name, o.granularity);
    } catch (err) {
      throw new RedisBitmapOpError(i, err instanceof BlockError ? err.message : String(err));
    }
  });
  await store.apply(ops);
}
