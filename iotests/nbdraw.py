"""nbdraw: a tiny raw-bytes NBD client for iotests.

It speaks the NBD protocol (../shared/reference/nbd-protocol.md) byte by byte
over a Unix socket, so a test can send exactly what it wants, including
malformed options and requests, and see exactly what the server answers.
Every socket read is bounded by a timeout; nothing here can hang a test.

Each call prints one readable line per message received (unless quiet=True),
using the constant names of the spec, for example

    option NBD_OPT_LIST reply NBD_REP_SERVER name ''
    option NBD_OPT_GO reply NBD_REP_ERR_UNKNOWN
    request NBD_CMD_READ offset 0 length 4096
      reply simple error NBD_EINVAL

Free-text parts of replies (error messages) are never printed because they
differ between servers; their presence is. Meta context ids (the server's
choice) are not printed either, and the NBD_REP_INFO replies to one option
are printed sorted by info type, since the spec leaves their order open.
A simple reply, a structured chunk and an option reply are each one line, so
the server's choice between them shows in the output.

Typical use from a test script:

    $PYTHON - "$SOCK" <<'PY'
    import os, sys; sys.dont_write_bytecode = True
    sys.path.insert(0, os.environ["IOTESTS_DIR"]); from nbdraw import *
    c = Conn(sys.argv[1])
    c.handshake()                         # greeting + client flags
    c.option(NBD_OPT_LIST)                # prints every reply up to the last
    c.go()                                # NBD_OPT_GO "", enters transmission
    c.cmd(NBD_CMD_READ, offset=0, length=512)
    c.disc()
    fresh_client(sys.argv[1])             # a new client still reads and writes
    PY
"""

import hashlib
import socket
import struct
import sys
import threading
import time

# ---------------------------------------------------------------- constants
NBDMAGIC = 0x4E42444D41474943          # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054          # "IHAVEOPT"
OLD_MAGIC = 0x00420281861253
REPLY_MAGIC = 0x3E889045565A9          # option reply magic
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
EXTENDED_REQUEST_MAGIC = 0x21E41C71
EXTENDED_REPLY_MAGIC = 0x6E8A278C

# handshake flags (server) and client flags
NBD_FLAG_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_NO_ZEROES = 1 << 1
NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_C_NO_ZEROES = 1 << 1

# options
NBD_OPT_EXPORT_NAME = 1
NBD_OPT_ABORT = 2
NBD_OPT_LIST = 3
NBD_OPT_PEEK_EXPORT = 4
NBD_OPT_STARTTLS = 5
NBD_OPT_INFO = 6
NBD_OPT_GO = 7
NBD_OPT_STRUCTURED_REPLY = 8
NBD_OPT_LIST_META_CONTEXT = 9
NBD_OPT_SET_META_CONTEXT = 10
NBD_OPT_EXTENDED_HEADERS = 11

# option reply types
NBD_REP_ACK = 1
NBD_REP_SERVER = 2
NBD_REP_INFO = 3
NBD_REP_META_CONTEXT = 4
_ERR = 1 << 31
NBD_REP_ERR_UNSUP = _ERR + 1
NBD_REP_ERR_POLICY = _ERR + 2
NBD_REP_ERR_INVALID = _ERR + 3
NBD_REP_ERR_PLATFORM = _ERR + 4
NBD_REP_ERR_TLS_REQD = _ERR + 5
NBD_REP_ERR_UNKNOWN = _ERR + 6
NBD_REP_ERR_SHUTDOWN = _ERR + 7
NBD_REP_ERR_BLOCK_SIZE_REQD = _ERR + 8
NBD_REP_ERR_TOO_BIG = _ERR + 9
NBD_REP_ERR_EXT_HEADER_REQD = _ERR + 10

# NBD_REP_INFO types
NBD_INFO_EXPORT = 0
NBD_INFO_NAME = 1
NBD_INFO_DESCRIPTION = 2
NBD_INFO_BLOCK_SIZE = 3

