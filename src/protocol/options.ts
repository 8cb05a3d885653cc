// Decoders for option request data ("Option types"). Each takes the whole
// option payload (its length already bounded by the server) and returns a
// typed value or the reason it is malformed; none throws on bad input.
import { NBD_MAX_STRING } from './constants.ts';

export type Decoded<T> = { ok: true; value: T } | { ok: false; reason: string };

const utf8 = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });

const fail = (reason: string): { ok: false; reason: string } => ({ ok: false, reason });

/**
 * A string field: valid UTF-8, no NUL, at most 4096 bytes ("Conventions").
 */
export function decodeString(buf: Buffer, what: string): Decoded<string> {
  if (buf.length > NBD_MAX_STRING) return fail(`${what} longer than ${NBD_MAX_STRING} bytes`);
  if (buf.includes(0)) return fail(`${what} contains NUL`);
  try {
    return { ok: true, value: utf8.decode(buf) };
  } catch {
    return fail(`${what} is not valid UTF-8`);
  }
}

export interface InfoRequest {
  name: string;
  /** NBD_INFO_* types the client asked for, in order, duplicates kept. */
  requests: number[];
}

/**
 * NBD_OPT_INFO / NBD_OPT_GO data.
 *   0      u32 name length N (at most option length - 6)
 *   4      name (N bytes)
 *   4+N    u16 number of information requests R
 *   6+N    u16 x R information types
 * The length must come out exactly.
 */
export function decodeInfoRequest(data: Buffer): Decoded<InfoRequest> {
  if (data.length < 6) return fail('INFO/GO data shorter than 6 bytes');
  const nameLength = data.readUInt32BE(0);
  if (nameLength > data.length - 6) return fail('export name runs past the option data');
  const name = decodeString(data.subarray(4, 4 + nameLength), 'export name');
  if (!name.ok) return name;
  const count = data.readUInt16BE(4 + nameLength);
  if (data.length !== 6 + nameLength + 2 * count) return fail('information request count does not match the option length');
  const requests: number[] = [];
  for (let i = 0; i < count; i++) requests.push(data.readUInt16BE(6 + nameLength + 2 * i));
  return { ok: true, value: { name: name.value, requests } };
}

export interface MetaContextRequest {
  exportName: string;
  queries: string[];
}

/**
 * NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT data.
 *   0      u32 export name length N
 *   4      export name
 *   4+N    u32 number of queries Q
 *   8+N    Q x { u32 query length L, query (L bytes) }
 */
export function decodeMetaContextRequest(data: Buffer, maxQueries: number): Decoded<MetaContextRequest> {
  if (data.length < 8) return fail('meta context data shorter than 8 bytes');
  const nameLength = data.readUInt32BE(0);
  if (nameLength > data.length - 8) return fail('export name runs past the option data');
  const exportName = decodeString(data.subarray(4, 4 + nameLength), 'export name');
  if (!exportName.ok) return exportName;
  let at = 4 + nameLength;
  const count = data.readUInt32BE(at);
  at += 4;
  // Each query needs at least its 4-byte length: a count that cannot fit is malformed.
  if (count > (data.length - at) / 4) return fail('query count runs past the option data');
  if (count > maxQueries) return fail(`more than ${maxQueries} queries`);
  const queries: string[] = [];
  for (let i = 0; i < count; i++) {
    if (data.length - at < 4) return fail('query length runs past the option data');
    const length = data.readUInt32BE(at);
    at += 4;
    if (length > data.length - at) return fail('query runs past the option data');
    const query = decodeString(data.subarray(at, at + length), 'query');
    if (!query.ok) return query;
    queries.push(query.value);
    at += length;
  }
  if (at !== data.length) return fail('trailing bytes after the last query');
  return { ok: true, value: { exportName: exportName.value, queries } };
}
