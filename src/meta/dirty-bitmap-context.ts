// The `qemu:dirty-bitmap:NAME` metadata context (qemu's docs/interop/nbd.txt):
// bit 0 of each extent's flags is 1 where the bitmap is dirty, 0 where it
// is clean, at the bitmap's granularity, clipped to the request, as
// qemu-nbd's bitmap_to_extents sends it.
import type { MetaContext, StatusRun } from './context.ts';
import type { DirtyBitmap } from './dirty-bitmap.ts';

export const DIRTY_BITMAP_NAMESPACE = 'qemu:dirty-bitmap:';
export const STATE_DIRTY = 1 << 0;

export class DirtyBitmapContext implements MetaContext {
  readonly name: string;
  readonly bitmap: DirtyBitmap;

  constructor(bitmap: DirtyBitmap) {
    this.bitmap = bitmap;
    this.name = `${DIRTY_BITMAP_NAMESPACE}${bitmap.name}`;
  }

  async status(offset: number, length: number, maxRuns: number): Promise<StatusRun[]> {
    return this.bitmap.runs(offset, length, maxRuns).map((r) => ({ length: r.length, flags: r.dirty ? STATE_DIRTY : 0 }));
  }
}
