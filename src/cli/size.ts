// Sizes and numbers as users type them on qemu-nbd's command line.

const SUFFIX: Record<string, number> = {
  '': 1,
  b: 1,
  k: 2 ** 10,
  m: 2 ** 20,
  g: 2 ** 30,
  t: 2 ** 40,
  p: 2 ** 50,
};

/** "1G", "512M", "4096", "1.5T", "64KiB" -> bytes; throws a one-line message. */
export function parseSize(text: string, what: string): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([bkmgtp]?)(?:i?b)?\s*$/i.exec(text);
  if (m === null) throw new UsageError(`invalid ${what} '${text}' (expected a number with an optional K, M, G, T or P suffix)`);
  const bytes = Number(m[1]) * SUFFIX[m[2]!.toLowerCase()]!;
  if (!Number.isSafeInteger(bytes)) throw new UsageError(`invalid ${what} '${text}' (not a whole number of bytes below 2^53)`);
  return bytes;
}

/** A whole number in [min, max]; throws a one-line message. */
export function parseInteger(value: unknown, what: string, min: number, max: number): number {
  const text = String(value);
  if (!/^\s*\d+\s*$/.test(text)) throw new UsageError(`invalid ${what} '${text}' (expected a whole number)`);
  const n = Number(text);
  if (n < min || n > max) throw new UsageError(`invalid ${what} '${text}' (expected ${min} to ${max})`);
  return n;
}

/** A mistake on the command line: printed as one line, exit status 1. */
export class UsageError extends Error {
  override name = 'UsageError';
}

export function formatSize(bytes: number): string {
  for (const [unit, scale] of [['PiB', 2 ** 50], ['TiB', 2 ** 40], ['GiB', 2 ** 30], ['MiB', 2 ** 20], ['KiB', 2 ** 10]] as const) {
    if (bytes >= scale && bytes % scale === 0) return `${bytes / scale} ${unit}`;
  }
  return `${bytes} bytes`;
}
