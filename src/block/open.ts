// Build a block node stack from plain options: a backend wrapped in the one
// CheckedNode. cache=none and cache=directsync open the file with O_DIRECT.
import { FileNode } from './file.ts';
import { MemoryNode } from './memory.ts';
import { CheckedNode } from './node.ts';
import type { CacheMode, DetectZeroesMode, DiscardMode } from './types.ts';

export interface CommonNodeSpec {
  readOnly?: boolean;
  /** Default 'writeback'. */
  cache?: CacheMode;
  /** Default 'ignore'. */
  discard?: DiscardMode;
  /** Default 'off'. */
  detectZeroes?: DetectZeroesMode;
}

export interface FileNodeSpec extends CommonNodeSpec {
  kind: 'file';
  /** A regular file or a block device. */
  path: string;
  /** Bytes skipped at the start of the file (qemu-nbd -o). Default 0. */
  offset?: number;
}

export interface MemoryNodeSpec extends CommonNodeSpec {
  kind: 'memory';
  /** Size in bytes, up to 2^53. */
  size: number;
}

export type BlockNodeSpec = FileNodeSpec | MemoryNodeSpec;

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
      : await FileNode.open({
          path: spec.path,
          readOnly: spec.readOnly ?? false,
          offset: spec.offset ?? 0,
          direct: usesDirectIo(spec.cache),
          discard,
        });
  return new CheckedNode(inner, {
    readOnly: spec.readOnly ?? false,
    cache: spec.cache ?? 'writeback',
    discard,
    detectZeroes: spec.detectZeroes ?? 'off',
  });
}