# transmission flags
NBD_FLAG_HAS_FLAGS = 1 << 0
NBD_FLAG_READ_ONLY = 1 << 1
NBD_FLAG_SEND_FLUSH = 1 << 2
NBD_FLAG_SEND_FUA = 1 << 3
NBD_FLAG_ROTATIONAL = 1 << 4
NBD_FLAG_SEND_TRIM = 1 << 5
NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6
NBD_FLAG_SEND_DF = 1 << 7
NBD_FLAG_CAN_MULTI_CONN = 1 << 8
NBD_FLAG_SEND_RESIZE = 1 << 9
NBD_FLAG_SEND_CACHE = 1 << 10
NBD_FLAG_SEND_FAST_ZERO = 1 << 11
NBD_FLAG_BLOCK_STATUS_PAYLOAD = 1 << 12

# commands
NBD_CMD_READ = 0
NBD_CMD_WRITE = 1
NBD_CMD_DISC = 2
NBD_CMD_FLUSH = 3
NBD_CMD_TRIM = 4
NBD_CMD_CACHE = 5
NBD_CMD_WRITE_ZEROES = 6
NBD_CMD_BLOCK_STATUS = 7
NBD_CMD_RESIZE = 8

# command flags
NBD_CMD_FLAG_FUA = 1 << 0
NBD_CMD_FLAG_NO_HOLE = 1 << 1
NBD_CMD_FLAG_DF = 1 << 2
NBD_CMD_FLAG_REQ_ONE = 1 << 3
NBD_CMD_FLAG_FAST_ZERO = 1 << 4
NBD_CMD_FLAG_PAYLOAD_LEN = 1 << 5

# structured reply flags and types
NBD_REPLY_FLAG_DONE = 1 << 0
NBD_REPLY_TYPE_NONE = 0
NBD_REPLY_TYPE_OFFSET_DATA = 1
NBD_REPLY_TYPE_OFFSET_HOLE = 2
NBD_REPLY_TYPE_BLOCK_STATUS = 5
NBD_REPLY_TYPE_BLOCK_STATUS_EXT = 6
NBD_REPLY_TYPE_ERROR = (1 << 15) + 1
NBD_REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

# base:allocation extent flags
NBD_STATE_HOLE = 1 << 0
NBD_STATE_ZERO = 1 << 1

# errors
NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108

DEFAULT_TIMEOUT = 5.0


def _names(prefix):
    g = globals()
    return {v: k for k, v in g.items() if k.startswith(prefix) and isinstance(v, int)}


_OPT_NAMES = _names("NBD_OPT_")
_REP_NAMES = _names("NBD_REP_")
_INFO_NAMES = _names("NBD_INFO_")
_CMD_NAMES = {v: k for k, v in globals().items()
              if k.startswith("NBD_CMD_") and not k.startswith("NBD_CMD_FLAG_")}
_ERRNO_NAMES = {v: k for k, v in globals().items()
                if k.startswith("NBD_E") and isinstance(v, int)}
_REPLY_TYPE_NAMES = {v: k for k, v in globals().items()
                     if k.startswith("NBD_REPLY_TYPE_") and isinstance(v, int)}
_TFLAG_NAMES = [(v, k[len("NBD_FLAG_"):]) for k, v in globals().items()
                if k.startswith("NBD_FLAG_") and not k.startswith("NBD_FLAG_C_")
                and k not in ("NBD_FLAG_FIXED_NEWSTYLE", "NBD_FLAG_NO_ZEROES")]
_CMDFLAG_NAMES = [(v, k[len("NBD_CMD_FLAG_"):]) for k, v in globals().items()
                  if k.startswith("NBD_CMD_FLAG_")]


def opt_name(n):
    return _OPT_NAMES.get(n, "option 0x%x" % n)


def rep_name(n):
    return _REP_NAMES.get(n, "reply type 0x%x" % n)


def cmd_name(n):
    return _CMD_NAMES.get(n, "command %d" % n)


def errno_name(n):
    return "OK" if n == 0 else _ERRNO_NAMES.get(n, "error %d" % n)


def reply_type_name(n):
    return _REPLY_TYPE_NAMES.get(n, "reply type %d" % n)


def _flag_names(value, table):
    out = []
    for bit, name in sorted(table):
        if value & bit:
            out.append(name)
            value &= ~bit
    if value:
        out.append("0x%x" % value)
    return "|".join(out) if out else "0"


def tflags_name(flags):
    """Transmission flags as NAME|NAME (without the NBD_FLAG_ prefix)."""
    return _flag_names(flags, _TFLAG_NAMES)


