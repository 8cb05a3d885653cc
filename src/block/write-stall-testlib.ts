// For tests of LoopWriteGuard's wiring: the next fs.writeSync sleeps
// before it writes, as a writer the kernel throttles sleeps. A sleep, not a
// busy wait: on a busy machine a busy wait is partly time spent waiting for
// a CPU, which the guard does not count (see run-delay.ts).
import fs from 'node:fs';

/** Make the next fs.writeSync sleep `ms` first; returns the function that puts fs.writeSync back. */
export function stallNextWrite(ms: number): () => void {
  const writeSync = fs.writeSync;
  let stall = true;
  fs.writeSync = ((...args: Parameters<typeof fs.writeSync>) => {
    if (stall) {
      stall = false;
      Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);
    }
    return writeSync(...args);
  }) as typeof fs.writeSync;
  return () => {
    fs.writeSync = writeSync;
  };
}
