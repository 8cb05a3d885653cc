// Liveness and readiness for /healthz and /readyz.
//
// Live: the event loop answers. A timer ticks every `intervalMs`; how late
// it runs is the loop's lag. The process is unhealthy while the worst lag
// of the last `windowMs` (or the time since the last tick, if the timer is
// starved right now) exceeds `maxLagMs`.
//
// Ready: set by the CLI once every listener is bound and every export is
// open; cleared when a graceful stop begins.

export type Readiness = 'starting' | 'ready' | 'stopping';

export interface HealthOptions {
  intervalMs?: number;
  maxLagMs?: number;
  windowMs?: number;
  /** For tests: a clock in milliseconds. */
  now?: () => number;
}

export interface Liveness {
  ok: boolean;
  /** Worst recent lag, in milliseconds. */
  lagMs: number;
}

export class Health {
  readonly intervalMs: number;
  readonly maxLagMs: number;
  readonly windowMs: number;
  readonly #now: () => number;
  #state: Readiness = 'starting';
  #timer: NodeJS.Timeout | undefined;
  #lastTick = 0;
  /** [time, lag] of recent ticks with a lag worth remembering. */
  #samples: [number, number][] = [];

  constructor(opts: HealthOptions = {}) {
    this.intervalMs = opts.intervalMs ?? 200;
    this.maxLagMs = opts.maxLagMs ?? 1000;
    this.windowMs = opts.windowMs ?? 5000;
    this.#now = opts.now ?? (() => performance.now());
  }

  get readiness(): Readiness {
    return this.#state;
  }

  setReady(): void {
    if (this.#state === 'starting') this.#state = 'ready';
  }

  setStopping(): void {
    this.#state = 'stopping';
  }

  /** Start measuring the loop's lag; the timer does not keep the process alive. */
  start(): this {
    if (this.#timer !== undefined) return this;
    this.#lastTick = this.#now();
    this.#timer = setInterval(() => this.tick(), this.intervalMs);
    this.#timer.unref();
    return this;
  }

  stop(): void {
    clearInterval(this.#timer);
    this.#timer = undefined;
  }

  /** One timer tick (exposed for tests). */
  tick(): void {
    const now = this.#now();
    const lag = Math.max(0, now - this.#lastTick - this.intervalMs);
    this.#lastTick = now;
    this.#samples = this.#samples.filter(([t]) => now - t <= this.windowMs);
    if (lag > 0) this.#samples.push([now, lag]);
  }

  liveness(): Liveness {
    const now = this.#now();
    let lagMs = this.#timer !== undefined ? Math.max(0, now - this.#lastTick - this.intervalMs) : 0;
    for (const [t, lag] of this.#samples) if (now - t <= this.windowMs && lag > lagMs) lagMs = lag;
    return { ok: lagMs <= this.maxLagMs, lagMs };
  }
}
