// nbd-export benchmark: one interleaved matrix of NBD servers x workloads x
// storage x transport. See bench/README.md. Run with `npm run bench -- [options]`.
//
// Every server of a (storage, transport) group is started once, on its own
// fresh copy of a random-content image (memory and Redis servers are pre-filled
// with the same content), checked with `nbdinfo --size` and warmed up; then for
// each workload and each repetition every server is run once, in rotating
// order (A B C, B C A, ...), so slow drifts of the shared machine hit every
// server alike. Nothing here asserts on times; the output is medians, min-max
// and ratios.

import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { fileURLToPath } from 'node:url';
import { median, pairedRatio, type RoundValue } from './paired.ts';

const benchDir = path.dirname(fileURLToPath(import.meta.url));
const projectRoot = path.resolve(benchDir, '..');
const PY = '/usr/bin/python3';
const EXPORT_NAME = 'bench';

// ---------------------------------------------------------------- options

const ALL_SERVERS = ['nbd-export', 'nbd-export-mem', 'nbd-export-redis', 'qemu-nbd', 'nbdkit-file', 'nbdkit-memory', 'nbd-server', 'nbdkit-null'];
const QUICK_WORKLOADS = ['seqread', 'randread', 'randwrite', 'copy-out-4', 'connect'];

const HELP = `usage: npm run bench -- [options]

  --servers LIST     comma list (default: ${ALL_SERVERS.join(',')}).
                     Also: nbd-export-metrics (nbd-export with --metrics on a free port,
                     to price the metrics hooks) and nbd-export@REV / nbd-export-mem@REV
                     (REV: a git revision of this repo, or a directory holding a modified
                     copy of src/ and bin/; bundled into a temp dir) to compare builds.
                     nbdkit-null (the client-bound reference) runs on the 4 KiB rows only.
  --filter LIST      comma list of workload ids, groups or /regexps/ (default: all):
                     seqread, seqwrite, randread, randwrite, randread-4conn, randrw,
                     copy-out-1, copy-out-4, copy-in-1, copy-in-4, connect;
                     groups: fio, copy, read, write, 4k      (--workloads is the same)
  --transport LIST   unix,tcp (default both)
  --storage LIST     shm,disk (default both); shm = tmpfs (--shm-dir), disk = --disk-dir
  --reps N           repetitions per server and workload (default 3)
  --runtime S        fio time per run, seconds (default 10)
  --ramp S           fio ramp time before measuring, seconds (default 2)
  --connect-time S   seconds per connections-per-second run (default 5)
  --size SIZE        image size, e.g. 1G, 256M (default 1G)
  --quick            a ~3-minute pass: reps 1, runtime 2, ramp 0, connect-time 2, storage shm,
                     transport unix, workloads ${QUICK_WORKLOADS.join(',')}
                     (explicit options win)
  --no-warmup        skip the untimed warm-up of each server after it starts
  --nbd-export-bin P the nbd-export executable to run as is
  --no-build         run the tree's bin/nbd-export as is (its dist/ bundle when fresh, else
                     tsx) instead of bundling the working tree into a temp dir at start
  --disk-dir DIR     where 'disk' images live (default /var/tmp)
  --shm-dir DIR      where 'shm' images, sockets and logs live (default /dev/shm)
  --out FILE         raw JSON (default bench/results/<date>.json; markdown next to it)
  --report FILES     only print the tables of earlier results JSON (comma list: merged)
  -h, --help`;

const { values: opt } = parseArgs({
  options: {
    servers: { type: 'string' },
    filter: { type: 'string' },
    workloads: { type: 'string' },
    transport: { type: 'string' },
    storage: { type: 'string' },
    reps: { type: 'string' },
    runtime: { type: 'string' },
    ramp: { type: 'string' },
    'connect-time': { type: 'string' },
    size: { type: 'string' },
    quick: { type: 'boolean', default: false },
    'no-warmup': { type: 'boolean', default: false },
    'nbd-export-bin': { type: 'string' },
    'no-build': { type: 'boolean', default: false },
    'disk-dir': { type: 'string' },
    'shm-dir': { type: 'string' },
    out: { type: 'string' },
    report: { type: 'string' },
    help: { type: 'boolean', short: 'h', default: false },
  },
  strict: true,
});
if (opt.help) {
  console.log(HELP);
  process.exit(0);
}

function list(s: string | undefined, dflt: string[]): string[] {
  return s ? s.split(',').map((x) => x.trim()).filter(Boolean) : dflt;
}
function num(s: string | undefined, dflt: number): number {
  if (s === undefined) return dflt;
  const n = Number(s);
  if (!Number.isFinite(n) || n <= 0) throw new Error(`bad number: ${s}`);
  return n;
}
function parseSize(s: string): number {
  const m = /^(\d+)([KMGT]?)i?B?$/i.exec(s.trim());
  if (!m) throw new Error(`bad size: ${s}`);
  const mult: Record<string, number> = { '': 1, K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40 };
  return Number(m[1]) * (mult[(m[2] ?? '').toUpperCase()] ?? 1);
}

// ---------------------------------------------------------------- workloads

type Unit = 'MB/s' | 'IOPS' | 'conn/s';
interface Workload {
  id: string;
  title: string;
  unit: Unit;
  kind: 'fio' | 'copy' | 'connect';
  writes: boolean;
  /** 4 KiB request rows, where nbdkit null shows what the client itself can do */
  small: boolean;
  groups: string[];
  fio?: Record<string, string | number>;
  copy?: { dir: 'out' | 'in'; connections: number };
}
const WORKLOADS: Workload[] = [
  { id: 'seqread', title: 'fio seq read 1M qd16', unit: 'MB/s', kind: 'fio', writes: false, small: false, groups: ['fio', 'read'], fio: { rw: 'read', bs: '1M', iodepth: 16 } },
  { id: 'seqwrite', title: 'fio seq write 1M qd16', unit: 'MB/s', kind: 'fio', writes: true, small: false, groups: ['fio', 'write'], fio: { rw: 'write', bs: '1M', iodepth: 16 } },
  { id: 'randread', title: 'fio randread 4k qd32', unit: 'IOPS', kind: 'fio', writes: false, small: true, groups: ['fio', 'read', '4k'], fio: { rw: 'randread', bs: '4k', iodepth: 32 } },
  { id: 'randwrite', title: 'fio randwrite 4k qd32', unit: 'IOPS', kind: 'fio', writes: true, small: true, groups: ['fio', 'write', '4k'], fio: { rw: 'randwrite', bs: '4k', iodepth: 32 } },
  { id: 'randread-4conn', title: 'fio randread 4k qd32 x 4 connections', unit: 'IOPS', kind: 'fio', writes: false, small: true, groups: ['fio', 'read', '4k'], fio: { rw: 'randread', bs: '4k', iodepth: 32, numjobs: 4 } },
  { id: 'randrw', title: 'fio randrw 70/30 4k qd32', unit: 'IOPS', kind: 'fio', writes: true, small: true, groups: ['fio', 'read', 'write', '4k'], fio: { rw: 'randrw', rwmixread: 70, bs: '4k', iodepth: 32 } },
  { id: 'copy-out-1', title: 'nbdcopy server → null:, 1 connection', unit: 'MB/s', kind: 'copy', writes: false, small: false, groups: ['copy', 'read'], copy: { dir: 'out', connections: 1 } },
  { id: 'copy-out-4', title: 'nbdcopy server → null:, 4 connections', unit: 'MB/s', kind: 'copy', writes: false, small: false, groups: ['copy', 'read'], copy: { dir: 'out', connections: 4 } },
  { id: 'copy-in-1', title: 'nbdcopy tmpfs file → server, 1 connection', unit: 'MB/s', kind: 'copy', writes: true, small: false, groups: ['copy', 'write'], copy: { dir: 'in', connections: 1 } },
  { id: 'copy-in-4', title: 'nbdcopy tmpfs file → server, 4 connections', unit: 'MB/s', kind: 'copy', writes: true, small: false, groups: ['copy', 'write'], copy: { dir: 'in', connections: 4 } },
  { id: 'connect', title: 'connect + NBD_OPT_GO + NBD_CMD_DISC, one at a time', unit: 'conn/s', kind: 'connect', writes: false, small: false, groups: [] },
];

