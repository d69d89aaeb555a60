/**
 * The few assertions the protocol-vector checks use, without Node: the
 * same checks run under Node's test runner and inside Chromium
 * (`browser.test.ts`), where `node:assert` does not exist.
 */
export class CheckFailed extends Error {
  override name = "CheckFailed";
}

function show(v: unknown): string {
  return JSON.stringify(v, (_, x) => (typeof x === "bigint" ? `${x}n` : x instanceof Uint8Array ? [...x] : x));
}

function fail(what: string, message?: string): never {
  throw new CheckFailed(message ? `${message}: ${what}` : what);
}

export const assert = {
  equal(actual: unknown, expected: unknown, message?: string): void {
    if (!Object.is(actual, expected)) fail(`${show(actual)} !== ${show(expected)}`, message);
  },
  notEqual(actual: unknown, expected: unknown, message?: string): void {
    if (Object.is(actual, expected)) fail(`both are ${show(actual)}`, message);
  },
  ok(value: unknown, message?: string): void {
    if (!value) fail(`${show(value)} is not truthy`, message);
  },
  deepEqual(actual: unknown, expected: unknown, message?: string): void {
    if (show(actual) !== show(expected)) fail(`${show(actual)} differs from ${show(expected)}`, message);
  },
  async rejects(
    promise: Promise<unknown>,
    expected?: RegExp | (abstract new (...args: never[]) => Error),
    message?: string,
  ): Promise<void> {
    try {
      await promise;
    } catch (e) {
      const text = e instanceof Error ? e.message : String(e);
      if (expected instanceof RegExp && !expected.test(text)) fail(`rejected with ${JSON.stringify(text)}`, message);
      if (typeof expected === "function" && !(e instanceof expected)) fail(`rejected with ${String(e)}`, message);
      return;
    }
    fail("did not reject", message);
  },
  throws(fn: () => unknown, expected: RegExp, message?: string): void {
    try {
      fn();
    } catch (e) {
      const text = e instanceof Error ? e.message : String(e);
      if (!expected.test(text)) fail(`threw ${JSON.stringify(text)}`, message);
      return;
    }
    fail("did not throw", message);
  },
};
