// The transmission phase (spec: "Transmission", "Request types",
// "Structured reply types"): parse requests from the connection's queue,
// validate each with the one pure check, run them concurrently against the
// shared block node, and write each reply whole. Parsing stops while the
// bytes or requests in flight exceed their bounds; the connection pauses
// its socket meanwhile and feeds again when work drains.
import {
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_CACHE,
  NBD_CMD_DISC,
  NBD_CMD_FLAG_DF,
  NBD_CMD_FLAG_FAST_ZERO,
  NBD_CMD_FLAG_FUA,
  NBD_CMD_FLAG_NO_HOLE,
  NBD_CMD_FLAG_REQ_ONE,
  NBD_CMD_FLUSH,
  NBD_CMD_READ,
  NBD_CMD_TRIM,
  NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES,
  NBD_EINVAL,
  NBD_ESHUTDOWN,
  OFFSET_DATA_HEADER_LENGTH,
  REQUEST_HEADER_LENGTH,
  SIMPLE_REPLY_HEADER_LENGTH,
} from '../protocol/constants.ts';
import type { ByteQueue } from '../protocol/byte-queue.ts';
import { commandLabel, commandName, errorLabel } from '../protocol/names.ts';
import {
  decodeRequest,
  encodeChunkBlockStatus,
  encodeChunkError,
  encodeChunkNone,
  encodeChunkOffsetDataHeader,
  encodeChunkOffsetHole,
  encodeSimpleReply,
  validateRequest,
  type Request,
  type ValidationContext,
} from '../protocol/transmission.ts';
import { isAllZero, zeroRuns } from '../exports/export.ts';
import { errnoOf, nbdErrorFromErrno } from './errors.ts';
import { OBSERVE_DONE, OBSERVE_START, type BackendError, type RequestEvent } from './events.ts';
import type { LogFields } from './log.ts';
import { exportFlags } from './flags.ts';
import type { ByteBudget } from './budget.ts';
import type { BufferPool } from './buffer-pool.ts';
import type { Session } from './negotiation.ts';
import type { FileSlice, MemoryRun } from '../exports/export.ts';
import type { ReplyPart } from './reply-writer.ts';
import { ReplySpace } from './reply-space.ts';

export interface TransmissionLimits {
  /** Parsing pauses once this many payload/reply bytes are in flight on one connection. */
  maxInflightBytes: number;
  /** ...or this many requests. */
  maxInflightRequests: number;
  /** Shared by every connection of the server (see budget.ts); none = no global bound. */
  budget?: ByteBudget;
  /** Reusable buffers for large read replies (see buffer-pool.ts). */
  pool?: BufferPool;
}

export const DEFAULT_LIMITS: TransmissionLimits = {
  // A request larger than this still runs (alone). 4 MiB in flight keeps a
  // 1 MiB qd16 reader fed: sequential reads ran 2-3x faster than with 64 MiB.
  maxInflightBytes: 4 * 1024 * 1024,
  maxInflightRequests: 256,
};

/** Write payloads at least this long that have not all arrived are read straight into their buffer. */
const DIRECT_READ_MIN = 64 * 1024;

/**
 * Unless the host writes large payloads at once (writesLargeNow), a large
 * write the node can do on this thread (BlockNode.writeNow: into tmpfs,
 * memory or a file's page cache) is written after the socket has been read dry, this much per
 * connection per turn of the event loop, and answered when its last slice
 * is in. Between slices the loop reads the socket again, so the client
 * keeps sending while we copy: a Unix socket holds only the sender's
 * 208 KiB, and a whole 1 MiB copy stalled it. Handed to the thread pool
 * instead, each write woke a pool thread that preempted this one
 * (bench/README.md "Large writes"). 64 and 256 KiB slices did no better.
 */
const WRITE_SLICE = 128 * 1024;

/**
 * Parsing pauses while this many bytes of one connection's large writes
 * wait for their slices. A payload then reaches the file soon after it was
 * read from the socket, while the CPU's cache still holds it: with the
 * in-flight bound alone (4 MiB a connection, 16 MiB for nbdcopy's four)
 * both copies went to and from memory, and `nbdcopy --connections=1`
 * spent 13 % (tmpfs) to 21 % (disk) more CPU per GB (bench/README.md,
 * session `s10`).
 */
const MAX_SLICED_BYTES = 2 * 1024 * 1024;

