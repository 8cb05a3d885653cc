// Socket reads into buffers we choose (net.Socket's `onread`), instead of
// Node's default of a fresh 64 KiB buffer for every read:
// - reads land in one staging buffer, reused for every read of every
//   socket: the sink must copy what it keeps before it returns
//   (ByteQueue.pushBorrowed/release). libuv asks for the buffer, reads and
//   calls back in one go for one socket, so no two reads share it at once;
//   a connection then costs no 64 KiB of its own (a profile of connect,
//   negotiate, disconnect loops had 4 % of the CPU allocating them);
// - a large write payload is read straight into the buffer it will be
//   written from, so it is copied once (kernel to buffer), as a C server
//   would do, with no chunks to allocate, gather and collect.
// A 1 MiB sequential write spent about half its CPU on those chunks.
import net from 'node:net';
import util from 'node:util';
import { type ClientSocket, type StreamHandle, Wire, wireAvailable } from './wire.ts';

/** Size of the staging buffer: one read takes at most this much. */
const STAGING_BYTES = 64 * 1024;

interface DirectRead {
  buf: Buffer;
  filled: number;
  done: () => void;
  thenRead: number;
}

let sharedStaging: Buffer | undefined;

export class SocketReader {
  readonly #staging = (sharedStaging ??= Buffer.allocUnsafeSlow(STAGING_BYTES));
  #direct: DirectRead | null = null;
  /** Whether the buffer last handed to the socket was the direct target. */
  #givenDirect = false;
  /** When not 0, the next staging read takes at most this many bytes. */
  #nextLimit = 0;
  /**
   * Receives what arrived outside a direct read. The chunk is lent: the
   * next read overwrites it, so whatever the sink keeps it copies first.
   */
  sink: (chunk: Buffer) => void = () => {};

  /** The socket's `onread` option. */
  readonly onread: net.OnReadOpts = {
    buffer: () => {
      const direct = this.#direct;
      this.#givenDirect = direct !== null;
      if (direct !== null) return direct.buf.subarray(direct.filled);
      if (this.#nextLimit === 0) return this.#staging;
      const limited = this.#staging.subarray(0, this.#nextLimit);
      this.#nextLimit = 0;
      return limited;
    },
    // Returns true: the connection pauses the socket itself when it must.
    callback: (n: number): boolean => {
      const direct = this.#direct;
      if (direct === null) {
        this.sink(this.#staging.subarray(0, n));
        return true;
      }
      let used = n;
      if (!this.#givenDirect) {
        // The direct read was asked for after the staging buffer had been
        // handed out (a write that waited for the memory budget): these
        // bytes come first in the payload, and only what follows it is not.
        used = Math.min(n, direct.buf.length - direct.filled);
        this.#staging.copy(direct.buf, direct.filled, 0, used);
      }
      direct.filled += used;
      if (direct.filled < direct.buf.length) return true;
      this.#direct = null;
      this.#nextLimit = direct.thenRead;
      direct.done();
      if (used < n) this.sink(this.#staging.subarray(used, n));
      return true;
    },
  };

  /**
   * Fill `buf` from its byte `filled` onwards with the next bytes the
   * socket brings, then call `done`; nothing reaches the sink meanwhile.
   * `thenRead` (when not 0) bounds the read after that: a request header's
   * length, so that a large payload behind it is not read into the staging
   * buffer and copied, but read straight into its own buffer too.
   */
  readInto(buf: Buffer, filled: number, done: () => void, thenRead = 0): void {
    if (filled >= buf.length) {
      this.#nextLimit = thenRead;
      done();
      return;
    }
    this.#direct = { buf, filled, done, thenRead };
  }
}

/**
 * The accepted socket's connection as a socket that reads through `reader`,
 * or null when this Node cannot hand it over. The accepted socket must not
 * have read yet (the listener's pauseOnConnect); it is released without
 * closing the connection.
 */
export function readThrough(socket: net.Socket, reader: SocketReader): net.Socket | null {
  // Node's listener gives accepted sockets no `onread`; a socket built on
  // the same handle can have one. `_handle` is Node's (stable) internal.
  const holder = socket as unknown as { _handle: unknown };
  const handle = holder._handle;
  if (handle === null || handle === undefined || socket.destroyed) return null;
  const adopted = new net.Socket({ handle, readable: true, writable: true, allowHalfOpen: socket.allowHalfOpen, onread: reader.onread } as net.SocketConstructorOpts);
  holder._handle = null;
  socket.destroy();
  return adopted;
}

/**
 * Have `server` build each accepted socket itself, reading through a new
 * SocketReader from the start, and hand it to `accept`. Node's listener
 * builds a paused Socket that readThrough() must then replace: two Socket
 * objects per connection, and their construction was a fifth of the busy
 * time of a connect-negotiate-disconnect loop. With `raw` (and a Node that
 * allows it, see wire.ts) the socket is a Wire on the accepted handle, with
 * no net.Socket at all. Returns false, leaving the listener's 'connection'
 * events as they are, when this Node's listener has no handle to do it on.
 * `_handle.onconnection` is Node's (stable) internal, as in readThrough();
 * the listener's maxConnections and its connection count are not kept (the
 * NbdServer keeps its own).
 */
export function acceptThrough(server: net.Server, accept: (socket: ClientSocket, reader: SocketReader) => void, raw = false): boolean {
  const listener = (server as unknown as { _handle: { onconnection?: unknown } | null })._handle;
  if (listener === null || listener === undefined || typeof listener.onconnection !== 'function') return false;
  const wire = raw && wireAvailable();
  listener.onconnection = (err: number, handle: StreamHandle) => {
    if (err !== 0 && err !== undefined) {
      server.emit('error', Object.assign(new Error(`accept ${util.getSystemErrorName(err)}`), { code: util.getSystemErrorName(err), errno: err, syscall: 'accept' }));
      return;
    }
    // As Node's listener does for noDelay: each request and reply goes out at once.
    const tcp = typeof handle.setNoDelay === 'function';
    if (tcp) handle.setNoDelay!(true);
    const reader = new SocketReader();
    // Reading starts on the next turn of the loop: accept() sets the sink first.
    const socket = wire
      ? new Wire(handle, reader)
      : new net.Socket({ handle, readable: true, writable: true, allowHalfOpen: (server as unknown as { allowHalfOpen: boolean }).allowHalfOpen, noDelay: tcp, onread: reader.onread } as net.SocketConstructorOpts);
    accept(socket, reader);
  };
  return true;
}
