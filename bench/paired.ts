// Paired ratios: each round of the bench runs every server once, in
// rotating order, within a few seconds; a shared machine's slow spells
// then hit every server of the round alike (in one `s14` run every
// server's seqwrite fell from ~3,000 to ~1,700 MB/s for two rounds). The
// ratio of one server's run to another's in the same round cancels that
// drift, where the ratio of the two medians only averages it away.

export function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

/** One measurement of one server in one round; `round` names the round (the same for every server in it). */
export interface RoundValue {
  round: string;
  value: number;
}

export interface Paired {
  /** Median of the per-round ratios a ÷ b. */
  median: number;
  min: number;
  max: number;
  /** Rounds in which a was at least b. */
  atLeast: number;
  /** Rounds that had both. */
  rounds: number;
}

/** The ratios a ÷ b of the rounds where both have a value (b > 0); null when there is none. */
export function pairedRatio(a: RoundValue[], b: RoundValue[]): Paired | null {
  const byRound = new Map(b.filter((x) => x.value > 0).map((x) => [x.round, x.value]));
  const ratios: number[] = [];
  for (const x of a) {
    const y = byRound.get(x.round);
    if (y !== undefined) ratios.push(x.value / y);
  }
  if (ratios.length === 0) return null;
  return {
    median: median(ratios),
    min: Math.min(...ratios),
    max: Math.max(...ratios),
    atLeast: ratios.filter((r) => r >= 1).length,
    rounds: ratios.length,
  };
}
