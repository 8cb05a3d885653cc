// A client connection driven straight on libuv's stream handle (the Pipe or
// TCP handle a listener accepts), without a net.Socket around it.
//
// Why: a net.Socket is a Duplex stream. Per connection it builds readable
// and writable state, and per write it runs the Writable machinery (buffer
// list, corking, nextTick callbacks). For a client that connects,
// negotiates and leaves, that bounds the rate: a bare net.Server that only
// answers the handshake (bench/connect-floor.mjs) spent 152 µs of CPU per
// connection on this machine, the same handshake on the raw handle 86 µs,
// and qemu-nbd 103 µs (bench/README.md). The handle's methods (readStart, writev,
// shutdown, close) are those net.Socket itself calls; what we cannot get
// elsewhere is the request constructors and the shared state the C++ side
// reports a write's outcome in, from `process.binding('stream_wrap')`.
// Where this Node does not offer them, wireAvailable() is false and the
// server keeps net.Socket.
//
// Only what Connection, ReplyWriter and NbdServer use is here, with
// net.Socket's meaning: write/cork/uncork (writes while corked leave in
// one writev), writableLength, pause/resume, end (shut down the sending
// side once every write is with the kernel), destroySoon, destroy, and the
// events 'drain', 'end', 'error' and 'close'. Reads always go through a
// SocketReader: libuv reads into the buffer it lends.
import { EventEmitter } from 'node:events';
import util from 'node:util';
import type { SocketReader } from './socket-reader.ts';

/** The part of net.Socket that connections use; a Wire has it too. */
export interface ClientSocket extends EventEmitter {
  readonly destroyed: boolean;
  readonly writableEnded: boolean;
  /** Bytes written but not yet taken by the kernel. */
  readonly writableLength: number;
  readonly remoteAddress?: string | undefined;
  readonly remotePort?: number | undefined;
  cork(): void;
  uncork(): void;
  write(buf: Buffer, cb?: (err?: Error | null) => void): boolean;
  pause(): this;
  resume(): this;
  isPaused(): boolean;
  end(): this;
  destroySoon(): void;
  destroy(err?: Error): this;
}

interface StreamBinding {
  streamBaseState: Int32Array;
  WriteWrap: new () => WriteReq;
  ShutdownWrap: new () => ShutdownReq;
  kReadBytesOrError: number;
  kBytesWritten: number;
  kLastWriteWasAsync: number;
}

interface WriteReq {
  handle: StreamHandle;
  oncomplete: (this: WriteReq, status: number) => void;
  async: boolean;
  bytes: number;
  buffer: unknown;
  // Ours: the wire and the callbacks to run when the kernel has the bytes.
  wire: Wire;
  callbacks: WriteCallback[] | null;
}

interface ShutdownReq {
  handle: StreamHandle;
  oncomplete: (this: ShutdownReq, status: number) => void;
  wire: Wire;
}

/** A libuv stream handle as Node's net module sees it (tcp_wrap, pipe_wrap). */
export interface StreamHandle {
  fd?: number;
  onread: (this: StreamHandle, buffer?: ArrayBuffer) => Buffer | undefined;
  readStart(): number;
  readStop(): number;
  useUserBuffer(buf: Buffer): void;
  writeBuffer(req: WriteReq, buf: Buffer): number;
  writev(req: WriteReq, chunks: Buffer[], allBuffers: boolean): number;
  shutdown(req: ShutdownReq): number;
  close(cb?: () => void): void;
  setNoDelay?(on: boolean): number;
  getpeername?(out: { address?: string; port?: number }): number;
}

type WriteCallback = (err?: Error | null) => void;

/** Shared by every write without a callback; never modified. */
const NO_CALLBACKS: WriteCallback[] = [];

function loadBinding(): StreamBinding | null {
  try {
    const binding = (process as unknown as { binding(name: string): Partial<StreamBinding> }).binding('stream_wrap');
    const { streamBaseState, WriteWrap, ShutdownWrap, kReadBytesOrError, kBytesWritten, kLastWriteWasAsync } = binding;
    if (!(streamBaseState instanceof Int32Array) || typeof WriteWrap !== 'function' || typeof ShutdownWrap !== 'function') return null;
    if (typeof kReadBytesOrError !== 'number' || typeof kBytesWritten !== 'number' || typeof kLastWriteWasAsync !== 'number') return null;
    return binding as StreamBinding;
  } catch {
    return null;
  }
}

const binding = loadBinding();

/** libuv's end-of-stream code (UV_EOF), as this Node reports it. */
const UV_EOF = (() => {
  for (const [code, [name]] of util.getSystemErrorMap()) if (name === 'EOF') return code;
  return -4095;
})();

/** Whether this Node lets us drive accepted handles ourselves (see the top of this file). */
export function wireAvailable(): boolean {
  return binding !== null;
}

