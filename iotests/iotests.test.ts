// Runs every iotest against bin/nbd-export through iotests/check, one node
// test per script, so `npm test` counts and reports them. A test that the
// runner skips (exit 77: a missing client outside CI, or a missing feature
// of the host such as IPv6 loopback) is reported skipped. A missing or
// broken bin/nbd-export fails every test: check refuses to run without the
// executable, and a server that does not start fails its script.
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const check = path.join(here, 'check');
const names = fs
  .readdirSync(path.join(here, 'tests'))
  .filter((f) => !/\.out(\.|$)/.test(f))
  .filter((f) => (fs.statSync(path.join(here, 'tests', f)).mode & 0o111) !== 0)
  .sort();

interface Run {
  status: number | null;
  output: string;
  timedOut: boolean;
}

/** Runs iotests/check for one test, asynchronously (so tests overlap), killing its process group after timeoutMs. */
function runCheck(name: string, timeoutMs: number): Promise<Run> {
  return new Promise((resolve) => {
    const child = spawn(check, ['--server', 'nbd-export', name], { detached: true, stdio: ['ignore', 'pipe', 'pipe'] });
    let output = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (output += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => (output += d));
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      try {
        if (child.pid !== undefined) process.kill(-child.pid, 'SIGKILL');
      } catch {
        // already gone
      }
    }, timeoutMs);
    child.on('error', (err) => {
      output += `\n${String(err)}`;
    });
    child.on('close', (status) => {
      clearTimeout(timer);
      resolve({ status, output, timedOut });
    });
  });
}

describe('iotests against nbd-export', { concurrency: 2 }, () => {
  test('bin/nbd-export starts', () => {
    const r = spawnSync(path.join(here, '..', 'bin', 'nbd-export'), ['--help'], { encoding: 'utf8', timeout: 30_000 });
    assert.equal(r.status, 0, r.stderr);
    assert.match(r.stdout, /Usage: nbd-export/);
  });

  for (const name of names) {
    test(name, { timeout: 180_000 }, async (t) => {
      const r = await runCheck(name, 170_000);
      const output = r.output;
      if (r.status === 0 && new RegExp(`^${name}: skipped`, 'm').test(output)) {
        t.skip(output.trim().split('\n')[0]);
        return;
      }
      if (r.status === 0 && new RegExp(`^${name}: not run against`, 'm').test(output)) {
        t.skip(`not run against nbd-export (supported-servers)`);
        return;
      }
      assert.equal(r.timedOut, false, `iotests/check ${name} did not finish within 170 s\n${output}`);
      assert.equal(r.status, 0, output);
      assert.match(output, /^1 passed, 0 failed$/m, output);
    });
  }
});
