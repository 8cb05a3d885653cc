// The URL that names a Redis-backed disk, given where an image file name
// goes on the command line:
//
//   redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]?disk=NAME[&...]
//   rediss://...                           the same over TLS
//   redis+unix:///PATH/TO/redis.sock?disk=NAME[&db=N][&...]
//   redis+cluster://HOST:PORT[,HOST:PORT...]?disk=NAME[&...]
//   rediss+cluster://...                   a cluster over TLS
//
// Parameters (all but disk optional):
//   disk=NAME       the disk: letters, digits, '.', '_', '-' (up to 200)
//   size=SIZE       create the disk with this size if it does not exist (K, M, G, T, P suffixes)
//   chunk=SIZE      chunk size when creating (default 64K; a power of two from 512 to 16M)
//   group=N         chunks per hash-tag group when creating (default 256)
//   wait=N          FLUSH and FUA wait until N replicas have the writes (WAIT)
//   waitaof=1       FLUSH and FUA wait until the writes are fsynced to the AOF (WAITAOF, Redis >= 7.2)
//   waittimeout=MS  how long WAIT/WAITAOF may take (default: half of timeout)
//   timeout=MS      every request fails with EIO after this long (default 5000)
//   user=, password=  credentials (also as USER:PASSWORD@ for TCP forms)
//   db=N            database number for redis+unix (TCP forms use the path)
//   ca=PATH         a PEM CA bundle to trust for rediss:// (besides the system's)
import { BlockError } from './types.ts';

export type RedisScheme = 'redis' | 'rediss' | 'redis+unix' | 'redis+cluster' | 'rediss+cluster';

export interface RedisEndpoint {
  host: string;
  port: number;
}

export interface RedisTarget {
  scheme: RedisScheme;
  tls: boolean;
  cluster: boolean;
  /** TCP endpoints: one for redis/rediss, the seed nodes for a cluster; empty for a Unix socket. */
  hosts: RedisEndpoint[];
  /** The Unix socket path (redis+unix). */
  path: string | undefined;
  db: number;
  username: string | undefined;
  password: string | undefined;
  disk: string;
  /** Create the disk with this size when it does not exist. */
  size: number | undefined;
  /** Chunk size asked for (checked against an existing disk). */
  chunkSize: number | undefined;
  /** Chunks per group asked for (checked against an existing disk). */
  groupChunks: number | undefined;
  /** Replicas WAIT must reach on FLUSH and FUA; 0 = no WAIT. */
  wait: number;
  /** Local AOF fsyncs WAITAOF must reach on FLUSH and FUA (0 or 1); 0 = no WAITAOF. */
  waitAof: number;
  waitTimeoutMs: number;
  /** Bound on every request, and on connecting. */
  timeoutMs: number;
  /** A CA file for TLS. */
  ca: string | undefined;
  /** The URL with any password replaced by '***', for messages. */
  display: string;
}

export const DEFAULT_REDIS_TIMEOUT_MS = 5000;
export const DEFAULT_REDIS_PORT = 6379;
export const DISK_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$/;

const SCHEMES: readonly RedisScheme[] = ['redis', 'rediss', 'redis+unix', 'redis+cluster', 'rediss+cluster'];
const PARAMS = new Set(['disk', 'size', 'chunk', 'group', 'wait', 'waitaof', 'waittimeout', 'timeout', 'user', 'password', 'db', 'ca']);

/** True when `text` is meant as a Redis disk URL (so a file of that name is not looked for). */
export function isRedisUrl(text: string): boolean {
  return /^rediss?(\+[a-z]+)?:\/\//i.test(text);
}

function bad(text: string): never {
  throw new BlockError('EINVAL', text);
}

const SUFFIX: Record<string, number> = { '': 1, b: 1, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30, t: 2 ** 40, p: 2 ** 50 };

