// Socket reads into buffers we choose (net.Socket's `onread`), instead of
// Node's default of a fresh 64 KiB buffer for every read:
// - reads land in one staging buffer, reused for every read: the sink must
//   copy what it keeps before it returns (ByteQueue.pushBorrowed/release);
// - a large write payload is read straight into the buffer it will be
//   written from, so it is copied once (kernel to buffer), as a C server
//   would do, with no chunks to allocate, gather and collect.
// A 1 MiB sequential write spent about half its CPU on those chunks.
import net from 'node:net';

/** Size of the staging buffer: one read takes at most this much. */
const STAGING_BYTES = 64 * 1024;

interface DirectRead {
  buf: Buffer;
  filled: number;
  done: () => void;
}

export class SocketReader {
  readonly #staging = Buffer.allocUnsafeSlow(STAGING_BYTES);
  #direct: DirectRead | null = null;
  /**
   * Receives what arrived outside a direct read. The chunk is lent: the
   * next read overwrites it, so whatever the sink keeps it copies first.
   */
  sink: (chunk: Buffer) => void = () => {};

  /** The socket's `onread` option. */
  readonly onread: net.OnReadOpts = {
    buffer: () => (this.#direct === null ? this.#staging : this.#direct.buf.subarray(this.#direct.filled)),
    // Returns true: the connection pauses the socket itself when it must.
    callback: (n: number, buf: Uint8Array): boolean => {
      const direct = this.#direct;
      if (direct === null || buf === this.#staging) {
        this.sink(this.#staging.subarray(0, n));
        return true;
      }
      direct.filled += n;
      if (direct.filled < direct.buf.length) return true;
      this.#direct = null;
      direct.done();
      return true;
    },
  };

  /**
   * Fill `buf` from its byte `filled` onwards with the next bytes the
   * socket brings, then call `done`; nothing reaches the sink meanwhile.
   */
  readInto(buf: Buffer, filled: number, done: () => void): void {
    if (filled >= buf.length) {
      done();
      return;
    }
    this.#direct = { buf, filled, done };
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
  const adopted = new net.Socket({ handle, readable: true, writable: true, allowHalfOpen: false, onread: reader.onread } as net.SocketConstructorOpts);
  holder._handle = null;
  socket.destroy();
  return adopted;
}
