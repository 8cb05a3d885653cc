// One client connection: owns the socket and its read queue, runs the
// negotiation then the transmission phase, and applies backpressure: the
// socket stops being read while the transmission phase is saturated or the
// client is not reading our replies, and resumes when that clears.
import type { Socket } from 'node:net';
import { ByteQueue } from '../protocol/byte-queue.ts';
import type { ExportRegistry } from '../exports/registry.ts';
import { Negotiation, type Session } from './negotiation.ts';
import { Transmission, type RequestEvent, type TransmissionLimits } from './transmission.ts';
import type { Logger } from './log.ts';

export interface ConnectionOwner {
  readonly exports: ExportRegistry;
  readonly limits: TransmissionLimits;
  /** A client still negotiating after this long is dropped (0 = never). */
  readonly handshakeLimitMs: number;
  readonly log: Logger;
  /** Called once, when the socket has closed. */
  connectionClosed(conn: Connection): void;
  negotiated?(conn: Connection, session: Session): void;
  requestDone?(conn: Connection, event: RequestEvent): void;
}

export class Connection {
  readonly id: number;
  readonly socket: Socket;
  readonly #owner: ConnectionOwner;
  readonly #queue = new ByteQueue();
  readonly #negotiation: Negotiation;
  #transmission: Transmission | null = null;
  #session: Session | null = null;
  #closed = false;
  #handshakeTimer: NodeJS.Timeout | undefined;
  #replies: Buffer[] = [];
  /** Run when the queued replies are written (they return budget bytes). */
  #sentCallbacks: (() => void)[] = [];
  #flushScheduled = false;

  constructor(id: number, socket: Socket, owner: ConnectionOwner) {
    this.id = id;
    this.socket = socket;
    this.#owner = owner;
    this.#negotiation = new Negotiation({
      exports: owner.exports,
      send: (buf) => this.#write(buf),
      close: (reason) => this.close(reason),
      enterTransmission: (session) => this.#enterTransmission(session),
      debug: (msg) => this.#debug(msg),
    });
  }

  get session(): Session | null {
    return this.#session;
  }

  /** Requests still running against the node. */
  get inflight(): number {
    return this.#transmission?.inflight ?? 0;
  }

  start(): void {
    const socket = this.socket;
    socket.on('data', (chunk: Buffer) => {
      this.#queue.push(chunk);
      this.#pump();
    });
    socket.on('drain', () => this.#pump());
    socket.on('error', (err) => this.#debug(`socket error: ${err.message}`));
    socket.on('end', () => this.close('client closed the connection'));
    socket.on('close', () => {
      this.#closed = true;
      clearTimeout(this.#handshakeTimer);
      this.#owner.connectionClosed(this);
    });
    if (this.#owner.handshakeLimitMs > 0) {
      // A client that never finishes negotiating must not hold a slot forever.
      this.#handshakeTimer = setTimeout(() => this.close('handshake time limit reached'), this.#owner.handshakeLimitMs);
    }
    this.#write(this.#negotiation.greeting());
  }

  /** New requests get NBD_ESHUTDOWN; negotiating clients are dropped. */
  shutdown(): void {
    if (this.#transmission !== null) this.#transmission.shutdown();
    else this.close('server shutting down');
  }

  close(reason: string): void {
    if (this.#closed) return;
    this.#closed = true;
    clearTimeout(this.#handshakeTimer);
    this.#debug(`closing: ${reason}`);
    // Let queued replies reach the client, then release the socket.
    this.#flushReplies();
    this.socket.end();
    this.socket.destroySoon();
  }

  #debug(message: string): void {
    this.#owner.log.debug(`conn ${this.id}: ${message}`);
  }

  #write(buf: Buffer): void {
    if (!this.#closed) this.socket.write(buf);
  }

  #enterTransmission(session: Session): void {
    clearTimeout(this.#handshakeTimer);
    this.#session = session;
    this.#owner.negotiated?.(this, session);
    this.#transmission = new Transmission(
      {
        sendReply: (parts, sent) => this.#queueReply(parts, sent),
        close: (reason) => this.close(reason),
        progress: () => this.#pump(),
        debug: (msg) => this.#debug(msg),
        warn: (msg) => this.#owner.log.warn(`conn ${this.id}: ${msg}`),
        requestDone: (event) => this.#owner.requestDone?.(this, event),
      },
      session,
      this.#owner.limits,
    );
  }

  /**
   * Replies finished in one turn of the event loop leave in one writev:
   * they are queued here and flushed corked from setImmediate, after the
   * loop has delivered every completion that was ready.
   */
  #queueReply(parts: Buffer[], sent?: () => void): void {
    // A reply to a client that has gone is dropped, not an error.
    if (this.#closed || this.socket.destroyed) {
      sent?.();
      return;
    }
    for (const part of parts) this.#replies.push(part);
    if (sent !== undefined) this.#sentCallbacks.push(sent);
    if (!this.#flushScheduled) {
      this.#flushScheduled = true;
      setImmediate(this.#flushReplies);
    }
  }

  readonly #flushReplies = (): void => {
    this.#flushScheduled = false;
    const replies = this.#replies;
    const callbacks = this.#sentCallbacks;
    this.#replies = [];
    this.#sentCallbacks = [];
    if (replies.length === 0 || this.socket.destroyed || this.socket.writableEnded) {
      for (const cb of callbacks) cb();
      return;
    }
    this.socket.cork();
    for (let i = 0; i < replies.length - 1; i++) this.socket.write(replies[i]!);
    // The write callback runs when the batch is with the kernel, or with an error when the socket dies.
    this.socket.write(replies[replies.length - 1]!, callbacks.length === 0 ? undefined : () => {
      for (const cb of callbacks) cb();
    });
    this.socket.uncork();
    if (this.#repliesBacklogged) this.#pump();
  };

  /**
   * Replies the client has not read yet pass the connection's bound. Not
   * Node's 16 KiB high-water mark: a client may send many requests before
   * it reads any reply, and stopping then would deadlock us both.
   */
  get #repliesBacklogged(): boolean {
    return this.socket.writableLength >= this.#owner.limits.maxInflightBytes;
  }

  #pump(): void {
    if (this.#closed) return;
    if (!this.#negotiation.finished) {
      // Replies to a batch of options leave in one write (no tiny packets).
      this.socket.cork();
      this.#negotiation.feed(this.#queue);
      this.socket.uncork();
    }
    if (this.#transmission !== null && !this.#closed) this.#transmission.feed(this.#queue);
    if (this.#closed) return;
    // Stop reading while we are saturated or the client does not read replies.
    const hold = this.#repliesBacklogged || (this.#transmission?.saturated ?? false);
    if (hold) this.socket.pause();
    else if (this.socket.isPaused()) this.socket.resume();
  }
}
