// The server: listeners, the connection limit, and the life cycle around
// them. A client beyond max-connections is held before the greeting, as
// qemu-nbd leaves it in the listen backlog, and is served when a slot frees.
import { EventEmitter } from 'node:events';
import fs from 'node:fs';
import net from 'node:net';
import type { ExportRegistry } from '../exports/registry.ts';
import { Connection, type ConnectionOwner } from './connection.ts';
import { channels, OBSERVE_DONE, OBSERVE_START, type BackendError, type RequestEvent, type Transport } from './events.ts';
import type { Session } from './negotiation.ts';
import { DEFAULT_LIMITS, type TransmissionLimits } from './transmission.ts';
import { silentLogger, type Logger } from './log.ts';
import { ByteBudget } from './budget.ts';
import { BufferPool } from './buffer-pool.ts';
import { acceptThrough, readThrough, SocketReader } from './socket-reader.ts';
import { socketFd, type ClientSocket } from './wire.ts';
import { unpaceLoopback } from './loopback-tcp.ts';

/**
 * Eight maximum payloads (32 MiB each): with only two, a few clients asking
 * for 32 MiB reads starved each other past the fuzzer's 20 s patience, and
 * two clients that never read could hold it all. Speed does not depend on
 * it now that each connection stops at 4 MiB in flight (same figures with
 * 64 MiB and 256 MiB).
 */
export const DEFAULT_MEMORY_BUDGET = 256 * 1024 * 1024;
/** After in-flight requests finish, how long a stopping server still answers ESHUTDOWN. */
const SHUTDOWN_GRACE_MS = 200;
/** Idle read buffers kept for reuse. */
const POOL_RETAINED = 32 * 1024 * 1024;

/** Bytes a waiting client may send before its greeting; more, and it is dropped. */
const MAX_EARLY_BYTES = 64 * 1024;

/** An accepted client: admitted at once, or waiting for a slot. */
interface Waiting {
  socket: ClientSocket;
  /** Set when the socket reads through it. */
  reader: SocketReader | undefined;
  transport: Transport;
  /** What it sent while it waited (a well-behaved client sends nothing before the greeting). */
  early: Buffer[];
  earlyBytes: number;
  /** Its 'end' listener while it waits. */
  gaveUp?: () => void;
}

export interface ServerOptions {
  exports: ExportRegistry;
  /** Clients served at once; 0 = unlimited (qemu-nbd's -e). */
  maxConnections: number;
  /** Keep running after the last client leaves (qemu-nbd's -t). */
  persistent: boolean;
  limits?: TransmissionLimits;
  /**
   * Bytes of request payloads and read replies held at once by all
   * clients together (default 256 MiB); see budget.ts.
   */
  memoryBudget?: number;
  /** Drop clients still negotiating after this long; 0 = no limit. Default 10 s. */
  handshakeLimitMs?: number;
  log?: Logger;
  /** Clients waiting for a slot beyond which new ones are dropped. */
  maxWaiting?: number;
  /**
   * Read admitted sockets through a SocketReader (default true); false
   * reads them from 'data' events, as when Node will not hand a socket over.
   */
  socketReader?: boolean;
  /**
   * With socketReader: drive accepted handles as Wires, without a
   * net.Socket (default true; see wire.ts). Falls back to net.Socket where
   * this Node does not allow it.
   */
  rawSockets?: boolean;
  /**
   * TCP clients on this machine whose congestion control paces (BBR) get
   * "reno" instead (default true; see loopback-tcp.ts).
   */
  loopbackReno?: boolean;
}

export interface ServerEvents {
  /** Not persistent, and the last client has gone. */
  idle: [];
  negotiated: [conn: Connection, session: Session];
  request: [conn: Connection, event: RequestEvent];
}

export class NbdServer extends EventEmitter<ServerEvents> implements ConnectionOwner {
  readonly exports: ExportRegistry;
  readonly limits: TransmissionLimits;
  readonly handshakeLimitMs: number;
  readonly log: Logger;
  readonly #maxConnections: number;
  readonly #socketReader: boolean;
  readonly #rawSockets: boolean;
  readonly #loopbackReno: boolean;
  readonly #persistent: boolean;
  readonly #maxWaiting: number;
  readonly #listeners: net.Server[] = [];
  readonly #active = new Set<Connection>();
  readonly #waiting: Waiting[] = [];
  #nextId = 1;
  #served = 0;
  #closing = false;

  constructor(opts: ServerOptions) {
    super();
    this.exports = opts.exports;
    const limits = opts.limits ?? DEFAULT_LIMITS;
    this.limits = {
      ...limits,
      budget: limits.budget ?? new ByteBudget(opts.memoryBudget ?? DEFAULT_MEMORY_BUDGET),
      pool: limits.pool ?? new BufferPool(POOL_RETAINED),
    };
    this.handshakeLimitMs = opts.handshakeLimitMs ?? 10_000;
    this.log = opts.log ?? silentLogger;
    this.#maxConnections = opts.maxConnections;
    this.#socketReader = opts.socketReader ?? true;
    this.#rawSockets = opts.rawSockets ?? true;
    this.#loopbackReno = opts.loopbackReno ?? true;
    this.#persistent = opts.persistent;
    this.#maxWaiting = opts.maxWaiting ?? 1024;
  }

