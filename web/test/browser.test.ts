/**
 * The page in a real headless Chromium (Debian's `chromium`, driven by
 * playwright-core), served by a real node: two browser users and a CLI
 * user chat in one room, a non-member's browser is refused, a member the
 * admin removes stops receiving, a reload keeps the key and the history,
 * and the exported key file works in the CLI. Screenshots of each page at
 * 360 px and 1280 px wide go to $SAFERCHAT_ARTIFACTS (default
 * build/screenshots).
 */
import assert from "node:assert/strict";
import { chmodSync, existsSync, mkdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { after, before, test } from "node:test";
import { type Browser, type Page, chromium } from "playwright-core";
import { NodeProcess, cliOk } from "./harness.js";

const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";
const ARTIFACTS =
  process.env.SAFERCHAT_ARTIFACTS ?? fileURLToPath(new URL("../screenshots/", import.meta.url));
/** Generous: RSA key generation and joins on a loaded 2-core machine. */
const WAIT = { timeout: 120_000 };

let node: NodeProcess;
let browser: Browser;
before(async () => {
  if (!existsSync(CHROMIUM)) throw new Error(`${CHROMIUM} is missing: apt-get install chromium (or set CHROMIUM)`);
  mkdirSync(ARTIFACTS, { recursive: true });
  node = await NodeProcess.start();
  browser = await chromium.launch({ executablePath: CHROMIUM, args: ["--no-sandbox"] });
});
after(async () => {
  await browser?.close();
  node?.stop();
});

async function person(width: number): Promise<{ page: Page; handle: string }> {
  const context = await browser.newContext({ viewport: { width, height: 800 }, acceptDownloads: true });
  const page = await context.newPage();
  const response = await page.goto(node.web);
  assert.match(response?.headers()["content-security-policy"] ?? "", /^default-src 'none'; script-src 'self';/);
  await page.waitForSelector("#create-pass", WAIT);
  await page.fill("#create-pass", "browser passphrase");
  await page.fill("#create-pass2", "browser passphrase");
  await page.click("#create");
  await page.waitForFunction(() => document.getElementById("handle")?.textContent?.length === 43, null, WAIT);
  const handle = (await page.textContent("#handle"))!;
  assert.match((await page.textContent("#fingerprint"))!, /^([0-9a-f]{4} ){7}[0-9a-f]{4}$/);
  return { page, handle };
}

async function joinRoom(page: Page, room: string): Promise<void> {
  await page.fill("#room-name", room);
  await page.click("#join");
}

async function waitForText(page: Page, selector: string, text: string): Promise<void> {
  await page.waitForFunction(
    ([s, t]) => (document.querySelector(s!)?.textContent ?? "").includes(t!),
    [selector, text],
    WAIT,
  );
}

async function post(page: Page, text: string): Promise<void> {
  await page.fill("#post-text", text);
  await page.click("#send");
}

async function screenshots(page: Page, name: string): Promise<void> {
  for (const width of [360, 1280]) {
    await page.setViewportSize({ width, height: 800 });
    await page.screenshot({ path: join(ARTIFACTS, `${name}-${width}.png`), fullPage: true });
    // Nothing spills sideways at either width.
    const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    assert.ok(overflow <= 0, `${name} at ${width} px overflows by ${overflow} px`);
  }
}

test("two browsers and a CLI chat; refusals, removal, reload and key export", async () => {
  const room = "browser-room";
  const cliEnv = { SAFERCHAT_KEY_PASSPHRASE: "cli passphrase" };
  const carolKey = join(node.dir, "carol.pem");
  const carol = /handle:\s+(\S+)/.exec(cliOk(["-k", carolKey, "keygen"], cliEnv))![1]!;
  const alice = await person(1280);
  const bob = await person(360);
  const mallory = await person(1280);
  cliOk(["-s", node.server, "admin", "create-chat", room]);
  for (const h of [alice.handle, bob.handle, carol]) cliOk(["-s", node.server, "admin", "add-user", room, h]);

  for (const p of [alice, bob]) {
    await joinRoom(p.page, room);
    await waitForText(p.page, "#status", `In ${room}.`);
  }
  cliOk(["-s", node.server, "-k", carolKey, "send", room, "hello from the CLI"], cliEnv);
  for (const p of [alice, bob]) await waitForText(p.page, "#messages", "hello from the CLI");

  await post(alice.page, "hello from alice's browser");
  await post(bob.page, "hello from bob's phone");
  for (const p of [alice, bob]) {
    await waitForText(p.page, "#messages", "hello from alice's browser");
    await waitForText(p.page, "#messages", "hello from bob's phone");
    // Members with fingerprints: all three joined.
    await waitForText(p.page, "#member-list", carol);
  }
  const history = cliOk(["-s", node.server, "-k", carolKey, "history", room], cliEnv);
  assert.match(history, /hello from alice's browser/);
  assert.match(history, /hello from bob's phone/);
  const warnings = await alice.page.locator("#messages .warning").count();
  assert.equal(warnings, 0, "an honest room raises no warning");

  // A non-member's browser is refused.
  await joinRoom(mallory.page, room);
  await waitForText(mallory.page, "#status", "does not exist or you are not a member");
  assert.equal(await mallory.page.isHidden("#post-form"), true);

  // The admin removes bob: his page says so, and he gets nothing after.
  cliOk(["-s", node.server, "admin", "remove-user", room, bob.handle]);
  await waitForText(bob.page, "#status", `Left ${room}`);
  await waitForText(alice.page, "#messages", "Membership changed");
  await alice.page.waitForFunction(
    (h) => !(document.getElementById("member-list")?.textContent ?? "").includes(h),
    bob.handle,
    WAIT,
  );
  await post(alice.page, "after bob left");
  await waitForText(alice.page, "#messages", "after bob left");
  await waitForText(bob.page, "#status", `Left ${room}`);
  assert.ok(!((await bob.page.textContent("#messages")) ?? "").includes("after bob left"));
  assert.match(cliOk(["-s", node.server, "-k", carolKey, "history", room], cliEnv), /after bob left/);

  // A reload keeps the key (same handle) and rejoins with the history;
  // the rooms joined from this browser are listed for a quick switch.
  await alice.page.reload();
  await waitForText(alice.page, "#status", `In ${room}.`);
  assert.deepEqual(await alice.page.locator("#recent-rooms button").allTextContents(), [room]);
  assert.equal(await alice.page.textContent("#handle"), alice.handle);
  await waitForText(alice.page, "#messages", "after bob left");
  await waitForText(alice.page, "#messages", "hello from the CLI");

  // The exported key file is the CLI's format: the CLI reads alice's handle from it.
  const [download] = await Promise.all([alice.page.waitForEvent("download", WAIT), alice.page.click("#export")]);
  const exported = join(node.dir, "alice-export.pem");
  await download.saveAs(exported);
  // As the page says: the CLI refuses a key file others can read.
  chmodSync(exported, 0o600);
  const whoami = cliOk(["-k", exported, "whoami"], { SAFERCHAT_KEY_PASSPHRASE: "browser passphrase" });
  assert.match(whoami, new RegExp(`handle:\\s+${alice.handle}`));

  // Nothing in localStorage or sessionStorage (the token lives in memory).
  for (const p of [alice, bob, mallory]) {
    assert.equal(await p.page.evaluate(() => localStorage.length + sessionStorage.length), 0);
  }
  // No text, key or token in the node's log.
  const log = readFileSync(node.log, "utf8");
  for (const secret of ["hello from", "after bob left", "PRIVATE KEY"]) {
    assert.ok(!log.includes(secret), `the node's log holds ${JSON.stringify(secret)}`);
  }

  await screenshots(alice.page, "alice");
  await screenshots(bob.page, "bob");
  await screenshots(mallory.page, "mallory");
});

test("the protocol vectors hold under Chromium's WebCrypto", async () => {
  // A page on a loopback origin (a secure context) that only this test
  // serves, with the checks `vectors.test.ts` runs under Node.
  const script = readFileSync(fileURLToPath(new URL("../in-browser/vectors.js", import.meta.url)), "utf8");
  const page = await (await browser.newContext()).newPage();
  await page.route("http://127.0.0.1:9/**", (route) =>
    route.request().url().endsWith("/vectors.js")
      ? route.fulfill({ contentType: "text/javascript", body: script })
      : route.fulfill({ contentType: "text/html", body: '<!doctype html><script type="module" src="/vectors.js"></script>' }),
  );
  await page.goto("http://127.0.0.1:9/");
  await page.waitForFunction(() => typeof window.runVectors === "function", null, WAIT);
  const result = await page.evaluate(() => window.runVectors());
  assert.deepEqual(result.failures, []);
  assert.ok(result.ran.length >= 7, result.ran.join(", "));
});

test("beyond plain localhost, the page and its calls run over the node's TLS", async () => {
  const secure = await NodeProcess.start(true);
  try {
    // The node's self-signed certificate; a real deployment has a CA's.
    const page = await (await browser.newContext({ ignoreHTTPSErrors: true })).newPage();
    await page.goto(secure.web);
    assert.equal(await page.evaluate(() => window.isSecureContext && location.protocol), "https:");
    await page.fill("#create-pass", "tls passphrase");
    await page.fill("#create-pass2", "tls passphrase");
    await page.click("#create");
    await page.waitForFunction(() => document.getElementById("handle")?.textContent?.length === 43, null, WAIT);
    // grpc-web over TLS reaches the node, which answers as it answers anyone.
    await joinRoom(page, "no-such-room");
    await waitForText(page, "#status", "does not exist or you are not a member");
  } finally {
    secure.stop();
  }
});