function selectWorkloads(spec: string[]): Workload[] {
  const out: Workload[] = [];
  for (const name of spec) {
    const re = /^\/(.*)\/$/.exec(name);
    const hit = WORKLOADS.filter((w) => (re ? new RegExp(re[1]!).test(w.id) : w.id === name || w.groups.includes(name)));
    if (!hit.length) throw new Error(`no workload matches ${name}`);
    for (const w of hit) if (!out.includes(w)) out.push(w);
  }
  return out.sort((a, b) => WORKLOADS.indexOf(a) - WORKLOADS.indexOf(b));
}

// ---------------------------------------------------------------- servers

type Transport = 'unix' | 'tcp';
type Storage = 'shm' | 'disk';
interface Endpoint {
  transport: Transport;
  socket?: string;
  port?: number;
}
interface Launch {
  cmd: string;
  args: string[];
  daemon?: { pidFile: string }; // forks into the background; its pid is read from pidFile
}
interface ServerDef {
  id: string;
  /** file: serves its own copy of the image; memory/redis: pre-filled; null: no data */
  backing: 'file' | 'memory' | 'redis' | 'null';
  tree: boolean; // count the RSS of child processes too (forking servers)
  smallOnly: boolean; // only on the 4 KiB rows (the nbdkit null reference)
  launch(img: string, ep: Endpoint, dir: string, aux: { redisSocket?: string; metricsPort?: number }): Launch;
  nbdExport?: { bin: string; ref?: string };
  metrics?: boolean;
}

function listenArgs(ep: Endpoint): string[] {
  return ep.transport === 'unix' ? ['-k', ep.socket!] : ['-b', '127.0.0.1', '-p', String(ep.port)];
}

function nbdExportDef(id: string, backing: 'file' | 'memory' | 'redis', bin: string, ref?: string, metrics = false): ServerDef {
  return {
    id,
    backing,
    tree: false,
    smallOnly: false,
    nbdExport: { bin, ref },
    metrics,
    launch: (img, ep, _dir, aux) => {
      const target = backing === 'memory' ? `memory:${imageSize}` : backing === 'redis' ? `redis+unix://${aux.redisSocket}?disk=${EXPORT_NAME}` : img;
      return {
        cmd: bin,
        args: ['-f', 'raw', '-x', EXPORT_NAME, '-t', '-e', '0', ...(backing === 'redis' ? ['--size', String(imageSize)] : []), ...(metrics ? ['--metrics', `127.0.0.1:${aux.metricsPort}`] : []), ...listenArgs(ep), target],
      };
    },
  };
}

function serverDefs(ids: string[], defaultBin: string, snapshotBin: (ref: string) => string): ServerDef[] {
  const out: ServerDef[] = [];
  for (const id of ids) {
    const at = /^(nbd-export(?:-mem)?)@(.+)$/.exec(id);
    if (at) {
      out.push(nbdExportDef(id, at[1] === 'nbd-export-mem' ? 'memory' : 'file', snapshotBin(at[2]!), at[2]));
      continue;
    }
    switch (id) {
      case 'nbd-export':
        out.push(nbdExportDef(id, 'file', defaultBin));
        break;
      case 'nbd-export-mem':
        out.push(nbdExportDef(id, 'memory', defaultBin));
        break;
      case 'nbd-export-redis':
        out.push(nbdExportDef(id, 'redis', defaultBin));
        break;
      case 'nbd-export-metrics':
        out.push(nbdExportDef(id, 'file', defaultBin, undefined, true));
        break;
      case 'qemu-nbd':
        out.push({
          id, backing: 'file', tree: false, smallOnly: false,
          // the defaults spelled out: writeback cache, thread-pool AIO
          launch: (img, ep) => ({ cmd: 'qemu-nbd', args: ['-f', 'raw', '-x', EXPORT_NAME, '-t', '-e', '0', '--cache=writeback', '--aio=threads', ...listenArgs(ep), img] }),
        });
        break;
      case 'nbdkit-file':
      case 'nbdkit-memory':
      case 'nbdkit-null': {
        const plugin = id.slice('nbdkit-'.length);
        out.push({
          id, backing: plugin === 'file' ? 'file' : plugin === 'memory' ? 'memory' : 'null', tree: false, smallOnly: plugin === 'null',
          launch: (img, ep) => ({
            cmd: 'nbdkit',
            args: ['-f', ...(ep.transport === 'unix' ? ['-U', ep.socket!] : ['-i', '127.0.0.1', '-p', String(ep.port)]), plugin, plugin === 'file' ? img : String(imageSize)],
          }),
        });
        break;
      }
      case 'nbd-server':
        out.push({
          id, backing: 'file', tree: true, smallOnly: false,
          launch: (img, ep, dir) => {
            // nbd-server -d serves a single connection and exits, so it cannot take
            // 4 connections or a connect loop: it runs as the usual forking daemon
            // and is found through its pid file (and its children for RSS).
            const conf = path.join(dir, `nbd-server-${ep.transport}.conf`);
            const generic = ep.transport === 'unix' ? [`unixsock = ${ep.socket}`] : ['listenaddr = 127.0.0.1', `port = ${ep.port}`];
            fs.writeFileSync(conf, ['[generic]', ...generic, `[${EXPORT_NAME}]`, `exportname = ${img}`, ''].join('\n'));
            const pidFile = path.join(dir, `nbd-server-${ep.transport}.pid`);
            return { cmd: 'nbd-server', args: ['-C', conf, '-p', pidFile], daemon: { pidFile } };
          },
        });
        break;
      default:
        throw new Error(`unknown server ${id}`);
    }
  }
  return out;
}

// ---------------------------------------------------------------- processes and cleanup

const children = new Set<ChildProcess>();
const daemonPids = new Set<number>();
const tempDirs: string[] = [];
let cleanedUp = false;

function killAllSync(): void {
  for (const c of children) {
    try {
      if (c.pid) process.kill(-c.pid, 'SIGKILL'); // detached: its own process group
    } catch {
      try { c.kill('SIGKILL'); } catch { /* gone */ }
    }
  }
  for (const pid of daemonPids) {
    // a forking daemon's per-client children are not in our process group
    for (const k of descendants(pid)) try { process.kill(k, 'SIGKILL'); } catch { /* gone */ }
    try { process.kill(pid, 'SIGKILL'); } catch { /* gone */ }
  }
}
function cleanupSync(): void {
  if (cleanedUp) return;
  cleanedUp = true;
  killAllSync();
  for (const d of tempDirs) {
    try { fs.rmSync(d, { recursive: true, force: true }); } catch { /* best effort */ }
  }
}
process.on('exit', cleanupSync);

/** File in each temp dir naming the bench that made it (see sweepLeftovers). */
const OWNER_FILE = 'bench.pid';

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/**
 * Stop what a killed bench left behind. SIGKILL (a terminal or job runner
 * that kills the whole group) gives no chance to clean up, and nbd-server,
 * the one daemon here, forks away from the parent-death signal its launcher
 * set, so it kept running with its image in /dev/shm. Each temp dir names
 * its bench in OWNER_FILE; for a dir whose bench is gone, the nbd-server
 * whose pid file lies there (checked to be an nbd-server started on that
 * dir's config) is killed with its children, and the dir is removed.
 */
