// The `qemu:dirty-bitmap:NAME` metadata context (qemu's docs/interop/nbd.txt):
// bit 0 of each extent's flags is 1 where the bitmap is dirty, 0 where it
// is clean, at the bitmap's granularity, clipped to the request, as
// qemu-nbd's bitmap_to_extents sends it.
import type { MetaContext, StatusRun } from './context.ts';
import type { BitmapRun } from './dirty-bitmap.ts';

export const DIRTY_BITMAP_NAMESPACE = 'qemu:dirty-bitmap:';
export const STATE_DIRTY = 1 << 0;

/**
 * Where a context reads a bitmap: the in-memory DirtyBitmap of a file
 * image, or a bitmap kept in Redis (redis-bitmaps.ts) read at each query.
 */
export interface DirtyBitmapSource {
  readonly name: string;
  runs(offset: number, length: number, maxRuns: number): BitmapRun[] | Promise<BitmapRun[]>;
  /** For metrics: cheap, may lag (Redis). */
  dirtyBytes(): number;
}

export class DirtyBitmapContext<B extends DirtyBitmapSource = DirtyBitmapSource> implements MetaContext {
  readonly name: string;
  readonly bitmap: B;

  constructor(bitmap: B) {
    this.bitmap = bitmap;
    this.name = `${DIRTY_BITMAP_NAMESPACE}${bitmap.name}`;
  }

  async status(offset: number, length: number, maxRuns: number): Promise<StatusRun[]> {
    return (await this.bitmap.runs(offset, length, maxRuns)).map((r) => ({ length: r.length, flags: r.dirty ? STATE_DIRTY : 0 }));
  }
}
