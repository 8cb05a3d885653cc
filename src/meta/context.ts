// Meta contexts are data, not special cases (DESIGN invariant 5): each one
// is a name plus a way to describe a range of the node. The server chooses
// them per connection with SET_META_CONTEXT; the export owns the list.

/** One run of a context's status ("Metadata querying"). */
export interface StatusRun {
  length: number;
  /** Context-defined status bits. */
  flags: number;
}

export interface MetaContext {
  /** Full name, "namespace:leaf", e.g. "base:allocation". */
  readonly name: string;
  /**
   * Status of [offset, offset+length): runs in order from `offset`, at least
   * one, covering at most `length` bytes, at most `maxRuns` of them.
   */
  status(offset: number, length: number, maxRuns: number): Promise<StatusRun[]>;
}

/**
 * Does `name` answer `query`? An exact name matches itself; for LIST a query
 * ending in ':' (a namespace, or "qemu:dirty-bitmap:") lists every name
 * under it ("NBD_OPT_LIST_META_CONTEXT"). SET selects exact names only.
 */
export function matchesQuery(name: string, query: string, forList: boolean): boolean {
  if (name === query) return true;
  return forList && query.endsWith(':') && name.startsWith(query);
}
