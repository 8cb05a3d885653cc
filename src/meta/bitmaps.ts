// The dirty bitmaps of one node: loaded from the image's store when it
// opens, updated by every write, write-zeroes and trim that reaches the
// shared node (DirtyTrackingNode wraps it once, so every connection goes
// through the same marking), stored back on a clean close. Bitmaps belong
// to the node, never to a connection or an export; an export only chooses
// which of them it offers as `qemu:dirty-bitmap:NAME` contexts.
//
// The rules follow qemu: an inconsistent bitmap (found in use) cannot be
// used, only removed; an enabled bitmap cannot be offered by a read-only
// export of a writable node (it would change under the reader); a bitmap
// that is not found refuses the export.
import { ForwardingNode } from '../block/node.ts';
import type { BlockNode, WriteOptions, ZeroOptions } from '../block/types.ts';
import { BlockError } from '../block/types.ts';
import type { BitmapStore } from './bitmap-store.ts';
import { DirtyBitmapContext } from './dirty-bitmap-context.ts';
import { checkBitmapParams, DEFAULT_GRANULARITY, DirtyBitmap, type BitmapInfo } from './dirty-bitmap.ts';

/** A refusal with qemu's wording; the CLI prints the message as it is. */
export class BitmapError extends Error {
  override name = 'BitmapError';
}

export interface BitmapListing extends BitmapInfo {
  /** Why the bitmap is unusable, or null. */
  inconsistent: string | null;
  /** Bytes in dirty granules (0 for inconsistent bitmaps). */
  dirtyBytes: number;
}

interface Inconsistent {
  info: BitmapInfo;
  reason: string;
}

export interface NodeBitmapsOptions {
  /** Where the bitmaps persist; null for a node with no persistent storage (memory disks). */
  store: BitmapStore | null;
  /** Bytes the bitmaps cover (the node's size). */
  size: number;
  /** The node may change: enabled bitmaps track writes and are stored back at close. */
  writable: boolean;
}

export class NodeBitmaps {
  readonly size: number;
  readonly writable: boolean;
  readonly #store: BitmapStore | null;
  /** Names in stored order, consistent or not. */
  #order: string[] = [];
  readonly #bitmaps = new Map<string, DirtyBitmap>();
  readonly #inconsistent = new Map<string, Inconsistent>();
  /** Bitmaps flagged in use on disk by us. */
  #inUse: string[] = [];
  /** Something besides bits changed (added, removed, enabled...): store even if no bit changed. */
  #changed = false;
  #closed = false;

  private constructor(opts: NodeBitmapsOptions) {
    this.size = opts.size;
    this.writable = opts.writable;
    this.#store = opts.store;
  }

