// Dirty bitmaps of a Redis disk, kept in Redis itself so that every
// nbd-export process serving the disk marks, and reports, the same bits.
//
// Keys of disk NAME (G = group, as in redis.ts):
//
//   nbd:{NAME}:meta         field bitmap:BITMAP = "ID GRANULARITY ENABLED(0|1)",
//                           field bitmap-seq = the last ID handed out
//   nbd:{NAME:G}:bm:ID      Redis bitmap: bit k set when granule k of group G is dirty
//   nbd:{NAME}:marks        hash ID -> GRANULARITY of the enabled bitmaps (standalone Redis)
//   nbd:{NAME:mI}:marks     the same, one copy per cluster slot the disk uses (I chosen so
//                           that {NAME:mI} hashes to that slot)
//
// Marking: the write, zero and trim scripts of redis.ts read the marks
// hash of their group and set the bits of every enabled bitmap in the same
// atomic script call as the data change, so no instance can change data
// without marking it, even if it dies right after. Nothing about bitmaps is
// cached by an instance: a change made here takes effect on the next write
// of every process.
//
// An ID is never reused: --clear gives the bitmap a new ID (atomic over
// the whole disk) and a removed or cleared bitmap's old bit keys are
// deleted afterwards. Every change to the bitmaps of a disk is one script
// on the metadata; on a standalone Redis the same script rewrites the
// marks hash, so a checkpoint (disable all, add one) is one atomic step
// for every writer. A cluster cannot run one script over every slot: the
// marks copies are then rewritten slot by slot, first to the union of the
// old and new enabled sets, then to the new set, so a write during the
// change marks the old bitmaps or the new ones or both, never neither (a
// checkpoint may see a write in both the old and the new bitmap, never in
// none). Management commands on one cluster disk should not run at once.
//
// Granularity: a power of two from 512 that divides a group's bytes, so a
// granule never spans two groups (whose keys may live on two shards).
import { BlockError } from './types.ts';
import { keySlot, runScript, script, type Client, type Script } from './redis-lua.ts';
import { Cluster } from 'ioredis';

export interface RedisBitmapInfo {
  name: string;
  /** Identifies the bits in Redis; a new one after every clear. */
  id: number;
  granularity: number;
  enabled: boolean;
}

export type RedisBitmapOp =
  | { kind: 'add' | 'checkpoint'; name: string; granularity: number }
  | { kind: 'remove' | 'clear' | 'enable' | 'disable'; name: string }
  | { kind: 'merge'; source: string; name: string };

/** An operation refused (qemu-img bitmap's wording); `index` is its position in the list given to apply(). */
export class RedisBitmapOpError extends BlockError {
  readonly index: number;
  constructor(index: number, message: string) {
    super('EINVAL', message);
    this.index = index;
  }
}

/** One run of equal state, in bytes. */
export interface DirtyRun {
  length: number;
  dirty: boolean;
}

export function bitsPrefix(disk: string, group: number): string {
  return `nbd:{${disk}:${group}}:bm:`;
}

/** Bit keys touched per step of clear, remove and merge (each step within one timeout). */
const STEP_KEYS = 1024;
/** At most this many groups' bits are read by one runs() call. */
const MAX_RUN_GROUPS = 1024;
/** And at most about this many granules. */
const MAX_RUN_GRANULES = 1 << 23;
/** Disks with more groups than this keep a marks copy in every cluster slot. */
const SLOT_SCAN_GROUPS = 1 << 16;

/**
 * Apply operations to the bitmaps of a disk. KEYS[1] metadata, KEYS[2]
 * (standalone only) the marks hash, rewritten in the same step. ARGV[1]
 * the number of operations, then kind, name, argument for each. Checks
 * every operation before changing anything: all are applied or none.
 * Answers {0, enabled before, enabled after, dropped IDs, merges (source
 * ID, target ID)...} or {index, message}.
 */