function errnoError(code: number, syscall: string): Error {
  const name = util.getSystemErrorName(code);
  return Object.assign(new Error(`${syscall} ${name}`), { code: name, errno: code, syscall });
}

/** Write callbacks that completed synchronously run together after the current job, as net.Socket's do (never inside write()). */
let deferred: { cbs: WriteCallback[]; err: Error | null }[] = [];
function runDeferred(): void {
  const batch = deferred;
  deferred = [];
  for (const { cbs, err } of batch) for (const cb of cbs) cb(err);
}
function defer(cbs: WriteCallback[], err: Error | null): void {
  if (deferred.length === 0) process.nextTick(runDeferred);
  deferred.push({ cbs, err });
}

function ignoreRead(): undefined {
  return undefined;
}

function onWriteComplete(this: WriteReq, status: number): void {
  this.wire.writeCompleted(this, status);
}

/** The fd under a Wire or net.Socket, or -1 (no handle, not a file descriptor, or TLS: its bytes are not the file's). */
export function socketFd(socket: ClientSocket): number {
  if (socket instanceof Wire) return socket.fd;
  if ((socket as { encrypted?: boolean }).encrypted === true) return -1;
  const fd = (socket as unknown as { _handle?: { fd?: unknown } })._handle?.fd;
  return typeof fd === 'number' && fd >= 0 ? fd : -1;
}

function onShutdownComplete(this: ShutdownReq): void {
  // Whatever the outcome, the sending side is done: destroySoon's close follows.
  this.wire.shutdownCompleted();
}

export class Wire extends EventEmitter implements ClientSocket {
  readonly #handle: StreamHandle;
  readonly #reader: SocketReader;
  readonly remoteAddress: string | undefined;
  readonly remotePort: number | undefined;
  /** The socket's fd (for sendfile and SO_SNDBUF), -1 when the handle has none. */
  readonly fd: number;
  #destroyed = false;
  #ended = false;
  #shutDown = false;
  #shutComplete = false;
  #closeWhenShut = false;
  /** The client shut down its side: there is nothing more to read. */
  #eof = false;
  #reading = false;
  #corked = 0;
  #corkedBufs: Buffer[] = [];
  #corkedBytes = 0;
  #corkedCbs: WriteCallback[] = [];
  /** Bytes of writes the kernel has not taken yet. */
  #pendingBytes = 0;
  /** Asynchronous writes not yet completed. */
  readonly #inflight = new Set<WriteReq>();

  constructor(handle: StreamHandle, reader: SocketReader) {
    super();
    if (binding === null) throw new Error('this Node offers no stream_wrap binding');
    this.#handle = handle;
    this.#reader = reader;
    const fd = handle.fd;
    this.fd = typeof fd === 'number' && fd >= 0 ? fd : -1;
    if (typeof handle.getpeername === 'function') {
      const peer: { address?: string; port?: number } = {};
      if (handle.getpeername(peer) === 0) {
        this.remoteAddress = peer.address;
        this.remotePort = peer.port;
      }
    }
    handle.onread = this.#onread;
    const first = reader.onread.buffer;
    handle.useUserBuffer((first instanceof Function ? first() : first) as Buffer);
    // libuv calls back only from the event loop, so the caller sets the reader's sink before any byte arrives.
    this.resume();
  }

  get destroyed(): boolean {
    return this.#destroyed;
  }

  get writableEnded(): boolean {
    return this.#ended;
  }

  get writableLength(): number {
    return this.#pendingBytes + this.#corkedBytes;
  }

  readonly #onread = (): Buffer | undefined => {
    const nread = binding!.streamBaseState[binding!.kReadBytesOrError]!;
    if (nread > 0) {
      if (this.#destroyed) return undefined;
      const onread = this.#reader.onread;
      onread.callback(nread, undefined as unknown as Uint8Array);
      // The reader says where the next read lands (its staging buffer or a payload's own).
      return onread.buffer instanceof Function ? (onread.buffer() as Buffer) : undefined;
    }
    if (nread === 0) return undefined;
    this.#stopReading();
    if (nread === UV_EOF) {
      this.#eof = true;
      this.emit('end');
    } else this.destroy(errnoError(nread, 'read'));
    return undefined;
  };

  cork(): void {
    this.#corked++;
  }