function sweepLeftovers(roots: string[]): void {
  for (const root of new Set(roots)) {
    let names: string[];
    try { names = fs.readdirSync(root).filter((n) => n.startsWith('nbd-bench-')); } catch { continue; }
    for (const name of names) {
      const dir = path.join(root, name);
      const owner = Number(readTrimmed(path.join(dir, OWNER_FILE)));
      if (!Number.isInteger(owner) || owner <= 0 || alive(owner)) continue;
      for (const f of fs.readdirSync(dir).filter((n) => /^nbd-server-.*\.pid$/.test(n))) {
        const pid = Number(readTrimmed(path.join(dir, f)));
        const cmdline = Number.isInteger(pid) && pid > 0 ? readTrimmed(`/proc/${pid}/cmdline`)?.split('\0') : undefined;
        if (cmdline === undefined || !path.basename(cmdline[0] ?? '').startsWith('nbd-server') || !cmdline.some((a) => a.startsWith(dir + path.sep))) continue;
        for (const k of descendants(pid)) try { process.kill(k, 'SIGKILL'); } catch { /* gone */ }
        try { process.kill(pid, 'SIGKILL'); } catch { /* gone */ }
        log(`stopped nbd-server ${pid} left by bench ${owner} (${dir})`);
      }
      fs.rmSync(dir, { recursive: true, force: true });
      log(`removed ${dir}, left by bench ${owner}`);
    }
  }
}
for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
  process.on(sig, () => {
    process.stderr.write(`\n${sig}: stopping servers and removing images\n`);
    cleanupSync();
    process.exit(130);
  });
}

interface RunResult { code: number | null; signal: string | null; stdout: string; stderr: string; ms: number; timedOut: boolean }

/** Run a client command to completion, killed (whole group) after timeoutMs. */
function run(cmd: string, args: string[], timeoutMs: number): Promise<RunResult> {
  return new Promise((resolve) => {
    const t0 = process.hrtime.bigint();
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], detached: true });
    children.add(child);
    let stdout = '';
    let stderr = '';
    let timedOut = false;
    child.stdout!.on('data', (d: Buffer) => { stdout += d.toString(); });
    child.stderr!.on('data', (d: Buffer) => { stderr += d.toString(); if (stderr.length > 1e5) stderr = stderr.slice(-5e4); });
    const timer = setTimeout(() => {
      timedOut = true;
      try { process.kill(-child.pid!, 'SIGKILL'); } catch { /* gone */ }
    }, timeoutMs);
    const done = (code: number | null, signal: string | null) => {
      clearTimeout(timer);
      children.delete(child);
      resolve({ code, signal, stdout, stderr, ms: Number(process.hrtime.bigint() - t0) / 1e6, timedOut });
    };
    child.on('error', (e) => { stderr += String(e); done(-1, null); });
    child.on('close', done);
  });
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.on('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(port));
    });
  });
}

/** A long-running helper or server process: detached (own group), dies with us. */
function spawnService(cmd: string, args: string[], logFile: string): ChildProcess {
  const fd = fs.openSync(logFile, 'a');
  // setpriv --pdeathsig: the process dies with this one even on SIGKILL
  const child = spawn('setpriv', ['--pdeathsig', 'SIGKILL', '--', cmd, ...args], { stdio: ['ignore', fd, fd], detached: true });
  fs.closeSync(fd);
  return child;
}

async function stopProcess(pid: number, group: boolean, exited: () => boolean): Promise<void> {
  const gone = () => { try { process.kill(pid, 0); return exited(); } catch { return true; } };
  try { process.kill(group ? -pid : pid, 'SIGTERM'); } catch { /* gone */ }
  for (let i = 0; i < 50 && !gone(); i++) await sleep(100);
  try { process.kill(group ? -pid : pid, 'SIGKILL'); } catch { /* gone */ }
}

// ---------------------------------------------------------------- RSS

function statusKiB(pid: number, field: 'VmRSS' | 'VmHWM'): number {
  try {
    const m = new RegExp(`^${field}:\\s+(\\d+) kB`, 'm').exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? Number(m[1]) : 0;
  } catch {
    return 0;
  }
}
const CLK_TCK = Number(spawnSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).stdout?.trim()) || 100;

/**
 * CPU seconds used so far by a server (user + system), with a forking
 * server's children, live and reaped. Less disturbed by other load than
 * throughput, so it prices small differences (such as --metrics) better.
 */
function cpuSeconds(pid: number, tree: boolean): number {
  const one = (p: number, reaped: boolean): number => {
    try {
      const stat = fs.readFileSync(`/proc/${p}/stat`, 'utf8');
      // proc(5) fields 14-17: utime, stime, cutime, cstime; rest[0] is field 3
      const rest = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      return (Number(rest[11]) + Number(rest[12]) + (reaped ? Number(rest[13]) + Number(rest[14]) : 0)) / CLK_TCK;
    } catch {
      return 0;
    }
  };
  let total = one(pid, tree);
  if (tree) for (const c of descendants(pid)) total += one(c, false);
  return total;
}

function descendants(pid: number): number[] {
  const out: number[] = [];
  const walk = (p: number) => {
    let tasks: string[] = [];
    try { tasks = fs.readdirSync(`/proc/${p}/task`); } catch { return; }
    for (const t of tasks) {
      let kids = '';
      try { kids = fs.readFileSync(`/proc/${p}/task/${t}/children`, 'utf8'); } catch { continue; }
      for (const k of kids.split(/\s+/).filter(Boolean)) {
        out.push(Number(k));
        walk(Number(k));
      }
    }
  };
  walk(pid);
  return out;
}

/**
 * Peak RSS of a server during one run: VmHWM after resetting it through
 * clear_refs (5 = reset the peak to the current RSS), and VmRSS sampled every
 * 100 ms for forking servers, whose per-client children come and go.
 */
class RssSampler {
  peak = 0;
  private timer: NodeJS.Timeout;
  constructor(private pid: number, private tree: boolean) {
    try { fs.writeFileSync(`/proc/${pid}/clear_refs`, '5'); } catch { /* then HWM is the lifetime peak */ }
    this.sample();
    this.timer = setInterval(() => this.sample(), 100);
  }
  private sample(): void {
    let kib = statusKiB(this.pid, 'VmRSS');
    if (this.tree) for (const c of descendants(this.pid)) kib += statusKiB(c, 'VmRSS');
    this.peak = Math.max(this.peak, kib);
  }
  stop(): number {
    clearInterval(this.timer);
    this.sample();
    return Math.max(this.peak, statusKiB(this.pid, 'VmHWM'));
  }
}

// ---------------------------------------------------------------- running servers

interface Instance {
  def: ServerDef;
  storage: Storage;
  transport: Transport;
  uri: string;
  connectSpec: string;
  image: string | null; // the file it serves, for sync after writes
  pid: number;
  child?: ChildProcess;
  redis?: { child: ChildProcess; socket: string };
  log: string;
  idleRssKiB: number;
  multiConn: boolean | null;
  alive: boolean;
  note: string[];
  command: string;
  nbdExportMode?: string;
  metricsPort?: number;
}

function uriOf(ep: Endpoint): string {
  return ep.transport === 'unix' ? `nbd+unix:///${EXPORT_NAME}?socket=${ep.socket}` : `nbd://127.0.0.1:${ep.port}/${EXPORT_NAME}`;
}

async function reachable(uri: string): Promise<boolean> {
  const r = await run('nbdinfo', ['--size', uri], 5000);
  return r.code === 0 && /^\d+\s*$/.test(r.stdout) && Number(r.stdout) === imageSize;
}

const log = (s: string) => process.stderr.write(s + '\n');

