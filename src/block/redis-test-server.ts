// Real redis-server processes for tests: one on a Unix socket in a fresh
// temporary folder (no TCP port), or a cluster of masters on loopback
// ports. Each stop() kills what it started and removes its files.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';

export const REDIS_SERVER = '/usr/bin/redis-server';
export const REDIS_CLI = '/usr/bin/redis-cli';

export function haveRedis(): boolean {
  return fs.existsSync(REDIS_SERVER) && fs.existsSync(REDIS_CLI);
}

export interface RedisProcess {
  dir: string;
  /** The Unix socket (single server) or undefined. */
  socket: string;
  child: ChildProcess;
  args: string[];
  /** SIGKILL and wait for the exit. */
  kill(): Promise<void>;
  /** Start again with the same arguments (after kill); waits until it answers. */
  restart(): Promise<void>;
  pause(): void;
  resume(): void;
  /** Kill and remove the folder. */
  stop(): Promise<void>;
  cli(...args: string[]): string;
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

async function waitFor(what: string, ok: () => boolean, ms = 10_000): Promise<void> {
  const until = Date.now() + ms;
  while (!ok()) {
    if (Date.now() > until) throw new Error(`${what} within ${ms} ms`);
    await sleep(50);
  }
}

function exited(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve();
  return new Promise((r) => child.once('exit', () => r()));
}

/** A redis-server on a Unix socket only (--port 0), without persistence unless `extra` asks for it. */
export async function startRedis(extra: string[] = []): Promise<RedisProcess> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbd-redis-'));
  const socket = path.join(dir, 'redis.sock');
  const args = ['--port', '0', '--unixsocket', socket, '--save', '', '--appendonly', 'no', '--dir', dir, '--daemonize', 'no', ...extra];
  const cli = (...a: string[]) => spawnSync(REDIS_CLI, ['-s', socket, ...a], { encoding: 'utf8', timeout: 5000 }).stdout.trim();
  const launch = async (): Promise<ChildProcess> => {
    const child = spawn(REDIS_SERVER, args, { stdio: 'ignore' });
    await waitFor('redis-server did not answer', () => fs.existsSync(socket) && cli('ping') === 'PONG');
    return child;
  };
  const proc: RedisProcess = {
    dir,
    socket,
    args,
    child: await launch(),
    async kill() {
      proc.child.kill('SIGKILL');
      await exited(proc.child);
      fs.rmSync(socket, { force: true });
    },
    async restart() {
      proc.child = await launch();
    },
    pause() {
      proc.child.kill('SIGSTOP');
    },
    resume() {
      proc.child.kill('SIGCONT');
    },
    async stop() {
      proc.child.kill('SIGCONT');
      await proc.kill();
      fs.rmSync(dir, { recursive: true, force: true });
    },
    cli,
  };
  return proc;
}

/** A TCP port on 127.0.0.1 that nobody listens on right now. */
export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(port));
    });
  });
}

export interface RedisCluster {
  ports: number[];
  dir: string;
  cli(port: number, ...args: string[]): string;
  stop(): Promise<void>;
}

/** `masters` cluster-enabled servers on loopback ports, joined with redis-cli --cluster create. */
export async function startCluster(masters = 3): Promise<RedisCluster> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbd-redis-cluster-'));
  const children: ChildProcess[] = [];
  const ports: number[] = [];
  const cli = (port: number, ...a: string[]) =>
    spawnSync(REDIS_CLI, ['-h', '127.0.0.1', '-p', String(port), ...a], { encoding: 'utf8', timeout: 20_000 }).stdout.trim();
  const stop = async () => {
    for (const c of children) c.kill('SIGKILL');
    await Promise.all(children.map(exited));
    fs.rmSync(dir, { recursive: true, force: true });
  };
  try {
    for (let i = 0; i < masters; i++) {
      const port = await freePort();
      const bus = await freePort();
      ports.push(port);
      const nodeDir = path.join(dir, String(i));
      fs.mkdirSync(nodeDir);
      children.push(
        spawn(
          REDIS_SERVER,
          ['--port', String(port), '--bind', '127.0.0.1', '--cluster-enabled', 'yes', '--cluster-port', String(bus),
            '--cluster-config-file', path.join(nodeDir, 'nodes.conf'), '--dir', nodeDir, '--save', '', '--appendonly', 'no', '--daemonize', 'no'],
          { stdio: 'ignore' },
        ),
      );
    }
    for (const p of ports) await waitFor(`cluster node ${p} did not answer`, () => cli(p, 'ping') === 'PONG');
    const r = spawnSync(REDIS_CLI, ['--cluster', 'create', ...ports.map((p) => `127.0.0.1:${p}`), '--cluster-replicas', '0', '--cluster-yes'], {
      encoding: 'utf8',
      timeout: 30_000,
    });
    if (r.status !== 0) throw new Error(`redis-cli --cluster create failed: ${r.stdout}${r.stderr}`);
    for (const p of ports) await waitFor('the cluster did not become ready', () => /cluster_state:ok/.test(cli(p, 'cluster', 'info')), 20_000);
  } catch (err) {
    await stop();
    throw err;
  }
  return { ports, dir, cli, stop };
}