  get connections(): ReadonlySet<Connection> {
    return this.#active;
  }

  /** Clients accepted but waiting for a connection slot (-e). */
  get waiting(): number {
    return this.#waiting.length;
  }

  /** Listen on TCP; resolves with the bound address (port 0 picks one). */
  async listenTcp(host: string, port: number): Promise<net.AddressInfo> {
    const server = this.#makeListener(true);
    await listen(server, { host, port });
    return server.address() as net.AddressInfo;
  }

  /** Listen on a Unix socket, replacing a stale socket file nobody listens on. */
  async listenUnix(path: string): Promise<void> {
    const server = this.#makeListener(false);
    try {
      await listen(server, { path });
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EADDRINUSE' || !(await isStaleSocket(path))) throw err;
      fs.unlinkSync(path);
      await listen(server, { path });
    }
  }

  /** Inherit an already listening socket (systemd socket activation). */
  async listenFd(fd: number): Promise<void> {
    const server = this.#makeListener(true);
    // net.Server.listen accepts a handle object { fd } in place of options.
    await listen(server, { fd } as net.ListenOptions);
  }

  #makeListener(tcp: boolean): net.Server {
    // Paused, so that an admitted socket can be handed to a SocketReader before it reads.
    // Half-open: a client that shuts down its side still gets its replies (see Connection).
    const server = net.createServer({ pauseOnConnect: true, noDelay: tcp, allowHalfOpen: true }, (socket) => this.#accept(socket));
    // Errors before listening are the caller's to report (port in use...).
    server.on('error', (err) => {
      if (server.listening) this.log.error(`listener: ${err.message}`);
    });
    // Once listening, the handle exists: accepted sockets then read through a SocketReader from the start.
    if (this.#socketReader) server.once('listening', () => acceptThrough(server, (socket, reader) => this.#accept(socket, reader), this.#rawSockets));
    this.#listeners.push(server);
    return server;
  }

  /** `reader`: the socket already reads through it; else it is paused, and adopted here if we read through readers. */
  #accept(socket: ClientSocket, reader?: SocketReader): void {
    socket.on('error', () => {}); // reported by the connection once it has one
    const transport: Transport = socket.remoteAddress === undefined ? 'unix' : 'tcp';
    if (transport === 'tcp' && this.#loopbackReno) {
      const was = unpaceLoopback(socketFd(socket), socket.remoteAddress);
      if (was !== null && this.log.debugEnabled) this.log.debug(`loopback client ${socket.remoteAddress}:${socket.remotePort}: congestion control ${was} -> reno`);
    }
    if (channels.accepted.hasSubscribers) channels.accepted.publish({ transport });
    if (this.#closing) {
      if (channels.refused.hasSubscribers) channels.refused.publish({ conn: undefined, reason: 'shutdown' });
      socket.destroy();
      return;
    }
    const free = this.#maxConnections === 0 || this.#active.size < this.#maxConnections;
    if (!free && this.#waiting.length >= this.#maxWaiting) {
      this.log.warn('too many clients waiting for a connection slot; dropping one');
      if (channels.refused.hasSubscribers) channels.refused.publish({ conn: undefined, reason: 'limit' });
      socket.destroy();
      return;
    }
    let client: Waiting;
    if (reader !== undefined) client = { socket, reader, transport, early: [], earlyBytes: 0 };
    else {
      // The listener accepts paused: the socket is handed to a SocketReader
      // before anything is read from it.
      const lender = this.#socketReader ? new SocketReader() : undefined;
      const adopted = lender === undefined ? null : readThrough(socket as net.Socket, lender);
      client = { socket: adopted ?? socket, reader: adopted === null ? undefined : lender, transport, early: [], earlyBytes: 0 };
    }
    if (free) {
      this.#admit(client);
      return;
    }
    this.log.debug(`connection limit ${this.#maxConnections} reached; client waits`);
    // A waiting client is read, so that one that gives up is noticed and
    // leaves the queue; what it sends before its greeting is kept, within reason.
    const early = (chunk: Buffer): void => {
      client.early.push(Buffer.from(chunk));
      client.earlyBytes += chunk.length;
      if (client.earlyBytes > MAX_EARLY_BYTES) client.socket.destroy();
    };
    if (client.reader !== undefined) client.reader.sink = early;
    else {
      client.socket.on('data', early);
      client.socket.resume();
    }
    client.socket.on('error', () => {});
    // One that shuts down its side before it is admitted has given up.
    client.gaveUp = () => client.socket.destroy();
    client.socket.on('end', client.gaveUp);
    this.#waiting.push(client);
    client.socket.once('close', () => {
      const i = this.#waiting.indexOf(client);
      if (i >= 0) this.#waiting.splice(i, 1);
    });
  }

