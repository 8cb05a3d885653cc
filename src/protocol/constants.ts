// Every NBD constant, spelled as in the spec (nbd-protocol.md) and grouped
// by its "Values" headings. Names for logs are derived from this file by
// names.ts; never type a constant's name twice.

// --- Magic numbers ("Newstyle negotiation", "Transmission") ---
export const NBDMAGIC = 0x4e42444d41474943n; // "NBDMAGIC"
export const IHAVEOPT = 0x49484156454f5054n; // "IHAVEOPT"
export const NBD_OPT_REPLY_MAGIC = 0x0003e889045565a9n;
export const NBD_REQUEST_MAGIC = 0x25609513;
export const NBD_SIMPLE_REPLY_MAGIC = 0x67446698;
export const NBD_STRUCTURED_REPLY_MAGIC = 0x668e33ef;

// --- Handshake flags ---
export const NBD_FLAG_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_NO_ZEROES = 1 << 1;

// --- Client flags ---
export const NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_C_NO_ZEROES = 1 << 1;

// --- Transmission flags ---
export const NBD_FLAG_HAS_FLAGS = 1 << 0;
export const NBD_FLAG_READ_ONLY = 1 << 1;
export const NBD_FLAG_SEND_FLUSH = 1 << 2;
export const NBD_FLAG_SEND_FUA = 1 << 3;
export const NBD_FLAG_ROTATIONAL = 1 << 4;
export const NBD_FLAG_SEND_TRIM = 1 << 5;
export const NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6;
export const NBD_FLAG_SEND_DF = 1 << 7;
export const NBD_FLAG_CAN_MULTI_CONN = 1 << 8;
export const NBD_FLAG_SEND_RESIZE = 1 << 9;
export const NBD_FLAG_SEND_CACHE = 1 << 10;
export const NBD_FLAG_SEND_FAST_ZERO = 1 << 11;
export const NBD_FLAG_BLOCK_STATUS_PAYLOAD = 1 << 12;

// --- Option types ---
export const NBD_OPT_EXPORT_NAME = 1;
export const NBD_OPT_ABORT = 2;
export const NBD_OPT_LIST = 3;
export const NBD_OPT_PEEK_EXPORT = 4;
export const NBD_OPT_STARTTLS = 5;
export const NBD_OPT_INFO = 6;
export const NBD_OPT_GO = 7;
export const NBD_OPT_STRUCTURED_REPLY = 8;
export const NBD_OPT_LIST_META_CONTEXT = 9;
export const NBD_OPT_SET_META_CONTEXT = 10;
export const NBD_OPT_EXTENDED_HEADERS = 11;

// --- Option reply types ---
export const NBD_REP_ACK = 1;
export const NBD_REP_SERVER = 2;
export const NBD_REP_INFO = 3;
export const NBD_REP_META_CONTEXT = 4;
const NBD_REP_FLAG_ERROR = 2 ** 31;
export const NBD_REP_ERR_UNSUP = NBD_REP_FLAG_ERROR + 1;
export const NBD_REP_ERR_POLICY = NBD_REP_FLAG_ERROR + 2;
export const NBD_REP_ERR_INVALID = NBD_REP_FLAG_ERROR + 3;
export const NBD_REP_ERR_PLATFORM = NBD_REP_FLAG_ERROR + 4;
export const NBD_REP_ERR_TLS_REQD = NBD_REP_FLAG_ERROR + 5;
export const NBD_REP_ERR_UNKNOWN = NBD_REP_FLAG_ERROR + 6;
export const NBD_REP_ERR_SHUTDOWN = NBD_REP_FLAG_ERROR + 7;
export const NBD_REP_ERR_BLOCK_SIZE_REQD = NBD_REP_FLAG_ERROR + 8;
export const NBD_REP_ERR_TOO_BIG = NBD_REP_FLAG_ERROR + 9;
export const NBD_REP_ERR_EXT_HEADER_REQD = NBD_REP_FLAG_ERROR + 10;

// --- Information types (NBD_REP_INFO) ---
export const NBD_INFO_EXPORT = 0;
export const NBD_INFO_NAME = 1;
export const NBD_INFO_DESCRIPTION = 2;
export const NBD_INFO_BLOCK_SIZE = 3;

// --- Command flags ---
export const NBD_CMD_FLAG_FUA = 1 << 0;
export const NBD_CMD_FLAG_NO_HOLE = 1 << 1;
export const NBD_CMD_FLAG_DF = 1 << 2;
export const NBD_CMD_FLAG_REQ_ONE = 1 << 3;
export const NBD_CMD_FLAG_FAST_ZERO = 1 << 4;
export const NBD_CMD_FLAG_PAYLOAD_LEN = 1 << 5;

// --- Structured reply flags ---
export const NBD_REPLY_FLAG_DONE = 1 << 0;

// --- Structured reply types ---
export const NBD_REPLY_TYPE_NONE = 0;
export const NBD_REPLY_TYPE_OFFSET_DATA = 1;
export const NBD_REPLY_TYPE_OFFSET_HOLE = 2;
export const NBD_REPLY_TYPE_BLOCK_STATUS = 5;
export const NBD_REPLY_TYPE_BLOCK_STATUS_EXT = 6;
export const NBD_REPLY_TYPE_ERROR = 2 ** 15 + 1;
export const NBD_REPLY_TYPE_ERROR_OFFSET = 2 ** 15 + 2;

// --- Request types ---
export const NBD_CMD_READ = 0;
export const NBD_CMD_WRITE = 1;
export const NBD_CMD_DISC = 2;
export const NBD_CMD_FLUSH = 3;
export const NBD_CMD_TRIM = 4;
export const NBD_CMD_CACHE = 5;
export const NBD_CMD_WRITE_ZEROES = 6;
export const NBD_CMD_BLOCK_STATUS = 7;
export const NBD_CMD_RESIZE = 8;

// --- Error values ---
export const NBD_EPERM = 1;
export const NBD_EIO = 5;
export const NBD_ENOMEM = 12;
export const NBD_EINVAL = 22;
export const NBD_ENOSPC = 28;
export const NBD_EOVERFLOW = 75;
export const NBD_ENOTSUP = 95;
export const NBD_ESHUTDOWN = 108;

// --- base:allocation flags ("`base:allocation` metadata context") ---
export const NBD_STATE_HOLE = 1 << 0;
export const NBD_STATE_ZERO = 1 << 1;

// --- Sizes fixed by the wire format ---
/** Server greeting: NBDMAGIC, IHAVEOPT, handshake flags. */
export const GREETING_LENGTH = 18;
/** Option header: IHAVEOPT, option, length. */
export const OPTION_HEADER_LENGTH = 16;
/** Option reply header: magic, option, reply type, length. */
export const OPTION_REPLY_HEADER_LENGTH = 20;
/** Request header ("Request message"). */
export const REQUEST_HEADER_LENGTH = 28;
export const SIMPLE_REPLY_HEADER_LENGTH = 16;
export const STRUCTURED_REPLY_HEADER_LENGTH = 20;
/** Header of an NBD_REPLY_TYPE_OFFSET_DATA chunk: the chunk header, then u64 offset; the data follows. */
export const OFFSET_DATA_HEADER_LENGTH = STRUCTURED_REPLY_HEADER_LENGTH + 8;
/** Zero padding after EXPORT_NAME's reply unless NO_ZEROES was agreed. */
export const EXPORT_NAME_ZEROES = 124;
/** Strings on the wire are at most this long ("Conventions"). */
export const NBD_MAX_STRING = 4096;