  uncork(): void {
    if (this.#corked === 0) return;
    if (--this.#corked > 0 || this.#corkedBufs.length === 0) return;
    const bufs = this.#corkedBufs;
    const cbs = this.#corkedCbs;
    this.#corkedBufs = [];
    this.#corkedCbs = [];
    this.#corkedBytes = 0;
    this.#writeNow(bufs, cbs);
  }

  write(buf: Buffer, cb?: WriteCallback): boolean {
    if (this.#destroyed || this.#ended) {
      if (cb !== undefined) defer([cb], errnoError(-32, 'write')); // EPIPE, as a destroyed net.Socket reports
      return false;
    }
    if (this.#corked > 0) {
      this.#corkedBufs.push(buf);
      this.#corkedBytes += buf.length;
      if (cb !== undefined) this.#corkedCbs.push(cb);
      return true;
    }
    this.#writeNow([buf], cb === undefined ? NO_CALLBACKS : [cb]);
    return this.#pendingBytes === 0;
  }

  #writeNow(bufs: Buffer[], cbs: WriteCallback[]): void {
    const { WriteWrap, streamBaseState, kBytesWritten, kLastWriteWasAsync } = binding!;
    const req = new WriteWrap();
    req.handle = this.#handle;
    req.oncomplete = onWriteComplete;
    req.async = false;
    req.wire = this;
    req.callbacks = cbs;
    const err = bufs.length === 1 ? this.#handle.writeBuffer(req, bufs[0]!) : this.#handle.writev(req, bufs, true);
    if (err !== 0) {
      req.callbacks = null;
      const error = errnoError(err, 'write');
      defer(cbs, error);
      this.destroy(error);
      return;
    }
    if (streamBaseState[kLastWriteWasAsync] === 0) {
      if (cbs.length > 0) defer(cbs, null);
      return;
    }
    // libuv holds on to the rest of the bytes: keep the buffers alive until it is done.
    req.async = true;
    req.buffer = bufs;
    req.bytes = streamBaseState[kBytesWritten]!;
    this.#pendingBytes += req.bytes;
    this.#inflight.add(req);
  }

  /** @internal From the write request's oncomplete. */
  writeCompleted(req: WriteReq, status: number): void {
    if (!this.#inflight.delete(req)) return; // dropped by destroy() already
    this.#pendingBytes -= req.bytes;
    const cbs = req.callbacks!;
    req.callbacks = null;
    req.buffer = null;
    if (status < 0) {
      const error = errnoError(status, 'write');
      for (const cb of cbs) cb(error);
      this.destroy(error);
      return;
    }
    for (const cb of cbs) cb(null);
    if (this.#pendingBytes === 0) {
      if (this.#ended && !this.#shutDown) this.#shutdown();
      else this.emit('drain');
    }
  }

  pause(): this {
    this.#stopReading();
    return this;
  }

  resume(): this {
    if (!this.#reading && !this.#destroyed && !this.#eof) {
      this.#reading = true;
      const err = this.#handle.readStart();
      if (err !== 0) this.destroy(errnoError(err, 'read'));
    }
    return this;
  }

  isPaused(): boolean {
    return !this.#reading;
  }

  #stopReading(): void {
    if (!this.#reading) return;
    this.#reading = false;
    if (!this.#destroyed) this.#handle.readStop();
  }

  /** Shut down our sending side once every write is with the kernel; reading goes on. */
  end(): this {
    if (this.#ended || this.#destroyed) return this;
    this.#ended = true;
    if (this.#corked > 0) {
      this.#corked = 1;
      this.uncork();
    }
    if (this.#pendingBytes === 0) this.#shutdown();
    return this;
  }

  #shutdown(): void {
    if (this.#shutDown || this.#destroyed) return;
    this.#shutDown = true;
    const req = new binding!.ShutdownWrap();
    req.handle = this.#handle;
    req.oncomplete = onShutdownComplete;
    req.wire = this;
    if (this.#handle.shutdown(req) !== 0) this.shutdownCompleted();
  }

  /** @internal From the shutdown request's oncomplete. */
  shutdownCompleted(): void {
    this.#shutComplete = true;
    if (this.#closeWhenShut) this.destroy();
  }

  /** end(), then close once the shutdown is done (net.Socket's destroySoon). */
  destroySoon(): void {
    this.#closeWhenShut = true;
    if (this.#shutComplete) this.destroy();
    else this.end();
  }

  destroy(err?: Error): this {
    if (this.#destroyed) return this;
    this.#destroyed = true;
    if (this.#reading) {
      this.#reading = false;
      this.#handle.readStop();
    }
    // Writes that never reached the kernel fail, as a destroyed net.Socket's do.
    const dropped: WriteCallback[] = this.#corkedCbs;
    this.#corkedBufs = [];
    this.#corkedCbs = [];
    this.#corkedBytes = 0;
    for (const req of this.#inflight) {
      for (const cb of req.callbacks!) dropped.push(cb);
      req.callbacks = null;
    }
    this.#inflight.clear();
    this.#pendingBytes = 0;
    if (dropped.length > 0) defer(dropped, err ?? errnoError(-32, 'write'));
    // The handle lets go of our reader (the C++ side insists on a function).
    this.#handle.onread = ignoreRead;
    this.#handle.close(() => {
      if (err !== undefined && this.listenerCount('error') > 0) this.emit('error', err);
      this.emit('close', err !== undefined);
    });
    return this;
  }
}
