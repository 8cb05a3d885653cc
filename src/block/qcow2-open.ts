// Opening an image file by format: raw, qcow2, or probed (qcow2 by its
// magic, raw otherwise, as qemu does), with its backing chain (qcow2 or raw
// backing files, named relative to the image's folder, any depth), and
// optionally a temporary qcow2 overlay (qemu-nbd -s, see qcow2-temp.ts). What is not
// implemented is refused with one readable line.
import fs from 'node:fs';
import path from 'node:path';
import { toBlockError } from './errno.ts';
import { FileNode } from './file.ts';
import { Qcow2Node } from './qcow2.ts';
import { Qcow2WritableNode } from './qcow2-write.ts';
import { openTemporaryOverlay, temporaryDirectory } from './qcow2-temp.ts';
import { INCOMPAT_CORRUPT, isQcow2, parseHeader, unsupported, type Qcow2Header } from './qcow2-format.ts';
import { ForwardingNode } from './node.ts';
import { RangeLock } from './range-lock.ts';
import type { BlockNode, DiscardMode, WriteOptions, ZeroOptions } from './types.ts';
import { BlockError } from './types.ts';

export type ImageFormat = 'raw' | 'qcow2';
export const IMAGE_FORMATS: readonly ImageFormat[] = ['raw', 'qcow2'];

/** Backing chains deeper than this are refused (a loop that realpath cannot see, say). */
const MAX_CHAIN_DEPTH = 256;

export interface ImageOpenOptions {
  path: string;
  /** undefined: probe (qcow2 by its magic, else raw). */
  format?: ImageFormat;
  readOnly?: boolean;
  /** Bytes skipped at the start of the file (qemu-nbd -o); the image starts there. */
  offset?: number;
  direct?: boolean;
  discard?: DiscardMode;
  /** Serve through a temporary qcow2 overlay; the file is opened read-only and never changed. */
  snapshot?: boolean;
  /**
   * qcow2 auto-clear feature bits the caller keeps valid itself (the
   * bitmaps bit, while src/meta keeps the bitmaps up to date): a writable
   * top image leaves them set instead of clearing them at its first write.
   */
  keepAutoclear?: bigint;
  /** Told when buffered writes leave the event loop for a while (see LoopWriteGuard). */
  warn?: (message: string) => void;
}

/** Open an image file as a BlockNode (not yet wrapped in a CheckedNode). */
export async function openImage(opts: ImageOpenOptions): Promise<BlockNode> {
  const snapshot = opts.snapshot ?? false;
  const node = await openLayer(opts.path, {
    format: opts.format,
    readOnly: (opts.readOnly ?? false) || snapshot,
    offset: opts.offset ?? 0,
    direct: opts.direct ?? false,
    discard: snapshot ? 'ignore' : (opts.discard ?? 'ignore'),
    seen: new Set(),
    depth: 0,
    keepAutoclear: opts.keepAutoclear ?? 0n,
    warn: opts.warn,
  });
  if (!snapshot) return node;
  try {
    return await openTemporaryOverlay(node);
  } catch (err) {
    await node.close().catch(() => {});
    const e = toBlockError(err);
    throw new BlockError(e.code, `cannot make the temporary overlay for -s in ${temporaryDirectory()}: ${e.message}`);
  }
}

interface LayerOptions {
  format: ImageFormat | undefined;
  readOnly: boolean;
  offset: number;
  direct: boolean;
  discard: DiscardMode;
  /** Real paths of the layers above, to refuse loops. */
  seen: Set<string>;
  depth: number;
  /** Only for the top image (see ImageOpenOptions). */
  keepAutoclear?: bigint;
  /** Only for the top image: backing files are read-only. */
  warn?: (message: string) => void;
}

async function openLayer(file: string, o: LayerOptions): Promise<BlockNode> {
  if (o.depth > MAX_CHAIN_DEPTH) throw unsupported(`backing chain is deeper than ${MAX_CHAIN_DEPTH} images`);
  const fnode = await FileNode.open({ path: file, readOnly: o.readOnly, offset: o.offset, direct: o.direct, discard: o.discard, warn: o.warn });
  try {
    let real = file;
    try {
      real = fs.realpathSync(file);
    } catch {
      // keep the name as given
    }
    if (o.seen.has(real)) throw unsupported(`backing chain loops back to '${file}'`);
    const head = fnode.size >= 4 ? await fnode.read(0, 4) : Buffer.alloc(0);
    const format = o.format ?? (isQcow2(head) ? 'qcow2' : 'raw');
    if (format === 'raw') return o.format === undefined && !o.readOnly ? new ProbedRawNode(fnode) : fnode;
    if (!isQcow2(head)) throw new BlockError('EINVAL', 'not a qcow2 image (no qcow2 magic)');
    return await openQcow2(fnode, file, { ...o, seen: new Set([...o.seen, real]) });
  } catch (err) {
    await fnode.close().catch(() => {});
    throw toBlockError(err);
  }
}

