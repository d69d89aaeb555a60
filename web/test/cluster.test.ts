/**
 * Browser sessions on a three-node cluster (`deploy/local-cluster.sh
 * --web`): users of the TypeScript client connect to the web listeners of
 * different nodes, whichever node serves the room, and chat with each
 * other and with a CLI user on a third node. A page cannot follow a
 * redirect, so the nodes that do not serve the room relay the session.
 */
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { after, before, test } from "node:test";
import { createGrpcWebTransport } from "@connectrpc/connect-node";
import { MemoryDevice } from "../src/client/device.js";
import { type Message, Session } from "../src/client/session.js";
import { generateIdentity } from "../src/protocol/keys.js";
import { bin, cliOk, eventually } from "./harness.js";

const SCRIPT = fileURLToPath(new URL("../../../deploy/local-cluster.sh", import.meta.url));
const dir = mkdtempSync(join(tmpdir(), "saferchat-web-cluster-"));
let nodes: Array<{ server: string; web: string }> = [];

function script(...args: string[]): string {
  const run = spawnSync("bash", [SCRIPT, ...args], {
    env: {
      ...process.env,
      SAFERCHAT_NODE_BIN: bin("saferchat-node"),
      LOCAL_CLUSTER_START_TIMEOUT_S: "180",
      // The relay says when it relays (at debug), so the test can tell.
      RUST_LOG: "info,saferchat_node::grpc::relay=debug",
    },
    encoding: "utf8",
    timeout: 300_000,
  });
  if (run.status !== 0) throw new Error(`local-cluster.sh ${args[0]} failed:\n${run.stdout}\n${run.stderr}`);
  return run.stdout;
}

before(() => {
  const out = script("start", "--nodes", "3", "--web", "--dir", dir);
  nodes = [...out.matchAll(/client (\S+) web (\S+)/g)].map((m) => ({ server: m[1]!, web: m[2]! }));
  assert.equal(nodes.length, 3, out);
});
after(() => {
  script("stop", "--dir", dir);
  rmSync(dir, { recursive: true, force: true });
});

test("browser users on different nodes and a CLI user on a third chat in one room", async () => {
  const admin = { SAFERCHAT_ADMIN_TOKEN: readFileSync(join(dir, "admin.token"), "utf8").trim() };
  const cliEnv = { ...admin, SAFERCHAT_KEY_PASSPHRASE: "cluster test passphrase" };
  const carolKey = join(dir, "carol.pem");
  const carol = /handle:\s+(\S+)/.exec(cliOk(["-k", carolKey, "keygen"], cliEnv))![1]!;
  const users = await Promise.all([0, 1].map(async () => ({ id: (await generateIdentity()).identity, got: [] as Message[] })));
  // Several rooms, so that some are served by each node: every user is
  // relayed for some of them.
  const rooms = ["cluster-a", "cluster-b", "cluster-c", "cluster-d"];
  for (const room of rooms) {
    cliOk(["-s", nodes[0]!.server, "admin", "create-chat", room], admin);
    for (const h of [...users.map((u) => u.id.public.handleText), carol]) {
      cliOk(["-s", nodes[0]!.server, "admin", "add-user", room, h], admin);
    }
  }
  for (const room of rooms) {
    const got: Message[][] = [[], []];
    const sessions = await Promise.all(
      users.map((u, i) =>
        Session.join(
          createGrpcWebTransport({ baseUrl: nodes[i === 0 ? 0 : 2]!.web, httpVersion: "1.1" }),
          u.id,
          room,
          new MemoryDevice(),
          { message: (m) => got[i]!.push(m), refused: (r) => assert.fail(`refused: ${r.reason}`) },
        ),
      ),
    );
    cliOk(["-s", nodes[1]!.server, "-k", carolKey, "send", room, `CLI in ${room}`], cliEnv);
    await sessions[0]!.post(`node 1's browser in ${room}`);
    await sessions[1]!.post(`node 3's browser in ${room}`);
    const all = [`CLI in ${room}`, `node 1's browser in ${room}`, `node 3's browser in ${room}`];
    await eventually(`both browsers to receive everything in ${room}`, () =>
      got.every((g) => all.every((t) => g.some((m) => m.text === t))),
    );
    // One order: both browsers saw the room's sequence numbers rise.
    for (const g of got) {
      const seqs = g.map((m) => m.seq);
      assert.deepEqual(seqs, [...seqs].sort((a, b) => (a < b ? -1 : a > b ? 1 : 0)));
      for (const m of g) assert.deepEqual(m.warnings, [], m.text);
    }
    const history = cliOk(["-s", nodes[1]!.server, "-k", carolKey, "history", room], cliEnv);
    for (const t of all) assert.ok(history.includes(t), `${t} in the CLI's history of ${room}`);
    for (const s of sessions) s.close();
  }
  // The browsers were relayed for the rooms their node does not serve.
  const relayed = [1, 3].map((i) => readFileSync(join(dir, `n${i}.log`), "utf8").split("relaying a session").length - 1);
  assert.ok(relayed[0]! + relayed[1]! > 0, `relayed sessions on nodes 1 and 3: ${relayed}`);
});
