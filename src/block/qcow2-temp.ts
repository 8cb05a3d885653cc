// qemu-nbd -s: the served image under a temporary qcow2 overlay, as qemu
// makes one (64 KiB clusters, in $TMPDIR or /var/tmp). Writes, zeroes and
// trims land in the overlay; the image below is opened read-only and never
// changes. The overlay file is unlinked as soon as it is open, so nothing
// is left behind at exit, even after a crash, and its size is bounded by
// the disk, not by memory. Its flushes do nothing: the data is thrown away
// anyway (qemu's temporary overlay is cache.no-flush too).
import fs from 'node:fs';
import path from 'node:path';
import { FileNode } from './file.ts';
import { ForwardingNode } from './node.ts';
import { emptyImage, parseHeader } from './qcow2-format.ts';
import { Qcow2WritableNode } from './qcow2-write.ts';
import type { BlockNode, WriteOptions, ZeroOptions } from './types.ts';

/** Cluster size of the overlay (qemu's default, so maps and depths look like qemu-nbd's). */
const OVERLAY_CLUSTER_BITS = 16;

/** Where the overlay file is made: $TMPDIR, else /var/tmp (as qemu does). */
export function temporaryDirectory(): string {
  const t = process.env.TMPDIR;
  return t !== undefined && t !== '' ? t : '/var/tmp';
}

/** A file whose flushes do nothing (its contents die with the process). */
class VolatileFile extends ForwardingNode {
  override write(offset: number, data: Buffer, _opts?: WriteOptions): Promise<void> {
    return this.inner.write(offset, data);
  }

  override async flush(): Promise<void> {}

  override trim(offset: number, length: number, _opts?: WriteOptions): Promise<void> {
    return this.inner.trim(offset, length);
  }

  override writeZeroes(offset: number, length: number, opts?: ZeroOptions): Promise<void> {
    return this.inner.writeZeroes(offset, length, { ...opts, fua: false });
  }
}

/**
 * `base` (opened read-only) under a new temporary qcow2 overlay of the same
 * size. The overlay owns `base` from then on: closing it closes both. On
 * failure `base` is left open for the caller to close.
 */
export async function openTemporaryOverlay(base: BlockNode, dir = temporaryDirectory()): Promise<Qcow2WritableNode> {
  const image = emptyImage(base.size, OVERLAY_CLUSTER_BITS);
  const folder = await fs.promises.mkdtemp(path.join(dir, 'nbd-export-snapshot-'));
  const file = path.join(folder, 'overlay.qcow2');
  let fnode: FileNode;
  try {
    await fs.promises.writeFile(file, image, { flag: 'wx', mode: 0o600 });
    fnode = await FileNode.open({ path: file, readOnly: false, discard: 'unmap' });
  } finally {
    await fs.promises.rm(folder, { recursive: true, force: true });
  }
  try {
    const header = parseHeader(image);
    const l1 = Buffer.from(image.subarray(header.l1TableOffset, header.l1TableOffset + header.l1Size * 8));
    return await Qcow2WritableNode.open({ file: new VolatileFile(fnode), header, l1, backing: base, writable: true, discard: 'unmap', path: file });
  } catch (err) {
    await fnode.close().catch(() => {});
    throw err;
  }
}
