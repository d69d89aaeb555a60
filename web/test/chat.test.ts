/**
 * The browser client's session code against a real node, over grpc-web on
 * the node's web listener (HTTP/1.1, as a browser without HTTP/2 would
 * speak it): two users of the TypeScript client and one CLI user chat in
 * one room and each reads the others; a non-member is refused; a member
 * the admin removes receives nothing posted after; a reconnecting member
 * reads history with the same device.
 */
import assert from "node:assert/strict";
import { join as joinPath } from "node:path";
import { after, before, test } from "node:test";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { Code, ConnectError, type Interceptor } from "@connectrpc/connect";
import { SealedSchema } from "../src/gen/envelope_pb.js";
import { type LinkFrame, LinkFrameSchema } from "../src/gen/web_pb.js";
import { createGrpcWebTransport } from "@connectrpc/connect-node";
import { MemoryDevice } from "../src/client/device.js";
import { type Message, Session } from "../src/client/session.js";
import { generateIdentity, type Identity } from "../src/protocol/keys.js";
import { NodeProcess, cliOk, eventually } from "./harness.js";

let node: NodeProcess;
before(async () => {
  node = await NodeProcess.start();
});
after(() => node?.stop());

function transport() {
  return createGrpcWebTransport({ baseUrl: node.web, httpVersion: "1.1" });
}

/** A browser-side user: identity, device, what its session received. */
async function browserUser(): Promise<{ id: Identity; device: MemoryDevice; got: Message[]; ended: Array<ConnectError | undefined> }> {
  return { id: (await generateIdentity()).identity, device: new MemoryDevice(), got: [], ended: [] };
}

async function join(u: Awaited<ReturnType<typeof browserUser>>, room: string): Promise<Session> {
  return Session.join(transport(), u.id, room, u.device, {
    message: (m) => u.got.push(m),
    refused: (r) => assert.fail(`a delivery was refused: ${r.reason}`),
    ended: (e) => u.ended.push(e),
  });
}

const texts = (ms: Message[]) => ms.map((m) => m.text);

