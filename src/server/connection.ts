// One client connection: owns the socket and its read queue, runs the
// negotiation then the transmission phase, and applies backpressure: the
// socket stops being read while the transmission phase is saturated or the
// client is not reading our replies, and resumes when that clears.
import { ByteQueue } from '../protocol/byte-queue.ts';
import { optionName } from '../protocol/names.ts';
import type { ExportRegistry } from '../exports/registry.ts';
import type { BackendError, CloseCause, NegotiationResult, RefusalReason, RequestEvent, Transport } from './events.ts';
import { exportFlags, transmissionFlagNames } from './flags.ts';
import { MAX_OPTIONS_KEPT, Negotiation, type Session } from './negotiation.ts';
import { Transmission, type TransmissionLimits } from './transmission.ts';
import type { Logger } from './log.ts';
import type { SocketReader } from './socket-reader.ts';
import type { ClientSocket } from './wire.ts';
import { ReplyWriter, type ReplyPart } from './reply-writer.ts';
import { ReplySpace } from './reply-space.ts';

/** Unread option replies at which a negotiating client stops being read. */
const NEGOTIATION_REPLY_BACKLOG = 256 * 1024;

/**
 * Status-only replies (no data: writes, trims, flushes) queued one after
 * another in a turn of the event loop that leave at once rather than at
 * the turn's end: the client reads them and sends more requests while we
 * parse the rest of what it sent. With all 32 replies to a batch of 4 KiB
 * writes in one writev, client and server took turns and a third of the
 * two cores idled (bench/README.md, session `s11`). A reply with data
 * starts the count again: flushed in eights too, 4 KiB reads ran
 * ×0.90–0.95, and mixed reads and writes ×0.96 when any eight status
 * replies of a turn sent the batch.
 */
const EARLY_REPLIES = 8;

/** Longest reply that counts as status-only for EARLY_REPLIES: a simple reply or a structured NONE chunk. */
const STATUS_REPLY_MAX = 32;

/** How long a closed connection may take to hand its last replies to a client. */
const CLOSE_LINGER_MS = 10_000;

export interface ConnectionOwner {
  readonly exports: ExportRegistry;
  readonly limits: TransmissionLimits;
  /** A client still negotiating after this long is dropped (0 = never). */
  readonly handshakeLimitMs: number;
  readonly log: Logger;
  /** Called once, when the socket has closed. */
  connectionClosed(conn: Connection): void;
  negotiated?(conn: Connection, session: Session): void;
  /** OBSERVE_* bits of events.ts: who wants request events now. */
  observing?(): number;
  requestStart?(event: RequestEvent): void;
  requestDone?(conn: Connection, event: RequestEvent): void;
  backendError?(event: BackendError): void;
}

/** How a connection ended, for logs and metrics (see events.ts). */
export interface CloseSummary {
  cause: CloseCause;
  reason: string;
  /** How negotiation ended. */
  negotiation: NegotiationResult;
  /** Set when the connection counts as refused. */
  refused: RefusalReason | undefined;
}

export class Connection {
  readonly id: number;
  readonly socket: ClientSocket;
  readonly transport: Transport;
  readonly #owner: ConnectionOwner;
  readonly #queue = new ByteQueue();
  readonly #negotiation: Negotiation;
  #transmission: Transmission | null = null;
  #session: Session | null = null;
  #closed = false;
  /** The client has shut down its sending side (see 'end' in start()). */
  #ended = false;
  #handshakeTimer: NodeJS.Timeout | undefined;
  #lingerTimer: NodeJS.Timeout | undefined;
  readonly #writer: ReplyWriter;
  /** Where this connection's small replies are built; recycled once they are all sent. */
  readonly #replySpace = new ReplySpace();
  #replies: ReplyPart[] = [];
  /** Run when the queued replies are written (they return budget bytes). */
  #sentCallbacks: (() => void)[] = [];
  /** Status-only replies queued since the last reply with data (see EARLY_REPLIES). */
  #statusReplies = 0;
  #flushScheduled = false;
  /** The first reason the connection ended for. */
  #cause: CloseCause | undefined;
  #reason = '';
  #requests = 0;
  /** Set when the socket reads through a SocketReader (its `onread`), else reads come as 'data' events. */
  readonly #reader: SocketReader | undefined;