def hflags_name(flags):
    return _flag_names(flags, [(NBD_FLAG_FIXED_NEWSTYLE, "FIXED_NEWSTYLE"),
                               (NBD_FLAG_NO_ZEROES, "NO_ZEROES")])


def cmdflags_name(flags):
    return _flag_names(flags, _CMDFLAG_NAMES)


def describe(data):
    """A short stable description of a data buffer."""
    if not data:
        return "0 bytes"
    if data.count(data[:1]) == len(data):
        return "%d x 0x%02x" % (len(data), data[0])
    return "%d bytes md5 %s" % (len(data), hashlib.md5(data).hexdigest()[:12])


def pattern(byte, length):
    return bytes([byte]) * length


class Closed(Exception):
    """The server closed the connection (EOF or reset)."""


class Timeout(Exception):
    """Nothing (or not enough) arrived within the timeout."""


class OptReply:
    def __init__(self, opt, rtype, data):
        self.opt, self.type, self.data = opt, rtype, data

    @property
    def is_error(self):
        return bool(self.type & _ERR)

    @property
    def is_final(self):
        return self.type == NBD_REP_ACK or self.is_error


class Chunk:
    """One reply message from transmission: a simple reply or one chunk."""

    def __init__(self, kind, handle, error=0, rtype=None, flags=0, data=b""):
        self.kind = kind            # "simple" or "structured"
        self.handle = handle
        self.error = error
        self.type = rtype
        self.flags = flags
        self.data = data            # payload (read data or chunk payload)

    @property
    def done(self):
        return self.kind == "simple" or bool(self.flags & NBD_REPLY_FLAG_DONE)