test("browser users and a CLI user share a room; non-members are refused; the removed stop receiving", async () => {
  const room = "web-team";
  const cliEnv = { SAFERCHAT_KEY_PASSPHRASE: "web test passphrase" };
  const carolKey = joinPath(node.dir, "carol.pem");
  const keygen = cliOk(["-k", carolKey, "keygen"], cliEnv);
  const carol = /handle:\s+(\S+)/.exec(keygen)![1]!;
  const [alice, bob, mallory] = [await browserUser(), await browserUser(), await browserUser()];
  cliOk(["-s", node.server, "admin", "create-chat", room]);
  for (const h of [alice.id.public.handleText, bob.id.public.handleText, carol]) {
    cliOk(["-s", node.server, "admin", "add-user", room, h]);
  }

  const a = await join(alice, room);
  const b = await join(bob, room);
  // The CLI user joins and posts (its first join registers its key).
  cliOk(["-s", node.server, "-k", carolKey, "send", room, "hello from the CLI"], cliEnv);
  await eventually("both browsers to receive the CLI's message", () =>
    [alice, bob].every((u) => texts(u.got).includes("hello from the CLI")),
  );
  const fromCarol = alice.got.find((m) => m.text === "hello from the CLI")!;
  assert.equal(fromCarol.sender, carol);
  assert.deepEqual(fromCarol.warnings, []);

  // Browser to browser and to the CLI.
  const posted = await a.post("hello from alice's browser ✓");
  assert.ok(posted.seq > 0n);
  await b.post("and from bob's");
  await eventually("both browsers to receive both posts", () =>
    [alice, bob].every((u) => ["hello from alice's browser ✓", "and from bob's"].every((t) => texts(u.got).includes(t))),
  );
  const history = cliOk(["-s", node.server, "-k", carolKey, "history", room], cliEnv);
  assert.match(history, /hello from alice's browser ✓/);
  assert.match(history, /and from bob's/);
  // The members with keys, as the browser verified them.
  const members = a.membership.members.filter((m) => m.key).map((m) => m.handle).sort();
  assert.deepEqual(members, [alice.id.public.handleText, bob.id.public.handleText, carol].sort());

  // A non-member is refused, with the one answer for "no room" and "not a member".
  await assert.rejects(join(mallory, room), (e: unknown) => {
    assert.ok(e instanceof ConnectError);
    assert.equal(e.code, Code.PermissionDenied);
    assert.match(e.rawMessage, /does not exist or you are not a member/);
    return true;
  });

  // The admin removes bob: his session ends, and nothing alice posts after
  // reaches him (it is not even sealed for him).
  cliOk(["-s", node.server, "admin", "remove-user", room, bob.id.public.handleText]);
  await eventually("bob's session to end", () => bob.ended.length > 0);
  assert.equal(bob.ended[0]?.code, Code.PermissionDenied);
  await eventually("alice to see the new membership", () => !a.membership.members.some((m) => m.handle === bob.id.public.handleText));
  await a.post("after bob left");
  await eventually("the CLI to read the post made after bob left", () =>
    /after bob left/.test(cliOk(["-s", node.server, "-k", carolKey, "history", room], cliEnv)),
  );
  assert.ok(!texts(bob.got).includes("after bob left"));
  await assert.rejects(join(bob, room), (e: unknown) => e instanceof ConnectError && e.code === Code.PermissionDenied);

  // Alice comes back with the same device: history opens, no warnings (no gap, no fork).
  a.close();
  const again = { ...alice, got: [] as Message[] };
  const a2 = await join(again, room);
  await eventually("alice's history on rejoining", () => texts(again.got).includes("after bob left"));
  for (const m of again.got) assert.deepEqual(m.warnings, [], m.text);
  const read = await a2.history(10);
  assert.deepEqual(texts(read).slice(0, 2), ["after bob left", "and from bob's"]);
  a2.close();
  b.close();
});

/**
 * A server that alters the 2nd live delivery's ciphertext and drops the
 * 4th, as a compromised node could: the altered one is refused (never
 * shown), and the messages after each hole carry a gap warning.
 */
const hostile: Interceptor = (next) => async (req) => {
  const res = await next(req);
  if (!res.stream || req.method.name !== "Open") return res;
  let live = 0;
  async function* tamper(frames: AsyncIterable<LinkFrame>): AsyncIterable<LinkFrame> {
    for await (const f of frames) {
      const inner = f.frame?.frame;
      if (inner?.case !== "deliveries" || inner.value.history) {
        yield f;
        continue;
      }
      const items = [];
      for (const item of inner.value.items) {
        live++;
        if (live === 4) continue;
        if (live === 2) {
          const sealed = fromBinary(SealedSchema, item.sealed);
          sealed.ciphertext[0]! ^= 1;
          item.sealed = toBinary(SealedSchema, sealed);
        }
        items.push(item);
      }
      inner.value.items = items;
      yield create(LinkFrameSchema, f);
    }
  }
  return { ...res, message: tamper(res.message as AsyncIterable<LinkFrame>) };
};

test("a server that alters or drops deliveries is caught: refused, and gaps reported", async () => {
  const room = "web-hostile";
  const [alice, bob] = [await browserUser(), await browserUser()];
  cliOk(["-s", node.server, "admin", "create-chat", room]);
  for (const h of [alice.id.public.handleText, bob.id.public.handleText]) {
    cliOk(["-s", node.server, "admin", "add-user", room, h]);
  }
  const refused: string[] = [];
  const a = await Session.join(
    createGrpcWebTransport({ baseUrl: node.web, httpVersion: "1.1", interceptors: [hostile] }),
    alice.id,
    room,
    alice.device,
    { message: (m) => alice.got.push(m), refused: (r) => refused.push(r.reason) },
  );
  const b = await join(bob, room);
  for (let i = 1; i <= 5; i++) await b.post(`message ${i}`);
  await eventually("alice to get what the server let through", () => alice.got.length + refused.length >= 4);
  assert.deepEqual(texts(alice.got), ["message 1", "message 3", "message 5"]);
  assert.deepEqual(refused, ["signature does not verify"]);
  assert.deepEqual(
    alice.got.map((m) => m.warnings),
    [[], [{ kind: "gap", missing: 1n }], [{ kind: "gap", missing: 1n }]],
  );
  a.close();
  b.close();
});
