// Profile nbd-export under one benchmark workload: starts the server from
// source under `node --cpu-prof`, runs the workload, stops the server with
// SIGTERM (which writes the profile) and prints where the samples went.
//
//   node --import tsx bench/profile.ts [--workload seqread] [--transport unix|tcp]
//        [--seconds 10] [--size 1G] [--dir DIR] [-- extra nbd-export flags]
//   node --import tsx bench/profile.ts --summarize FILE.cpuprofile
//
// Workloads: the ids of bench/run.ts (seqread, seqwrite, randread, randwrite,
// randread-4conn, randrw, copy-out-1, copy-out-4, copy-in-1, copy-in-4, connect).

import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { fileURLToPath } from 'node:url';

const benchDir = path.dirname(fileURLToPath(import.meta.url));
const projectRoot = path.resolve(benchDir, '..');

const { values: opt, positionals } = parseArgs({
  options: {
    workload: { type: 'string', default: 'seqread' },
    transport: { type: 'string', default: 'unix' },
    seconds: { type: 'string', default: '10' },
    size: { type: 'string', default: '1G' },
    dir: { type: 'string' },
    summarize: { type: 'string' },
    top: { type: 'string', default: '30' },
  },
  allowPositionals: true,
  strict: true,
});

interface Node {
  id: number;
  callFrame: { functionName: string; url: string; lineNumber: number };
  hitCount?: number;
  children?: number[];
}
interface Profile { nodes: Node[]; samples: number[]; timeDeltas: number[]; startTime: number; endTime: number }

