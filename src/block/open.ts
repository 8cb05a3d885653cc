// Build a block node stack from plain options: a backend wrapped in the one
// CheckedNode. cache=none and cache=directsync open the file with O_DIRECT.
import { MemoryNode } from './memory.ts';
import { CheckedNode } from './node.ts';
import type { RedisTarget } from './redis-url.ts';
import { openImage, type ImageFormat } from './qcow2-open.ts';
import type { CacheMode, DetectZeroesMode, DiscardMode } from './types.ts';

export interface CommonNodeSpec {
  readOnly?: boolean;
  /** Default 'writeback'. */
  cache?: CacheMode;
  /** Default 'ignore'. */
  discard?: DiscardMode;
  /** Default 'off'. */
  detectZeroes?: DetectZeroesMode;
  /** Told about trouble the backend works around (a lost Redis connection, file writes sent off the event loop). */
  warn?: (message: string) => void;
}

export interface FileNodeSpec extends CommonNodeSpec {
  kind: 'file';
  /** A regular file or a block device. */
  path: string;
  /** Bytes skipped at the start of the file (qemu-nbd -o). Default 0. */
  offset?: number;
  /** 'raw' or 'qcow2'; undefined probes (qcow2 by its magic, else raw). */
  format?: ImageFormat;
  /** Serve through a temporary qcow2 overlay; the file is never changed (qemu-nbd -s). */
  snapshot?: boolean;
  /** qcow2 auto-clear bits the caller keeps valid (see ImageOpenOptions.keepAutoclear). */
  keepAutoclear?: bigint;
}

export interface MemoryNodeSpec extends CommonNodeSpec {
  kind: 'memory';
  /** Size in bytes, up to 2^53. */
  size: number;
}

export interface RedisNodeSpec extends CommonNodeSpec {
  kind: 'redis';
  /** A parsed Redis disk URL (see redis-url.ts). */
  target: RedisTarget;
  /** Create the disk with this size when it does not exist yet. */
  size?: number;
}

export type BlockNodeSpec = FileNodeSpec | MemoryNodeSpec | RedisNodeSpec;

/** True for the cache modes that bypass the host page cache (O_DIRECT). */
export function usesDirectIo(cache: CacheMode | undefined): boolean {
  return cache === 'none' || cache === 'directsync';
}

/**
 * Open the backend named by `spec` and wrap it in a CheckedNode. Fails with
 * a BlockError named by errno (ENOENT, EACCES, EROFS, EISDIR, EINVAL...).
 */
export async function openBlockNode(spec: BlockNodeSpec): Promise<CheckedNode> {
  const discard = spec.discard ?? 'ignore';
  const inner =
    spec.kind === 'memory'
      ? new MemoryNode(spec.size)
      : spec.kind === 'redis'
        ? await (await import('./redis.ts')).RedisNode.open({ target: spec.target, size: spec.size, readOnly: spec.readOnly ?? false, warn: spec.warn })
        : await openImage({
          path: spec.path,
          format: spec.format,
          snapshot: spec.snapshot,
          readOnly: spec.readOnly ?? false,
          offset: spec.offset ?? 0,
          direct: usesDirectIo(spec.cache),
          discard,
          keepAutoclear: spec.keepAutoclear,
          warn: spec.warn,
        });
  return new CheckedNode(inner, {
    readOnly: spec.readOnly ?? false,
    cache: spec.cache ?? 'writeback',
    discard,
    detectZeroes: spec.detectZeroes ?? 'off',
  });
}