/** "64K", "4096", "1G" -> bytes. */
export function parseRedisSize(text: string, what: string): number {
  const m = /^(\d+(?:\.\d+)?)([bkmgtp]?)(?:i?b)?$/i.exec(text.trim());
  if (m === null) bad(`invalid ${what} '${text}' (expected a number with an optional K, M, G, T or P suffix)`);
  const n = Number(m[1]) * SUFFIX[m[2]!.toLowerCase()]!;
  if (!Number.isSafeInteger(n)) bad(`invalid ${what} '${text}' (not a whole number of bytes below 2^53)`);
  return n;
}

function integer(text: string, what: string, min: number, max: number): number {
  if (!/^\d+$/.test(text)) bad(`invalid ${what} '${text}' (expected a whole number)`);
  const n = Number(text);
  if (n < min || n > max) bad(`invalid ${what} '${text}' (expected ${min} to ${max})`);
  return n;
}

function decode(text: string, what: string): string {
  try {
    return decodeURIComponent(text);
  } catch {
    return bad(`invalid ${what} in the Redis URL (bad %-escape)`);
  }
}

function endpoint(text: string, scheme: string): RedisEndpoint {
  const m = /^(?:\[([0-9A-Fa-f:.]+)\]|([^:[\]]+))(?::(\d+))?$/.exec(text);
  if (m === null) bad(`invalid host '${text}' in ${scheme}:// URL (expected HOST[:PORT])`);
  const host = m[1] ?? m[2]!;
  const port = m[3] === undefined ? DEFAULT_REDIS_PORT : integer(m[3], 'Redis port', 1, 65535);
  return { host, port };
}

/** A chunk size is a power of two from 512 bytes to 16 MiB. */
export function checkChunkSize(n: number): void {
  if (!(Number.isSafeInteger(n) && n >= 512 && n <= 16 * 1024 * 1024 && (n & (n - 1)) === 0)) {
    bad(`invalid chunk size ${n} (a power of two from 512 to 16M)`);
  }
}