  /** Load the node's bitmaps; when writable, flag the enabled ones in use before anything is written. */
  static async open(opts: NodeBitmapsOptions): Promise<NodeBitmaps> {
    const nb = new NodeBitmaps(opts);
    if (opts.store !== null) {
      for (const s of await opts.store.load()) {
        nb.#order.push(s.info.name);
        if (s.inconsistent !== null || s.data === undefined) {
          nb.#inconsistent.set(s.info.name, { info: s.info, reason: s.inconsistent ?? 'no data' });
        } else {
          nb.#bitmaps.set(s.info.name, new DirtyBitmap(s.info, opts.size, s.data));
        }
      }
      if (opts.writable) {
        const enabled = [...nb.#bitmaps.values()].filter((b) => b.enabled).map((b) => b.name);
        await opts.store.markInUse(enabled);
        nb.#inUse = enabled;
      }
    }
    return nb;
  }

  get store(): BitmapStore | null {
    return this.#store;
  }

  /** Every bitmap, in stored order (new ones last). */
  list(): BitmapListing[] {
    return this.#order.map((name) => {
      const b = this.#bitmaps.get(name);
      if (b !== undefined) return { ...b.info, inconsistent: null, dirtyBytes: b.dirtyBytes() };
      const i = this.#inconsistent.get(name)!;
      return { ...i.info, inconsistent: i.reason, dirtyBytes: 0 };
    });
  }

  /** A usable bitmap by name. */
  get(name: string): DirtyBitmap | undefined {
    return this.#bitmaps.get(name);
  }

  /** Bitmaps, in stored order, that a metrics hook may read (dirtyBytes() is cheap). */
  get bitmaps(): DirtyBitmap[] {
    return this.#order.flatMap((n) => this.#bitmaps.get(n) ?? []);
  }

  /** Mark [offset, offset+length) in every enabled bitmap. */
  mark(offset: number, length: number): void {
    for (const b of this.#bitmaps.values()) if (b.enabled) b.mark(offset, length);
  }

  /** Wrap the shared node so that every change marks the bitmaps first; install once per node. */
  wrap(node: BlockNode): DirtyTrackingNode {
    return new DirtyTrackingNode(node, this);
  }

  /**
   * The contexts for `names`, as qemu-nbd builds an export's bitmaps
   * (nbd/server.c nbd_export_create): each must exist and be consistent;
   * an enabled one cannot be offered read-only while the node is writable.
   */
  contexts(names: readonly string[], exportReadOnly: boolean): DirtyBitmapContext[] {
    return names.map((name) => {
      const b = this.#usable(name);
      if (exportReadOnly && this.writable && b.enabled) throw new BitmapError(`Enabled bitmap '${name}' incompatible with readonly export`);
      return new DirtyBitmapContext(b);
    });
  }

  #usable(name: string): DirtyBitmap {
    if (this.#inconsistent.has(name)) throw new BitmapError(`Bitmap '${name}' is inconsistent and cannot be used`);
    const b = this.#bitmaps.get(name);
    if (b === undefined) throw new BitmapError(`Bitmap '${name}' is not found`);
    return b;
  }

  #exists(name: string): boolean {
    return this.#bitmaps.has(name) || this.#inconsistent.has(name);
  }

  // --- management (nbd-export bitmap), with qemu-img bitmap's messages ---

  add(name: string, granularity = DEFAULT_GRANULARITY, enabled = true): DirtyBitmap {
    if (this.#store === null) throw new BitmapError('this image cannot store bitmaps');
    if (this.#exists(name)) throw new BitmapError(`Bitmap already exists: ${name}`);
    try {
      checkBitmapParams(name, granularity);
    } catch (err) {
      throw new BitmapError((err as Error).message);
    }
    const b = new DirtyBitmap({ name, granularity, enabled }, this.size);
    this.#bitmaps.set(name, b);
    this.#order.push(name);
    this.#changed = true;
    return b;
  }

  remove(name: string): void {
    if (!this.#exists(name)) throw new BitmapError(`Dirty bitmap '${name}' not found`);
    this.#bitmaps.delete(name);
    this.#inconsistent.delete(name);
    this.#order = this.#order.filter((n) => n !== name);
    this.#changed = true;
  }

  clear(name: string): void {
    this.#found(name).clear();
    this.#changed = true;
  }

  enable(name: string): void {
    this.#found(name).enabled = true;
    this.#changed = true;
  }

  disable(name: string): void {
    this.#found(name).enabled = false;
    this.#changed = true;
  }

  /** OR bitmap `src` into `dst` (qemu-img bitmap --merge SRC ... DST). */
  merge(src: string, dst: string): void {
    const to = this.#found(dst);
    const from = this.#found(src);
    to.merge(from);
    this.#changed = true;
  }

  /**
   * Disable every enabled bitmap and add `name`, enabled, in one step: no
   * write falls between the old bitmaps and the new one, and none is in
   * both. Returns the names disabled.
   */
  checkpoint(name: string, granularity = DEFAULT_GRANULARITY): string[] {
    if (this.#exists(name)) throw new BitmapError(`Bitmap already exists: ${name}`);
    const enabled = [...this.#bitmaps.values()].filter((b) => b.enabled);
    this.add(name, granularity, true);
    for (const b of enabled) b.enabled = false;
    return enabled.map((b) => b.name);
  }

  #found(name: string): DirtyBitmap {
    if (this.#inconsistent.has(name)) throw new BitmapError(`Bitmap '${name}' is inconsistent and cannot be used`);
    const b = this.#bitmaps.get(name);
    if (b === undefined) throw new BitmapError(`Dirty bitmap '${name}' not found`);
    return b;
  }

  /** Whether close() has anything to store. */
  get needsSave(): boolean {
    return this.#changed || this.#inUse.length > 0 || [...this.#bitmaps.values()].some((b) => b.modified);
  }

  /** Store the bitmaps (not in use) when anything changed; idempotent. */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    await this.save();
  }

  /** Store now (the bitmap command after its changes; close() on a clean stop). */
  async save(): Promise<void> {
    if (this.#store === null || !this.needsSave) return;
    await this.#store.save(this.bitmaps, [...this.#inconsistent.keys()]);
    for (const b of this.#bitmaps.values()) b.modified = false;
    this.#inUse = [];
    this.#changed = false;
  }
}

/**
 * The shared node with marking in front: a write, write-zeroes or trim
 * marks the granules it touches in every enabled bitmap before it reaches
 * storage, so the bitmap is dirty before the request can be acknowledged,
 * whichever connection sent it. Trim marks only when it can deallocate
 * (--discard=unmap); a fast zero the node cannot do changes nothing.
 * Closing the node stores the bitmaps after the node's own data is safe.
 */
export class DirtyTrackingNode extends ForwardingNode {
  readonly bitmaps: NodeBitmaps;

  constructor(inner: BlockNode, bitmaps: NodeBitmaps) {
    super(inner);
    this.bitmaps = bitmaps;
  }

  /** Mark only ranges the node accepts, so a refused request (past the end, read-only) marks nothing. */
  #mark(offset: number, length: number): void {
    if (!this.inner.capabilities.writable || offset < 0 || length <= 0 || offset + length > this.size) return;
    this.bitmaps.mark(offset, length);
  }

  override write(offset: number, data: Buffer, opts?: WriteOptions): Promise<void> {
    this.#mark(offset, data.length);
    return this.inner.write(offset, data, opts);
  }

  override writeZeroes(offset: number, length: number, opts?: ZeroOptions): Promise<void> {
    if (!(opts?.fast === true && !this.inner.capabilities.canFastZero)) this.#mark(offset, length);
    return this.inner.writeZeroes(offset, length, opts);
  }

  override trim(offset: number, length: number, opts?: WriteOptions): Promise<void> {
    if (this.inner.capabilities.canTrim) this.#mark(offset, length);
    return this.inner.trim(offset, length, opts);
  }

  /** Close the node (its data durable), then store the bitmaps. */
  override async close(): Promise<void> {
    await this.inner.close();
    await this.bitmaps.close();
  }
}

/** A BlockError from a store, or a BitmapError, as one readable line. */
export function bitmapFailure(err: unknown): BitmapError {
  if (err instanceof BitmapError) return err;
  if (err instanceof BlockError) return new BitmapError(err.message);
  return new BitmapError(err instanceof Error ? err.message : String(err));
}