async function startServer(def: ServerDef, storage: Storage, transport: Transport, dirs: { shm: string; img: string }, baseImage: string): Promise<Instance> {
  const tag = `${def.id.replace(/[^A-Za-z0-9.-]/g, '_')}-${storage}-${transport}`;
  let image: string | null = null;
  if (def.backing === 'file') {
    image = path.join(dirs.img, `${tag}.img`);
    const cp = await run('cp', ['--sparse=never', baseImage, image], 300_000);
    if (cp.code !== 0) throw new Error(`cp image: ${cp.stderr}`);
    await run('sync', [image], 300_000); // untimed: don't let the copy's writeback land in a measurement
  }
  const aux: { redisSocket?: string; metricsPort?: number } = {};
  let redis: Instance['redis'];
  if (def.backing === 'redis') {
    // a private Redis on a Unix socket, no persistence: the backend's own cost
    const socket = path.join(dirs.shm, `${tag}.redis.sock`);
    const args = ['--port', '0', '--unixsocket', socket, '--unixsocketperm', '700', '--save', '', '--appendonly', 'no', '--dir', dirs.shm, '--dbfilename', `${tag}.rdb`];
    log(`   $ redis-server ${args.map((a) => (a === '' ? "''" : a)).join(' ')}`);
    const child = spawnService('redis-server', args, path.join(dirs.shm, `${tag}.redis.log`));
    children.add(child);
    redis = { child, socket };
    for (let i = 0; i < 100 && !fs.existsSync(socket); i++) await sleep(50);
    if (!fs.existsSync(socket)) throw new Error(`redis-server did not open ${socket}: ${readTail(path.join(dirs.shm, `${tag}.redis.log`))}`);
    aux.redisSocket = socket;
  }
  if (def.metrics) aux.metricsPort = await freePort();
  const ep: Endpoint = transport === 'unix' ? { transport, socket: path.join(dirs.shm, `${tag}.sock`) } : { transport, port: await freePort() };
  const l = def.launch(image ?? '', ep, dirs.shm, aux);
  const command = [l.cmd, ...l.args].join(' ');
  log(`   $ ${command}`);
  const logFile = path.join(dirs.shm, `${tag}.log`);
  const child = spawnService(l.cmd, l.args, logFile);
  const inst: Instance = {
    def, storage, transport, uri: uriOf(ep), connectSpec: transport === 'unix' ? `unix:${ep.socket}` : `tcp:127.0.0.1:${ep.port}`,
    image, pid: child.pid ?? -1, redis, log: logFile, idleRssKiB: 0, multiConn: null, alive: false, note: [], command, metricsPort: aux.metricsPort,
  };
  if (def.nbdExport) inst.nbdExportMode = nbdExportMode(def.nbdExport.bin);
  try {
    if (l.daemon) {
      const exited = await new Promise<number | null>((res) => { child.on('close', (c) => res(c)); child.on('error', () => res(-1)); });
      if (exited !== 0) throw new Error(`${def.id} exited with ${exited}: ${readTail(logFile)}`);
      for (let i = 0; i < 50 && !fs.existsSync(l.daemon.pidFile); i++) await sleep(100);
      inst.pid = Number(fs.readFileSync(l.daemon.pidFile, 'utf8').trim());
      daemonPids.add(inst.pid);
    } else {
      children.add(child);
      inst.child = child;
      child.on('exit', () => { inst.alive = false; });
    }
    const deadline = Date.now() + 30_000;
    while (Date.now() < deadline) {
      if (!l.daemon && child.exitCode !== null) throw new Error(`${def.id} exited with ${child.exitCode}: ${readTail(logFile)}`);
      if (await reachable(inst.uri)) { inst.alive = true; break; }
      await sleep(200);
    }
    if (!inst.alive) throw new Error(`${def.id} not reachable at ${inst.uri} after 30 s: ${readTail(logFile)}`);
    const info = await run('nbdinfo', ['--json', inst.uri], 10_000);
    try { inst.multiConn = Boolean(JSON.parse(info.stdout).exports?.[0]?.can_multi_conn); } catch { inst.multiConn = null; }
    if (def.backing === 'memory' || def.backing === 'redis') {
      const fill = await run('nbdcopy', ['--connections=4', baseImage, inst.uri], 600_000);
      if (fill.code !== 0) throw new Error(`pre-filling ${def.id}: ${fill.stderr}`);
    }
    inst.idleRssKiB = treeRss(inst);
  } catch (e) {
    await stopServer(inst);
    throw e;
  }
  return inst;
}

function treeRss(inst: Instance): number {
  return statusKiB(inst.pid, 'VmRSS') + (inst.def.tree ? descendants(inst.pid).reduce((a, p) => a + statusKiB(p, 'VmRSS'), 0) : 0);
}

/** A small system file's content, trimmed, or undefined when it cannot be read. */
function readTrimmed(file: string): string | undefined {
  try { return fs.readFileSync(file, 'utf8').trim(); } catch { return undefined; }
}

function readTail(file: string): string {
  try { return fs.readFileSync(file, 'utf8').slice(-800); } catch { return ''; }
}

async function stopServer(inst: Instance): Promise<void> {
  const pid = inst.pid;
  if (inst.child) {
    const c = inst.child;
    await stopProcess(pid, true, () => c.exitCode !== null || c.signalCode !== null);
    children.delete(c);
  } else if (pid > 0) {
    const kids = descendants(pid);
    await stopProcess(pid, false, () => false);
    for (const k of kids) try { process.kill(k, 'SIGKILL'); } catch { /* gone */ }
    daemonPids.delete(pid);
  }
  if (inst.redis) {
    const c = inst.redis.child;
    await stopProcess(c.pid!, true, () => c.exitCode !== null || c.signalCode !== null);
    children.delete(c);
  }
  if (inst.image) fs.rmSync(inst.image, { force: true });
}

function nbdExportMode(bin: string): string {
  if (process.env.NBD_EXPORT_FROM_SOURCE === '1') return 'source (tsx)';
  const root = path.resolve(path.dirname(bin), '..');
  try {
    const b = fs.statSync(path.join(root, 'dist/nbd-export.mjs')).mtimeMs;
    return b >= newestMtime(path.join(root, 'src')) ? 'bundle (dist/)' : 'source (tsx)';
  } catch {
    return 'source (tsx)';
  }
}
function newestMtime(dir: string): number {
  let newest = 0;
  for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
    const p = path.join(dir, e.name);
    newest = Math.max(newest, e.isDirectory() ? newestMtime(p) : fs.statSync(p).mtimeMs);
  }
  return newest;
}

// ---------------------------------------------------------------- one measurement

interface Sample {
  storage: Storage;
  transport: Transport;
  server: string;
  workload: string;
  rep: number;
  /** Which of the files given to --report the sample came from (rounds pair only within one run). */
  run?: number;
  value: number | null;
  unit: Unit;
  rssPeakKiB: number;
  /** server CPU per unit of work: µs per I/O (IOPS rows), ms per GB (MB/s rows), µs per connection */
  cpuPerOp?: number;
  error?: string;
  skipped?: string;
  detail?: Record<string, unknown>;
}
type Measurement = { value: number | null; cpuPerOp?: number; error?: string; skipped?: string; detail?: Record<string, unknown> };

