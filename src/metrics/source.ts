// The MetricsSource of a running server: what /metrics reads at scrape
// time from the export registry (sizes, dirty bitmaps) and from the server
// (connections, requests in flight, clients waiting). Kept here, not in the
// CLI, so the wiring is tested with the metrics.
import type { Export } from '../exports/export.ts';
import type { MetricsSource } from './metrics.ts';

export interface ExportList {
  list(): Iterable<Export>;
}

/** What the source needs of an NbdServer (undefined before it exists). */
export interface ServerView {
  readonly connections: Iterable<{ readonly session: { readonly export: { readonly name: string } } | null; readonly inflight: number }>;
  readonly waiting: number;
}

export function serverSource(exports: ExportList, server: () => ServerView | undefined): MetricsSource {
  return {
    exports: function* () {
      for (const e of exports.list()) yield { name: e.name, size: e.size, loopWriteSpells: e.node.loopWriteSpells };
    },
    connections: function* () {
      for (const c of server()?.connections ?? []) yield { export: c.session?.export.name, inflight: c.inflight };
    },
    waiting: () => server()?.waiting ?? 0,
    bitmaps: function* () {
      for (const e of exports.list()) {
        for (const b of e.bitmapStats()) yield { export: e.name, bitmap: b.name, dirtyBytes: b.dirtyBytes() };
      }
    },
  };
}
