// Where a node's persistent bitmaps live: qcow2's bitmaps extension
// (qcow2-bitmaps.ts) or, for raw images, a sidecar file of ours
// (raw-bitmaps.ts). Both follow qcow2's crash rule: a bitmap that may
// change is flagged "in use" on disk before the image may change, and the
// flag is cleared only when the bitmap is stored again after a clean stop;
// a bitmap found in use is inconsistent and is never used again (only
// removed).
import type { BitmapInfo, DirtyBitmap } from './dirty-bitmap.ts';

/** One bitmap as found on disk. */
export interface StoredBitmap {
  info: BitmapInfo;
  /** Why the bits cannot be trusted (found in use, written by a program that does not keep bitmaps...), or null. */
  inconsistent: string | null;
  /** The bits in qcow2 order, when consistent. */
  data?: Uint8Array;
}

export interface BitmapStore {
  /** For messages: "qcow2 image" or "bitmap file PATH". */
  readonly where: string;
  /** Every bitmap stored, in stored order. */
  load(): Promise<StoredBitmap[]>;
  /** Flag these bitmaps in use, durably, before anything may change them or the image. */
  markInUse(names: readonly string[]): Promise<void>;
  /**
   * Store the bitmaps as they are now, not in use; `inconsistent` names
   * entries kept as found (still in use). Every other stored bitmap goes.
   */
  save(bitmaps: readonly DirtyBitmap[], inconsistent: readonly string[]): Promise<void>;
}