async function runFio(inst: Instance, id: string, params: Record<string, string | number>, dir: string, seconds: number, rampSeconds: number): Promise<Measurement> {
  const job = path.join(dir, `job-${id}.fio`);
  const lines = ['[global]', 'ioengine=nbd', `uri=${inst.uri}`, 'time_based=1', `runtime=${seconds}`, `ramp_time=${rampSeconds}`, 'group_reporting=1', 'norandommap=1', 'randrepeat=0', `[${id}]`];
  for (const [k, v] of Object.entries(params)) lines.push(`${k}=${v}`);
  fs.writeFileSync(job, lines.join('\n') + '\n');
  const limit = seconds + rampSeconds + 60;
  // server CPU over the measured part: from the end of the ramp (roughly) to fio's exit
  let cpu0 = cpuSeconds(inst.pid, inst.def.tree);
  const rampTimer = rampSeconds > 0 ? setTimeout(() => { cpu0 = cpuSeconds(inst.pid, inst.def.tree); }, rampSeconds * 1000) : undefined;
  const r = await run('fio', ['--output-format=json', job], limit * 1000);
  clearTimeout(rampTimer);
  const cpu = cpuSeconds(inst.pid, inst.def.tree) - cpu0;
  if (r.timedOut) return { value: null, error: `fio timed out after ${limit} s` };
  // fio may print warnings before its JSON
  const start = r.stdout.indexOf('\n{');
  const json = r.stdout.startsWith('{') ? r.stdout : start >= 0 ? r.stdout.slice(start + 1) : '';
  let j: { jobs?: Array<Record<string, any>> };
  try { j = JSON.parse(json); } catch { return { value: null, error: `fio exit ${r.code}: ${r.stderr.slice(-400) || r.stdout.slice(-400)}` }; }
  const job0 = j.jobs?.[0];
  if (!job0) return { value: null, error: 'fio: no job in output' };
  if (job0.error) return { value: null, error: `fio error ${job0.error}: ${r.stderr.slice(-400)}` };
  const rd = job0.read as Record<string, any>;
  const wr = job0.write as Record<string, any>;
  const detail = {
    readIops: rd.iops, writeIops: wr.iops, readBytesPerSec: rd.bw_bytes, writeBytesPerSec: wr.bw_bytes,
    readClatMeanUs: rd.clat_ns?.mean / 1000, writeClatMeanUs: wr.clat_ns?.mean / 1000,
    readClatP99Us: rd.clat_ns?.percentile?.['99.000000'] / 1000, writeClatP99Us: wr.clat_ns?.percentile?.['99.000000'] / 1000,
    usrCpu: job0.usr_cpu, sysCpu: job0.sys_cpu, exitCode: r.code,
  };
  if (r.code !== 0) return { value: null, error: `fio exit ${r.code}: ${r.stderr.slice(-400)}`, detail };
  const bs = String(params.bs ?? '');
  const small = bs === '4k';
  const value = small ? rd.iops + wr.iops : (rd.bw_bytes + wr.bw_bytes) / 1e6;
  if (!(value > 0)) return { value: null, error: `fio measured nothing: ${r.stderr.slice(-400)}`, detail };
  const ios = (rd.total_ios ?? 0) + (wr.total_ios ?? 0);
  const bytes = (rd.io_bytes ?? 0) + (wr.io_bytes ?? 0);
  const cpuPerOp = small ? (ios > 0 ? (cpu * 1e6) / ios : undefined) : bytes > 0 ? (cpu * 1e3) / (bytes / 1e9) : undefined;
  return { value, cpuPerOp, detail: { ...detail, serverCpuSec: cpu } };
}

async function runConnect(inst: Instance, seconds: number): Promise<Measurement> {
  const cpu0 = cpuSeconds(inst.pid, inst.def.tree);
  const r = await run(PY, [path.join(benchDir, 'connect.py'), inst.connectSpec, EXPORT_NAME, String(seconds)], (seconds + 60) * 1000);
  if (r.timedOut) return { value: null, error: 'connect loop timed out' };
  let j: { connections: number; errors: number; rate: number; first_error: string | null };
  try { j = JSON.parse(r.stdout); } catch { return { value: null, error: `connect.py exit ${r.code}: ${r.stderr.slice(-400)}` }; }
  if (j.errors > 0 && j.connections === 0) return { value: null, error: `connect: ${j.first_error}`, detail: j };
  const cpu = cpuSeconds(inst.pid, inst.def.tree) - cpu0;
  return { value: j.rate, cpuPerOp: j.connections > 0 ? (cpu * 1e6) / j.connections : undefined, detail: { ...j, serverCpuSec: cpu }, ...(j.errors ? { error: `${j.errors} failed connections, first: ${j.first_error}` } : {}) };
}

/** Size of the /metrics page, to show the metrics hooks were live during the run. */
async function scrapeMetrics(port: number): Promise<{ bytes: number; requests: number } | { error: string }> {
  try {
    const r = await fetch(`http://127.0.0.1:${port}/metrics`, { signal: AbortSignal.timeout(5000) });
    const text = await r.text();
    // the sum of nbd_requests_total over its labels: non-zero when the hooks counted
    const requests = text.split('\n').filter((l) => l.startsWith('nbd_requests_total')).reduce((a, l) => a + (Number(l.split(' ').pop()) || 0), 0);
    return { bytes: text.length, requests };
  } catch (e) {
    return { error: String(e) };
  }
}

async function measure(inst: Instance, w: Workload, dir: string, baseImage: string): Promise<Measurement> {
  const m = await measureOnly(inst, w, dir, baseImage);
  if (inst.metricsPort !== undefined) m.detail = { ...m.detail, metrics: await scrapeMetrics(inst.metricsPort) };
  return m;
}

async function measureOnly(inst: Instance, w: Workload, dir: string, baseImage: string): Promise<Measurement> {
  if (w.kind === 'fio') return runFio(inst, w.id, w.fio!, dir, runtime, ramp);
  if (w.kind === 'copy') {
    const { dir: d, connections } = w.copy!;
    if (connections > 1 && inst.multiConn === false) return { value: null, skipped: 'server does not advertise multi-conn' };
    const args = [`--connections=${connections}`, ...(d === 'out' ? [inst.uri, 'null:'] : [baseImage, inst.uri])];
    const cpu0 = cpuSeconds(inst.pid, inst.def.tree);
    const r = await run('nbdcopy', args, 300_000);
    const cpu = cpuSeconds(inst.pid, inst.def.tree) - cpu0;
    if (r.timedOut) return { value: null, error: 'nbdcopy timed out after 300 s' };
    if (r.code !== 0) return { value: null, error: `nbdcopy exit ${r.code}: ${r.stderr.slice(-400)}` };
    return { value: imageSize / 1e6 / (r.ms / 1000), cpuPerOp: (cpu * 1e3) / (imageSize / 1e9), detail: { seconds: r.ms / 1000, serverCpuSec: cpu } };
  }
  return runConnect(inst, connectTime);
}

/**
 * Untimed: a few seconds of small reads and of connections, so the first
 * workload does not measure a cold JIT or cold caches.
 */
async function warmUp(inst: Instance, dir: string): Promise<void> {
  await runFio(inst, 'warmup', { rw: 'randread', bs: '4k', iodepth: 32 }, dir, quick ? 1 : 2, 0);
  await runConnect(inst, 1);
}

// ---------------------------------------------------------------- report

function fmt(v: number, unit: Unit): string {
  if (unit === 'IOPS') return v >= 10000 ? `${(v / 1000).toFixed(1)}k` : `${(v / 1000).toFixed(2)}k`;
  if (v >= 100) return v.toFixed(0);
  if (v >= 10) return v.toFixed(1);
  return v.toFixed(2);
}

interface Results {
  meta: Record<string, unknown>;
  servers: Array<Record<string, unknown>>;
  samples: Sample[];
}

const FILE_PEERS = ['qemu-nbd', 'nbdkit-file', 'nbd-server'];
const short = (s: string) => s.replace('nbd-export-', 'ne-').replace(/^nbd-export/, 'ne');

