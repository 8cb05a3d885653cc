// TCP connections from this machine without BBR's pacing.
//
// BBR, the default congestion control of some distributions and cloud
// images (this bench machine's among them), paces its sockets: it spaces
// the segments it sends by its estimate of the path's bottleneck rate,
// arming a timer as it transmits. Over loopback there is no link whose
// queue pacing could spare, only the cost: `perf` of a 1 MiB sequential
// read over TCP loopback had 30 % of our thread's time in `tcp_write_xmit`
// with interrupts off (bench/README.md, `s13`), and the same server did
// 2.2x the throughput on the same machine with "reno" or "cubic". A
// loopback connection loses no segments, so the choice between loss-based
// algorithms does not matter; "reno" is built into every kernel and always
// allowed (net.ipv4.tcp_allowed_congestion_control), so an unprivileged
// server may pick it. Other algorithms and remote peers are left as the
// administrator set them.
import { congestionControl, setCongestionControl } from './sendfile.ts';

/** Congestion controls that pace every socket. */
const PACING = new Set(['bbr', 'bbr2', 'bbr3']);

/** True for 127.0.0.0/8, ::1 and IPv4-mapped 127.x addresses. */
export function isLoopbackAddress(address: string | undefined): boolean {
  if (address === undefined) return false;
  if (address === '::1') return true;
  const v4 = address.startsWith('::ffff:') ? address.slice(7) : address;
  return v4.startsWith('127.') && /^\d+\.\d+\.\d+\.\d+$/.test(v4);
}

/**
 * On a TCP socket whose peer is on this machine and whose congestion
 * control paces, switch to "reno". Returns the algorithm it had when it
 * switched, else null (not loopback, not pacing, or not possible here).
 */
export function unpaceLoopback(socketFd: number, remoteAddress: string | undefined): string | null {
  if (socketFd < 0 || !isLoopbackAddress(remoteAddress)) return null;
  const current = congestionControl(socketFd);
  if (current === null || !PACING.has(current)) return null;
  return setCongestionControl(socketFd, 'reno') ? current : null;
}