const MANAGE = script(`
local meta = KEYS[1]
local flat = redis.call('HGETALL', meta)
if #flat == 0 then return {-1, 'the disk does not exist'} end
local bms, names = {}, {}
for i = 1, #flat, 2 do
  local f = flat[i]
  if string.sub(f, 1, 7) == 'bitmap:' then
    local id, g, e = string.match(flat[i + 1], '^(%d+) (%d+) (%d)$')
    local name = string.sub(f, 8)
    bms[name] = {id = tonumber(id), g = tonumber(g), e = e == '1'}
    names[#names + 1] = name
  end
end
local seq = tonumber(redis.call('HGET', meta, 'bitmap-seq') or '0')
local function enabled()
  local out = {}
  for _, b in pairs(bms) do
    if b.e then out[#out + 1] = tostring(b.id); out[#out + 1] = tostring(b.g) end
  end
  return out
end
local before = enabled()
local dropped, merges = {}, {}
local function missing(name) return "Dirty bitmap '" .. name .. "' not found" end
for k = 1, tonumber(ARGV[1]) do
  local kind, name, arg = ARGV[k * 3 - 1], ARGV[k * 3], ARGV[k * 3 + 1]
  local b = bms[name]
  if kind == 'add' or kind == 'checkpoint' then
    if b then return {k, 'Bitmap already exists: ' .. name} end
    if kind == 'checkpoint' then for _, o in pairs(bms) do o.e = false end end
    seq = seq + 1
    bms[name] = {id = seq, g = tonumber(arg), e = true}
    names[#names + 1] = name
  elseif not b then return {k, missing(name)}
  elseif kind == 'remove' then dropped[#dropped + 1] = tostring(b.id); bms[name] = nil
  elseif kind == 'clear' then dropped[#dropped + 1] = tostring(b.id); seq = seq + 1; b.id = seq
  elseif kind == 'enable' then b.e = true
  elseif kind == 'disable' then b.e = false
  elseif kind == 'merge' then
    local src = bms[arg]
    if not src then return {k, missing(arg)} end
    if src.g ~= b.g then
      return {k, 'Bitmaps ' .. arg .. ' and ' .. name .. ' have different granularities (' .. src.g .. ' and ' .. b.g .. ')'}
    end
    merges[#merges + 1] = tostring(src.id); merges[#merges + 1] = tostring(b.id)
  else return {k, 'unknown operation ' .. kind} end
end
for _, name in ipairs(names) do
  local b = bms[name]
  if b then redis.call('HSET', meta, 'bitmap:' .. name, b.id .. ' ' .. b.g .. ' ' .. (b.e and '1' or '0'))
  else redis.call('HDEL', meta, 'bitmap:' .. name) end
end
redis.call('HSET', meta, 'bitmap-seq', seq)
local after = enabled()
if KEYS[2] then
  redis.call('DEL', KEYS[2])
  if #after > 0 then redis.call('HSET', KEYS[2], unpack(after)) end
end
return {0, before, after, dropped, merges}
`);

/** Replace a marks copy (cluster): KEYS[1] the copy, ARGV id, granularity pairs. */
const SET_MARKS = script(`
redis.call('DEL', KEYS[1])
if #ARGV > 0 then redis.call('HSET', KEYS[1], unpack(ARGV)) end
return 0
`);

export interface RedisBitmapsContext {
  client: Client;
  disk: string;
  size: number;
  chunkSize: number;
  groupChunks: number;
  /** Run one step against Redis, bounded by the disk's timeout, failures as BlockErrors. */
  op<T>(fn: () => Promise<T>): Promise<T>;
}

function parseInfo(name: string, value: string): RedisBitmapInfo | null {
  const m = /^(\d+) (\d+) ([01])$/.exec(value);
  if (m === null) return null;
  return { name, id: Number(m[1]), granularity: Number(m[2]), enabled: m[3] === '1' };
}

/** Pairs id, granularity from a script's flat answer. */
function pairs(flat: unknown): Map<string, string> {
  const out = new Map<string, string>();
  const a = (flat as unknown[]) ?? [];
  for (let i = 0; i + 1 < a.length; i += 2) out.set(String(a[i]), String(a[i + 1]));
  return out;
}

export class RedisBitmaps {
  readonly #c: RedisBitmapsContext;
  readonly #metaKey: string;
  readonly #cluster: boolean;
  /** Cluster: slot -> I such that {NAME:mI} hashes to it; filled as slots are asked for. */
  readonly #tags = new Map<number, number>();
  #scan = 0;

  constructor(c: RedisBitmapsContext) {
    this.#c = c;
    this.#metaKey = `nbd:{${c.disk}}:meta`;
    this.#cluster = c.client instanceof Cluster;
  }