class Conn:
    """One raw NBD connection over a Unix socket."""

    def __init__(self, path, timeout=DEFAULT_TIMEOUT, quiet=False, connect=True):
        self.path = path
        self.timeout = timeout
        self.quiet = quiet
        self.sock = None
        self.hflags = 0
        self.no_zeroes = False
        self.structured = False
        self.size = None
        self.tflags = None
        self.next_handle = 1
        self.contexts = {}          # id -> name, from SET_META_CONTEXT
        self.pending = {}           # handle -> (cmd, length) of sent requests
        if connect:
            self.connect()

    # ------------------------------------------------------------ plumbing
    def log(self, *args):
        if not self.quiet:
            print(*args, flush=True)

    def connect(self):
        deadline = time.monotonic() + self.timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(self.timeout)
            try:
                s.connect(self.path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                s.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.sock = s

    def close(self):
        if self.sock:
            self.sock.close()
            self.sock = None

    def send(self, data):
        if self.sock is None:
            raise Closed("connection already closed")
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError) as e:
            raise Closed(str(e))

    def recv_exact(self, n, timeout=None):
        """Read exactly n bytes; Closed on EOF, Timeout if they do not come."""
        buf = bytearray()
        self.sock.settimeout(self.timeout if timeout is None else timeout)
        while len(buf) < n:
            try:
                part = self.sock.recv(min(n - len(buf), 1 << 20))
            except socket.timeout:
                raise Timeout("got %d of %d bytes" % (len(buf), n))
            except ConnectionResetError:
                raise Closed("reset")
            if not part:
                raise Closed("EOF after %d of %d bytes" % (len(buf), n))
            buf += part
        return bytes(buf)

    def expect_close(self, timeout=None, count_bytes=True):
        """Expect the server to close the connection.  Prints what happened
        (with the number of bytes that came first, unless count_bytes is
        False) and returns True if it closed."""
        timeout = self.timeout if timeout is None else timeout
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        extra = 0
        try:
            while True:
                if time.monotonic() > deadline:
                    raise socket.timeout()
                part = self.sock.recv(65536)
                if not part:
                    break
                extra += len(part)
        except ConnectionResetError:
            pass
        except socket.timeout:
            self.log("connection still open (%s)" %
                     ("no data" if not extra else "%d bytes received" % extra))
            return False
        if extra and count_bytes:
            self.log("server sent %d more bytes, then closed the connection" % extra)
        else:
            self.log("server closed the connection")
        self.close()
        return True

    def still_open(self, timeout=0.3):
        """True if nothing arrives and the connection stays open briefly."""
        self.sock.settimeout(timeout)
        try:
            self.sock.recv(1, socket.MSG_PEEK)
            return False                 # data pending or EOF
        except socket.timeout:
            return True
        except ConnectionResetError:
            return False

    # ----------------------------------------------------------- handshake
    def greeting(self):
        data = self.recv_exact(18)
        magic, opt_magic, hflags = struct.unpack(">QQH", data)
        self.hflags = hflags
        self.log("greeting %s %s handshake flags %s" % (
            "NBDMAGIC" if magic == NBDMAGIC else "magic 0x%x" % magic,
            "IHAVEOPT" if opt_magic == IHAVEOPT else
            ("oldstyle" if opt_magic == OLD_MAGIC else "0x%x" % opt_magic),
            hflags_name(hflags)))
        return magic, opt_magic, hflags

    def client_flags(self, flags=NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES):
        self.no_zeroes = bool(flags & NBD_FLAG_C_NO_ZEROES)
        self.send(struct.pack(">I", flags))

    def handshake(self, flags=NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES,
                  quiet=True):
        """Greeting and client flags; prints the greeting unless quiet."""
        q, self.quiet = self.quiet, self.quiet or quiet
        try:
            self.greeting()
        finally:
            self.quiet = q
        self.client_flags(flags)

    # ------------------------------------------------------------- options
    def send_option(self, opt, data=b"", length=None, magic=IHAVEOPT):
        """Send one option; length overrides the declared data length."""
        if length is None:
            length = len(data)
        self.send(struct.pack(">QII", magic, opt, length) + data)

    def read_option_reply(self, show=True):
        hdr = self.recv_exact(20)
        magic, opt, rtype, length = struct.unpack(">QIII", hdr)
        if magic != REPLY_MAGIC:
            raise AssertionError("bad option reply magic 0x%x" % magic)
        data = self.recv_exact(length) if length else b""
        r = OptReply(opt, rtype, data)
        if show:
            self.show_rep(r)
        return r

    def show_rep(self, r):
        self.log("option %s reply %s" % (opt_name(r.opt), self.format_rep(r)))

    def format_rep(self, r):
        name = rep_name(r.type)
        d = r.data
        if r.is_error:
            return name + (" (with message)" if d else "")
        if r.type == NBD_REP_ACK:
            return name + ("" if not d else " length %d" % len(d))
        if r.type == NBD_REP_SERVER:
            if len(d) < 4:
                return name + " malformed length %d" % len(d)
            n = struct.unpack(">I", d[:4])[0]
            s = "%s name %r" % (name, d[4:4 + n].decode("utf-8", "replace"))
            if len(d) > 4 + n:
                s += " description %r" % d[4 + n:].decode("utf-8", "replace")
            return s
        if r.type == NBD_REP_META_CONTEXT:
            if len(d) < 4:
                return name + " malformed length %d" % len(d)
            cid = struct.unpack(">I", d[:4])[0]
            return "%s %r" % (name, d[4:].decode("utf-8", "replace")) + \
                (" id %d" % cid if self.show_ids else "")
        if r.type == NBD_REP_INFO:
            if len(d) < 2:
                return name + " malformed length %d" % len(d)
            itype = struct.unpack(">H", d[:2])[0]
            body = d[2:]
            iname = _INFO_NAMES.get(itype, "info type %d" % itype)
            if itype == NBD_INFO_EXPORT and len(body) == 10:
                size, tflags = struct.unpack(">QH", body)
                return "%s %s size %d flags %s" % (name, iname, size, tflags_name(tflags))
            if itype in (NBD_INFO_NAME, NBD_INFO_DESCRIPTION):
                return "%s %s %r" % (name, iname, body.decode("utf-8", "replace"))
            if itype == NBD_INFO_BLOCK_SIZE and len(body) == 12:
                mn, pref, mx = struct.unpack(">III", body)
                return "%s %s min %d preferred %d max %d" % (name, iname, mn, pref, mx)
            return "%s %s length %d" % (name, iname, len(body))
        return "%s length %d" % (name, len(d))

    show_ids = False    # meta context ids are the server's choice: not printed

    def read_option_replies(self):
        """Read replies to one option until ACK or an error reply, then print
        them.  The spec leaves the order of NBD_REP_INFO replies open, so
        they are printed sorted by info type (the list returned is in wire
        order).  If the server closes the connection midway, what was read
        is printed, then 'server closed the connection'."""
        replies = []
        try:
            while True:
                r = self.read_option_reply(show=False)
                replies.append(r)
                if r.is_final:
                    break
                self._note(r)
        except Closed:
            self._show_all(replies)
            self.log("server closed the connection")
            self.close()
            return replies
        if r.opt == NBD_OPT_STRUCTURED_REPLY and r.type == NBD_REP_ACK:
            self.structured = True
        self._show_all(replies)
        return replies

    def _show_all(self, replies):
        def key(r):
            if r.type == NBD_REP_INFO and len(r.data) >= 2:
                return (0, struct.unpack(">H", r.data[:2])[0])
            return (0, -1) if not r.is_final else (1, 0)
        for r in sorted(replies, key=key):
            self.show_rep(r)

    def _note(self, r):
        """Remember export size/flags and meta context ids from a reply."""
        if r.type == NBD_REP_INFO and len(r.data) == 12 and \
                struct.unpack(">H", r.data[:2])[0] == NBD_INFO_EXPORT:
            self.size, self.tflags = struct.unpack(">QH", r.data[2:])
        if r.type == NBD_REP_META_CONTEXT and len(r.data) >= 4:
            cid = struct.unpack(">I", r.data[:4])[0]
            self.contexts[cid] = r.data[4:].decode("utf-8", "replace")

    def option(self, opt, data=b"", length=None):
        """Send an option and read all its replies (until ACK or error).
        Returns the list of replies."""
        try:
            self.send_option(opt, data, length)
        except Closed:
            self.log("option %s: server closed the connection" % opt_name(opt))
            self.close()
            return []
        return self.read_option_replies()

    @staticmethod
    def info_data(name="", infos=()):
        n = name.encode() if isinstance(name, str) else name
        return struct.pack(">I", len(n)) + n + struct.pack(">H", len(infos)) + \
            b"".join(struct.pack(">H", i) for i in infos)

    @staticmethod
    def meta_data(name="", queries=()):
        n = name.encode() if isinstance(name, str) else name
        out = struct.pack(">I", len(n)) + n + struct.pack(">I", len(queries))
        for q in queries:
            qb = q.encode() if isinstance(q, str) else q
            out += struct.pack(">I", len(qb)) + qb
        return out

    def info(self, name="", infos=()):
        return self.option(NBD_OPT_INFO, self.info_data(name, infos))

    def go(self, name="", infos=()):
        """NBD_OPT_GO; on ACK the connection is in transmission phase."""
        rs = self.option(NBD_OPT_GO, self.info_data(name, infos))
        return bool(rs) and rs[-1].type == NBD_REP_ACK

    def structured_reply(self):
        return self.option(NBD_OPT_STRUCTURED_REPLY)

    def set_meta_context(self, queries=("base:allocation",), name=""):
        return self.option(NBD_OPT_SET_META_CONTEXT, self.meta_data(name, queries))

    def list_meta_context(self, queries=(), name=""):
        return self.option(NBD_OPT_LIST_META_CONTEXT, self.meta_data(name, queries))

    def export_name(self, name=""):
        """NBD_OPT_EXPORT_NAME: reads size and flags (and the 124 zero bytes
        unless NO_ZEROES was negotiated).  Prints the result."""
        n = name.encode() if isinstance(name, str) else name
        self.send_option(NBD_OPT_EXPORT_NAME, n)
        try:
            size, tflags = struct.unpack(">QH", self.recv_exact(10))
        except Closed:
            self.log("option NBD_OPT_EXPORT_NAME: server closed the connection")
            self.close()
            return False
        self.size, self.tflags = size, tflags
        self.log("option NBD_OPT_EXPORT_NAME export size %d flags %s" % (size, tflags_name(tflags)))
        if not self.no_zeroes:
            z = self.recv_exact(124)
            self.log("  followed by %s" % describe(z))
        return True

    def abort(self):
        """NBD_OPT_ABORT: the server should ACK (it may just close)."""
        self.send_option(NBD_OPT_ABORT)
        try:
            self.read_option_reply()
        except Closed:
            self.log("option NBD_OPT_ABORT: server closed the connection")
            self.close()
            return
        self.expect_close()

    # -------------------------------------------------------- transmission
    def send_request(self, cmd, flags=0, offset=0, length=None, payload=b"",
                     handle=None, magic=REQUEST_MAGIC):
        """Send one request; length defaults to len(payload)."""
        if handle is None:
            handle = self.next_handle
            self.next_handle += 1
        if length is None:
            length = len(payload)
        self.send(struct.pack(">IHHQQI", magic, flags, cmd, handle, offset, length) + payload)
        self.pending[handle] = (cmd, length)
        return handle

    def read_chunk(self):
        """Read one simple reply or one structured reply chunk.  For a simple
        reply to a READ, the data (of the requested length) is read only if
        the error is 0."""
        magic = struct.unpack(">I", self.recv_exact(4))[0]
        if magic == SIMPLE_REPLY_MAGIC:
            error, handle = struct.unpack(">IQ", self.recv_exact(12))
            data = b""
            cmd, length = self.pending.get(handle, (None, 0))
            if cmd == NBD_CMD_READ and error == 0:
                data = self.recv_exact(length)
            return Chunk("simple", handle, error=error, data=data)
        if magic == STRUCTURED_REPLY_MAGIC:
            flags, rtype, handle, length = struct.unpack(">HHQI", self.recv_exact(16))
            data = self.recv_exact(length) if length else b""
            error = 0
            if rtype & (1 << 15) and len(data) >= 4:
                error = struct.unpack(">I", data[:4])[0]
            return Chunk("structured", handle, error=error, rtype=rtype,
                         flags=flags, data=data)
        raise AssertionError("bad reply magic 0x%x" % magic)

    def format_chunk(self, c):
        if c.kind == "simple":
            if c.error:
                return "reply simple error %s" % errno_name(c.error)
            return "reply simple OK" + (" data %s" % describe(c.data) if c.data else "")
        s = "chunk %s%s" % (reply_type_name(c.type),
                            " DONE" if c.flags & NBD_REPLY_FLAG_DONE else "")
        d = c.data
        if c.type == NBD_REPLY_TYPE_OFFSET_DATA:
            off = struct.unpack(">Q", d[:8])[0]
            s += " offset %d data %s" % (off, describe(d[8:]))
        elif c.type == NBD_REPLY_TYPE_OFFSET_HOLE:
            off, ln = struct.unpack(">QI", d)
            s += " offset %d length %d" % (off, ln)
        elif c.type == NBD_REPLY_TYPE_BLOCK_STATUS:
            cid = struct.unpack(">I", d[:4])[0]
            s += " context %s" % self.contexts.get(cid, "id %d" % cid)
            ext = [struct.unpack(">II", d[i:i + 8]) for i in range(4, len(d), 8)]
            s += " extents " + " ".join("%d:%s" % (ln, _state(fl)) for ln, fl in ext)
        elif c.type in (NBD_REPLY_TYPE_ERROR, NBD_REPLY_TYPE_ERROR_OFFSET):
            s += " error %s" % errno_name(c.error)
            if c.type == NBD_REPLY_TYPE_ERROR_OFFSET and len(d) >= 6:
                mlen = struct.unpack(">H", d[4:6])[0]
                off = struct.unpack(">Q", d[6 + mlen:14 + mlen])[0]
                s += " offset %d" % off
        elif d:
            s += " length %d" % len(d)
        return s

    def read_reply(self, handle=None):
        """Read all chunks of one reply (until a simple reply or DONE).
        Prints each and returns (error, data, chunks): error is the first
        error seen (0 if none), data the read data assembled (holes as
        zeroes) relative to the request offset when known."""
        chunks = []
        while True:
            c = self.read_chunk()
            if handle is not None and c.handle != handle:
                self.log("  unexpected handle %d" % c.handle)
            chunks.append(c)
            self.log("  " + self.format_chunk(c))
            if c.done:
                break
        self.pending.pop(chunks[0].handle, None)
        error = next((c.error for c in chunks if c.error), 0)
        return error, chunks

    def cmd(self, cmd, flags=0, offset=0, length=None, payload=b"", handle=None,
            label=None):
        """Send one request and read its whole reply, printing both.
        Returns (error, chunks).  On EOF prints that the server closed."""
        if length is None:
            length = len(payload)
        desc = "request %s" % (label or cmd_name(cmd))
        if flags:
            desc += " flags %s" % cmdflags_name(flags)
        desc += " offset %d length %d" % (offset, length)
        if payload:
            desc += " payload %s" % describe(payload)
        self.log(desc)
        sender = None
        try:
            if len(payload) > (1 << 20):
                # Send a big payload from a thread, so that a server which
                # answers (or closes) before reading it all cannot deadlock us.
                h = self.send_request(cmd, flags, offset, length, b"", handle)
                sender = threading.Thread(target=self._send_quietly, args=(self.sock, payload))
                sender.start()
            else:
                h = self.send_request(cmd, flags, offset, length, payload, handle)
            return self.read_reply(h)
        except Closed:
            self.log("  server closed the connection")
            self.close()
            return None, []
        finally:
            if sender:
                sender.join(self.timeout)

    @staticmethod
    def _send_quietly(sock, data):
        try:
            sock.sendall(data)
        except OSError:
            pass

    def read_data(self, chunks, offset, length):
        """Assemble READ data from chunks (simple or structured)."""
        if chunks and chunks[0].kind == "simple":
            return chunks[0].data
        buf = bytearray(length)
        for c in chunks:
            if c.type == NBD_REPLY_TYPE_OFFSET_DATA:
                off = struct.unpack(">Q", c.data[:8])[0] - offset
                buf[off:off + len(c.data) - 8] = c.data[8:]
        return bytes(buf)

    def disc(self):
        """NBD_CMD_DISC; the server closes the connection."""
        if self.sock is None:
            return                      # already closed (and reported)
        self.log("request NBD_CMD_DISC")
        try:
            self.send_request(NBD_CMD_DISC)
        except Closed:
            pass
        self.expect_close()


