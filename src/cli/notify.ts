// systemd readiness notification (sd_notify(3)): when NOTIFY_SOCKET is set,
// send "READY=1" once serving and "STOPPING=1" when a stop begins, as one
// datagram to that Unix socket ('@' starts an abstract socket name).
//
// Node has no Unix datagram sockets. The npm packages that add them
// (sd-notify, unix-dgram) are native addons built at install time; koffi,
// which nbd-export already uses for the libc calls Node lacks (src/block/
// ffi.ts), calls socket()/sendto() directly, from our own process, so
// NotifyAccess=main accepts it. Where koffi cannot load, `systemd-notify`
// (from the systemd package) is run instead; systemd may not attribute its
// message to us (it comes from a short-lived child), so it is the fallback.
// Either way a failure is one warning, never a reason to stop serving.
import { execFile } from 'node:child_process';
import { createRequire } from 'node:module';
import os from 'node:os';
import type * as KoffiModule from 'koffi';
import { errnoName } from '../block/errno.ts';
import type { Logger } from '../server/log.ts';

const AF_UNIX = 1;
const SOCK_DGRAM = 2;
const SOCK_CLOEXEC = 0o2000000;
const MSG_NOSIGNAL = 0x4000;
/** sizeof(struct sockaddr_un.sun_path) on Linux. */
const SUN_PATH = 108;

/**
 * struct sockaddr_un for `path`, cut to the length to pass as addrlen:
 * a path ends with NUL, an abstract name ('@name') starts with one.
 */
export function sockaddrUn(path: string): Buffer {
  const abstract = path.startsWith('@');
  if (!abstract && !path.startsWith('/')) throw new Error(`unsupported NOTIFY_SOCKET '${path}' (expected an absolute path or @name)`);
  const name = Buffer.from(abstract ? path.slice(1) : path, 'utf8');
  if (name.length + 1 > SUN_PATH) throw new Error(`NOTIFY_SOCKET '${path}' is too long`);
  const addr = Buffer.alloc(2 + 1 + name.length);
  if (os.endianness() === 'LE') addr.writeUInt16LE(AF_UNIX, 0);
  else addr.writeUInt16BE(AF_UNIX, 0);
  // Abstract: a NUL, then the name (no terminator). Path: the path, then NUL.
  name.copy(addr, abstract ? 3 : 2);
  return addr;
}

export type Sender = (socketPath: string, message: string) => Promise<void>;

interface Libc {
  koffi: typeof KoffiModule;
  socket: (domain: number, type: number, protocol: number) => number;
  sendto: (fd: number, buf: Buffer, len: number, flags: number, addr: Buffer, addrlen: number) => number;
  close: (fd: number) => number;
}

let libc: Libc | null | undefined;

function loadLibc(): Libc | null {
  if (libc !== undefined) return libc;
  try {
    if (process.platform !== 'linux') throw new Error('not Linux');
    const koffi = createRequire(import.meta.url)('koffi') as typeof KoffiModule;
    const lib = koffi.load('libc.so.6');
    libc = {
      koffi,
      socket: lib.func('int socket(int domain, int type, int protocol)') as Libc['socket'],
      sendto: lib.func('intptr_t sendto(int fd, const uint8_t *buf, size_t len, int flags, const uint8_t *addr, uint32_t addrlen)') as Libc['sendto'],
      close: lib.func('int close(int fd)') as Libc['close'],
    };
  } catch {
    libc = null;
  }
  return libc;
}

/** sendto() through koffi; synchronous (a datagram to a local socket). */
export const sendWithKoffi: Sender = async (socketPath, message) => {
  const l = loadLibc();
  if (l === null) throw new Error('koffi is not available');
  const addr = sockaddrUn(socketPath);
  const fd = l.socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) throw new Error(`socket(): ${errnoName(l.koffi.errno())}`);
  try {
    const data = Buffer.from(message, 'utf8');
    if (Number(l.sendto(fd, data, data.length, MSG_NOSIGNAL, addr, addr.length)) < 0) {
      throw new Error(`sendto(${socketPath}): ${errnoName(l.koffi.errno())}`);
    }
  } finally {
    l.close(fd);
  }
};

/**
 * `systemd-notify --no-block VAR=VALUE...` with NOTIFY_SOCKET passed on
 * (without --no-block it waits for systemd to answer a barrier, which
 * nothing but systemd does).
 */
export const sendWithSystemdNotify: Sender = (socketPath, message) =>
  new Promise((resolve, reject) => {
    const args = ['--no-block', ...message.split('\n').filter((l) => l !== '')];
    execFile('systemd-notify', args, { env: { ...process.env, NOTIFY_SOCKET: socketPath }, timeout: 5_000 }, (err, _out, stderr) => {
      if (err === null) resolve();
      else reject(new Error(`systemd-notify: ${stderr.trim() || err.message}`));
    });
  });

export interface Notifier {
  /** Send "VAR=VALUE" lines; never throws, warns once per failure. */
  notify(message: string): Promise<void>;
}

/** A notifier for $NOTIFY_SOCKET, or undefined when it is not set. */
export function systemdNotifier(log: Logger, env: NodeJS.ProcessEnv = process.env, senders?: Sender[]): Notifier | undefined {
  const socketPath = env.NOTIFY_SOCKET;
  if (socketPath === undefined || socketPath === '') return undefined;
  const chain = senders ?? (loadLibc() !== null ? [sendWithKoffi] : [sendWithSystemdNotify]);
  return {
    async notify(message) {
      const errors: string[] = [];
      for (const send of chain) {
        try {
          await send(socketPath, message);
          log.debug(`notified systemd: ${message.replace(/\n/g, ' ')}`);
          return;
        } catch (err) {
          errors.push(err instanceof Error ? err.message : String(err));
        }
      }
      log.warn(`cannot notify systemd (${message.split('\n')[0]}): ${errors.join('; ')}`);
    },
  };
}
