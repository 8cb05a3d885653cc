// -T/--trace: one log line when a request is parsed and one when its reply
// is ready, through the same events the metrics use (src/server/events.ts),
// so without -T the request path does not even build them.
import { commandLabel, errorLabel } from '../protocol/names.ts';
import { subscribe, type RequestEvent } from '../server/events.ts';
import type { Logger } from '../server/log.ts';

function describe(e: RequestEvent): string {
  return `${commandLabel(e.command)} cookie ${e.cookie} offset ${e.offset} length ${e.length} flags 0x${e.flags.toString(16)}`;
}

function fields(e: RequestEvent): Record<string, unknown> {
  return {
    conn: e.conn,
    export: e.export,
    cookie: e.cookie,
    command: commandLabel(e.command),
    offset: e.offset,
    length: e.length,
    flags: e.flags,
  };
}

/** Log every request and reply at level "trace"; returns the unsubscriber. */
export function startTrace(log: Logger): () => void {
  const stops = [
    subscribe('requestStart', (e) => log.trace(`request ${describe(e)}`, fields(e))),
    subscribe('requestDone', (e) => {
      const result = errorLabel(e.error);
      const seconds = (e.end - e.start) / 1000;
      log.trace(`reply ${describe(e)}: ${result} in ${(seconds * 1000).toFixed(3)} ms`, { ...fields(e), result, bytes: e.bytes, duration: seconds });
    }),
  ];
  return () => {
    for (const stop of stops) stop();
  };
}
