// Counting the references to every host cluster of a qcow2 image by
// walking its metadata: the header cluster, the L1 table, the refcount
// table and blocks, every L2 table and every data, zero (preallocated) and
// compressed cluster they name. The writable node compares the counts with
// the stored refcounts to repair an image left dirty (lazy refcounts, see
// qcow2-write.ts), as qemu does when it opens one read/write.
import { compressedSpan, CorruptImageError, decodeL2, offsetOf, type Qcow2Header } from './qcow2-format.ts';

export interface ReferenceWalk {
  header: Qcow2Header;
  /** The active L1 table. */
  l1: Buffer;
  /** Host offsets of the refcount blocks (from the refcount table). */
  refcountBlocks: number[];
  /** Read one L2 table (a cluster) at a host offset. */
  readTable: (offset: number) => Promise<Buffer>;
  path: string;
}

/** References per host cluster index (clusters not in the map have none). */
export async function countReferences(w: ReferenceWalk): Promise<Map<number, number>> {
  const h = w.header;
  const cs = h.clusterSize;
  const refs = new Map<number, number>();
  const add = (offset: number, length: number): void => {
    const first = Math.floor(offset / cs);
    const last = Math.floor((offset + length - 1) / cs);
    for (let c = first; c <= last; c++) refs.set(c, (refs.get(c) ?? 0) + 1);
  };
  const aligned = (offset: number, what: string): void => {
    if (offset % cs !== 0) throw new CorruptImageError(w.path, `${what} offset ${offset} is not aligned`);
  };
  add(0, cs);
  if (h.l1Size > 0) add(h.l1TableOffset, h.l1Size * 8);
  add(h.refcountTableOffset, h.refcountTableClusters * cs);
  for (const b of w.refcountBlocks) {
    aligned(b, 'refcount block');
    add(b, cs);
  }
  for (let i = 0; i < h.l1Size; i++) {
    const l2 = offsetOf(w.l1.readUInt32BE(i * 8), w.l1.readUInt32BE(i * 8 + 4));
    if (l2 === 0) continue;
    aligned(l2, 'L2 table');
    add(l2, cs);
    const table = await w.readTable(l2);
    for (let j = 0; j < cs / 8; j++) {
      const e = decodeL2(table, j, h.clusterBits);
      if (e.kind === 'compressed') {
        const span = compressedSpan(e);
        add(span.start, span.end - span.start);
      } else if ((e.kind === 'normal' || e.kind === 'zero') && e.host !== 0) {
        aligned(e.host, 'cluster');
        add(e.host, cs);
      }
    }
  }
  return refs;
}
