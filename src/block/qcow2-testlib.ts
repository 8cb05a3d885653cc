// Helpers for the qcow2 tests: images made and inspected with qemu-img and
// qemu-io (the oracle), in a temporary folder removed after the tests.
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after } from 'node:test';

/** True when qemu-img and qemu-io are installed; tests skip loudly otherwise. */
export const HAVE_QEMU = ['qemu-img', 'qemu-io'].every((c) => spawnSync(c, ['--version']).status === 0);
export const SKIP_NO_QEMU = HAVE_QEMU ? false : 'qemu-img and qemu-io are not installed';

// Made when the test file imports this module, so the hook is the file's own.
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbd-export-qcow2-'));
after(() => fs.rmSync(dir, { recursive: true, force: true }));

/** The test folder (removed after the tests). */
export function testDir(): string {
  return dir;
}

let counter = 0;
/** A fresh path in the test folder. */
export function tmp(name: string): string {
  return path.join(testDir(), `${counter++}-${name}`);
}

export function qemuImg(...args: string[]): string {
  return execFileSync('qemu-img', args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
}

/** Run qemu-io commands on an image (format named). */
export function qemuIo(file: string, format: string, ...cmds: string[]): string {
  const args = ['-f', format];
  for (const c of cmds) args.push('-c', c);
  return execFileSync('qemu-io', [...args, file], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
}

/** qemu-img create -f qcow2 with options; backing as [file, format]. */
export function createQcow2(file: string, size: number | string, opts: string[] = [], backing?: [string, string]): string {
  const args = ['create', '-q', '-f', 'qcow2'];
  if (opts.length > 0) args.push('-o', opts.join(','));
  if (backing !== undefined) args.push('-b', backing[0], '-F', backing[1]);
  args.push(file, String(size));
  qemuImg(...args);
  return file;
}

/** The guest contents as qemu sees them: qemu-img convert -O raw. */
export function qemuRaw(file: string, format: string): Buffer {
  const out = tmp('convert.raw');
  qemuImg('convert', '-f', format, '-O', 'raw', file, out);
  const data = fs.readFileSync(out);
  fs.rmSync(out);
  return data;
}

export interface MapEntry {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
  offset?: number;
}

export function qemuMap(file: string, format: string): MapEntry[] {
  return JSON.parse(qemuImg('map', '--output=json', '-f', format, file)) as MapEntry[];
}

export interface CheckResult {
  errors: number;
  leaks: number;
  corruptions: number;
  raw: string;
}

/** qemu-img check, parsed (it exits non-zero on leaks or errors). */
export function qemuCheck(file: string): CheckResult {
  const r = spawnSync('qemu-img', ['check', '--output=json', '-f', 'qcow2', file], { encoding: 'utf8' });
  const raw = `${r.stdout}${r.stderr}`;
  try {
    const j = JSON.parse(r.stdout) as { 'check-errors'?: number; 'leaks'?: number; 'corruptions'?: number };
    return { errors: j['check-errors'] ?? 0, leaks: j.leaks ?? 0, corruptions: j.corruptions ?? 0, raw };
  } catch {
    return { errors: -1, leaks: -1, corruptions: -1, raw };
  }
}

/** A deterministic pattern of `length` bytes that depends on `seed`, no zero bytes. */
export function pattern(length: number, seed: number): Buffer {
  const b = Buffer.allocUnsafe(length);
  let x = (seed * 2654435761 + 7) >>> 0;
  for (let i = 0; i < length; i++) {
    x = (x * 1103515245 + 12345) >>> 0;
    b[i] = ((x >>> 16) % 255) + 1;
  }
  return b;
}

/** Byte-wise flags from extents: for comparing with qemu-img map. */
export function flagsPerRange(runs: { length: number; hole: boolean; zero: boolean }[]): string {
  return runs.map((r) => `${r.length}:${r.hole ? 'hole' : 'data'}${r.zero ? ',zero' : ''}`).join(' ');
}

/** qemu-img map entries as merged extents (hole = !data). */
export function mapAsExtents(map: MapEntry[]): { length: number; hole: boolean; zero: boolean }[] {
  const out: { length: number; hole: boolean; zero: boolean }[] = [];
  for (const m of map) {
    const hole = !m.data;
    const last = out[out.length - 1];
    if (last !== undefined && last.hole === hole && last.zero === m.zero) last.length += m.length;
    else out.push({ length: m.length, hole, zero: m.zero });
  }
  return out;
}