function report(res: Results): string {
  const out: string[] = [];
  const samples = res.samples;
  const groups = [...new Set(samples.map((s) => `${s.storage}/${s.transport}`))];
  const wOrder = WORKLOADS.map((w) => w.id);
  const serverOrder = [...new Set(samples.map((s) => s.server))];
  for (const g of groups) {
    const [storage, transport] = g.split('/');
    const gs = samples.filter((s) => s.storage === storage && s.transport === transport);
    const servers = serverOrder.filter((id) => gs.some((s) => s.server === id));
    const stat = (server: string, wl: string) => {
      const ok = gs.filter((s) => s.server === server && s.workload === wl && s.value !== null).map((s) => s.value!);
      if (!ok.length) return null;
      return { med: median(ok), min: Math.min(...ok), max: Math.max(...ok), n: ok.length };
    };
    // ratio columns: [title, numerator, denominators (the best of them is used)]
    const ratios: Array<[string, string, string[]]> = [];
    const has = (s: string) => servers.includes(s);
    const peers = FILE_PEERS.filter(has);
    if (has('nbd-export')) {
      if (peers.length > 1) ratios.push(['ne ÷ best peer', 'nbd-export', peers]);
      for (const p of peers) ratios.push([`ne ÷ ${p}`, 'nbd-export', [p]]);
      if (has('nbdkit-null')) ratios.push(['ne ÷ nbdkit-null', 'nbd-export', ['nbdkit-null']]);
    }
    if (has('nbd-export-mem')) {
      if (has('nbdkit-memory')) ratios.push(['ne-mem ÷ nbdkit-memory', 'nbd-export-mem', ['nbdkit-memory']]);
      if (has('nbdkit-null')) ratios.push(['ne-mem ÷ nbdkit-null', 'nbd-export-mem', ['nbdkit-null']]);
    }
    for (const v of servers.filter((s) => s.startsWith('nbd-export') && !['nbd-export', 'nbd-export-mem'].includes(s))) {
      const base = v.startsWith('nbd-export-mem@') ? 'nbd-export-mem' : 'nbd-export';
      if (has(base)) ratios.push([`${short(v)} ÷ ${short(base)}`, v, [base]]);
    }
    out.push(`### ${storage === 'shm' ? 'tmpfs (/dev/shm)' : 'disk'} image, ${transport === 'unix' ? 'Unix socket' : 'TCP 127.0.0.1'}`, '');
    out.push(`median [min–max] of ${Math.max(0, ...gs.map((s) => s.rep))} runs; ratio = nbd-export median ÷ peer median (>1: nbd-export faster; "best peer" = the fastest of ${FILE_PEERS.join(', ')} on that row, named). ne = nbd-export (file), ne-mem = memory:, ne-redis = Redis backend. **Bold**: below the target (1.0 of the best peer; 0.9 of nbdkit null).`, '');
    const tail = (xs: string[]) => (xs.length ? ` ${xs.join(' | ')} |` : '');
    /** Of `ids`, the one with the best median on `wl`. */
    const bestOf = (ids: string[], wl: string) => {
      let best: { id: string; st: NonNullable<ReturnType<typeof stat>> } | null = null;
      for (const id of ids) {
        const st = stat(id, wl);
        if (st !== null && (best === null || st.med > best.st.med)) best = { id, st };
      }
      return best;
    };
    // the issue's targets: >= 1.0 of the best peer, >= 0.9 of nbdkit null on 4 KiB rows
    const targetOf = (title: string) =>
      title === 'ne ÷ best peer' || title === 'ne-mem ÷ nbdkit-memory' || (peers.length === 1 && title === `ne ÷ ${peers[0]}`) ? 1 : title.endsWith('÷ nbdkit-null') ? 0.9 : 0;
    out.push(`| workload | unit | ${servers.join(' | ')} |${tail(ratios.map((r) => r[0]))}`);
    out.push(`|---|---|${servers.map(() => '---:').join('|')}|${ratios.map(() => '---:|').join('')}`);
    for (const wl of wOrder) {
      if (!gs.some((s) => s.workload === wl)) continue;
      const w = WORKLOADS.find((x) => x.id === wl)!;
      const cells = servers.map((id) => {
        const st = stat(id, wl);
        if (!st) {
          const skip = gs.find((s) => s.server === id && s.workload === wl && s.skipped);
          const err = gs.find((s) => s.server === id && s.workload === wl && s.error);
          return skip ? 'skipped' : err ? 'FAILED' : '–';
        }
        const errs = gs.filter((s) => s.server === id && s.workload === wl && s.error).length;
        return `${fmt(st.med, w.unit)} [${fmt(st.min, w.unit)}–${fmt(st.max, w.unit)}]${errs ? ` (${errs} err)` : ''}`;
      });
      const rs = ratios.map(([title, a, bs]) => {
        const x = stat(a, wl);
        const best = bestOf(bs, wl);
        if (!x || best === null) return '–';
        const ratio = x.med / best.st.med;
        const r = ratio < targetOf(title) ? `**${ratio.toFixed(2)}**` : ratio.toFixed(2);
        return bs.length > 1 ? `${r} (${best.id})` : r;
      });
      out.push(`| ${wl} | ${w.unit} | ${cells.join(' | ')} |${tail(rs)}`);
    }
    out.push('');
    // the same ratios, paired round by round (see paired.ts)
    const rounds = (server: string, wl: string): RoundValue[] =>
      gs.filter((s) => s.server === server && s.workload === wl && s.value !== null).map((s) => ({ round: `${s.run ?? 0}:${s.rep}`, value: s.value! }));
    if (ratios.length > 0 && Math.max(0, ...gs.map((s) => s.rep)) > 1) {
      out.push('Paired ratios: in each round every server ran once, back to back; each column\'s ratio taken round by round (a run ÷ the other server\'s run in the same round; "best peer" = the one with the best median above), then the median [min–max] of those ratios and in how many rounds the first server was at least as fast. A slow spell of the machine that hits a whole round cancels out, where the ratio of medians only averages it.', '');
      out.push(`| workload |${tail(ratios.map((r) => r[0]))}`);
      out.push(`|---|${ratios.map(() => '---:|').join('')}`);
      for (const wl of wOrder) {
        if (!gs.some((s) => s.workload === wl)) continue;
        const rs = ratios.map(([title, a, bs]) => {
          const best = bestOf(bs, wl);
          const p = best === null ? null : pairedRatio(rounds(a, wl), rounds(best.id, wl));
          if (p === null) return '–';
          const m = p.median < targetOf(title) ? `**${p.median.toFixed(2)}**` : p.median.toFixed(2);
          return `${m} [${p.min.toFixed(2)}–${p.max.toFixed(2)}] ${p.atLeast}/${p.rounds}`;
        });
        out.push(`| ${wl} |${tail(rs)}`);
      }
      out.push('');
    }
    // server CPU per unit of work: what each server spends, whatever else ran
    const cpuStat = (server: string, wl: string) => {
      const v = gs.filter((s) => s.server === server && s.workload === wl && s.value !== null && typeof s.cpuPerOp === 'number').map((s) => s.cpuPerOp!);
      return v.length ? median(v) : null;
    };
    if (gs.some((s) => typeof s.cpuPerOp === 'number')) {
      const cratios = ratios.filter(([, , bs]) => bs.length === 1);
      out.push('Server CPU (user + system, median) per unit of work — lower is better: IOPS rows µs per I/O, MB/s rows ms per GB, connect µs per connection. Ratio = nbd-export ÷ peer (<1: nbd-export cheaper).', '');
      out.push(`| workload | per | ${servers.join(' | ')} |${tail(cratios.map((r) => r[0]))}`);
      out.push(`|---|---|${servers.map(() => '---:').join('|')}|${cratios.map(() => '---:|').join('')}`);
      for (const wl of wOrder) {
        if (!gs.some((s) => s.workload === wl)) continue;
        const w = WORKLOADS.find((x) => x.id === wl)!;
        const per = w.unit === 'IOPS' ? 'µs/IO' : w.unit === 'MB/s' ? 'ms/GB' : 'µs/conn';
        const cells = servers.map((id) => {
          const v = cpuStat(id, wl);
          return v === null ? '–' : v >= 100 ? v.toFixed(0) : v.toFixed(1);
        });
        const rs = cratios.map(([, a, bs]) => {
          const x = cpuStat(a, wl);
          const y = cpuStat(bs[0]!, wl);
          return x !== null && y !== null && y > 0 ? (x / y).toFixed(2) : '–';
        });
        out.push(`| ${wl} | ${per} | ${cells.join(' | ')} |${tail(rs)}`);
      }
      out.push('');
    }
  }
  // peak RSS: one table, max over all groups and runs
  const wls = wOrder.filter((wl) => samples.some((s) => s.workload === wl));
  out.push('### Peak RSS (MiB)', '');
  out.push('Max over all storage/transport groups and repetitions of the peak RSS during each run (VmHWM reset before each run through /proc/PID/clear_refs, and VmRSS sampled every 100 ms; nbd-server: its forked children added). Servers are not restarted between workloads, so memory a server keeps after one workload shows in the next. Memory backends hold the image they were pre-filled with; ne-redis is the nbd-export process only (Redis holds the data). idle = after start and pre-fill.', '');
  out.push(`| server | idle | ${wls.join(' | ')} | max |`);
  out.push(`|---|---:|${wls.map(() => '---:').join('|')}|---:|`);
  for (const id of serverOrder) {
    const idle = Math.max(0, ...res.servers.filter((s) => s.id === id).map((s) => Number(s.idleRssKiB) || 0));
    let all = 0;
    const cells = wls.map((wl) => {
      const v = samples.filter((s) => s.server === id && s.workload === wl && s.rssPeakKiB > 0).map((s) => s.rssPeakKiB);
      if (!v.length) return '–';
      all = Math.max(all, ...v);
      return (Math.max(...v) / 1024).toFixed(0);
    });
    out.push(`| ${id} | ${(idle / 1024).toFixed(0)} | ${cells.join(' | ')} | ${(all / 1024).toFixed(0)} |`);
  }
  out.push('');
  const problems = samples.filter((s) => s.error || s.skipped);
  if (problems.length) {
    out.push('### Errors and skips', '');
    for (const p of problems) out.push(`- ${p.storage}/${p.transport} ${p.server} ${p.workload} rep ${p.rep}: ${p.skipped ? `skipped (${p.skipped})` : p.error}`);
    out.push('');
  }
  return out.join('\n');
}

