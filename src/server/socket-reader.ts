// Socket reads into buffers we choose (net.Socket's `onread`), instead of
// Node's default of a fresh 64 KiB buffer for every read:
// - small reads (headers, options, small payloads) land in one reused
//   staging buffer and are copied out at their exact size;
// - a large write payload is read straight into the buffer it will be
//   written from, so it is copied once (kernel to buffer), as a C server
//   would do, with no chunks to allocate, gather and collect.
// A 1 MiB sequential write spent about half its CPU on those chunks.
import net from 'node:net';

/** Size of the staging buffer: one read takes at most this much. */
const STAGING_BYTES = 64 * 1024;
/**
 * Reads at least this long hand the staging buffer itself on (a new one
 * takes its place); shorter ones are copied out, so that a few bytes do not
 * pin 64 KiB.
 */
const HAND_ON_MIN = 16 * 1024;

interface DirectRead {
  buf: Buffer;
  filled: number;
  done: () => void;
}

export class SocketReader {
  #staging = Buffer.allocUnsafeSlow(STAGING_BYTES);
  #direct: DirectRead | null = null;
  /** Receives what arrived outside a direct read, as a buffer of its own. */
  sink: (chunk: Buffer) => void = () => {};

  /** The socket's `onread` option. */
  readonly onread: net.OnReadOpts = {
    buffer: () => (this.#direct === null ? this.#staging : this.#direct.buf.subarray(this.#direct.filled)),
    // Returns true: the connection pauses the socket itself when it must.
    callback: (n: number, buf: Uint8Array): boolean => {
      const direct = this.#direct;
      if (direct === null || buf === this.#staging) {
        const staging = this.#staging;
        let chunk: Buffer;
        if (n >= HAND_ON_MIN) {
          chunk = staging.subarray(0, n);
          this.#staging = Buffer.allocUnsafeSlow(STAGING_BYTES);
        } else {
          chunk = Buffer.allocUnsafe(n);
          staging.copy(chunk, 0, 0, n);
        }
        this.sink(chunk);
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
