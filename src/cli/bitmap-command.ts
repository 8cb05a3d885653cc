// `nbd-export bitmap IMAGE OPS... [NAME]`: manage an image's persistent
// dirty bitmaps without QEMU, as `qemu-img bitmap` does for qcow2 images,
// and for raw images (their sidecar file). Operations run in the order
// given; either all succeed and are stored, or none is. The image is
// locked as qemu-img locks it, so this refuses while a server (ours,
// qemu-nbd, QEMU) has the image open in a conflicting way.
//
// Beyond qemu-img: --list, and --checkpoint NEW, which disables every
// enabled bitmap and adds NEW, enabled, in one store: a backup tool rotates
// bitmaps with no write missed between the old bitmap and the new one.
import fs from 'node:fs';
import { FileNode } from '../block/file.ts';
import { PERM_CONSISTENT_READ, PERM_RESIZE, PERM_WRITE } from '../block/image-lock.ts';
import { readQcow2Header } from '../block/qcow2-open.ts';
import { RedisBitmapOpError, type RedisBitmapOp } from '../block/redis-bitmaps.ts';
import { isRedisUrl, parseRedisUrl } from '../block/redis-url.ts';
import { RedisNode } from '../block/redis.ts';
import { bitmapFailure, NodeBitmaps } from '../meta/bitmaps.ts';
import { applyRedisBitmapOps, listRedisBitmaps } from '../meta/redis-bitmaps.ts';
import { DEFAULT_GRANULARITY } from '../meta/dirty-bitmap.ts';
import { EDIT_PERMS, lockImage, probeFormat, storeFor } from './bitmap-serve.ts';
import { formatSize, parseSize, UsageError } from './size.ts';

type Op =
  | { kind: 'add' | 'remove' | 'clear' | 'enable' | 'disable' }
  | { kind: 'merge'; source: string }
  | { kind: 'checkpoint'; name: string }
  | { kind: 'list' };

export interface BitmapCommand {
  image: string;
  format: 'raw' | 'qcow2' | undefined;
  ops: Op[];
  name: string | undefined;
  granularity: number | undefined;
}

export const BITMAP_USAGE = `Usage: nbd-export bitmap [-f raw|qcow2] OPERATION... [-g GRANULARITY] IMAGE [NAME]

Manage the persistent dirty bitmaps of IMAGE (qcow2: in the image, as qemu-img
bitmap does; raw: in IMAGE.bitmaps beside it; a Redis disk URL: in Redis, while
it is served). Operations run in order; either all of them are stored or none
is. Refused while an image file is in use.

  --add               add NAME (enabled; -g GRANULARITY, default 64K)
  --remove            remove NAME
  --clear             clear every bit of NAME
  --enable            NAME tracks writes again
  --disable           NAME stops tracking writes
  --merge SOURCE      set in NAME every bit set in SOURCE
  --checkpoint NEW    disable every enabled bitmap and add NEW, enabled, at once
  --list              print the bitmaps
  -g, --granularity   granule size for --add and --checkpoint (512 to 2G, a power of 2)
  -f, --format        raw or qcow2 (default: probe)`;

const SIMPLE = new Set(['add', 'remove', 'clear', 'enable', 'disable']);