/** Read and check the header of a qcow2 file. */
export async function readQcow2Header(fnode: BlockNode): Promise<Qcow2Header> {
  const first = await fnode.read(0, Math.min(fnode.size, 4096));
  if (first.length < 24) throw new BlockError('EINVAL', 'invalid qcow2 image: the file is too short');
  const bits = first.readUInt32BE(20);
  // Read the whole first cluster (extensions and the backing name live there); parseHeader checks bits.
  const clusterSize = bits >= 9 && bits <= 21 ? 2 ** bits : 512;
  const cluster0 = Buffer.alloc(clusterSize);
  await fnode.read(0, clusterSize, cluster0);
  return parseHeader(cluster0);
}

async function openQcow2(fnode: FileNode, file: string, o: LayerOptions): Promise<BlockNode> {
  const header = await readQcow2Header(fnode);
  if (!o.readOnly) {
    if (header.incompatible & INCOMPAT_CORRUPT) {
      throw unsupported("qcow2 image is marked corrupt; repair it with 'qemu-img check -r all' or serve it read-only (-r)");
    }
    if (header.nbSnapshots > 0) throw unsupported('writing qcow2 images with internal snapshots is not supported; serve it read-only (-r) or with -s');
  }
  const l1 = Buffer.alloc(header.l1Size * 8);
  if (l1.length > 0) await fnode.read(header.l1TableOffset, l1.length, l1);

  let backing: BlockNode | null = null;
  if (header.backingFile !== null) backing = await openBacking(file, header, o);
  try {
    const init = { file: fnode, header, l1, backing, writable: !o.readOnly, discard: o.discard, path: file };
    if (o.readOnly) return new Qcow2Node(init);
    // The writer clears the auto-clear bits it sees; hide the ones the caller keeps.
    if (o.keepAutoclear !== undefined && o.keepAutoclear !== 0n) header.autoclear &= ~o.keepAutoclear;
    return await Qcow2WritableNode.open(init);
  } catch (err) {
    await backing?.close().catch(() => {});
    throw err;
  }
}

/** The backing file of `file`: its name resolved against the image's folder, its format named or probed; read-only. */
async function openBacking(file: string, header: Qcow2Header, o: LayerOptions): Promise<BlockNode> {
  const name = header.backingFile!;
  if (/^[a-z][a-z0-9+.-]*:/i.test(name) && !fs.existsSync(path.resolve(path.dirname(file), name))) {
    throw unsupported(`backing file '${name}' is not a plain file name (protocols and json: are not supported)`);
  }
  const fmt = header.backingFormat;
  if (fmt !== null && !(IMAGE_FORMATS as readonly string[]).includes(fmt)) {
    throw unsupported(`backing file '${name}' has format '${fmt}', which is not supported (raw or qcow2)`);
  }
  const resolved = path.isAbsolute(name) ? name : path.resolve(path.dirname(file), name);
  try {
    return await openLayer(resolved, {
      format: (fmt as ImageFormat | null) ?? undefined,
      readOnly: true,
      offset: 0,
      direct: o.direct,
      discard: 'ignore',
      seen: o.seen,
      depth: o.depth + 1,
    });
  } catch (err) {
    const e = toBlockError(err);
    throw new BlockError(e.code, `backing file '${resolved}': ${e.message}`);
  }
}

/**
 * A raw image whose format was probed, not named: a write must not make it
 * look like a qcow2 image (whose backing file the writer would choose when
 * it is next probed), as qemu restricts writes to block 0 of probed images.
 */
export class ProbedRawNode extends ForwardingNode {
  readonly #lock = new RangeLock();

  override async write(offset: number, data: Buffer, opts?: WriteOptions): Promise<void> {
    if (offset >= 4) return this.inner.write(offset, data, opts);
    await this.#lock.with(0, 4, async () => {
      const head = Buffer.alloc(4);
      await this.inner.read(0, Math.min(4, this.size), head);
      data.copy(head, offset, 0, Math.min(data.length, 4 - offset));
      if (isQcow2(head)) throw new BlockError('EPERM', 'writing a qcow2 header to a probed raw image is refused (name the format with -f raw)');
      await this.inner.write(offset, data, opts);
    });
  }

  override async writeZeroes(offset: number, length: number, opts?: ZeroOptions): Promise<void> {
    if (offset >= 4) return this.inner.writeZeroes(offset, length, opts);
    await this.#lock.with(0, 4, () => this.inner.writeZeroes(offset, length, opts));
  }
}
