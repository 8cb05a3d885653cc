// The handshake as named states with one handler per option (spec: "Fixed
// newstyle negotiation", "Option types"). It consumes bytes from the
// connection's ByteQueue and may stop whenever bytes run out; it never
// reads past the option being handled, and allocates option data only
// after its length has been checked.
import {
  NBD_FLAG_FIXED_NEWSTYLE,
  NBD_FLAG_NO_ZEROES,
  NBD_MAX_STRING,
  NBD_INFO_DESCRIPTION,
  NBD_INFO_NAME,
  NBD_OPT_ABORT,
  NBD_OPT_EXPORT_NAME,
  NBD_OPT_GO,
  NBD_OPT_INFO,
  NBD_OPT_LIST,
  NBD_OPT_LIST_META_CONTEXT,
  NBD_OPT_SET_META_CONTEXT,
  NBD_OPT_STARTTLS,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_REP_ACK,
  NBD_REP_ERR_INVALID,
  NBD_REP_ERR_POLICY,
  NBD_REP_ERR_TOO_BIG,
  NBD_REP_ERR_UNKNOWN,
  NBD_REP_ERR_UNSUP,
  NBD_REP_INFO,
  NBD_REP_META_CONTEXT,
  NBD_REP_SERVER,
  OPTION_HEADER_LENGTH,
} from '../protocol/constants.ts';
import type { ByteQueue } from '../protocol/byte-queue.ts';
import {
  CLIENT_FLAGS_LENGTH,
  decodeClientFlags,
  decodeOptionHeader,
  encodeExportNameReply,
  encodeGreeting,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeInfoString,
  encodeMetaContextReply,
  encodeOptionReply,
  encodeServerEntry,
} from '../protocol/handshake.ts';
import { truncateUtf8 } from '../protocol/transmission.ts';
import { decodeInfoRequest, decodeMetaContextRequest, decodeString } from '../protocol/options.ts';
import { optionName, replyTypeName } from '../protocol/names.ts';
import type { Export } from '../exports/export.ts';
import type { ExportRegistry } from '../exports/registry.ts';
import { matchesQuery, type MetaContext } from '../meta/context.ts';
import { exportFlags } from './flags.ts';

export const HANDSHAKE_FLAGS = NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES;

/**
 * Largest option data we read into memory: an INFO/GO or meta-context
 * request with a maximal name and a few maximal queries fits. Longer
 * options are drained unread and refused.
 */
export const MAX_OPTION_DATA = 64 * 1024;
/** Queries in one LIST/SET_META_CONTEXT ("NBD_REP_ERR_TOO_BIG" beyond). */
export const MAX_META_QUERIES = 128;

/** What negotiation hands to the transmission phase. */
export interface Session {
  export: Export;
  structuredReplies: boolean;
  /** Contexts selected by the last SET_META_CONTEXT, if it named this export. */
  metaContexts: MetaContext[];
  /** How the client entered transmission, for logs and metrics. */
  via: 'go' | 'export_name';
}

/** Options remembered per connection for the log; a client may send any number. */
export const MAX_OPTIONS_KEPT = 32;

export interface NegotiationHost {
  readonly exports: ExportRegistry;
  send(buf: Buffer): void;
  /** Drop the connection: a protocol violation or the client's NBD_OPT_ABORT. */
  close(reason: string, cause: 'protocol_error' | 'abort'): void;
  enterTransmission(session: Session): void;
  debug(message: string): void;
}

type State =
  | { name: 'client-flags' }
  | { name: 'option-header' }
  | { name: 'option-data'; option: number; length: number }
  | { name: 'option-drain'; option: number; left: number; reply: number; message: string }
  | { name: 'done' };

export class Negotiation {
  readonly #host: NegotiationHost;
  #state: State = { name: 'client-flags' };
  #noZeroes = false;
  #structuredReplies = false;
  /** Last SET_META_CONTEXT: export name and the contexts it selected. */
  #meta: { exportName: string; contexts: MetaContext[] } | null = null;
  readonly #options: number[] = [];
  #listed = false;
  #tlsRefused = false;