/** Parse the arguments after `bitmap`; null when --help was asked. Operations keep their order, so this is no yargs parser. */
export function parseBitmapArgs(argv: readonly string[]): BitmapCommand | null {
  const ops: Op[] = [];
  const positional: string[] = [];
  let format: BitmapCommand['format'];
  let granularity: number | undefined;
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    const eq = arg.startsWith('--') ? arg.indexOf('=') : -1;
    const flag = eq > 0 ? arg.slice(0, eq) : arg;
    const value = (): string => {
      if (eq > 0) return arg.slice(eq + 1);
      const v = argv[++i];
      if (v === undefined) throw new UsageError(`${flag} needs a value`);
      return v;
    };
    if (flag === '-h' || flag === '--help') return null;
    if (flag.startsWith('--') && SIMPLE.has(flag.slice(2))) {
      if (eq > 0) throw new UsageError(`${flag} takes no value`);
      ops.push({ kind: flag.slice(2) as 'add' });
    } else if (flag === '--merge') ops.push({ kind: 'merge', source: value() });
    else if (flag === '--checkpoint') ops.push({ kind: 'checkpoint', name: value() });
    else if (flag === '--list' || flag === '-l') ops.push({ kind: 'list' });
    else if (flag === '-g' || flag === '--granularity') granularity = parseSize(value(), '--granularity');
    else if (flag === '-f' || flag === '--format') {
      const f = value();
      if (f !== 'raw' && f !== 'qcow2') throw new UsageError(`format '${f}' is not supported (raw or qcow2)`);
      format = f;
    } else if (flag.startsWith('-') && flag !== '-') throw new UsageError(`unknown option '${flag}' for bitmap`);
    else positional.push(arg);
  }
  if (ops.length === 0) throw new UsageError('Need at least one of --add, --remove, --clear, --enable, --disable, --merge, --checkpoint or --list');
  const needsName = ops.some((o) => o.kind !== 'list' && o.kind !== 'checkpoint');
  if (positional.length === 0) throw new UsageError('missing IMAGE');
  if (needsName && positional.length < 2) throw new UsageError('Expecting image file name and bitmap name');
  if (positional.length > (needsName ? 2 : 1)) throw new UsageError(`unexpected argument '${positional[needsName ? 2 : 1]}'`);
  if (granularity !== undefined && !ops.some((o) => o.kind === 'add' || o.kind === 'checkpoint')) {
    throw new UsageError('granularity only supported with --add or --checkpoint');
  }
  return { image: positional[0]!, format, ops, name: needsName ? positional[1] : undefined, granularity };
}

/** The virtual size of the image (qcow2: from its header; raw: the file or device). */
async function imageSize(path: string, format: 'raw' | 'qcow2'): Promise<number> {
  const f = await FileNode.open({ path, readOnly: true });
  try {
    return format === 'qcow2' ? (await readQcow2Header(f)).size : f.size;
  } finally {
    await f.close();
  }
}

function listing(b: NodeBitmaps): string {
  return b
    .list()
    .map((x) => {
      const state = x.inconsistent !== null ? `inconsistent: ${x.inconsistent}` : `${x.enabled ? 'enabled' : 'disabled'}, ${x.dirtyBytes} dirty bytes`;
      return `${x.name}: granularity ${formatSize(x.granularity)}, ${state}\n`;
    })
    .join('');
}

/** Run the subcommand; returns the exit status. Messages go to stderr as one line each, like qemu-img's. */
export async function bitmapCommand(argv: readonly string[], out: (s: string) => void = (s) => process.stdout.write(s)): Promise<number> {
  let cmd: BitmapCommand | null;
  try {
    cmd = parseBitmapArgs(argv);
  } catch (err) {
    process.stderr.write(`nbd-export bitmap: ${(err as Error).message}\nTry 'nbd-export bitmap --help' for more information.\n`);
    return 1;
  }
  if (cmd === null) {
    out(`${BITMAP_USAGE}\n`);
    return 0;
  }
  try {
    await runBitmapCommand(cmd, out);
    return 0;
  } catch (err) {
    process.stderr.write(`nbd-export: ${(err as Error).message}\n`);
    return 1;
  }
}

