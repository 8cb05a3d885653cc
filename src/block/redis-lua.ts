// Lua scripts and cluster slots, shared by the Redis node (redis.ts) and
// its dirty bitmaps (redis-bitmaps.ts).
import { createHash } from 'node:crypto';
import type { Cluster, Redis } from 'ioredis';

export type Client = Redis | Cluster;
export type Arg = string | Buffer | number;

export interface Script {
  lua: string;
  sha: string;
}

export function script(lua: string): Script {
  return { lua, sha: createHash('sha1').update(lua).digest('hex') };
}

// CRC16/XMODEM, Redis Cluster's key hash.
const CRC_TABLE = (() => {
  const t = new Uint16Array(256);
  for (let i = 0; i < 256; i++) {
    let c = i << 8;
    for (let k = 0; k < 8; k++) c = c & 0x8000 ? ((c << 1) ^ 0x1021) & 0xffff : (c << 1) & 0xffff;
    t[i] = c;
  }
  return t;
})();

/** The cluster slot of a key (hash tags honoured). */
export function keySlot(key: string): number {
  let s = key;
  const open = key.indexOf('{');
  if (open >= 0) {
    const close = key.indexOf('}', open + 1);
    if (close > open + 1) s = key.slice(open + 1, close);
  }
  let crc = 0;
  for (const b of Buffer.from(s)) crc = ((crc << 8) & 0xffff) ^ CRC_TABLE[((crc >> 8) ^ b) & 0xff]!;
  return crc & 16383;
}

/** EVALSHA, falling back to EVAL the first time a server has not seen the script. */
export async function runScript(client: Client, s: Script, keys: string[], args: Arg[]): Promise<unknown> {
  try {
    return await client.evalsha(s.sha, keys.length, ...keys, ...args);
  } catch (err) {
    if (!(err instanceof Error && err.message.startsWith('NOSCRIPT'))) throw err;
    return client.eval(s.lua, keys.length, ...keys, ...args);
  }
}

