/**
 * The protocol-vector checks as a script for a page: `browser.test.ts`
 * loads it in Chromium and calls `runVectors()`.
 */
import V from "../../../docs/protocol-vectors.json";
import { vectorChecks } from "../vector-checks.js";

declare global {
  interface Window {
    runVectors(): Promise<{ ran: string[]; failures: string[] }>;
  }
}

window.runVectors = async () => {
  const ran: string[] = [];
  const failures: string[] = [];
  for (const check of vectorChecks(V)) {
    ran.push(check.name);
    try {
      await check.run();
    } catch (e) {
      failures.push(`${check.name}: ${e instanceof Error ? e.message : String(e)}`);
    }
  }
  return { ran, failures };
};