  /**
   * The handler of each option we know ("Option types"). Static, so that it
   * is built once, not per connection; a static member may call the
   * instance's private methods.
   */
  static readonly #handlers: ReadonlyMap<number, (n: Negotiation, d: Buffer, o: number) => void> = new Map([
    [NBD_OPT_EXPORT_NAME, (n: Negotiation, d: Buffer) => n.#optExportName(d)],
    [NBD_OPT_ABORT, (n: Negotiation, _d: Buffer, o: number) => n.#optAbort(o)],
    [NBD_OPT_LIST, (n: Negotiation, d: Buffer, o: number) => n.#optList(d, o)],
    [NBD_OPT_STARTTLS, (n: Negotiation, d: Buffer, o: number) => n.#optStartTls(d, o)],
    [NBD_OPT_INFO, (n: Negotiation, d: Buffer, o: number) => n.#optInfoGo(d, o)],
    [NBD_OPT_GO, (n: Negotiation, d: Buffer, o: number) => n.#optInfoGo(d, o)],
    [NBD_OPT_STRUCTURED_REPLY, (n: Negotiation, d: Buffer, o: number) => n.#optStructuredReply(d, o)],
    [NBD_OPT_LIST_META_CONTEXT, (n: Negotiation, d: Buffer, o: number) => n.#optMetaContext(d, o, true)],
    [NBD_OPT_SET_META_CONTEXT, (n: Negotiation, d: Buffer, o: number) => n.#optMetaContext(d, o, false)],
  ]);

  constructor(host: NegotiationHost) {
    this.#host = host;
  }

  greeting(): Buffer {
    return encodeGreeting(HANDSHAKE_FLAGS);
  }

  get finished(): boolean {
    return this.#state.name === 'done';
  }

  /** The options the client sent, in order (the first MAX_OPTIONS_KEPT), for the log. */
  get options(): readonly number[] {
    return this.#options;
  }

  /** NBD_OPT_LIST was answered (for nbd_negotiations_total{result="list_only"}). */
  get listed(): boolean {
    return this.#listed;
  }

  /** NBD_OPT_STARTTLS was refused (a client that then leaves counts as refused{reason="tls"}). */
  get tlsRefused(): boolean {
    return this.#tlsRefused;
  }

  /** Consume what can be consumed now; returns when more bytes are needed or negotiation ended. */
  feed(queue: ByteQueue): void {
    for (;;) {
      const state = this.#state;
      switch (state.name) {
        case 'done':
          return;
        case 'client-flags': {
          if (queue.length < CLIENT_FLAGS_LENGTH) return;
          const flags = decodeClientFlags(queue.take(CLIENT_FLAGS_LENGTH), HANDSHAKE_FLAGS);
          if (flags === null) return this.#end('client set unknown client flags');
          this.#noZeroes = flags.noZeroes;
          this.#state = { name: 'option-header' };
          break;
        }
        case 'option-header': {
          if (queue.length < OPTION_HEADER_LENGTH) return;
          const header = decodeOptionHeader(queue.take(OPTION_HEADER_LENGTH));
          if (header === null) return this.#end('bad option magic');
          this.#host.debug(`option ${optionName(header.option)} length ${header.length}`);
          if (this.#options.length < MAX_OPTIONS_KEPT) this.#options.push(header.option);
          if (header.length <= MAX_OPTION_DATA) {
            this.#state = { name: 'option-data', option: header.option, length: header.length };
          } else if (header.option === NBD_OPT_EXPORT_NAME) {
            // No way to answer EXPORT_NAME with an error ("NBD_OPT_EXPORT_NAME").
            return this.#end('EXPORT_NAME longer than a string may be');
          } else {
            const known = Negotiation.#handlers.has(header.option);
            this.#state = {
              name: 'option-drain',
              option: header.option,
              left: header.length,
              reply: known ? NBD_REP_ERR_TOO_BIG : NBD_REP_ERR_UNSUP,
              message: known ? `option data of ${header.length} bytes is too big` : 'unsupported option',
            };
          }
          break;
        }
        case 'option-drain': {
          state.left -= queue.skip(state.left);
          if (state.left > 0) return;
          this.#state = { name: 'option-header' };
          this.#error(state.option, state.reply, state.message);
          break;
        }
        case 'option-data': {
          if (queue.length < state.length) return;
          const data = queue.take(state.length);
          this.#state = { name: 'option-header' };
          const handler = Negotiation.#handlers.get(state.option);
          if (handler === undefined) this.#error(state.option, NBD_REP_ERR_UNSUP, 'unsupported option');
          else handler(this, data, state.option);
          break;
        }
      }
    }
  }

  #end(reason: string, cause: 'protocol_error' | 'abort' = 'protocol_error'): void {
    this.#state = { name: 'done' };
    this.#host.close(reason, cause);
  }

  #reply(option: number, type: number, data?: Buffer): void {
    this.#host.send(encodeOptionReply(option, type, data));
  }

  /** An error reply carries a human-readable message ("Option reply types"). */
  #error(option: number, type: number, message: string): void {
    this.#host.debug(`option ${optionName(option)}: ${replyTypeName(type)}: ${message}`);
    this.#reply(option, type, truncateUtf8(message, NBD_MAX_STRING));
  }

  #optExportName(data: Buffer): void {
    const name = decodeString(data, 'export name');
    if (!name.ok) return this.#end(`EXPORT_NAME: ${name.reason}`);
    const exp = this.#host.exports.get(name.value);
    // "NBD_OPT_EXPORT_NAME": an unknown export ends the session.
    if (exp === undefined) return this.#end(`EXPORT_NAME: no export '${name.value}'`);
    this.#host.send(encodeExportNameReply(exp.size, exportFlags(exp, this.#structuredReplies), this.#noZeroes));
    this.#finish(exp, 'export_name');
  }

  #optAbort(option: number): void {
    // "NBD_OPT_ABORT": reply ACK, ignore any data, then close.
    this.#reply(option, NBD_REP_ACK);
    this.#end('client sent NBD_OPT_ABORT', 'abort');
  }

  #optList(data: Buffer, option: number): void {
    if (data.length !== 0) return this.#error(option, NBD_REP_ERR_INVALID, 'NBD_OPT_LIST takes no data');
    for (const exp of this.#host.exports.list()) {
      this.#reply(option, NBD_REP_SERVER, encodeServerEntry(exp.name, exp.description));
    }
    this.#reply(option, NBD_REP_ACK);
    this.#listed = true;
  }

  #optStartTls(data: Buffer, option: number): void {
    if (data.length !== 0) return this.#error(option, NBD_REP_ERR_INVALID, 'NBD_OPT_STARTTLS takes no data');
    this.#tlsRefused = true;
    this.#error(option, NBD_REP_ERR_POLICY, 'TLS is not configured on this server');
  }

