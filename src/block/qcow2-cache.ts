// A cache of one-cluster metadata tables (L2 tables, refcount blocks) by
// host offset, shared by every caller of the one qcow2 node. Concurrent
// misses for the same table share one read. Clean tables are evicted
// least recently used first once the cache holds more than its budget;
// dirty tables stay until the owner has written them (markClean).
//
// A caller that awaits between getting a table and changing it must get it
// again afterwards: a clean table may have been evicted meanwhile.

export class TableCache {
  readonly #tableSize: number;
  readonly #maxTables: number;
  readonly #load: (offset: number) => Promise<Buffer>;
  /** Insertion order is recency: the first entry is the least recently used. */
  readonly #tables = new Map<number, Buffer>();
  readonly #dirty = new Set<number>();
  readonly #loading = new Map<number, Promise<Buffer>>();
  /** Bumped by drop(): a load that started before it must not insert a stale table. */
  readonly #generation = new Map<number, number>();

  constructor(tableSize: number, maxBytes: number, load: (offset: number) => Promise<Buffer>) {
    this.#tableSize = tableSize;
    this.#maxTables = Math.max(4, Math.floor(maxBytes / tableSize));
    this.#load = load;
  }

  /** The table at `offset`, read from disk on a miss. */
  async get(offset: number): Promise<Buffer> {
    const hit = this.peek(offset);
    if (hit !== undefined) return hit;
    let loading = this.#loading.get(offset);
    if (loading === undefined) {
      const gen = this.#generation.get(offset) ?? 0;
      loading = this.#load(offset).then(
        (buf) => {
          this.#loading.delete(offset);
          const now = this.#tables.get(offset);
          if (now !== undefined) return now; // put() while we read: that one is newer
          if ((this.#generation.get(offset) ?? 0) !== gen) return buf; // dropped meanwhile: do not cache
          this.#insert(offset, buf);
          return buf;
        },
        (err: unknown) => {
          this.#loading.delete(offset);
          throw err;
        },
      );
      this.#loading.set(offset, loading);
    }
    return loading;
  }

  /** The table if cached (and mark it recently used). */
  peek(offset: number): Buffer | undefined {
    const buf = this.#tables.get(offset);
    if (buf !== undefined) {
      this.#tables.delete(offset);
      this.#tables.set(offset, buf);
    }
    return buf;
  }

  /** Put a table made in memory (a new one); it is dirty until markClean. */
  put(offset: number, buf: Buffer): void {
    this.#insert(offset, buf);
    this.#dirty.add(offset);
  }

  /** Mark a table changed; `buf` (the table the caller changed) is put back if it was evicted meanwhile. */
  markDirty(offset: number, buf: Buffer): void {
    const cached = this.#tables.get(offset);
    if (cached === undefined) this.#insert(offset, buf);
    else if (cached !== buf) throw new Error(`table at ${offset} was changed through a stale copy`);
    this.#dirty.add(offset);
  }

  isDirty(offset: number): boolean {
    return this.#dirty.has(offset);
  }

  get dirtyCount(): number {
    return this.#dirty.size;
  }

  /** Dirty tables in ascending offset order (offset, the live buffer). */
  dirtyTables(): [number, Buffer][] {
    return [...this.#dirty].sort((a, b) => a - b).map((o) => [o, this.#tables.get(o)!]);
  }

  markClean(offset: number): void {
    this.#dirty.delete(offset);
    this.#trim();
  }

  /** Forget a table (its cluster was freed). */
  drop(offset: number): void {
    this.#tables.delete(offset);
    this.#dirty.delete(offset);
    this.#generation.set(offset, (this.#generation.get(offset) ?? 0) + 1);
  }

  #insert(offset: number, buf: Buffer): void {
    if (buf.length !== this.#tableSize) throw new Error(`table of ${buf.length} bytes, expected ${this.#tableSize}`);
    this.#tables.delete(offset);
    this.#tables.set(offset, buf);
    this.#trim();
  }

  /** Evict clean tables, least recently used first, down to the budget. */
  #trim(): void {
    if (this.#tables.size <= this.#maxTables) return;
    for (const offset of this.#tables.keys()) {
      if (this.#tables.size <= this.#maxTables) break;
      if (!this.#dirty.has(offset)) this.#tables.delete(offset);
    }
  }
}
