// An export: what a client selects by name during negotiation. It owns the
// shared block node (one per image, whatever the number of connections) and
// the meta contexts offered on it. NBD wire details stay in server/.
import type { BlockNode } from '../block/types.ts';
import { BaseAllocationContext } from '../meta/base-allocation.ts';
import type { MetaContext } from '../meta/context.ts';

// The server finds holes in read replies with the block layer's zero tests.
export { isAllZero, zeroRuns } from '../block/node.ts';

export interface BlockSizeConstraints {
  minimum: number;
  preferred: number;
  maximum: number;
}

/** Spec defaults ("Size constraints"): 1, 4096, 32 MiB. */
export const DEFAULT_BLOCK_SIZE: BlockSizeConstraints = { minimum: 1, preferred: 4096, maximum: 32 * 1024 * 1024 };

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
  blockSize?: BlockSizeConstraints;
}

export class Export {
  readonly name: string;
  readonly description: string;
  readonly node: BlockNode;
  readonly readOnly: boolean;
  readonly multiConn: boolean;
  readonly blockSize: BlockSizeConstraints;
  /** Context ids are positions in this list: base:allocation is 0, as in qemu-nbd. */
  readonly metaContexts: readonly MetaContext[];

  constructor(opts: ExportOptions) {
    this.name = opts.name;
    this.description = opts.description ?? '';
    this.node = opts.node;
    this.readOnly = (opts.readOnly ?? false) || !opts.node.capabilities.writable;
    this.multiConn = opts.multiConn;
    this.blockSize = opts.blockSize ?? DEFAULT_BLOCK_SIZE;
    this.metaContexts = [new BaseAllocationContext(opts.node), ...(opts.metaContexts ?? [])];
  }

  get size(): number {
    return this.node.size;
  }

  /** The context with this id, as handed out by contextId(). */
  context(id: number): MetaContext | undefined {
    return this.metaContexts[id];
  }

  contextId(context: MetaContext): number {
    return this.metaContexts.indexOf(context);
  }
}