  #optStructuredReply(data: Buffer, option: number): void {
    if (data.length !== 0) return this.#error(option, NBD_REP_ERR_INVALID, 'NBD_OPT_STRUCTURED_REPLY takes no data');
    if (this.#structuredReplies) return this.#error(option, NBD_REP_ERR_INVALID, 'structured replies already negotiated');
    this.#structuredReplies = true;
    this.#reply(option, NBD_REP_ACK);
  }

  #optInfoGo(data: Buffer, option: number): void {
    const req = decodeInfoRequest(data);
    if (!req.ok) return this.#error(option, NBD_REP_ERR_INVALID, req.reason);
    const { name, requests } = req.value;
    const exp = this.#host.exports.get(name);
    if (exp === undefined) return this.#error(option, NBD_REP_ERR_UNKNOWN, `export '${name}' not present`);

    // As qemu-nbd: NAME when asked, DESCRIPTION whenever there is one,
    // BLOCK_SIZE always (clients ignore what they did not ask for), EXPORT last.
    if (requests.includes(NBD_INFO_NAME)) this.#reply(option, NBD_REP_INFO, encodeInfoString(NBD_INFO_NAME, exp.name));
    if (exp.description !== '') {
      this.#reply(option, NBD_REP_INFO, encodeInfoString(NBD_INFO_DESCRIPTION, exp.description));
    }
    const bs = exp.blockSize;
    this.#reply(option, NBD_REP_INFO, encodeInfoBlockSize(bs.minimum, bs.preferred, bs.maximum));
    this.#reply(option, NBD_REP_INFO, encodeInfoExport(exp.size, exportFlags(exp, this.#structuredReplies)));
    this.#reply(option, NBD_REP_ACK);
    if (option === NBD_OPT_GO) this.#finish(exp, 'go');
  }

  #optMetaContext(data: Buffer, option: number, forList: boolean): void {
    // SET replaces the previous selection even when it fails ("NBD_OPT_SET_META_CONTEXT").
    if (!forList) this.#meta = null;
    if (!this.#structuredReplies) {
      return this.#error(option, NBD_REP_ERR_INVALID, 'structured replies must be negotiated first');
    }
    const req = decodeMetaContextRequest(data, MAX_META_QUERIES);
    if (!req.ok) {
      const tooBig = req.reason.startsWith('more than');
      return this.#error(option, tooBig ? NBD_REP_ERR_TOO_BIG : NBD_REP_ERR_INVALID, req.reason);
    }
    const { exportName, queries } = req.value;
    const exp = this.#host.exports.get(exportName);
    if (exp === undefined) return this.#error(option, NBD_REP_ERR_UNKNOWN, `export '${exportName}' not present`);

    const chosen = exp.metaContexts.filter((ctx) =>
      forList && queries.length === 0 ? true : queries.some((q) => matchesQuery(ctx.name, q, forList)),
    );
    for (const ctx of chosen) {
      // "NBD_OPT_LIST_META_CONTEXT": the id in LIST replies SHOULD be zero.
      this.#reply(option, NBD_REP_META_CONTEXT, encodeMetaContextReply(forList ? 0 : exp.contextId(ctx), ctx.name));
    }
    if (!forList) this.#meta = { exportName, contexts: chosen };
    this.#reply(option, NBD_REP_ACK);
  }

  #finish(exp: Export, via: Session['via']): void {
    this.#state = { name: 'done' };
    // Contexts count only if the last SET_META_CONTEXT named this export.
    const metaContexts = this.#meta !== null && this.#meta.exportName === exp.name ? this.#meta.contexts : [];
    this.#host.enterTransmission({ export: exp, structuredReplies: this.#structuredReplies, metaContexts, via });
  }
}