def _state(flags):
    if flags == 0:
        return "data"
    names = []
    if flags & NBD_STATE_HOLE:
        names.append("hole")
    if flags & NBD_STATE_ZERO:
        names.append("zero")
    if flags & ~3:
        names.append("0x%x" % (flags & ~3))
    return ",".join(names)


def connect_go(path, name="", structured=False, meta=None, quiet=True, timeout=DEFAULT_TIMEOUT):
    """A connection already in transmission phase (via NBD_OPT_GO)."""
    c = Conn(path, timeout=timeout, quiet=quiet)
    c.handshake()
    if structured:
        c.structured_reply()
    if meta:
        c.set_meta_context(meta)
    if not c.go(name):
        raise AssertionError("NBD_OPT_GO failed")
    c.quiet = False
    return c


def fresh_client(path, name="", offset=None, writable=True, byte=0x5A, length=4096):
    """Check that a brand-new client can still negotiate (with NBD_OPT_GO),
    write a pattern and read it back (or only read, if not writable).  By
    default it uses the last `length` bytes of the export.  Prints one line."""
    try:
        c = connect_go(path, name, quiet=True)
        c.quiet = True
        if offset is None:
            offset = c.size - length
        if writable:
            err, _ = c.cmd(NBD_CMD_WRITE, offset=offset, payload=pattern(byte, length))
            if err:
                print("fresh client: write failed: %s" % errno_name(err))
                return False
        err, chunks = c.cmd(NBD_CMD_READ, offset=offset, length=length)
        if err:
            print("fresh client: read failed: %s" % errno_name(err))
            return False
        data = c.read_data(chunks, offset, length)
        if writable and data != pattern(byte, length):
            print("fresh client: read back wrong data: %s" % describe(data))
            return False
        c.send_request(NBD_CMD_DISC)
        c.expect_close()
        print("fresh client: %s OK" % ("write and read" if writable else "read"))
        return True
    except (Closed, Timeout, OSError, AssertionError) as e:
        print("fresh client: FAILED (%s: %s)" % (type(e).__name__, e))
        return False


if __name__ == "__main__":
    # `python3 nbdraw.py SOCKET [EXPORT]` = fresh_client check.
    sys.exit(0 if fresh_client(sys.argv[1], *(sys.argv[2:3])) else 1)