  get #groupBytes(): number {
    return this.#c.chunkSize * this.#c.groupChunks;
  }

  get #groups(): number {
    return Math.ceil(Math.ceil(this.#c.size / this.#c.chunkSize) / this.#c.groupChunks);
  }

  /** Refuse a granularity that is not a power of two from 512 dividing a group's bytes. */
  checkGranularity(granularity: number): void {
    const gb = this.#groupBytes;
    if (!Number.isSafeInteger(granularity) || granularity < 512 || (granularity & (granularity - 1)) !== 0 || gb % granularity !== 0) {
      let max = 512;
      while (gb % (max * 2) === 0) max *= 2;
      const range = gb % 512 === 0 ? `512 to ${max}` : 'none';
      throw new BlockError(
        'EINVAL',
        `granularity ${granularity} does not fit this Redis disk: a power of two that divides a chunk group (${this.#c.groupChunks} chunks of ${this.#c.chunkSize} bytes) is needed (${range})`,
      );
    }
  }

  /** The marks hash the scripts of group `group` read. */
  marksKey(group: number): string {
    if (!this.#cluster) return `nbd:{${this.#c.disk}}:marks`;
    return this.#marksCopy(keySlot(`{${this.#c.disk}:${group}}`));
  }

  #marksCopy(slot: number): string {
    while (!this.#tags.has(slot)) {
      const s = keySlot(`{${this.#c.disk}:m${this.#scan}}`);
      if (!this.#tags.has(s)) this.#tags.set(s, this.#scan);
      this.#scan++;
    }
    return `nbd:{${this.#c.disk}:m${this.#tags.get(slot)}}:marks`;
  }

  /** Every cluster slot holding a group of this disk. */
  #slots(): number[] {
    const n = this.#groups;
    if (n > SLOT_SCAN_GROUPS) return Array.from({ length: 16384 }, (_, i) => i);
    const set = new Set<number>();
    for (let g = 0; g < n; g++) set.add(keySlot(`{${this.#c.disk}:${g}}`));
    return [...set];
  }

  /** Every bitmap, oldest first. */
  async list(): Promise<RedisBitmapInfo[]> {
    const flat = await this.#c.op(() => this.#c.client.hgetall(this.#metaKey));
    const out: RedisBitmapInfo[] = [];
    for (const [field, value] of Object.entries(flat)) {
      if (!field.startsWith('bitmap:')) continue;
      const info = parseInfo(field.slice(7), value);
      if (info === null) throw new BlockError('EINVAL', `Redis disk '${this.#c.disk}' has a damaged bitmap entry '${field}'`);
      out.push(info);
    }
    return out.sort((a, b) => a.id - b.id);
  }

  /** One bitmap as it is now in Redis, or undefined. */
  async get(name: string): Promise<RedisBitmapInfo | undefined> {
    const value = await this.#c.op(() => this.#c.client.hget(this.#metaKey, `bitmap:${name}`));
    if (value === null) return undefined;
    const info = parseInfo(name, value);
    if (info === null) throw new BlockError('EINVAL', `Redis disk '${this.#c.disk}' has a damaged entry for bitmap '${name}'`);
    return info;
  }

  /**
   * Apply operations in order, all or none (a refusal is a
   * RedisBitmapOpError naming the operation). Granularities are checked
   * here first. Merges and the deletion of dropped bits follow the
   * metadata change.
   */
  async apply(ops: readonly RedisBitmapOp[]): Promise<void> {
    ops.forEach((o, i) => {
      if (o.kind === 'add' || o.kind === 'checkpoint') {
        try {
          this.checkGranularity(o.granularity);
        } catch (err) {
          throw new RedisBitmapOpError(i, (err as Error).message);
        }
      }
    });
    const args: (string | number)[] = [ops.length];
    for (const o of ops) {
      args.push(o.kind, o.name, o.kind === 'add' || o.kind === 'checkpoint' ? o.granularity : o.kind === 'merge' ? o.source : '');
    }
    const keys = this.#cluster ? [this.#metaKey] : [this.#metaKey, this.marksKey(0)];
    const reply = (await this.#c.op(() => runScript(this.#c.client, MANAGE, keys, args))) as unknown[];
    const status = Number(reply[0]);
    if (status === -1) throw new BlockError('ENOENT', `Redis disk '${this.#c.disk}' does not exist`);
    if (status > 0) throw new RedisBitmapOpError(status - 1, String(reply[1]));
    const before = pairs(reply[1]);
    const after = pairs(reply[2]);
    const dropped = ((reply[3] as unknown[]) ?? []).map(String);
    const merges = ((reply[4] as unknown[]) ?? []).map(String);
    if (this.#cluster) await this.#syncCopies(before, after);
    for (let i = 0; i + 1 < merges.length; i += 2) {
      const [src, dst] = [merges[i]!, merges[i + 1]!];
      await this.#eachGroup((g) => {
        const p = bitsPrefix(this.#c.disk, g);
        return this.#c.client.bitop('OR', p + dst, p + dst, p + src);
      });
    }
    for (const id of dropped) await this.#eachGroup((g) => this.#c.client.unlink(bitsPrefix(this.#c.disk, g) + id));
  }

  /** Cluster: every marks copy to old ∪ new, then to new (see the top of this file). */
  async #syncCopies(before: Map<string, string>, after: Map<string, string>): Promise<void> {
    const same = before.size === after.size && [...before].every(([id, g]) => after.get(id) === g);
    const flat = (m: Map<string, string>) => [...m].flat();
    const steps = same ? [after] : [new Map([...before, ...after]), after];
    const slots = this.#slots();
    for (const m of steps) {
      const args = flat(m);
      for (let i = 0; i < slots.length; i += STEP_KEYS) {
        const batch = slots.slice(i, i + STEP_KEYS);
        await this.#c.op(() => Promise.all(batch.map((s) => runScript(this.#c.client, SET_MARKS as Script, [this.#marksCopy(s)], args))));
      }
    }
  }

  /** Run `fn` for every group, STEP_KEYS at a time, each step within the timeout. */
  async #eachGroup(fn: (g: number) => Promise<unknown>): Promise<void> {
    const n = this.#groups;
    for (let g0 = 0; g0 < n; g0 += STEP_KEYS) {
      const end = Math.min(n, g0 + STEP_KEYS);
      await this.#c.op(() => {
        const calls: Promise<unknown>[] = [];
        for (let g = g0; g < end; g++) calls.push(fn(g));
        return Promise.all(calls);
      });
    }
  }

  #missing(name: string): BlockError {
    return new BlockError('ENOENT', `dirty bitmap '${name}' no longer exists on Redis disk '${this.#c.disk}'`);
  }

  /**
   * Runs of equal state over [offset, offset+length), read from Redis now
   * (the bitmap's current bits, whoever set them): at least one, at most
   * `maxRuns`, covering less than asked when the range is long.
   */
  async runs(name: string, offset: number, length: number, maxRuns: number): Promise<DirtyRun[]> {
    const info = await this.get(name);
    if (info === undefined) throw this.#missing(name);
    const gran = info.granularity;
    const gb = this.#groupBytes;
    const end = Math.min(offset + length, this.#c.size);
    if (end <= offset) return [];
    const firstGroup = Math.floor(offset / gb);
    const lastGroup = Math.min(
      Math.floor((end - 1) / gb),
      firstGroup + Math.min(MAX_RUN_GROUPS, Math.max(1, Math.floor(MAX_RUN_GRANULES / (gb / gran)))) - 1,
    );
    interface Span {
      g: number;
      lo: number;
      hi: number;
    }
    const spans: Span[] = [];
    for (let g = firstGroup; g <= lastGroup; g++) {
      const from = Math.max(offset, g * gb) - g * gb;
      const to = Math.min(end, (g + 1) * gb) - g * gb;
      spans.push({ g, lo: Math.floor(from / gran), hi: Math.ceil(to / gran) });
    }
    const client = this.#c.client;
    const bufs = await this.#c.op(() =>
      Promise.all(spans.map((s) => client.getrangeBuffer(bitsPrefix(this.#c.disk, s.g) + info.id, s.lo >> 3, (s.hi - 1) >> 3))),
    );
    const runs: DirtyRun[] = [];
    const stop = Math.min(end, (lastGroup + 1) * gb);
    let runStart = offset;
    let runDirty: boolean | undefined;
    const flip = (at: number, dirty: boolean): boolean => {
      // A state change at byte `at`: close the run before it.
      if (runDirty !== undefined && at > runStart) {
        runs.push({ length: at - runStart, dirty: runDirty });
        if (runs.length >= maxRuns) return false;
        runStart = at;
      }
      runDirty = dirty;
      return true;
    };
    for (const [i, s] of spans.entries()) {
      const buf = bufs[i]!;
      const base = s.lo >> 3;
      let k = s.lo;
      while (k < s.hi) {
        const byte = buf[(k >> 3) - base] ?? 0;
        // Whole bytes in the current state are skipped.
        if ((k & 7) === 0 && k + 8 <= s.hi && byte === (runDirty === true ? 0xff : 0) && runDirty !== undefined) {
          k += 8;
          continue;
        }
        const dirty = (byte & (0x80 >> (k & 7))) !== 0;
        if (dirty !== runDirty && !flip(Math.max(offset, s.g * gb + k * gran), dirty)) return runs;
        k++;
      }
    }
    if (runDirty !== undefined && stop > runStart) runs.push({ length: stop - runStart, dirty: runDirty });
    return runs;
  }

  /** Bytes of the disk in dirty granules of bitmap `name` (a BITCOUNT per group). */
  async dirtyBytes(name: string): Promise<number> {
    const info = await this.get(name);
    if (info === undefined) throw this.#missing(name);
    let count = 0;
    await this.#eachGroup(async (g) => {
      const n = await this.#c.client.bitcount(bitsPrefix(this.#c.disk, g) + info.id);
      count += n;
    });
    const size = this.#c.size;
    const short = Math.ceil(size / info.granularity) * info.granularity - size;
    if (count > 0 && short > 0) {
      // The last granule counts only its part inside the disk.
      const lastGroup = this.#groups - 1;
      const bit = Math.floor((size - 1 - lastGroup * this.#groupBytes) / info.granularity);
      const set = await this.#c.op(() => this.#c.client.getbit(bitsPrefix(this.#c.disk, lastGroup) + info.id, bit));
      if (set === 1) count = count * info.granularity - short;
      else count *= info.granularity;
      return count;
    }
    return count * info.granularity;
  }
}