  constructor(
    id: number,
    socket: ClientSocket,
    owner: ConnectionOwner,
    transport: Transport = socket.remoteAddress === undefined ? 'unix' : 'tcp',
    reader?: SocketReader,
  ) {
    this.id = id;
    this.socket = socket;
    this.#reader = reader;
    this.transport = transport;
    this.#owner = owner;
    this.#writer = new ReplyWriter(socket);
    this.#negotiation = new Negotiation({
      exports: owner.exports,
      send: (buf) => this.#write(buf),
      close: (reason, cause) => this.close(reason, cause),
      enterTransmission: (session) => this.#enterTransmission(session),
      debug: (msg) => this.#debug(msg),
    });
  }

  get session(): Session | null {
    return this.#session;
  }

  /** Read reply bytes that went by sendfile. */
  get bytesByFile(): number {
    return this.#writer.bytesByFile;
  }

  /** Requests still running against the node. */
  get inflight(): number {
    return this.#transmission?.inflight ?? 0;
  }

  /** Why the connection ended and what that counts as; valid once it has closed. */
  closeSummary(): CloseSummary {
    const cause = this.#cause ?? 'client';
    const reason = this.#reason || 'connection closed';
    if (this.#session !== null) {
      const refused = cause === 'protocol_error' ? 'protocol_error' : undefined;
      return { cause, reason, negotiation: this.#session.via, refused };
    }
    switch (cause) {
      case 'client':
      case 'abort':
        // A client that asked for TLS and left without it was refused for that.
        if (this.#negotiation.tlsRefused) return { cause, reason, negotiation: 'failed', refused: 'tls' };
        return { cause, reason, negotiation: this.#negotiation.listed ? 'list_only' : 'abort', refused: undefined };
      case 'protocol_error':
      case 'handshake_timeout':
      case 'shutdown':
        return { cause, reason, negotiation: 'failed', refused: cause };
      default:
        return { cause, reason, negotiation: 'failed', refused: undefined };
    }
  }

  /** `early`: what the client sent before it was admitted, parsed after the greeting. */
  start(early: Buffer[] = []): void {
    const socket = this.socket;
    if (this.#reader !== undefined) {
      this.#reader.sink = (chunk: Buffer) => {
        // After we hang up, whatever the client still sends is dropped.
        if (this.#closed) return;
        this.#queue.pushBorrowed(chunk);
        try {
          this.#pump();
        } finally {
          // The reader reuses the chunk's memory for its next read.
          this.#queue.release();
        }
      };
    } else {
      socket.on('data', (chunk: Buffer) => {
        if (this.#closed) return;
        this.#queue.push(chunk);
        this.#pump();
      });
      socket.resume(); // the listener accepts paused (see socket-reader.ts)
    }
    socket.on('drain', () => this.#pump());
    socket.on('error', (err) => {
      this.#debug(`socket error: ${err.message}`);
      this.#setCause('socket_error', `socket error: ${err.message}`);
    });
    socket.on('end', () => {
      // A client may shut down its side after its last request (with or
      // without NBD_CMD_DISC) and still read the replies, as qemu-nbd lets
      // it: the connection closes once nothing it asked for is in flight.
      this.#ended = true;
      this.#pump();
    });
    socket.on('close', () => {
      this.#closed = true;
      clearTimeout(this.#handshakeTimer);
      // A pending timer would keep this whole connection reachable until it fires.
      clearTimeout(this.#lingerTimer);
      this.#writer.dropAll();
      if (this.#owner.log.infoEnabled) this.#logClose();
      this.#owner.connectionClosed(this);
    });
    if (this.#owner.handshakeLimitMs > 0) {
      // A client that never finishes negotiating must not hold a slot forever.
      this.#handshakeTimer = setTimeout(() => this.close('handshake time limit reached', 'handshake_timeout'), this.#owner.handshakeLimitMs);
    }
    this.#write(this.#negotiation.greeting());
    if (early.length > 0) {
      for (const chunk of early) this.#queue.push(chunk);
      this.#pump();
    }
  }

  /** New requests get NBD_ESHUTDOWN; negotiating clients are dropped. */
  shutdown(): void {
    if (this.#transmission !== null) this.#transmission.shutdown();
    else this.close('server shutting down', 'shutdown');
  }

  /** Hang up now (the end of a graceful stop). */
  destroy(reason: string, cause: CloseCause): void {
    this.#setCause(cause, reason);
    this.socket.destroy();
  }

  close(reason: string, cause: CloseCause): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#setCause(cause, reason);
    clearTimeout(this.#handshakeTimer);
    this.#debug(`closing: ${reason}`);
    // Let queued replies reach the client, then release the socket.
    this.#flushReplies();
    this.#queue.skip(this.#queue.length);
    this.#writer.whenIdle(() => {
      this.socket.end();
      this.socket.destroySoon();
    });
    // A client that never reads would keep the socket (and our replies)
    // forever; with nothing left to write, the shutdown completes by itself.
    if (this.#writer.backlog === 0) return;
    this.#lingerTimer = setTimeout(() => this.socket.destroy(), CLOSE_LINGER_MS);
    this.#lingerTimer.unref();
  }

  #setCause(cause: CloseCause, reason: string): void {
    if (this.#cause !== undefined) return;
    this.#cause = cause;
    this.#reason = reason;
  }

  #debug(message: string): void {
    this.#owner.log.debug(message, { conn: this.id });
  }

  #write(buf: Buffer): void {
    if (!this.#closed) this.#writer.write([buf]);
  }

  #enterTransmission(session: Session): void {
    clearTimeout(this.#handshakeTimer);
    this.#session = session;
    if (this.transport === 'unix') this.#writer.widenSendBufferForLargeReplies();
    if (this.#owner.log.infoEnabled) this.#logHandshake(session);
    this.#owner.negotiated?.(this, session);
    const owner = this.#owner;
    this.#transmission = new Transmission(
      {
        id: this.id,
        replySpace: this.#replySpace,
        sendReply: (parts, sent) => this.#queueReply(parts, sent),
        sendsFiles: this.#writer.sendsFiles,
        writesLargeNow: this.transport !== 'unix',
        close: (reason, cause) => this.close(reason, cause),
        progress: () => this.#pump(),
        readInto:
          this.#reader === undefined
            ? undefined
            : (buf, filled, done, thenRead) =>
                this.#reader!.readInto(
                  buf,
                  filled,
                  () => {
                    // As with queued bytes: nothing that arrives after we hung up is acted on.
                    if (!this.#closed) done();
                  },
                  thenRead,
                ),
        debug: (msg) => this.#debug(msg),
        debugging: owner.log.debugEnabled,
        warn: (msg, fields) => owner.log.warn(msg, { conn: this.id, ...fields }),
        observing: () => owner.observing?.() ?? 0,
        requestStart: (event) => owner.requestStart?.(event),
        requestDone: (event) => {
          this.#requests++;
          owner.requestDone?.(this, event);
        },
        backendError: (event) => owner.backendError?.(event),
      },
      session,
      this.#owner.limits,
    );
  }

  /** The options the client sent, for the log ("..." when there were more). */
  #optionNames(): string[] {
    const options = this.#negotiation.options.map((o) => optionName(o).replace(/^NBD_OPT_/, ''));
    if (options.length === MAX_OPTIONS_KEPT) options.push('...');
    return options;
  }

  /** At info: why the connection ended. */
  #logClose(): void {
    const { cause, reason, negotiation } = this.closeSummary();
    const exp = this.#session?.export.name;
    // Without a session, the options tried are the handshake's result.
    const options = exp === undefined ? this.#optionNames() : undefined;
    const detail = exp !== undefined ? `${this.#requests} requests` : `negotiation ${negotiation}; options ${options!.join(',') || 'none'}`;
    this.#owner.log.info(`disconnected: ${reason} (${detail})`, {
      conn: this.id,
      cause,
      reason,
      export: exp,
      requests: exp !== undefined ? this.#requests : undefined,
      negotiation: exp === undefined ? negotiation : undefined,
      options,
    });
  }

  /** At info: what the client negotiated. */
  #logHandshake(session: Session): void {
    const exp = session.export;
    const flags = exportFlags(exp, session.structuredReplies);
    const options = this.#optionNames();
    const contexts = session.metaContexts.map((c) => c.name);
    const flagNames = transmissionFlagNames(flags);
    this.#owner.log.info(
      `negotiated export '${exp.name}' via ${session.via === 'go' ? 'NBD_OPT_GO' : 'NBD_OPT_EXPORT_NAME'}; ` +
        `options ${options.join(',') || 'none'}; flags 0x${flags.toString(16)} (${flagNames.join(',')}); ` +
        `${session.structuredReplies ? 'structured replies' : 'simple replies'}; contexts ${contexts.join(',') || 'none'}`,
      {
        conn: this.id,
        export: exp.name,
        via: session.via,
        options,
        flags,
        flag_names: flagNames,
        structured_replies: session.structuredReplies,
        contexts,
      },
    );
  }

  /**
   * Replies finished in one turn of the event loop leave in one writev:
   * they are queued here and flushed corked from setImmediate, after the
   * loop has delivered every completion that was ready.
   */
  #queueReply(parts: ReplyPart[], sent?: () => void): void {
    // A reply to a client that has gone is dropped, not an error.
    if (this.#closed || this.socket.destroyed) {
      sent?.();
      return;
    }
    for (const part of parts) this.#replies.push(part);
    if (sent !== undefined) this.#sentCallbacks.push(sent);
    // Only replies the socket takes at once leave early: their callbacks
    // then run later, not inside the Transmission's parsing loop.
    if (parts.length !== 1 || parts[0]!.length > STATUS_REPLY_MAX) this.#statusReplies = 0;
    else if (++this.#statusReplies >= EARLY_REPLIES && this.#writer.takesAtOnce(this.#replies)) {
      this.#writeQueued();
      return;
    }
    if (!this.#flushScheduled) {
      this.#flushScheduled = true;
      setImmediate(this.#flushReplies);
    }
  }

  readonly #flushReplies = (): void => {
    this.#flushScheduled = false;
    if (this.#replies.length === 0 || this.socket.destroyed || this.socket.writableEnded) {
      for (const cb of this.#takeQueued()[1]) cb();
      return;
    }
    this.#writeQueued();
    if (this.#repliesBacklogged) this.#pump();
  };

  #writeQueued(): void {
    const [replies, callbacks] = this.#takeQueued();
    this.#writer.write(replies, callbacks);
    // Every reply built so far is now with the kernel: its reply space may be written again.
    if (this.#writer.backlog === 0) this.#replySpace.recycle();
  }

  /** The queued replies and their callbacks; the queue starts empty again. */
  #takeQueued(): [ReplyPart[], (() => void)[]] {
    const taken: [ReplyPart[], (() => void)[]] = [this.#replies, this.#sentCallbacks];
    this.#replies = [];
    this.#sentCallbacks = [];
    this.#statusReplies = 0;
    return taken;
  }

  /**
   * Replies the client has not read yet pass the connection's bound. Not
   * Node's 16 KiB high-water mark: a client may send many requests before
   * it reads any reply, and stopping then would deadlock us both.
   */
  get #repliesBacklogged(): boolean {
    // While negotiating, replies are many small buffers that each cost far
    // more memory than their bytes, and a client that pipelines options and
    // reads nothing owes us no patience: hold it at a small backlog.
    const bound = this.#transmission === null ? NEGOTIATION_REPLY_BACKLOG : this.#owner.limits.maxInflightBytes;
    return this.#writer.backlog >= bound;
  }

  #pump(): void {
    // A dead socket (write error) must stop parsing at once: its replies are
    // dropped synchronously, so parsing on would run every queued request in
    // one chain of microtasks and starve the event loop.
    if (this.#closed || this.socket.destroyed) return;
    if (!this.#negotiation.finished) {
      // Replies to a batch of options leave in one write (no tiny packets).
      this.socket.cork();
      this.#negotiation.feed(this.#queue);
      this.socket.uncork();
    }
    if (this.#transmission !== null && !this.#closed) this.#transmission.feed(this.#queue);
    if (this.#closed) return;
    if (this.#ended && (this.#transmission === null || this.#transmission.inflight === 0)) {
      this.close('client closed the connection', 'client');
      return;
    }
    // Stop reading while we are saturated or the client does not read replies.
    const hold = this.#repliesBacklogged || (this.#transmission?.saturated ?? false);
    if (hold) this.socket.pause();
    else if (this.socket.isPaused()) this.socket.resume();
  }
}