export async function runBitmapCommand(cmd: BitmapCommand, out: (s: string) => void): Promise<void> {
  if (isRedisUrl(cmd.image)) return runRedisBitmapCommand(cmd, out);
  if (!fs.existsSync(cmd.image)) throw new Error(`cannot open '${cmd.image}': No such file or directory`);
  const format = cmd.format ?? probeFormat(cmd.image);
  const changes = cmd.ops.some((o) => o.kind !== 'list');
  // Only reading: conflict with writers only, as `qemu-img info` does.
  const perms = changes ? EDIT_PERMS : { perm: [PERM_CONSISTENT_READ], unshared: [PERM_WRITE, PERM_RESIZE] };
  const lock = lockImage(cmd.image, perms);
  try {
    const size = await imageSize(cmd.image, format);
    let bitmaps: NodeBitmaps;
    try {
      bitmaps = await NodeBitmaps.open({ store: storeFor(cmd.image, format, size), size, writable: false });
    } catch (err) {
      throw new Error(`cannot read the bitmaps of '${cmd.image}': ${bitmapFailure(err).message}`);
    }
    const granularity = cmd.granularity ?? DEFAULT_GRANULARITY;
    for (const op of cmd.ops) {
      const name = cmd.name ?? '';
      try {
        switch (op.kind) {
          case 'add':
            bitmaps.add(name, granularity, true);
            break;
          case 'remove':
            bitmaps.remove(name);
            break;
          case 'clear':
            bitmaps.clear(name);
            break;
          case 'enable':
            bitmaps.enable(name);
            break;
          case 'disable':
            bitmaps.disable(name);
            break;
          case 'merge':
            bitmaps.merge(op.source, name);
            break;
          case 'checkpoint':
            bitmaps.checkpoint(op.name, granularity);
            break;
          case 'list':
            out(listing(bitmaps));
            break;
        }
      } catch (err) {
        const target = op.kind === 'checkpoint' ? op.name : name;
        throw new Error(`Operation ${op.kind} on bitmap ${target} failed: ${bitmapFailure(err).message}`);
      }
    }
    if (changes) {
      try {
        await bitmaps.save();
      } catch (err) {
        throw new Error(`cannot store the bitmaps of '${cmd.image}': ${bitmapFailure(err).message}`);
      }
    }
  } finally {
    lock.release();
  }
}

/**
 * A Redis disk (redis://...?disk=NAME): its bitmaps live in Redis and may
 * change while any number of instances serve the disk, so there is no
 * lock. The operations before each --list (all of them when there is
 * none) are one atomic change (src/block/redis-bitmaps.ts).
 */
async function runRedisBitmapCommand(cmd: BitmapCommand, out: (s: string) => void): Promise<void> {
  if (cmd.format !== undefined) throw new Error('-f applies to image files, not Redis disks');
  let node: RedisNode;
  try {
    node = await RedisNode.open({ target: parseRedisUrl(cmd.image) });
  } catch (err) {
    throw new Error(`cannot open '${cmd.image}': ${err instanceof Error ? err.message : String(err)}`);
  }
  try {
    const granularity = cmd.granularity ?? DEFAULT_GRANULARITY;
    const name = cmd.name ?? '';
    let pending: RedisBitmapOp[] = [];
    const flush = async () => {
      const ops = pending;
      pending = [];
      if (ops.length === 0) return;
      try {
        await applyRedisBitmapOps(node.bitmaps, ops);
      } catch (err) {
        if (!(err instanceof RedisBitmapOpError)) throw new Error(`cannot change the bitmaps of '${cmd.image}': ${bitmapFailure(err).message}`);
        const op = ops[err.index]!;
        throw new Error(`Operation ${op.kind} on bitmap ${op.name} failed: ${err.message}`);
      }
    };
    for (const op of cmd.ops) {
      switch (op.kind) {
        case 'list': {
          await flush();
          for (const b of await listRedisBitmaps(node.bitmaps)) {
            out(`${b.name}: granularity ${formatSize(b.granularity)}, ${b.enabled ? 'enabled' : 'disabled'}, ${b.dirtyBytes} dirty bytes\n`);
          }
          break;
        }
        case 'checkpoint':
          pending.push({ kind: 'checkpoint', name: op.name, granularity });
          break;
        case 'add':
          pending.push({ kind: 'add', name, granularity });
          break;
        case 'merge':
          pending.push({ kind: 'merge', source: op.source, name });
          break;
        default:
          pending.push({ kind: op.kind, name });
      }
    }
    await flush();
  } finally {
    await node.close().catch(() => {});
  }
}