/**
 * Reads at least this long are sent from the file (sendfile) when the node
 * can say where their bytes lie: below it, a read is a small copy and its
 * reply joins the batch's one writev.
 */
const FILE_SLICE_MIN = 64 * 1024;

/** Zeroes sent for holes of BlockNode.readViews where a reply cannot say "hole"; never written. */
const ZEROES = Buffer.alloc(64 * 1024);

/** "NBD_CMD_BLOCK_STATUS": SHOULD NOT send more than 2^20 descriptors per chunk. */
const MAX_DESCRIPTORS = 1 << 20;

export type { RequestEvent } from './events.ts';

export interface TransmissionHost {
  /**
   * Write one whole reply; the parts go out corked, back to back. `sent`
   * runs once the bytes are with the kernel, or the reply was dropped.
   */
  sendReply(parts: ReplyPart[], sent?: () => void): void;
  /** sendReply() takes file slices (large reads then go by sendfile); else parts are Buffers. */
  readonly sendsFiles?: boolean;
  /**
   * Large write payloads the node can write on this thread (writeNow) are
   * written at once, whole, rather than in slices between socket reads
   * (WRITE_SLICE). Worth it where the client's next bytes keep arriving
   * into large socket buffers meanwhile (TCP): there slicing ran ×0.79–0.89.
   */
  readonly writesLargeNow?: boolean;
  /** Framing lost ('protocol_error') or NBD_CMD_DISC done ('disc'). */
  close(reason: string, cause: 'protocol_error' | 'disc'): void;
  /** Work drained: the connection may feed again. */
  progress(): void;
  /**
   * Read the socket's next bytes straight into `buf` from byte `filled`,
   * then call `done` (see socket-reader.ts). Without it, payloads are
   * gathered from the queue.
   */
  readInto?(buf: Buffer, filled: number, done: () => void, thenRead?: number): void;
  debug(message: string): void;
  /** False when debug() discards its message: per-request lines are then not built. */
  readonly debugging?: boolean;
  warn(message: string, fields?: LogFields): void;
  /** The connection's id, for events. */
  readonly id?: number;
  /**
   * Where small replies are built; the host recycles it when its replies
   * are all with the kernel. Without it, one that is never recycled.
   */
  readonly replySpace?: ReplySpace;
  /**
   * Who wants request events (OBSERVE_* bits of events.ts), asked once per
   * feed. 0: no timestamps are taken and no request event is built. A host
   * without it observes every request's end.
   */
  observing?(): number;
  requestStart?(event: RequestEvent): void;
  /** Once per observed request, when its reply is ready (DISC: when parsed). */
  requestDone?(event: RequestEvent): void;
  backendError?(event: BackendError): void;
}

/** `start`: when the header was parsed (performance.now()), 0 when unobserved. */
type State =
  | { name: 'header' }
  | { name: 'budget'; req: Request; start: number }
  | { name: 'payload'; req: Request; start: number }
  /** The rest of a write payload is being read into its buffer. */
  | { name: 'direct' }
  | { name: 'drain'; left: number }
  | { name: 'disconnecting' }
  /** Framing lost: the connection is closing and nothing more is parsed. */
  | { name: 'closed' };

/** A large write being written in slices; `written` bytes of its payload are in. */
interface SlicedWrite {
  req: Request;
  payload: Buffer;
  start: number;
  written: number;
}

export class Transmission {
  readonly #host: TransmissionHost;
  readonly #session: Session;
  readonly #limits: TransmissionLimits;
  readonly #ctx: ValidationContext;
  #state: State = { name: 'header' };
  #inflight = 0;
  #inflightBytes = 0;
  #shuttingDown = false;
  /** Pooled read buffers, returned to the pool when their reply is written. */
  // The maps are made at first use: a connection that does no I/O (a
  // probe, a connect-and-leave) makes none, and each is work for every GC.
  #pooled: WeakMap<Request, Buffer> | undefined;
  /** File slices of read replies, released when their reply is written. */
  #slices: WeakMap<Request, FileSlice> | undefined;
  /** Pooled write payloads, returned to the pool once their write has succeeded. */
  #pooledPayloads: WeakMap<Request, Buffer> | undefined;
  /** Large writes waiting for their slices (see WRITE_SLICE), oldest first. */
  #sliced: SlicedWrite[] | undefined;
  /** Bytes of the writes in #sliced (see MAX_SLICED_BYTES). */
  #slicedBytes = 0;
  /** Resumes parsing once the shared budget has room again. */
  readonly #wake: () => void;
  /** Where small replies are built (see reply-space.ts). */
  readonly #space: ReplySpace;

