// An export: what a client selects by name during negotiation. It owns the
// shared block node (one per image, whatever the number of connections) and
// the meta contexts offered on it. NBD wire details stay in server/.
import type { BlockNode } from '../block/types.ts';
export type { FileSlice, MemoryRun } from '../block/types.ts';
import { BaseAllocationContext } from '../meta/base-allocation.ts';
import type { MetaContext } from '../meta/context.ts';
import type { DirtyBitmapContext } from '../meta/dirty-bitmap-context.ts';

// The server finds holes in read replies with the block layer's zero tests.
export { isAllZero, zeroRuns } from '../block/node.ts';

export interface BlockSizeConstraints {
  minimum: number;
  preferred: number;
  maximum: number;
}

/** Spec defaults ("Size constraints"): 1, 4096, 32 MiB. */
export const DEFAULT_BLOCK_SIZE: BlockSizeConstraints = { minimum: 1, preferred: 4096, maximum: 32 * 1024 * 1024 };

/**
 * A dirty bitmap as the metrics see it (nbd_dirty_bitmap_dirty_bytes):
 * its name and a cheap count of the bytes it marks dirty.
 */
export interface BitmapStat {
  readonly name: string;
  dirtyBytes(): number;
}

export interface ExportOptions {
  name: string;
  description?: string;
  node: BlockNode;
  /** Refuse writes even if the node allows them. */
  readOnly?: boolean;
  /**
   * More than one client may use this export at once, with a cache shared
   * by all (or none): the server advertises NBD_FLAG_CAN_MULTI_CONN.
   */
  multiConn: boolean;
  /** Extra contexts after base:allocation, in the order their ids follow. */
  metaContexts?: MetaContext[];
  /**
   * `qemu:dirty-bitmap:NAME` contexts, after the others. As in qemu-nbd
   * (nbd/server.c NBD_META_ID_DIRTY_BITMAP) their ids start at 2 whether
   * or not qemu:allocation-depth (id 1) is offered.
   */
  bitmapContexts?: DirtyBitmapContext[];
  blockSize?: BlockSizeConstraints;
  /** The export's dirty bitmaps, for metrics; asked again at every scrape (bitmaps come and go). */
  bitmapStats?: () => Iterable<BitmapStat>;
}

export class Export {
  readonly name: string;
  readonly description: string;
  readonly node: BlockNode;
  readonly readOnly: boolean;
  readonly multiConn: boolean;
  readonly blockSize: BlockSizeConstraints;
  /** In id order: base:allocation is 0, qemu:allocation-depth 1, bitmaps from 2, as in qemu-nbd. */
  readonly metaContexts: readonly MetaContext[];
  readonly #ids = new Map<MetaContext, number>();
  readonly #byId = new Map<number, MetaContext>();
  readonly #bitmapStats: () => Iterable<BitmapStat>;

  constructor(opts: ExportOptions) {
    this.name = opts.name;
    this.description = opts.description ?? '';
    this.node = opts.node;
    this.readOnly = (opts.readOnly ?? false) || !opts.node.capabilities.writable;
    this.multiConn = opts.multiConn;
    this.blockSize = opts.blockSize ?? DEFAULT_BLOCK_SIZE;
    const others = [new BaseAllocationContext(opts.node), ...(opts.metaContexts ?? [])];
    const bitmaps = opts.bitmapContexts ?? [];
    this.metaContexts = [...others, ...bitmaps];
    others.forEach((ctx, i) => this.#setId(ctx, i));
    const firstBitmapId = Math.max(2, others.length);
    bitmaps.forEach((ctx, i) => this.#setId(ctx, firstBitmapId + i));
    this.#bitmapStats = opts.bitmapStats ?? (() => []);
  }

  #setId(ctx: MetaContext, id: number): void {
    this.#ids.set(ctx, id);
    this.#byId.set(id, ctx);
  }

  /** The dirty bitmaps of this export, for metrics. */
  bitmapStats(): Iterable<BitmapStat> {
    return this.#bitmapStats();
  }

  get size(): number {
    return this.node.size;
  }

  /** The context with this id, as handed out by contextId(). */
  context(id: number): MetaContext | undefined {
    return this.#byId.get(id);
  }

  contextId(context: MetaContext): number {
    return this.#ids.get(context) ?? -1;
  }
}
