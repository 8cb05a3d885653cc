// Runs every iotest against bin/nbd-export through iotests/check, one node
// test per script, so `npm test` counts and reports them. A test that the
// runner skips (exit 77: a missing client outside CI) is reported skipped.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
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

describe('iotests against nbd-export', { concurrency: 2 }, () => {
  test('bin/nbd-export starts', () => {
    const r = spawnSync(path.join(here, '..', 'bin', 'nbd-export'), ['--help'], { encoding: 'utf8', timeout: 30_000 });
    assert.equal(r.status, 0, r.stderr);
    assert.match(r.stdout, /Usage: nbd-export/);
  });

  for (const name of names) {
    test(name, { timeout: 180_000 }, (t) => {
      const r = spawnSync(check, ['--server', 'nbd-export', name], { encoding: 'utf8', timeout: 170_000 });
      const output = `${r.stdout}${r.stderr}`;
      if (r.status === 0 && new RegExp(`^${name}: skipped`, 'm').test(output)) {
        t.skip(output.trim().split('\n')[0]);
        return;
      }
      if (r.status === 0 && new RegExp(`^${name}: not run against`, 'm').test(output)) return;
      assert.equal(r.status, 0, output);
      assert.match(output, /^1 passed, 0 failed$/m, output);
    });
  }
});