// ---------------------------------------------------------------- main

if (opt.report) {
  // several runs (e.g. one per storage/transport group) print as one report
  const runs = opt.report.split(',').map((f) => JSON.parse(fs.readFileSync(f, 'utf8')) as Results);
  const merged: Results = { meta: runs[0]!.meta, servers: runs.flatMap((r) => r.servers), samples: runs.flatMap((r, run) => r.samples.map((s) => ({ ...s, run }))) };
  for (const r of runs) console.log(`<!-- ${r.meta.date}: ${r.meta.command} -->`);
  console.log(report(merged));
  process.exit(0);
}

const quick = opt.quick;
const reps = num(opt.reps, quick ? 1 : 3);
const runtime = num(opt.runtime, quick ? 2 : 10);
const ramp = opt.ramp === '0' ? 0 : num(opt.ramp, quick ? 0 : 2);
const connectTime = num(opt['connect-time'], quick ? 2 : 5);
const imageSize = parseSize(opt.size ?? '1G');
const transports = list(opt.transport, quick ? ['unix'] : ['unix', 'tcp']) as Transport[];
const storages = list(opt.storage, quick ? ['shm'] : ['shm', 'disk']) as Storage[];
for (const t of transports) if (t !== 'unix' && t !== 'tcp') throw new Error(`unknown transport ${t}`);
for (const s of storages) if (s !== 'shm' && s !== 'disk') throw new Error(`unknown storage ${s}`);
const serverIds = list(opt.servers, ALL_SERVERS);
const workloads = selectWorkloads(list(opt.filter ?? opt.workloads, quick ? QUICK_WORKLOADS : WORKLOADS.map((w) => w.id)));
const shmRoot = opt['shm-dir'] ?? '/dev/shm';
const diskRoot = opt['disk-dir'] ?? '/var/tmp';
const explicitBin = opt['nbd-export-bin'] ? path.resolve(opt['nbd-export-bin']) : undefined;

