// Which chunks of a file are known to hold only allocated, written data
// (no hole, no unwritten extent). FileNode reads such chunks straight from
// the page cache; elsewhere it asks lseek(SEEK_DATA/SEEK_HOLE) first so as
// not to read unwritten extents (which would turn them into data on ext4).
// This is knowledge about the file's layout, never about its contents.

/** Smallest chunk; larger files get larger chunks so the map stays small. */
const MIN_CHUNK = 64 * 1024;
/** The map never has more chunks than this (2 MiB of bits). */
const MAX_CHUNKS = 1 << 24;

export class DataMap {
  readonly chunk: number;
  readonly #size: number;
  readonly #chunks: number;
  readonly #bits: Uint8Array;
  /** Bumped by every forget(): a scan that began before it must not mark. */
  #generation = 0;

  constructor(size: number) {
    let chunk = MIN_CHUNK;
    while (Math.ceil(size / chunk) > MAX_CHUNKS) chunk *= 2;
    this.chunk = chunk;
    this.#size = size;
    this.#chunks = Math.ceil(size / chunk);
    this.#bits = new Uint8Array(Math.ceil(this.#chunks / 8));
  }

  get generation(): number {
    return this.#generation;
  }

  /** The start of the chunk holding `at`. */
  chunkStart(at: number): number {
    return at - (at % this.chunk);
  }

  /** [start, end) was seen to be all data by a scan that began at `generation`. */
  mark(start: number, end: number, generation: number): void {
    if (generation !== this.#generation) return;
    const first = Math.ceil(start / this.chunk);
    // Only whole chunks; the file's last chunk may be short.
    const last = end >= this.#size ? this.#chunks : Math.floor(end / this.chunk);
    for (let i = first; i < last; i++) this.#bits[i >> 3]! |= 1 << (i & 7);
  }

  /** [start, end) may have holes again (trim, zeroing). */
  forget(start: number, end: number): void {
    this.#generation++;
    const first = Math.floor(start / this.chunk);
    const last = Math.ceil(end / this.chunk);
    for (let i = first; i < last && i < this.#chunks; i++) this.#bits[i >> 3]! &= ~(1 << (i & 7));
  }

  /** True when every chunk touching [start, end) is known data. */
  covers(start: number, end: number): boolean {
    if (end > this.#size) return false;
    const last = Math.ceil(end / this.chunk);
    for (let i = Math.floor(start / this.chunk); i < last; i++) {
      if (i >= this.#chunks || (this.#bits[i >> 3]! & (1 << (i & 7))) === 0) return false;
    }
    return true;
  }
}
