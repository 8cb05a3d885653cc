// Serving an image with its dirty bitmaps: lock the image as QEMU would
// (so qemu-img, qemu-nbd and `nbd-export bitmap` stay away while we serve),
// open the node, load its bitmaps (qcow2 extension or raw sidecar), flag
// the enabled ones in use, and put the marking wrapper in front of the
// shared node; then build the -B contexts with qemu-nbd's checks.
import fs from 'node:fs';
import { EDIT_PERMS, ImageLock, servePerms, type LockPerms } from '../block/image-lock.ts';
import { usesDirectIo } from '../block/open.ts';
import { isQcow2 } from '../block/qcow2-format.ts';
import type { BlockNode } from '../block/types.ts';
import type { BitmapStore } from '../meta/bitmap-store.ts';
import { bitmapFailure, NodeBitmaps } from '../meta/bitmaps.ts';
import type { DirtyBitmapContext } from '../meta/dirty-bitmap-context.ts';
import { Qcow2BitmapStore } from '../meta/qcow2-bitmaps.ts';
import { RawBitmapStore } from '../meta/raw-bitmaps.ts';
import type { RedisNode } from '../block/redis.ts';
import type { Config } from './args.ts';

/** The format of the image file at `path` (its first bytes after `offset`), as openImage probes it. */
export function probeFormat(path: string, offset = 0): 'raw' | 'qcow2' {
  const fd = fs.openSync(path, 'r');
  try {
    const head = Buffer.alloc(4);
    const n = fs.readSync(fd, head, 0, 4, offset);
    return isQcow2(head.subarray(0, n)) ? 'qcow2' : 'raw';
  } finally {
    fs.closeSync(fd);
  }
}

/** The store for an image of this format. */
export function storeFor(path: string, format: 'raw' | 'qcow2', size: number): BitmapStore {
  return format === 'qcow2' ? new Qcow2BitmapStore(path) : new RawBitmapStore(path, size);
}

/** Lock `path` for `perms`; a conflict is one readable line naming the image. */
export function lockImage(path: string, perms: LockPerms, direct = false): ImageLock {
  try {
    return ImageLock.acquire(path, perms, { direct });
  } catch (err) {
    throw new Error(`cannot open '${path}': ${err instanceof Error ? err.message : String(err)}`);
  }
}

export { EDIT_PERMS };

export interface Served {
  /** The node to export: the shared node, behind the marking wrapper when bitmaps track writes. */
  node: BlockNode;
  bitmaps: NodeBitmaps;
  /** The -B contexts, in qemu-nbd's order. */
  contexts: DirtyBitmapContext[];
  /** Drop the image lock; after the node has closed. */
  release(): void;
}

/**
 * Open the image named by `config` through `open` with its lock and
 * bitmaps. Failures are Errors with one readable line; nothing stays open.
 */
export async function openServed(config: Config, open: () => Promise<BlockNode>): Promise<Served> {
  const file = config.image.kind === 'file' ? config.image.path : null;
  let lock: ImageLock | null = null;
  let format: 'raw' | 'qcow2' = 'raw';
  const writable = !config.readOnly && !config.snapshot;
  if (file !== null) {
    try {
      format = config.format ?? probeFormat(file, config.offset);
    } catch {
      // openImage reports a missing or unreadable file in its own words.
    }
    if (fs.existsSync(file)) {
      lock = lockImage(file, servePerms(format, writable, format === 'raw' && RawBitmapStore.exists(file)), usesDirectIo(config.cache));
    }
  }
  let node: BlockNode;
  try {
    node = await open();
  } catch (err) {
    lock?.release();
    throw err;
  }
  if (config.image.kind === 'redis') return openRedisServed(config, node, writable);
  let bitmaps: NodeBitmaps;
  try {
    // -o: a raw image inside a bigger file keeps no bitmaps of ours. A
    // read-only serve without -B has no use for them: not even read.
    const wanted = writable || config.bitmaps.length > 0;
    const store = file !== null && wanted && (format === 'qcow2' || config.offset === 0) ? storeFor(file, format, node.size) : null;
    bitmaps = await NodeBitmaps.open({ store, size: node.size, writable });
  } catch (err) {
    await node.close().catch(() => {});
    lock?.release();
    throw new Error(`cannot open '${config.imageName}': bitmaps: ${bitmapFailure(err).message}`);
  }
  // Nothing can add a bitmap while we serve: without an enabled one, no wrapper (and nothing to store).
  const tracking = bitmaps.writable && bitmaps.bitmaps.some((b) => b.enabled);
  const exported = tracking ? bitmaps.wrap(node) : node;
  let contexts: DirtyBitmapContext[];
  try {
    // qemu-nbd collects -B names by prepending to a list, so the last one
    // named gets the first id. A name given twice is offered once (qemu-nbd
    // lists it twice but selects only the first).
    contexts = bitmaps.contexts([...new Set([...config.bitmaps].reverse())], config.readOnly);
  } catch (err) {
    await exported.close().catch(() => {});
    if (!tracking) await bitmaps.close().catch(() => {});
    lock?.release();
    throw bitmapFailure(err);
  }
  return { node: exported, bitmaps, contexts, release: () => lock?.release() };
}

/** The RedisNode under the wrappers openBlockNode puts around it. */
export async function redisNodeOf(node: BlockNode): Promise<RedisNode | undefined> {
  // Loaded only for Redis disks: ioredis costs ~24 MiB of memory once imported.
  const { RedisNode } = await import('../block/redis.ts');
  let n: BlockNode | undefined = node;
  while (n !== undefined && !(n instanceof RedisNode)) n = (n as { inner?: BlockNode }).inner;
  return n;
}

/**
 * A Redis disk: its bitmaps live in Redis and the node's own scripts mark
 * them (src/block/redis-bitmaps.ts), so no wrapper and nothing to store at
 * close; no image lock either (several instances are the point). The -B
 * contexts read Redis at every query.
 */
async function openRedisServed(config: Config, node: BlockNode, writable: boolean): Promise<Served> {
  const redis = await redisNodeOf(node);
  const { redisBitmapContexts } = await import('../meta/redis-bitmaps.ts');
  const names = [...new Set([...config.bitmaps].reverse())];
  let contexts: DirtyBitmapContext[] = [];
  try {
    if (redis === undefined) throw new Error('not a Redis disk');
    contexts = await redisBitmapContexts(redis.bitmaps, names, config.readOnly, writable);
  } catch (err) {
    await node.close().catch(() => {});
    throw bitmapFailure(err);
  }
  const bitmaps = await NodeBitmaps.open({ store: null, size: node.size, writable: false });
  return { node, bitmaps, contexts, release: () => {} };
}
