/**
 * Key files move between the CLI and a browser: a file the CLI wrote
 * opens here, a file written here opens in the CLI (same handle), and a
 * wrong passphrase or another format is refused.
 */
import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, test } from "node:test";
import { decryptKeyFile, encryptKeyFile } from "../src/protocol/keyfile.js";
import { KeyError, generateIdentity, identityFromPkcs8, pem } from "../src/protocol/keys.js";
import { cli, cliOk } from "./harness.js";

const dir = mkdtempSync(join(tmpdir(), "saferchat-keyfile-"));
after(() => rmSync(dir, { recursive: true, force: true }));
const PASS = "a passphrase for the key file test";

function handleOf(whoami: string): string {
  return /handle:\s+(\S+)/.exec(whoami)![1]!;
}

test("a key file the CLI wrote opens in the browser code, with the same handle", async () => {
  const path = join(dir, "cli.pem");
  const made = cliOk(["-k", path, "keygen"], { SAFERCHAT_KEY_PASSPHRASE: PASS });
  const text = readFileSync(path, "utf8");
  assert.match(text, /BEGIN ENCRYPTED PRIVATE KEY/);
  const id = await identityFromPkcs8(await decryptKeyFile(text, PASS));
  assert.equal(id.public.handleText, handleOf(made));
  await assert.rejects(decryptKeyFile(text, "not the passphrase"), KeyError);
});

test("a wrong passphrase is refused every time, also when the padding happens to fit", async () => {
  const { pkcs8 } = await generateIdentity();
  // Few iterations, so that many wrong passphrases are cheap to try: about
  // one in 256 leaves valid CBC padding, which alone proves nothing.
  const file = await encryptKeyFile(pkcs8, PASS, 1);
  for (let i = 0; i < 1000; i++) {
    await assert.rejects(decryptKeyFile(file, `wrong ${i}`), /wrong passphrase/);
  }
  assert.equal((await decryptKeyFile(file, PASS)).length, pkcs8.length);
});

test("a key file written by the browser code opens in the CLI, with the same handle", async () => {
  const { identity, pkcs8 } = await generateIdentity();
  const path = join(dir, "browser.pem");
  writeFileSync(path, await encryptKeyFile(pkcs8, PASS), { mode: 0o600 });
  const shown = cliOk(["-k", path, "whoami"], { SAFERCHAT_KEY_PASSPHRASE: PASS });
  assert.equal(handleOf(shown), identity.public.handleText);
  const wrong = cli(["-k", path, "whoami"], { SAFERCHAT_KEY_PASSPHRASE: "not the passphrase" });
  assert.notEqual(wrong.status, 0);
  // And back: the file opens here too.
  const again = await identityFromPkcs8(await decryptKeyFile(readFileSync(path, "utf8"), PASS));
  assert.equal(again.public.handleText, identity.public.handleText);
});

test("an unencrypted key, or bytes that are not a key file, are refused with a clear error", async () => {
  const { pkcs8 } = await generateIdentity();
  await assert.rejects(decryptKeyFile(pem("PRIVATE KEY", pkcs8), PASS), /no ENCRYPTED PRIVATE KEY PEM block/);
  await assert.rejects(
    decryptKeyFile(pem("ENCRYPTED PRIVATE KEY", Uint8Array.of(0x30, 0x03, 0x02, 0x01, 0x01)), PASS),
    KeyError,
  );
  await assert.rejects(encryptKeyFile(pkcs8, ""), /passphrase is empty/);
});
