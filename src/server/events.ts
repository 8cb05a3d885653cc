// Every event the server publishes for metrics and traces, declared here
// and nowhere else (STYLE habit 12): channels of node:diagnostics_channel.
// The server publishes only while a channel has subscribers, and on the
// request path it asks once per batch of parsed requests (observing()), so
// without --metrics or --trace a request costs nothing extra. Subscribers
// (src/metrics/, the CLI's trace log) must be quick, and must not keep the
// messages: they are plain data, but not copies.
//
// Hooks carry the events up: Transmission and Negotiation call their host
// (Connection), Connection calls its owner (NbdServer), and NbdServer
// publishes. Protocol and server code never import prom-client.
import diagnostics_channel from 'node:diagnostics_channel';

export type Transport = 'unix' | 'tcp';

/** Why a connection was refused or cut short (nbd_connections_refused_total{reason}). */
export type RefusalReason =
  /** more clients waiting for a slot than the server holds (-e) */
  | 'limit'
  /** still negotiating after --handshake-limit */
  | 'handshake_timeout'
  /** closed for a protocol violation, in negotiation or transmission */
  | 'protocol_error'
  /** asked for STARTTLS, was refused, and left without transmission */
  | 'tls'
  /** arrived, or was still negotiating, while the server stopped */
  | 'shutdown';

/** How negotiation ended (nbd_negotiations_total{result}). */
export type NegotiationResult = 'go' | 'export_name' | 'abort' | 'list_only' | 'failed';

/** Why a connection ended, as logged at info. */
export type CloseCause =
  /** the client closed its end (without NBD_CMD_DISC if in transmission) */
  | 'client'
  | 'disc'
  | 'abort'
  | 'protocol_error'
  | 'handshake_timeout'
  | 'shutdown'
  | 'socket_error';

export interface ConnectionAccepted {
  transport: Transport;
}

export interface ConnectionRefused {
  /** undefined when refused before it became a connection (limit, shutdown) */
  conn: number | undefined;
  reason: RefusalReason;
}

export interface NegotiationEnded {
  conn: number;
  result: NegotiationResult;
  /** The export entered; undefined unless result is go or export_name. */
  export: string | undefined;
}

/**
 * One request. Published at start (error, bytes and end are 0) and when
 * its reply is ready. Times are performance.now() milliseconds, 0 when
 * nobody observed requests as the header was parsed.
 */
export interface RequestEvent {
  conn: number;
  export: string;
  cookie: bigint;
  /** NBD_CMD_* (commandLabel() names it) */
  command: number;
  flags: number;
  offset: number;
  length: number;
  /** NBD error (errorLabel() names it); 0 = ok */
  error: number;
  /** Bytes read or written */
  bytes: number;
  /** Header parsed */
  start: number;
  /** Reply ready */
  end: number;
}

export interface BackendError {
  conn: number;
  export: string;
  command: number;
  /** errno name from the block node ("EIO", "ENOSPC"); "unknown" when it had none */
  errno: string;
  /** The NBD error the client got */
  error: number;
  message: string;
}

export interface ConnectionClosed {
  conn: number;
  /** undefined if it never entered transmission */
  export: string | undefined;
  cause: CloseCause;
  reason: string;
}

/** A typed view of a diagnostics channel. */
export interface EventChannel<T> {
  readonly name: string;
  readonly hasSubscribers: boolean;
  publish(message: T): void;
}

function channel<T>(name: string): EventChannel<T> {
  return diagnostics_channel.channel(name) as unknown as EventChannel<T>;
}

export const channels = {
  accepted: channel<ConnectionAccepted>('nbd-export:connection:accepted'),
  refused: channel<ConnectionRefused>('nbd-export:connection:refused'),
  negotiation: channel<NegotiationEnded>('nbd-export:negotiation'),
  requestStart: channel<RequestEvent>('nbd-export:request:start'),
  requestDone: channel<RequestEvent>('nbd-export:request:done'),
  backendError: channel<BackendError>('nbd-export:backend:error'),
  closed: channel<ConnectionClosed>('nbd-export:connection:closed'),
} as const;

export type Channels = typeof channels;
type MessageOf<C> = C extends EventChannel<infer T> ? T : never;

/** Subscribe to one channel; returns the function that unsubscribes. */
export function subscribe<K extends keyof Channels>(name: K, fn: (message: MessageOf<Channels[K]>) => void): () => void {
  const channelName = channels[name].name;
  const listener = fn as (message: unknown) => void;
  diagnostics_channel.subscribe(channelName, listener);
  return () => void diagnostics_channel.unsubscribe(channelName, listener);
}

/** Bits of TransmissionHost.observing(): who wants request events. */
export const OBSERVE_DONE = 1;
export const OBSERVE_START = 2;