  constructor(host: TransmissionHost, session: Session, limits: TransmissionLimits = DEFAULT_LIMITS) {
    this.#host = host;
    this.#session = session;
    this.#limits = limits;
    this.#wake = () => host.progress();
    this.#space = host.replySpace ?? new ReplySpace();
    const exp = session.export;
    this.#ctx = {
      size: exp.size,
      transmissionFlags: exportFlags(exp, session.structuredReplies),
      structuredReplies: session.structuredReplies,
      metaContexts: session.metaContexts.length > 0,
      minimumBlock: exp.blockSize.minimum,
      maximumPayload: exp.blockSize.maximum,
    };
  }

  get inflight(): number {
    return this.#inflight;
  }

  /** True while parsing is held back by the in-flight bounds. */
  get saturated(): boolean {
    // Waiting for the shared budget counts too: the socket must not be read meanwhile.
    if (this.#state.name === 'budget') return true;
    return (
      this.#inflightBytes >= this.#limits.maxInflightBytes ||
      this.#inflight >= this.#limits.maxInflightRequests ||
      this.#slicedBytes >= MAX_SLICED_BYTES
    );
  }

  /** From now on new requests get NBD_ESHUTDOWN ("Terminating the transmission phase"). */
  shutdown(): void {
    this.#shuttingDown = true;
  }

  feed(queue: ByteQueue): void {
    // One timestamp for the headers parsed in this call: they arrived together.
    const observe = this.#host.observing !== undefined ? this.#host.observing() : OBSERVE_DONE;
    let now = 0;
    for (;;) {
      const state = this.#state;
      switch (state.name) {
        case 'disconnecting':
        case 'closed':
        case 'direct':
          return;
        case 'drain': {
          state.left -= queue.skip(state.left);
          if (state.left > 0) return;
          this.#state = { name: 'header' };
          break;
        }
        case 'budget': {
          // Hold the request until the shared budget has room for its bytes.
          if (!this.#limits.budget!.tryTake(state.req.length)) {
            this.#limits.budget!.waitFor(this.#wake);
            return;
          }
          if (state.req.type === NBD_CMD_WRITE) {
            this.#state = { name: 'payload', req: state.req, start: state.start };
          } else {
            this.#state = { name: 'header' };
            if (!this.#readNow(state.req, state.start)) this.#dispatch(state.req, undefined, state.start);
          }
          break;
        }
        case 'payload': {
          const n = state.req.length;
          if (queue.length < n) {
            if (n >= DIRECT_READ_MIN && this.#host.readInto !== undefined) this.#readPayloadDirect(queue, state.req, state.start);
            return;
          }
          if (this.#writeNow(queue, state.req, state.start)) {
            this.#state = { name: 'header' };
            break;
          }
          // A payload spread over socket chunks is gathered into a pooled
          // buffer: a fresh 1 MiB buffer per write kept the GC busy (48 % of
          // busy samples in a 1 MiB sequential-write profile).
          const pooled = queue.contiguous(n) ? undefined : this.#limits.pool?.get(n);
          if (pooled !== undefined) (this.#pooledPayloads ??= new WeakMap()).set(state.req, pooled);
          const payload = pooled === undefined ? queue.takeKept(n) : queue.takeInto(pooled);
          this.#state = { name: 'header' };
          if (!this.#writeLarge(state.req, payload, state.start)) this.#dispatch(state.req, payload, state.start);
          break;
        }
        case 'header': {
          if (this.saturated || queue.length < REQUEST_HEADER_LENGTH) return;
          const req = decodeRequest(queue.take(REQUEST_HEADER_LENGTH));
          if (req === null) {
            // "Request message": a bad magic means we lost framing; hang up.
            this.#state = { name: 'closed' };
            this.#host.close('bad request magic', 'protocol_error');
            return;
          }
          if (observe !== 0 && now === 0) now = performance.now();
          if ((observe & OBSERVE_START) !== 0) this.#host.requestStart?.(this.#event(req, 0, 0, now, 0));
          if (this.#host.debugging !== false) this.#host.debug(`request ${commandName(req.type)} flags 0x${req.flags.toString(16)} offset ${req.offset} length ${req.length}`);
          if (req.type === NBD_CMD_DISC) {
            // "NBD_CMD_DISC": finish what is in flight, then close.
            this.#done(req, 0, 0, now);
            this.#state = { name: 'disconnecting' };
            this.#closeWhenIdle();
            return;
          }
          let error = validateRequest(req, this.#ctx);
          let why = 'request rejected';
          // "NBD_CMD_BLOCK_STATUS": a zero length is unspecified; refuse it without disconnecting.
          if (error === 0 && req.type === NBD_CMD_BLOCK_STATUS && req.length === 0) {
            error = NBD_EINVAL;
            why = 'zero-length block status';
          }
          if (error === 0 && this.#shuttingDown) error = NBD_ESHUTDOWN;
          if (req.type === NBD_CMD_WRITE) {
            if (error !== 0) {
              // A rejected write still has its payload consumed, unread and unallocated.
              this.#replyError(req, error, why, now);
              if (req.length > 0) this.#state = { name: 'drain', left: req.length };
              break;
            }
            this.#state = this.#limits.budget !== undefined ? { name: 'budget', req, start: now } : { name: 'payload', req, start: now };
            break;
          }
          if (error !== 0) {
            this.#replyError(req, error, why, now);
            break;
          }
          if (req.type === NBD_CMD_READ && this.#limits.budget !== undefined) {
            this.#state = { name: 'budget', req, start: now };
            break;
          }
          if (req.type === NBD_CMD_READ && this.#readNow(req, now)) break;
          this.#dispatch(req, undefined, now);
          break;
        }
      }
    }
  }

  /** Take what the queue holds of a large payload, and have the socket read the rest into the same buffer. */
  #readPayloadDirect(queue: ByteQueue, req: Request, start: number): void {
    const pooled = this.#limits.pool?.get(req.length);
    if (pooled !== undefined) (this.#pooledPayloads ??= new WeakMap()).set(req, pooled);
    const payload = pooled ?? Buffer.allocUnsafe(req.length);
    const have = queue.length;
    queue.takeInto(payload.subarray(0, have));
    this.#state = { name: 'direct' };
    // A large write is often followed by another: read only the next
    // header first, so that the next payload is read into its own buffer too.
    this.#host.readInto!(
      payload,
      have,
      () => {
        this.#state = { name: 'header' };
        if (!this.#writeLarge(req, payload, start)) this.#dispatch(req, payload, start);
        this.#host.progress();
      },
      REQUEST_HEADER_LENGTH,
    );
  }

  #closeWhenIdle(): void {
    if (this.#inflight === 0) this.#host.close('client sent NBD_CMD_DISC', 'disc');
  }

  /**
   * Run `req` and send its reply. `asked` is the request as the client sent
   * it, when `req` is only the rest of it (#dispatchRest): the request's
   * events and logs are about what the client asked for.
   */
  #dispatch(req: Request, payload: Buffer | undefined, start: number, asked: Request = req): void {
    const cost = req.type === NBD_CMD_READ ? req.length : (payload?.length ?? 0);
    // Budget bytes (taken in the 'budget' state) go back once the reply is with the kernel.
    const held = this.#limits.budget !== undefined && (req.type === NBD_CMD_READ || req.type === NBD_CMD_WRITE) ? req.length : 0;
    this.#inflight++;
    this.#inflightBytes += cost;
    this.#run(req, payload)
      .then(
        (parts) => {
          this.#done(asked, 0, asked.type === NBD_CMD_READ || asked.type === NBD_CMD_WRITE ? asked.length : 0, start);
          return parts;
        },
        (err: unknown) => this.#failed(asked, err, start),
      )
      .then((parts) => {
        this.#inflight--;
        this.#host.sendReply(parts, this.#whenSent(req, cost, held));
        if (this.#state.name === 'disconnecting') this.#closeWhenIdle();
        else this.#host.progress();
      });
  }

  /**
   * What to do once a reply is with the kernel. Until then its bytes count
   * against this connection and the budget: a client that does not read
   * its replies holds at most maxInflightBytes of memory.
   */
  #whenSent(req: Request, cost: number, held: number): (() => void) | undefined {
    if (cost === 0 && held === 0) return undefined;
    return () => {
      this.#inflightBytes -= cost;
      if (held > 0) this.#limits.budget!.give(held);
      const pooled = this.#pooled?.get(req);
      if (pooled !== undefined) this.#limits.pool!.release(pooled);
      this.#slices?.get(req)?.release();
      if (this.#state.name !== 'disconnecting') this.#host.progress();
    };
  }

  /** A request the node failed: log and report it; its error reply. */
  #failed(req: Request, err: unknown, start: number): Buffer[] {
    const code = errnoOf(err);
    const error = nbdErrorFromErrno(code, req.flags);
    const message = err instanceof Error ? err.message : String(err);
    this.#host.warn(`${commandName(req.type)} offset ${req.offset} length ${req.length} failed: ${code ?? ''} ${message}`, {
      command: commandLabel(req.type),
      offset: req.offset,
      length: req.length,
      errno: code ?? 'unknown',
      error: errorLabel(error),
    });
    if (this.#host.backendError !== undefined) {
      this.#host.backendError({ conn: this.#host.id ?? 0, export: this.#session.export.name, command: req.type, errno: code ?? 'unknown', error, message });
    }
    this.#done(req, error, 0, start);
    return this.#errorReply(req, error, message || 'I/O error');
  }

  /**
   * A small write the node can do on this thread (BlockNode.writeNow):
   * done straight from the socket's bytes, with no copy of the payload and
   * no promise, and answered at once. False when the node cannot.
   */
  #writeNow(queue: ByteQueue, req: Request, start: number): boolean {
    if (this.#session.export.node.writeNow === undefined || req.length === 0 || req.length >= DIRECT_READ_MIN) return false;
    const reply = this.#tryWriteNow(req, queue.peek(req.length), start);
    if (reply === null) return false;
    queue.skip(req.length);
    this.#answerWrittenNow(req, reply);
    return true;
  }

  /**
   * A large write the node can do on this thread: written and answered at
   * once where the host asks for that (writesLargeNow), else queued for
   * slices. False when the node cannot: it is then dispatched.
   */
  #writeLarge(req: Request, payload: Buffer, start: number): boolean {
    if (this.#host.writesLargeNow !== true) return this.#writeInSlices(req, payload, start);
    const reply = this.#tryWriteNow(req, payload, start);
    if (reply === null) return false;
    this.#releasePayload(req);
    this.#answerWrittenNow(req, reply);
    return true;
  }

  /**
   * Queue a large write for writing in slices on this thread (WRITE_SLICE).
   * False when the node cannot write on this thread at all, or the write
   * asks for FUA: it is then dispatched.
   */
  #writeInSlices(req: Request, payload: Buffer, start: number): boolean {
    if (this.#session.export.node.writeNow === undefined || (req.flags & NBD_CMD_FLAG_FUA) !== 0) return false;
    const queue = (this.#sliced ??= []);
    queue.push({ req, payload, start, written: 0 });
    this.#slicedBytes += req.length;
    // Counted in flight like a dispatched request: it holds its payload, and NBD_CMD_DISC waits for it.
    this.#inflight++;
    this.#inflightBytes += req.length;
    if (queue.length === 1) setImmediate(Transmission.#writeSlice, this);
    return true;
  }

  /** One turn's slice of the oldest queued large write; answers it when it is all written. */
  static #writeSlice(tx: Transmission): void {
    const queue = tx.#sliced!;
    const w = queue[0]!;
    const { req, payload } = w;
    const n = Math.min(WRITE_SLICE, payload.length - w.written);
    let reply: Buffer[] | undefined;
    try {
      if (tx.#session.export.node.writeNow!(req.offset + w.written, payload.subarray(w.written, w.written + n), { fua: false })) {
        w.written += n;
        if (w.written === payload.length) reply = tx.#writtenReply(req, w.start);
      } else {
        tx.#unqueueSliced();
        tx.#dispatchRest(w);
      }
    } catch (err) {
      reply = tx.#failed(req, err, w.start);
    }
    if (reply !== undefined) {
      tx.#unqueueSliced();
      tx.#releasePayload(req);
      tx.#answerWrittenNow(req, reply);
    }
    if (queue.length > 0) setImmediate(Transmission.#writeSlice, tx);
    if (tx.#state.name === 'disconnecting') tx.#closeWhenIdle();
    else tx.#host.progress();
  }

  /** The oldest sliced write leaves the queue and stops counting in flight. */
  #unqueueSliced(): void {
    const { req } = this.#sliced!.shift()!;
    this.#slicedBytes -= req.length;
    this.#inflight--;
    this.#inflightBytes -= req.length;
  }

  /**
   * The node stopped writing on this thread partway (it is closing, or a
   * file's LoopWriteGuard sent its writes to the pool): what is left of the
   * write goes the usual way, and its reply, error or not, answers the
   * request (its events count every byte the client sent).
   */
  #dispatchRest(w: SlicedWrite): void {
    if (w.written === 0) {
      this.#dispatch(w.req, w.payload, w.start);
      return;
    }
    const rest: Request = { ...w.req, offset: w.req.offset + w.written, length: w.req.length - w.written };
    // The budget held the whole payload; the dispatched rest gives back only its own bytes.
    this.#limits.budget?.give(w.written);
    const pooled = this.#pooledPayloads?.get(w.req);
    if (pooled !== undefined) {
      this.#pooledPayloads!.delete(w.req);
      this.#pooledPayloads!.set(rest, pooled);
    }
    this.#dispatch(rest, w.payload.subarray(w.written), w.start, w.req);
  }

  #releasePayload(req: Request): void {
    const pooled = this.#pooledPayloads?.get(req);
    if (pooled === undefined) return;
    this.#pooledPayloads!.delete(req);
    this.#limits.pool!.release(pooled);
  }

  /** The reply to `data` written by BlockNode.writeNow, or null when the node cannot write it now. */
  #tryWriteNow(req: Request, data: Buffer, start: number): Buffer[] | null {
    const node = this.#session.export.node;
    if (node.writeNow === undefined) return null;
    try {
      if (!node.writeNow(req.offset, data, { fua: (req.flags & NBD_CMD_FLAG_FUA) !== 0 })) return null;
      return this.#writtenReply(req, start);
    } catch (err) {
      return this.#failed(req, err, start);
    }
  }

  #writtenReply(req: Request, start: number): Buffer[] {
    this.#done(req, 0, req.length, start);
    return [encodeSimpleReply(req.cookie, 0, this.#space.take(SIMPLE_REPLY_HEADER_LENGTH))];
  }

  #answerWrittenNow(req: Request, reply: Buffer[]): void {
    // The budget's bytes (taken in the 'budget' state) held a payload that is written now.
    if (this.#limits.budget !== undefined) this.#limits.budget.give(req.length);
    this.#host.sendReply(reply);
  }

  /**
   * A small read the node can do on this thread (BlockNode.readNow): its
   * reply is queued at once, with no promise. False when the node cannot
   * (the request is then dispatched) or when a slice would serve it.
   */
  #readNow(req: Request, start: number): boolean {
    const node = this.#session.export.node;
    if (node.readNow === undefined || req.length === 0 || req.length >= FILE_SLICE_MIN) return false;
    // Header and data side by side in shared reply space (see reply-space.ts).
    const headerLength = this.#session.structuredReplies ? OFFSET_DATA_HEADER_LENGTH : SIMPLE_REPLY_HEADER_LENGTH;
    const space = this.#space.take(headerLength + req.length);
    let reply: Buffer[];
    try {
      const into = space?.subarray(headerLength);
      const data = node.readNow(req.offset, req.length, into);
      if (data === null) {
        if (space !== undefined) this.#space.giveBack(space);
        return false;
      }
      this.#done(req, 0, req.length, start);
      reply = this.#dataReply(req, data, data === into ? space : undefined);
    } catch (err) {
      if (space !== undefined) this.#space.giveBack(space);
      reply = this.#failed(req, err, start);
    }
    // The reply holds the bytes (and any budget taken in the 'budget' state) until it is sent.
    this.#inflightBytes += req.length;
    this.#host.sendReply(reply, this.#whenSent(req, req.length, this.#limits.budget !== undefined ? req.length : 0));
    return true;
  }

  /** Run one validated request; resolves with its whole reply, rejects with the storage error. */
  async #run(req: Request, payload: Buffer | undefined): Promise<ReplyPart[]> {
    const node = this.#session.export.node;
    const fua = (req.flags & NBD_CMD_FLAG_FUA) !== 0;
    switch (req.type) {
      case NBD_CMD_READ:
        return this.#read(req);
      case NBD_CMD_WRITE: {
        const pooled = this.#pooledPayloads?.get(req);
        this.#pooledPayloads?.delete(req);
        if (req.length > 0) await node.write(req.offset, payload!, { fua });
        // Back to the pool only after success: a backend that gave up on a
        // write (a Redis timeout) may still read the buffer later.
        if (pooled !== undefined) this.#limits.pool!.release(pooled);
        break;
      }
      case NBD_CMD_FLUSH:
        await node.flush();
        break;
      case NBD_CMD_TRIM:
        if (req.length > 0) await node.trim(req.offset, req.length, { fua });
        break;
      case NBD_CMD_CACHE:
        if (req.length > 0) await node.cache(req.offset, req.length);
        break;
      case NBD_CMD_WRITE_ZEROES:
        if (req.length > 0) {
          await node.writeZeroes(req.offset, req.length, {
            fua,
            noHole: (req.flags & NBD_CMD_FLAG_NO_HOLE) !== 0,
            fast: (req.flags & NBD_CMD_FLAG_FAST_ZERO) !== 0,
          });
        }
        break;
      case NBD_CMD_BLOCK_STATUS:
        return this.#blockStatus(req);
    }
    return [encodeSimpleReply(req.cookie, 0)];
  }

  #event(req: Request, error: number, bytes: number, start: number, end: number): RequestEvent {
    return {
      conn: this.#host.id ?? 0,
      export: this.#session.export.name,
      cookie: req.cookie,
      command: req.type,
      flags: req.flags,
      offset: req.offset,
      length: req.length,
      error,
      bytes,
      start,
      end,
    };
  }

  /** Report a finished request; `start` 0 means nobody observed it. */
  #done(req: Request, error: number, bytes: number, start: number): void {
    if (start !== 0 && this.#host.requestDone !== undefined) this.#host.requestDone(this.#event(req, error, bytes, start, performance.now()));
  }

  #errorReply(req: Request, error: number, message: string): Buffer[] {
    if (this.#host.debugging !== false) this.#host.debug(`reply ${commandName(req.type)} error ${errorLabel(error)}`);
    // Structured replies carry READ and BLOCK_STATUS errors as an error
    // chunk; every other command may use a simple reply ("Simple reply message").
    const structured = this.#session.structuredReplies && (req.type === NBD_CMD_READ || req.type === NBD_CMD_BLOCK_STATUS);
    return [structured ? encodeChunkError(req.cookie, true, error, message) : encodeSimpleReply(req.cookie, error)];
  }

  /** Reply at once to a request refused before it ran. */
  #replyError(req: Request, error: number, message: string, start: number): void {
    this.#done(req, error, 0, start);
    this.#host.sendReply(this.#errorReply(req, error, message));
  }

  async #read(req: Request): Promise<ReplyPart[]> {
    const node = this.#session.export.node;
    const { offset, length, cookie } = req;
    if (length === 0) {
      return [this.#session.structuredReplies ? encodeChunkNone(cookie) : encodeSimpleReply(cookie, 0)];
    }
    // Data straight from the page cache: one data chunk, as qemu-nbd sends
    // data (a hole would have made the node say no; zero bytes that are
    // data go as data).
    const slice = length >= FILE_SLICE_MIN && this.#host.sendsFiles === true ? (node.fileSlice?.(offset, length) ?? null) : null;
    if (slice !== null) {
      (this.#slices ??= new WeakMap()).set(req, slice);
      const header = this.#session.structuredReplies ? encodeChunkOffsetDataHeader(cookie, true, offset, length) : encodeSimpleReply(cookie, 0);
      return [header, slice];
    }
    const views = length >= FILE_SLICE_MIN ? (node.readViews?.(offset, length) ?? null) : null;
    if (views !== null) return this.#viewsReply(req, views);
    const pooled = this.#limits.pool?.get(length);
    const data = await node.read(offset, length, pooled);
    if (pooled !== undefined) {
      // Back to the pool once the reply is written (or now, if unused).
      if (data.buffer === pooled.buffer) (this.#pooled ??= new WeakMap()).set(req, pooled);
      else this.#limits.pool!.release(pooled);
    }
    return this.#dataReply(req, data);
  }

  /**
   * The reply to a read answered with views of the node's memory
   * (BlockNode.readViews): the data goes as it lies, uncopied and unscanned;
   * what holds no data goes as hole chunks, or as zeroes where the reply
   * cannot carry holes (simple replies, DF).
   */
  #viewsReply(req: Request, runs: MemoryRun[]): Buffer[] {
    const { offset, length, cookie } = req;
    const end = offset + length;
    if (!this.#session.structuredReplies || (req.flags & NBD_CMD_FLAG_DF) !== 0) {
      const parts = [this.#session.structuredReplies ? encodeChunkOffsetDataHeader(cookie, true, offset, length) : encodeSimpleReply(cookie, 0)];
      for (const run of runs) {
        if (typeof run !== 'number') parts.push(run);
        else for (let left = run; left > 0; left -= ZEROES.length) parts.push(ZEROES.subarray(0, Math.min(left, ZEROES.length)));
      }
      return parts;
    }
    const parts: Buffer[] = [];
    let pos = offset;
    for (let i = 0; i < runs.length; ) {
      const run = runs[i]!;
      if (typeof run === 'number') {
        parts.push(encodeChunkOffsetHole(cookie, pos + run === end, pos, run));
        pos += run;
        i++;
        continue;
      }
      // Data runs side by side go as one chunk.
      let j = i;
      let n = 0;
      for (; j < runs.length && typeof runs[j] !== 'number'; j++) n += (runs[j] as Buffer).length;
      parts.push(encodeChunkOffsetDataHeader(cookie, pos + n === end, pos, n));
      for (; i < j; i++) parts.push(runs[i] as Buffer);
      pos += n;
    }
    return parts;
  }

  /** All of a read's data as one final NBD_REPLY_TYPE_OFFSET_DATA chunk (see #dataReply for `space`). */
  #dataChunk(req: Request, data: Buffer, space: Buffer | undefined): Buffer[] {
    if (space === undefined) return [encodeChunkOffsetDataHeader(req.cookie, true, req.offset, req.length), data];
    encodeChunkOffsetDataHeader(req.cookie, true, req.offset, req.length, space);
    return [space];
  }

  /**
   * The reply to a read that returned `data`. `space` (optional) holds
   * `data` at its end, with room for the header before it: a reply that is
   * one header and that data is then written in it, as one buffer.
   */
  #dataReply(req: Request, data: Buffer, space?: Buffer): Buffer[] {
    const { offset, length, cookie } = req;
    if (!this.#session.structuredReplies) {
      if (space === undefined) return [encodeSimpleReply(cookie, 0), data];
      encodeSimpleReply(cookie, 0, space);
      return [space];
    }
    // "NBD_CMD_READ": with DF, one data chunk.
    if ((req.flags & NBD_CMD_FLAG_DF) !== 0) return this.#dataChunk(req, data, space);
    // "NBD_REPLY_TYPE_OFFSET_HOLE": zero stretches (4 KiB granules) go as
    // holes, as qemu-nbd sends a file's holes. Checking the data costs a
    // memcmp per granule; asking the node for extents costs lseek calls
    // that are O(file) on tmpfs.
    if (isAllZero(data)) return [encodeChunkOffsetHole(cookie, true, offset, length)];
    const runs = zeroRuns(data, offset);
    if (runs.length === 1) return this.#dataChunk(req, data, space);
    const parts: Buffer[] = [];
    runs.forEach((run, i) => {
      const done = i === runs.length - 1;
      if (run.zero) {
        parts.push(encodeChunkOffsetHole(cookie, done, run.offset, run.length));
      } else {
        parts.push(encodeChunkOffsetDataHeader(cookie, done, run.offset, run.length));
        parts.push(data.subarray(run.offset - offset, run.offset - offset + run.length));
      }
    });
    return parts;
  }

  async #blockStatus(req: Request): Promise<Buffer[]> {
    const { offset, length, cookie } = req;
    const reqOne = (req.flags & NBD_CMD_FLAG_REQ_ONE) !== 0;
    const exp = this.#session.export;
    const contexts = this.#session.metaContexts;
    const answers = await Promise.all(contexts.map((ctx) => ctx.status(offset, length, reqOne ? 1 : MAX_DESCRIPTORS)));
    return answers.map((runs, i) => {
      const descriptors = reqOne ? runs.slice(0, 1).map((r) => ({ length: Math.min(r.length, length), flags: r.flags })) : runs;
      return encodeChunkBlockStatus(cookie, i === answers.length - 1, exp.contextId(contexts[i]!), descriptors);
    });
  }
}