  #admit(client: Waiting): void {
    const { socket, transport } = client;
    socket.removeAllListeners('data');
    if (client.gaveUp !== undefined) socket.off('end', client.gaveUp);
    const conn = new Connection(this.#nextId++, socket, this, transport, client.reader);
    this.#active.add(conn);
    this.#served++;
    if (this.log.infoEnabled) {
      const from = transport === 'unix' ? 'a unix socket' : `${socket.remoteAddress}:${socket.remotePort}`;
      this.log.info(`accepted from ${from}`, { conn: conn.id, transport, remote: transport === 'tcp' ? from : undefined });
    }
    conn.start(client.early);
  }

  connectionClosed(conn: Connection): void {
    if (!this.#active.delete(conn)) return;
    this.#publishClosed(conn);
    if (this.#closing) return;
    if (!this.#persistent && this.#active.size === 0 && this.#served > 0) {
      // qemu-nbd without -t: the server ends with its last client.
      this.emit('idle');
      return;
    }
    while (this.#waiting.length > 0 && (this.#maxConnections === 0 || this.#active.size < this.#maxConnections)) {
      const next = this.#waiting.shift()!;
      if (!next.socket.destroyed) this.#admit(next);
    }
  }

  #publishClosed(conn: Connection): void {
    const { negotiation, refused, cause, reason } = conn.closeSummary();
    // A negotiated connection's result was published when it negotiated.
    if (conn.session === null && channels.negotiation.hasSubscribers) {
      channels.negotiation.publish({ conn: conn.id, result: negotiation, export: undefined });
    }
    if (refused !== undefined && channels.refused.hasSubscribers) channels.refused.publish({ conn: conn.id, reason: refused });
    if (channels.closed.hasSubscribers) channels.closed.publish({ conn: conn.id, export: conn.session?.export.name, cause, reason });
  }

  negotiated(conn: Connection, session: Session): void {
    if (channels.negotiation.hasSubscribers) {
      channels.negotiation.publish({ conn: conn.id, result: session.via, export: session.export.name });
    }
    this.emit('negotiated', conn, session);
  }

  /** Asked by each connection once per batch of requests; see events.ts. */
  observing(): number {
    return (
      (channels.requestDone.hasSubscribers || this.listenerCount('request') > 0 ? OBSERVE_DONE : 0) |
      (channels.requestStart.hasSubscribers ? OBSERVE_START : 0)
    );
  }

  requestStart(event: RequestEvent): void {
    if (channels.requestStart.hasSubscribers) channels.requestStart.publish(event);
  }

  requestDone(conn: Connection, event: RequestEvent): void {
    if (channels.requestDone.hasSubscribers) channels.requestDone.publish(event);
    if (this.listenerCount('request') > 0) this.emit('request', conn, event);
  }

  backendError(event: BackendError): void {
    if (channels.backendError.hasSubscribers) channels.backendError.publish(event);
  }

  /**
   * Stop: close listeners (Node removes a Unix socket file it created),
   * answer new requests with ESHUTDOWN, wait up to `timeoutMs` for requests
   * in flight, then drop every client.
   */
  async close(timeoutMs = 0): Promise<void> {
    this.#closing = true;
    const closed = this.#listeners.map((l) => new Promise<void>((resolve) => l.close(() => resolve())));
    for (const client of this.#waiting.splice(0)) client.socket.destroy();
    for (const conn of this.#active) conn.shutdown();
    const deadline = Date.now() + timeoutMs;
    while ([...this.#active].some((c) => c.inflight > 0) && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 10));
    }
    // "Terminating the transmission phase": requests still arriving get
    // NBD_ESHUTDOWN, to which a client answers with a soft disconnect;
    // give them a moment for that before hanging up.
    const grace = Math.min(SHUTDOWN_GRACE_MS, Math.max(0, deadline - Date.now()));
    if (this.#active.size > 0 && grace > 0) await new Promise((r) => setTimeout(r, grace));
    for (const conn of this.#active) conn.destroy('server stopped', 'shutdown');
    await Promise.all(closed);
  }
}

function listen(server: net.Server, options: net.ListenOptions): Promise<void> {
  return new Promise((resolve, reject) => {
    const onError = (err: Error) => reject(err);
    server.once('error', onError);
    server.listen(options, () => {
      server.off('error', onError);
      resolve();
    });
  });
}

/** A socket file whose listener has gone refuses connections. */
function isStaleSocket(path: string): Promise<boolean> {
  try {
    if (!fs.statSync(path).isSocket()) return Promise.resolve(false);
  } catch {
    return Promise.resolve(false);
  }
  return new Promise((resolve) => {
    const probe = net.connect({ path });
    probe.once('connect', () => {
      probe.destroy();
      resolve(false);
    });
    probe.once('error', (err: NodeJS.ErrnoException) => resolve(err.code === 'ECONNREFUSED'));
  });
}