/** Parse a Redis disk URL; throws a BlockError('EINVAL') with a one-line message. */
export function parseRedisUrl(text: string): RedisTarget {
  const m = /^([a-z+]+):\/\/(?:([^@/?#]*)@)?([^/?#]*)(\/[^?#]*)?(?:\?([^#]*))?$/i.exec(text);
  if (m === null) bad(`invalid Redis URL '${text}'`);
  const scheme = m[1]!.toLowerCase() as RedisScheme;
  if (!SCHEMES.includes(scheme)) bad(`unknown URL scheme '${m[1]}://' (expected ${SCHEMES.map((s) => `${s}://`).join(', ')})`);
  const userinfo = m[2];
  const authority = m[3]!;
  const pathPart = m[4] ?? '';
  const query = m[5] ?? '';
  const cluster = scheme.endsWith('+cluster');
  const unix = scheme === 'redis+unix';

  const params = new Map<string, string>();
  for (const part of query.split('&')) {
    if (part === '') continue;
    const eq = part.indexOf('=');
    const key = decode(eq < 0 ? part : part.slice(0, eq), 'parameter name');
    const value = decode(eq < 0 ? '' : part.slice(eq + 1).replace(/\+/g, ' '), `parameter '${key}'`);
    if (!PARAMS.has(key)) bad(`unknown parameter '${key}' in the Redis URL (known: ${[...PARAMS].join(', ')})`);
    if (params.has(key)) bad(`parameter '${key}' given twice in the Redis URL`);
    params.set(key, value);
  }

  let username: string | undefined;
  let password: string | undefined;
  if (userinfo !== undefined) {
    const colon = userinfo.indexOf(':');
    const user = decode(colon < 0 ? userinfo : userinfo.slice(0, colon), 'user name');
    username = user === '' ? undefined : user;
    password = colon < 0 ? undefined : decode(userinfo.slice(colon + 1), 'password');
    // redis://secret@host means a password, as with redis-cli -u.
    if (colon < 0) [username, password] = [undefined, user];
  }
  if (params.has('user')) username = params.get('user');
  if (params.has('password')) password = params.get('password');

  let hosts: RedisEndpoint[] = [];
  let path: string | undefined;
  let db = 0;
  if (unix) {
    if (authority !== '' && authority !== 'localhost') bad(`a redis+unix:// URL has no host ('${authority}'): use redis+unix:///PATH/TO/redis.sock?disk=NAME`);
    path = decode(pathPart, 'socket path');
    if (path === '' || path === '/') bad('a redis+unix:// URL needs the socket path: redis+unix:///PATH/TO/redis.sock?disk=NAME');
    if (params.has('db')) db = integer(params.get('db')!, 'Redis database', 0, 1_000_000);
  } else {
    if (authority === '') bad(`a ${scheme}:// URL needs a host`);
    if (params.has('db')) bad(`use the path for the database in a ${scheme}:// URL (${scheme}://HOST:PORT/DB)`);
    hosts = cluster ? authority.split(',').map((h) => endpoint(h, scheme)) : [endpoint(authority, scheme)];
    if (!cluster && hosts.length !== 1) bad(`a ${scheme}:// URL names one host`);
    const dbText = pathPart.replace(/^\//, '');
    if (dbText !== '') db = integer(dbText, 'Redis database', 0, 1_000_000);
    if (cluster && db !== 0) bad('a Redis cluster has only database 0');
  }

  const diskName = params.get('disk');
  if (diskName === undefined || diskName === '') bad(`the Redis URL needs the disk's name: ...?disk=NAME`);
  if (!DISK_NAME.test(diskName)) bad(`invalid disk name '${diskName}' (letters, digits, '.', '_' and '-', up to 200)`);

  const size = params.has('size') ? parseRedisSize(params.get('size')!, 'disk size') : undefined;
  const chunkSize = params.has('chunk') ? parseRedisSize(params.get('chunk')!, 'chunk size') : undefined;
  if (chunkSize !== undefined) checkChunkSize(chunkSize);
  const groupChunks = params.has('group') ? integer(params.get('group')!, 'group (chunks per group)', 1, 65536) : undefined;
  const wait = params.has('wait') ? integer(params.get('wait')!, 'wait (replicas)', 0, 1000) : 0;
  const waitAof = params.has('waitaof') ? integer(params.get('waitaof')!, 'waitaof', 0, 1) : 0;
  const timeoutMs = params.has('timeout') ? integer(params.get('timeout')!, 'timeout (ms)', 100, 3_600_000) : DEFAULT_REDIS_TIMEOUT_MS;
  const waitTimeoutMs = params.has('waittimeout')
    ? integer(params.get('waittimeout')!, 'waittimeout (ms)', 1, timeoutMs - 50)
    : Math.floor(timeoutMs / 2);
  const ca = params.get('ca');
  const tls = scheme === 'rediss' || scheme === 'rediss+cluster';
  if (ca !== undefined && !tls) bad(`ca= applies to rediss:// URLs only`);

  const display = password === undefined ? text : text.replace(/^([a-z+]+:\/\/)([^@/?#]*@)?/i, (_all, s: string, u: string | undefined) => {
    if (u === undefined) return s;
    const colon = u.indexOf(':');
    return colon < 0 ? `${s}***@` : `${s}${u.slice(0, colon)}:***@`;
  }).replace(/([?&]password=)[^&#]*/, '$1***');

  return {
    scheme,
    tls,
    cluster,
    hosts,
    path,
    db,
    username,
    password,
    disk: diskName,
    size,
    chunkSize,
    groupChunks,
    wait,
    waitAof,
    waitTimeoutMs,
    timeoutMs,
    ca,
    display,
  };
}

/** Where the target is, for messages: "127.0.0.1:6379", "/run/redis.sock", "cluster 10.0.0.1:7000,...". */
export function describeTarget(t: RedisTarget): string {
  if (t.path !== undefined) return t.path;
  const hosts = t.hosts.map((h) => (h.host.includes(':') ? `[${h.host}]:${h.port}` : `${h.host}:${h.port}`)).join(',');
  return t.cluster ? `cluster ${hosts}` : hosts;
}
