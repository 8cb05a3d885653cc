// The exports a server offers, by name. The control socket (later) adds and
// removes exports at run time; negotiation only looks them up.
import type { Export } from './export.ts';

export class ExportRegistry {
  readonly #exports = new Map<string, Export>();

  add(exp: Export): void {
    if (this.#exports.has(exp.name)) throw new Error(`export '${exp.name}' already exists`);
    this.#exports.set(exp.name, exp);
  }

  /** Remove by name; returns the export so the caller can close its node. */
  remove(name: string): Export | undefined {
    const exp = this.#exports.get(name);
    this.#exports.delete(name);
    return exp;
  }

  get(name: string): Export | undefined {
    return this.#exports.get(name);
  }

  list(): Export[] {
    return [...this.#exports.values()];
  }
}
