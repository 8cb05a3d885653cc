import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import { describe, test } from 'node:test';
import { isLoopbackAddress, unpaceLoopback } from './loopback-tcp.ts';
import { congestionControl, sendfileAvailable, setCongestionControl } from './sendfile.ts';
import { NbdServer } from './server.ts';
import { makeExport, registryOf, waitFor } from './test-helpers.ts';
import { socketFd } from './wire.ts';

const t = { timeout: 5_000 };

function systemDefault(): string | null {
  try {
    return fs.readFileSync('/proc/sys/net/ipv4/tcp_congestion_control', 'latin1').trim();
  } catch {
    return null;
  }
}

/** A connected pair over TCP loopback: the accepted socket and the client's; closed after `body`. */
async function withPair(body: (accepted: net.Socket, client: net.Socket) => Promise<void> | void): Promise<void> {
  const listener = net.createServer();
  await new Promise<void>((r) => listener.listen(0, '127.0.0.1', r));
  const acceptedP = new Promise<net.Socket>((r) => listener.once('connection', r));
  const client = net.connect((listener.address() as net.AddressInfo).port, '127.0.0.1');
  const accepted = await acceptedP;
  try {
    await body(accepted, client);
  } finally {
    client.destroy();
    accepted.destroy();
    await new Promise<void>((r) => listener.close(() => r()));
  }
}

describe('loopback TCP without pacing', () => {
  test('loopback addresses', () => {
    for (const a of ['127.0.0.1', '127.1.2.3', '::1', '::ffff:127.0.0.1']) assert.equal(isLoopbackAddress(a), true, a);
    for (const a of [undefined, '', '10.0.0.1', '192.0.2.127', '::', '::2', '::ffff:10.0.0.1', '127.example', '1127.0.0.1', 'fe80::1']) {
      assert.equal(isLoopbackAddress(a), false, String(a));
    }
  });

  test('a pacing socket from a loopback peer is switched to reno; others are left alone', { ...t, skip: !sendfileAvailable() && 'no koffi' }, async () => {
    await withPair((accepted) => {
      const fd = socketFd(accepted);
      assert.ok(fd >= 0);
      // Whatever the system's default, bbr must be loaded for the switch to be seen.
      if (!setCongestionControl(fd, 'bbr')) return;
      assert.equal(congestionControl(fd), 'bbr');
      // A remote peer keeps what it has.
      assert.equal(unpaceLoopback(fd, '192.0.2.1'), null);
      assert.equal(congestionControl(fd), 'bbr');
      assert.equal(unpaceLoopback(fd, accepted.remoteAddress), 'bbr');
      assert.equal(congestionControl(fd), 'reno');
      // Not pacing: nothing to do.
      assert.equal(unpaceLoopback(fd, accepted.remoteAddress), null);
      assert.equal(congestionControl(fd), 'reno');
    });
  });

  test('a closed descriptor is reported as not switched', { ...t, skip: !sendfileAvailable() && 'no koffi' }, () => {
    assert.equal(congestionControl(-1), null);
    assert.equal(unpaceLoopback(-1, '127.0.0.1'), null);
  });

  for (const rawSockets of [true, false]) {
    for (const loopbackReno of [true, false]) {
      test(`the server's socket to a loopback client (${rawSockets ? 'Wire' : 'net.Socket'}, loopbackReno ${loopbackReno})`, { ...t, skip: (!sendfileAvailable() || systemDefault() === null) && 'no koffi or no /proc' }, async () => {
        const server = new NbdServer({ exports: registryOf(makeExport({ name: 'a' })), maxConnections: 0, persistent: true, handshakeLimitMs: 0, rawSockets, loopbackReno });
        const client = new net.Socket();
        try {
          const { port } = await server.listenTcp('127.0.0.1', 0);
          await new Promise<void>((r, j) => client.connect(port, '127.0.0.1', r).once('error', j));
          await waitFor(() => server.connections.size === 1);
          const [conn] = server.connections;
          const fd = socketFd(conn!.socket);
          assert.ok(fd >= 0);
          const system = systemDefault()!;
          const expected = loopbackReno && system.startsWith('bbr') ? 'reno' : system;
          assert.equal(congestionControl(fd), expected, `system default ${system}`);
        } finally {
          client.destroy();
          await server.close();
        }
      });
    }
  }
});
