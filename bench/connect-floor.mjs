// The least a Node server can do per connection for bench/connect.py: a
// bare net.Server on a Unix socket that sends the greeting, answers one
// NBD_OPT_GO with NBD_INFO_EXPORT and NBD_REP_ACK, and closes at the next
// request (NBD_CMD_DISC). No validation, no exports, no logging: it says
// how close to qemu-nbd's connection rate any server built on net.Socket
// can come on this machine, so that the connect row of bench/README.md can
// be read against it. With --raw the same handshake runs on the accepted
// libuv handle, with no net.Socket, as nbd-export's Wire does
// (src/server/wire.ts): the floor for a server built that way.
//
//   node bench/connect-floor.mjs /tmp/floor.sock [--raw] &
//   python3 bench/connect.py unix:/tmp/floor.sock bench 3
import fs from 'node:fs';
import net from 'node:net';

const path = process.argv[2];
if (path === undefined) {
  console.error('usage: node bench/connect-floor.mjs SOCKET_PATH [--raw]');
  process.exit(2);
}
fs.rmSync(path, { force: true });

const REPLY_MAGIC = 0x3e889045565a9n;
const NBD_REP_ACK = 1;
const NBD_REP_INFO = 3;
const NBD_INFO_EXPORT = 0;
// NBDMAGIC IHAVEOPT, then FIXED_NEWSTYLE | NO_ZEROES.
const greeting = Buffer.from('NBDMAGICIHAVEOPT\x00\x03', 'latin1');

function optionReply(option, type, payload) {
  const reply = Buffer.alloc(20 + payload.length);
  reply.writeBigUInt64BE(REPLY_MAGIC, 0);
  reply.writeUInt32BE(option, 8);
  reply.writeUInt32BE(type, 12);
  reply.writeUInt32BE(payload.length, 16);
  payload.copy(reply, 20);
  return reply;
}

const info = Buffer.alloc(12);
info.writeUInt16BE(NBD_INFO_EXPORT, 0);
info.writeBigUInt64BE(1n << 30n, 2); // 1 GiB
info.writeUInt16BE(1, 10); // NBD_FLAG_HAS_FLAGS

/** The handshake state of one connection: feed() it bytes, and it answers through `send` until `done`. */
function handshake(send, done) {
  let pending = Buffer.alloc(0);
  let phase = 'flags';
  return (chunk) => {
    pending = pending.length === 0 ? chunk : Buffer.concat([pending, chunk]);
    for (;;) {
      if (phase === 'flags') {
        if (pending.length < 4) return;
        pending = pending.subarray(4);
        phase = 'option';
      } else if (phase === 'option') {
        if (pending.length < 16 || pending.length < 16 + pending.readUInt32BE(12)) return;
        const option = pending.readUInt32BE(8);
        pending = pending.subarray(16 + pending.readUInt32BE(12));
        send([optionReply(option, NBD_REP_INFO, info), optionReply(option, NBD_REP_ACK, Buffer.alloc(0))]);
        phase = 'transmission';
      } else {
        if (pending.length < 28) return;
        done();
        return;
      }
    }
  };
}

/** Each accepted handle driven with the calls net.Socket itself makes on it. */
function serveRaw(server) {
  const { streamBaseState, WriteWrap, kReadBytesOrError, kArrayBufferOffset } = process.binding('stream_wrap');
  const write = (handle, bufs) => {
    const req = new WriteWrap();
    req.handle = handle;
    req.oncomplete = () => {};
    req.async = false;
    if ((bufs.length === 1 ? handle.writeBuffer(req, bufs[0]) : handle.writev(req, bufs, true)) !== 0) handle.close();
  };
  server._handle.onconnection = (err, handle) => {
    if (err) return;
    let closed = false;
    const close = () => {
      if (closed) return;
      closed = true;
      handle.readStop();
      handle.close();
    };
    const feed = handshake((bufs) => write(handle, bufs), close);
    handle.onread = (arrayBuffer) => {
      const n = streamBaseState[kReadBytesOrError];
      if (n < 0) return close();
      // Each read comes in memory of its own, as net.Socket's 'data' chunks do.
      feed(Buffer.from(arrayBuffer, streamBaseState[kArrayBufferOffset], n));
    };
    write(handle, [greeting]);
    handle.readStart();
  };
}

const raw = process.argv.includes('--raw');
const server = net.createServer((socket) => {
  socket.on('error', () => {});
  socket.write(greeting);
  const feed = handshake(
    (bufs) => {
      socket.cork();
      for (const b of bufs) socket.write(b);
      socket.uncork();
    },
    () => socket.end(),
  );
  socket.on('data', feed);
});
server.listen(path, () => {
  if (raw) serveRaw(server);
});
process.on('SIGTERM', () => server.close(() => process.exit(0)));