async function main(): Promise<void> {
  sweepLeftovers([shmRoot, diskRoot]);
  const shmDir = fs.mkdtempSync(path.join(shmRoot, 'nbd-bench-'));
  tempDirs.push(shmDir);
  const diskDir = storages.includes('disk') ? fs.mkdtempSync(path.join(diskRoot, 'nbd-bench-')) : shmDir;
  if (diskDir !== shmDir) tempDirs.push(diskDir);
  for (const d of new Set([shmDir, diskDir])) fs.writeFileSync(path.join(d, OWNER_FILE), `${process.pid}\n`);

  // The nbd-export under test is bundled once, now, from the working tree into
  // a temp dir: a long run measures one fixed build even while src/ changes,
  // and it runs like an installed package (bundle, not tsx).
  const gitHead = spawnSync('git', ['-C', projectRoot, 'rev-parse', 'HEAD'], { encoding: 'utf8' }).stdout.trim();
  const dirty = spawnSync('git', ['-C', projectRoot, 'status', '--porcelain', '--', 'src', 'bin'], { encoding: 'utf8' }).stdout.trim();
  const bundleFrom = (srcRoot: string, dir: string): string => {
    fs.mkdirSync(path.join(dir, 'bin'), { recursive: true });
    fs.mkdirSync(path.join(dir, 'src'), { recursive: true }); // empty: the bundle is always fresh
    fs.copyFileSync(path.join(srcRoot, 'bin/nbd-export'), path.join(dir, 'bin/nbd-export'));
    fs.chmodSync(path.join(dir, 'bin/nbd-export'), 0o755);
    fs.symlinkSync(path.join(projectRoot, 'node_modules'), path.join(dir, 'node_modules'));
    const b = spawnSync(path.join(projectRoot, 'node_modules/.bin/esbuild'), ['src/cli/main.ts', '--bundle', '--splitting', '--platform=node', '--format=esm', '--target=node20', '--packages=external', '--log-level=warning', `--outdir=${path.join(dir, 'dist')}`, '--entry-names=nbd-export', '--out-extension:.js=.mjs'], { cwd: srcRoot, encoding: 'utf8' });
    if (b.status !== 0) throw new Error(`bundling ${srcRoot}: ${b.stderr}`);
    return path.join(dir, 'bin/nbd-export');
  };
  let defaultBin = explicitBin ?? path.join(projectRoot, 'bin/nbd-export');
  if (!explicitBin && !opt['no-build'] && serverIds.some((s) => !s.includes('@') && s.startsWith('nbd-export'))) {
    defaultBin = bundleFrom(projectRoot, path.join(shmDir, 'worktree'));
    log(`nbd-export: working tree (HEAD ${gitHead.slice(0, 10)}${dirty ? ' + uncommitted changes in src/ or bin/' : ''}) bundled into ${path.dirname(path.dirname(defaultBin))}`);
  }
  const snapshots = new Map<string, string>();
  const refCommits: Record<string, string> = {};
  const snapshotBin = (ref: string): string => {
    const have = snapshots.get(ref);
    if (have) return have;
    const safe = ref.replace(/[^A-Za-z0-9.-]/g, '_');
    // a directory holding a copy of the tree (an experiment), or a git revision
    if (fs.existsSync(path.join(ref, 'src/cli/main.ts'))) {
      const bin = bundleFrom(path.resolve(ref), path.join(shmDir, `snapshot-${safe}`));
      snapshots.set(ref, bin);
      refCommits[ref] = `directory ${path.resolve(ref)}`;
      return bin;
    }
    const tree = path.join(shmDir, `tree-${safe}`);
    fs.mkdirSync(tree);
    const a = spawnSync('sh', ['-c', 'git -C "$1" archive "$2" | tar -x -C "$3"', 'sh', projectRoot, ref, tree], { encoding: 'utf8' });
    if (a.status !== 0) throw new Error(`git archive ${ref}: ${a.stderr}`);
    const bin = bundleFrom(tree, path.join(shmDir, `snapshot-${safe}`));
    snapshots.set(ref, bin);
    refCommits[ref] = spawnSync('git', ['-C', projectRoot, 'rev-parse', ref], { encoding: 'utf8' }).stdout.trim();
    return bin;
  };
  const defs = serverDefs(serverIds, defaultBin, snapshotBin);

  const version = (cmd: string, args: string[]) => {
    const r = spawnSync(cmd, args, { encoding: 'utf8' });
    return `${r.stdout ?? ''}${r.stderr ?? ''}`.split('\n')[0]!.trim();
  };
  const meta: Record<string, unknown> = {
    date: new Date().toISOString(),
    command: `npm run bench -- ${process.argv.slice(2).join(' ')}`.trim(),
    host: os.hostname(),
    nproc: os.cpus().length,
    cpu: os.cpus()[0]?.model,
    memTotalGiB: +(os.totalmem() / 2 ** 30).toFixed(1),
    kernel: os.release(),
    // The system's default for TCP sockets; nbd-export moves loopback clients off bbr (--no-loopback-reno keeps it).
    tcpCongestionControl: readTrimmed('/proc/sys/net/ipv4/tcp_congestion_control'),
    node: process.version,
    versions: {
      'qemu-nbd': version('qemu-nbd', ['--version']),
      nbdkit: version('nbdkit', ['--version']),
      'nbd-server': version('nbd-server', ['-V']),
      'redis-server': version('redis-server', ['--version']),
      fio: version('fio', ['--version']),
      nbdcopy: version('nbdcopy', ['--version']),
    },
    nbdExport: { commit: gitHead, srcDirty: dirty.length > 0, mode: nbdExportMode(defaultBin), bin: defaultBin, refs: refCommits },
    options: { servers: serverIds, workloads: workloads.map((w) => w.id), transports, storages, reps, runtime, ramp, connectTime, imageSize, quick },
    loadavgStart: os.loadavg(),
  };
  const stamp = new Date().toISOString().replace(/[:]/g, '-').replace(/\..*$/, '');
  const outFile = path.resolve(opt.out ?? path.join(benchDir, 'results', `${stamp}.json`));
  fs.mkdirSync(path.dirname(outFile), { recursive: true });
  const results: Results = { meta, servers: [], samples: [] };
  const save = () => {
    results.meta.loadavgEnd = os.loadavg();
    fs.writeFileSync(outFile, JSON.stringify(results, null, 1));
  };

  log(`TCP congestion control (system default): ${meta.tcpCongestionControl ?? 'unknown'}`);
  log(`base image: ${imageSize} bytes of random data in ${shmDir}`);
  const baseImage = path.join(shmDir, 'base.img');
  {
    const r = await run('sh', ['-c', 'head -c "$1" /dev/urandom > "$2"', 'sh', String(imageSize), baseImage], 300_000);
    if (r.code !== 0) throw new Error(`making the image: ${r.stderr}`);
  }

  // storage-independent servers (memory, Redis, null) run with the first storage only
  const plan: Array<{ storage: Storage; transport: Transport; defs: ServerDef[] }> = [];
  storages.forEach((storage, i) => {
    for (const transport of transports) {
      const d = defs.filter((x) => x.backing === 'file' || i === 0);
      if (d.length) plan.push({ storage, transport, defs: d });
    }
  });
  const runsOf = (d: ServerDef[], w: Workload) => d.filter((x) => !x.smallOnly || w.small).length;
  const perRun = (w: Workload) => (w.kind === 'fio' ? runtime + ramp + 1 : w.kind === 'copy' ? 3 : connectTime + 0.5);
  const total = plan.reduce((a, g) => a + reps * workloads.reduce((b, w) => b + runsOf(g.defs, w), 0), 0);
  const estimate = plan.reduce((a, g) => a + reps * workloads.reduce((b, w) => b + runsOf(g.defs, w) * perRun(w), 0) + g.defs.length * 6, 0);
  log(`${total} runs in ${plan.length} groups, roughly ${Math.ceil(estimate / 60)} min (more for slow servers); results → ${outFile}`);
  const t0 = Date.now();
  let done = 0;

  for (const g of plan) {
    log(`\n== ${g.storage}/${g.transport}: starting ${g.defs.map((d) => d.id).join(', ')}`);
    const insts: Instance[] = [];
    try {
      for (const d of g.defs) {
        try {
          const inst = await startServer(d, g.storage, g.transport, { shm: shmDir, img: g.storage === 'shm' ? shmDir : diskDir }, baseImage);
          insts.push(inst);
          results.servers.push({ id: d.id, storage: g.storage, transport: g.transport, command: inst.command, uri: inst.uri, idleRssKiB: inst.idleRssKiB, multiConn: inst.multiConn, nbdExportMode: inst.nbdExportMode, ref: d.nbdExport?.ref });
          log(`   ${d.id}: pid ${inst.pid}, ${inst.uri}, multi-conn ${inst.multiConn}, idle RSS ${(inst.idleRssKiB / 1024).toFixed(0)} MiB${inst.nbdExportMode ? `, ${inst.nbdExportMode}` : ''}`);
        } catch (e) {
          log(`   ${d.id}: FAILED TO START: ${(e as Error).message}`);
          results.servers.push({ id: d.id, storage: g.storage, transport: g.transport, startError: (e as Error).message });
        }
      }
      if (!opt['no-warmup']) {
        log('   warming up (untimed)');
        for (const inst of insts) await warmUp(inst, shmDir);
      }
      for (const w of workloads) {
        const these = insts.filter((i) => !i.def.smallOnly || w.small);
        for (let rep = 1; rep <= reps; rep++) {
          const order = these.map((_, i) => these[(i + rep - 1) % these.length]!);
          for (const inst of order) {
            done++;
            const base: Omit<Sample, 'value' | 'rssPeakKiB'> = { storage: g.storage, transport: g.transport, server: inst.def.id, workload: w.id, rep, unit: w.unit };
            if (!inst.alive) {
              results.samples.push({ ...base, value: null, rssPeakKiB: 0, error: 'server not running' });
              continue;
            }
            const sampler = new RssSampler(inst.pid, inst.def.tree);
            let m: Measurement;
            try {
              m = await measure(inst, w, shmDir, baseImage);
            } catch (e) {
              m = { value: null, error: String(e) };
            }
            const rss = sampler.stop();
            results.samples.push({ ...base, ...m, rssPeakKiB: rss });
            const eta = done < total ? ` eta ${Math.ceil((((Date.now() - t0) / done) * (total - done)) / 60000)} min` : '';
            log(`[${done}/${total}] ${g.storage}/${g.transport} ${w.id} rep ${rep} ${inst.def.id}: ${m.value !== null ? `${fmt(m.value, w.unit)} ${w.unit}` : m.skipped ? `skipped (${m.skipped})` : 'FAILED'}${m.error ? ` — ${m.error.split('\n')[0]}` : ''}, RSS ${(rss / 1024).toFixed(0)} MiB${eta}`);
            if (m.error && !(await reachable(inst.uri))) {
              inst.alive = false;
              inst.note.push(`unreachable after ${w.id} rep ${rep}`);
              log(`   !! ${inst.def.id} is not reachable any more (log: ${readTail(inst.log).split('\n').slice(-3).join(' | ')})`);
            }
            if (w.writes && g.storage === 'disk' && inst.image) await run('sync', [inst.image], 300_000); // untimed
          }
          save();
        }
      }
    } finally {
      for (const inst of insts) {
        const entry = results.servers.find((s) => s.id === inst.def.id && s.storage === g.storage && s.transport === g.transport);
        if (entry && inst.note.length) entry.notes = inst.note;
        const tail = readTail(inst.log).trim();
        if (entry && tail) entry.logTail = tail.slice(-400);
        await stopServer(inst);
      }
    }
  }
  save();
  const md = report(results);
  fs.writeFileSync(outFile.replace(/\.json$/, '') + '.md', md + '\n');
  console.log(md);
  log(`\nraw results: ${outFile}\ntables: ${outFile.replace(/\.json$/, '')}.md\nwall time ${((Date.now() - t0) / 60000).toFixed(1)} min`);
}

main().then(
  () => { cleanupSync(); },
  (e) => { console.error(e); cleanupSync(); process.exit(1); },
);
