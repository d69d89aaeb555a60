/** The protocol test vectors under Node's WebCrypto (`vector-checks.ts`). */
import { readFileSync } from "node:fs";
import { test } from "node:test";
import { vectorChecks } from "./vector-checks.js";

// The vectors file, found from the repository root (the tests run in web/).
const V = JSON.parse(readFileSync(new URL("../../../docs/protocol-vectors.json", import.meta.url), "utf8"));

for (const check of vectorChecks(V)) test(check.name, () => check.run());