/** Self and inclusive share of samples per function (name + file:line). */
export function summarize(file: string, top: number): string {
  const p = JSON.parse(fs.readFileSync(file, 'utf8')) as Profile;
  const byId = new Map(p.nodes.map((n) => [n.id, n]));
  const parent = new Map<number, number>();
  for (const n of p.nodes) for (const c of n.children ?? []) parent.set(c, n.id);
  const counts = new Map<number, number>();
  for (const s of p.samples) counts.set(s, (counts.get(s) ?? 0) + 1);
  const total = p.samples.length;
  const label = (n: Node) => {
    const f = n.callFrame;
    const url = f.url.replace(/^file:\/\//, '').replace(projectRoot + '/', '');
    return `${f.functionName || '(anonymous)'} ${url ? `${url}:${f.lineNumber + 1}` : ''}`.trim();
  };
  const self = new Map<string, number>();
  const incl = new Map<string, number>();
  let idle = 0;
  for (const [id, c] of counts) {
    const n = byId.get(id)!;
    if (n.callFrame.functionName === '(idle)') idle += c;
    self.set(label(n), (self.get(label(n)) ?? 0) + c);
    const seen = new Set<string>();
    for (let cur: number | undefined = id; cur !== undefined; cur = parent.get(cur)) {
      const l = label(byId.get(cur)!);
      if (seen.has(l)) continue; // recursion counts once
      seen.add(l);
      incl.set(l, (incl.get(l) ?? 0) + c);
    }
  }
  const pct = (c: number) => `${((100 * c) / total).toFixed(1).padStart(5)}%`;
  const busy = total - idle;
  const out = [`${file}: ${total} samples over ${((p.endTime - p.startTime) / 1e6).toFixed(1)} s, idle ${pct(idle)} (busy = ${busy} samples)`, '', 'self time:'];
  for (const [l, c] of [...self].sort((a, b) => b[1] - a[1]).slice(0, top)) out.push(`  ${pct(c)} of all, ${((100 * c) / Math.max(1, busy)).toFixed(1).padStart(5)}% of busy  ${l}`);
  out.push('', 'inclusive (our code, node: internals and libraries):');
  for (const [l, c] of [...incl].sort((a, b) => b[1] - a[1]).filter(([l]) => !l.startsWith('(')).slice(0, top)) out.push(`  ${pct(c)} of all, ${((100 * c) / Math.max(1, busy)).toFixed(1).padStart(5)}% of busy  ${l}`);
  return out.join('\n');
}

const FIO: Record<string, Record<string, string | number>> = {
  seqread: { rw: 'read', bs: '1M', iodepth: 16 },
  seqwrite: { rw: 'write', bs: '1M', iodepth: 16 },
  randread: { rw: 'randread', bs: '4k', iodepth: 32 },
  randwrite: { rw: 'randwrite', bs: '4k', iodepth: 32 },
  'randread-4conn': { rw: 'randread', bs: '4k', iodepth: 32, numjobs: 4 },
  randrw: { rw: 'randrw', rwmixread: 70, bs: '4k', iodepth: 32 },
};

async function main(): Promise<void> {
  if (opt.summarize) {
    console.log(summarize(opt.summarize, Number(opt.top)));
    return;
  }
  const work = fs.mkdtempSync(path.join('/dev/shm', 'nbd-prof-'));
  const profDir = path.resolve(opt.dir ?? fs.mkdtempSync(path.join(os.tmpdir(), 'nbd-prof-out-')));
  fs.mkdirSync(profDir, { recursive: true });
  const img = path.join(work, 'img');
  const sock = path.join(work, 'sock');
  const port = 20000 + Math.floor(Math.random() * 20000);
  let server: ReturnType<typeof spawn> | undefined;
  const cleanup = () => {
    try { if (server?.pid) process.kill(server.pid, 'SIGKILL'); } catch { /* gone */ }
    fs.rmSync(work, { recursive: true, force: true });
  };
  process.on('SIGINT', () => { cleanup(); process.exit(130); });
  try {
    spawnSync('sh', ['-c', 'head -c "$1" /dev/urandom > "$2"', 'sh', String(parseSizeArg(opt.size!)), img]);
    const listen = opt.transport === 'unix' ? ['-k', sock] : ['-b', '127.0.0.1', '-p', String(port)];
    const args = ['--cpu-prof', `--cpu-prof-dir=${profDir}`, path.join(projectRoot, 'bin/nbd-export'), '-f', 'raw', '-x', 'bench', '-t', '-e', '0', ...listen, ...positionals, img];
    console.error(`$ NBD_EXPORT_FROM_SOURCE=1 node ${args.join(' ')}`);
    server = spawn('node', args, { env: { ...process.env, NBD_EXPORT_FROM_SOURCE: '1' }, stdio: 'inherit' });
    const uri = opt.transport === 'unix' ? `nbd+unix:///bench?socket=${sock}` : `nbd://127.0.0.1:${port}/bench`;
    for (let i = 0; i < 100; i++) {
      if (spawnSync('nbdinfo', ['--size', uri]).status === 0) break;
      await new Promise((r) => setTimeout(r, 200));
    }
    const secs = Number(opt.seconds);
    const w = opt.workload!;
    const t0 = Date.now();
    if (FIO[w]) {
      const fio = ['--name=' + w, '--ioengine=nbd', `--uri=${uri}`, '--time_based=1', `--runtime=${secs}`, '--norandommap=1', '--group_reporting=1', ...Object.entries(FIO[w]!).map(([k, v]) => `--${k}=${v}`)];
      const r = spawnSync('fio', fio, { encoding: 'utf8' });
      console.error(r.stdout.split('\n').filter((l) => /IOPS|BW=/.test(l)).join('\n'));
    } else if (/^copy-(out|in)-(\d)$/.test(w)) {
      const [, dir, n] = /^copy-(out|in)-(\d)$/.exec(w)!;
      // repeat the copy to fill the requested time
      if (dir === 'in') fs.copyFileSync(img, img + '.src');
      let copies = 0;
      while (Date.now() - t0 < secs * 1000) {
        const r = spawnSync('nbdcopy', [`--connections=${n}`, ...(dir === 'out' ? [uri, 'null:'] : [img + '.src', uri])], { encoding: 'utf8' });
        if (r.status !== 0) throw new Error(`nbdcopy: ${r.stderr}`);
        copies++;
      }
      console.error(`${copies} copies in ${((Date.now() - t0) / 1000).toFixed(1)} s: ${((copies * parseSizeArg(opt.size!)) / 1e6 / ((Date.now() - t0) / 1000)).toFixed(0)} MB/s`);
    } else if (w === 'connect') {
      const spec = opt.transport === 'unix' ? `unix:${sock}` : `tcp:127.0.0.1:${port}`;
      const r = spawnSync('/usr/bin/python3', [path.join(benchDir, 'connect.py'), spec, 'bench', String(secs)], { encoding: 'utf8' });
      console.error(r.stdout.trim());
    } else {
      throw new Error(`unknown workload ${w}`);
    }
    const status = fs.readFileSync(`/proc/${server.pid}/status`, 'utf8');
    console.error(status.split('\n').filter((l) => /VmHWM|VmRSS/.test(l)).join('  '));
    server.kill('SIGTERM');
    await new Promise((r) => server!.on('exit', r));
    const files = fs.readdirSync(profDir).filter((f) => f.endsWith('.cpuprofile')).map((f) => path.join(profDir, f));
    const newest = files.sort((a, b) => fs.statSync(b).mtimeMs - fs.statSync(a).mtimeMs)[0];
    if (!newest) throw new Error(`no profile in ${profDir}`);
    console.log(summarize(newest, Number(opt.top)));
  } finally {
    cleanup();
  }
}

function parseSizeArg(s: string): number {
  const m = /^(\d+)([KMG]?)$/i.exec(s);
  if (!m) throw new Error(`bad size ${s}`);
  return Number(m[1]) * ({ '': 1, K: 1024, M: 2 ** 20, G: 2 ** 30 } as Record<string, number>)[m[2]!.toUpperCase()]!;
}

main().catch((e) => { console.error(e); process.exit(1); });
