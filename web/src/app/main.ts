/**
 * The page: key management, one room's session, messages and members.
 * Everything is built with `textContent` (never HTML from data), so a
 * message or a handle can never run script; the page's
 * Content-Security-Policy forbids inline script and style besides.
 */
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { ConnectError } from "@connectrpc/connect";
import type { Message, Member } from "../client/session.js";
import { Session } from "../client/session.js";
import { decryptKeyFile, encryptKeyFile } from "../protocol/keyfile.js";
import { type Identity, fingerprint, generateIdentity, identityFromPkcs8 } from "../protocol/keys.js";
import { describe } from "../protocol/streams.js";
import { IdbDevice, lastRoom, loadIdentity, recentRooms, saveIdentity, setLastRoom } from "./store.js";

function $<T extends HTMLElement>(id: string): T {
  const e = document.getElementById(id);
  if (!e) throw new Error(`#${id} is missing`);
  return e as T;
}

function status(text: string, error = false): void {
  const s = $("status");
  s.textContent = text;
  s.classList.toggle("error", error);
}

function reason(e: unknown): string {
  if (e instanceof ConnectError) return e.rawMessage;
  return e instanceof Error ? e.message : String(e);
}

let me: Identity | undefined;
let keyFile = "";
let session: Session | undefined;
const device = new IdbDevice();

function short(handle: string): string {
  return handle === me?.public.handleText ? "you" : `${handle.slice(0, 8)}…`;
}

function line(kind: "message" | "warning" | "notice", parts: Array<[string, string]>, title?: string): void {
  const li = document.createElement("li");
  li.className = kind;
  if (title) li.title = title;
  for (const [cls, text] of parts) {
    const span = document.createElement("span");
    span.className = cls;
    span.textContent = text;
    li.append(span);
  }
  const list = $("messages");
  list.append(li);
  list.scrollTop = list.scrollHeight;
}

function showMessage(m: Message): void {
  const at = new Date(Number(m.timeMs)).toLocaleTimeString();
  line("message", [["meta", `${at} ${short(m.sender)}${m.history ? " (history)" : ""}:`], ["text", m.text]], m.sender);
  for (const w of m.warnings) line("warning", [["text", `⚠ ${short(m.sender)}: ${describe(w)}`]]);
}

function showMembers(revision: bigint, members: Member[], roomFingerprint: string): void {
  $("revision").textContent = revision.toString();
  $("room-fingerprint").textContent = roomFingerprint;
  const list = $("member-list");
  list.replaceChildren();
  for (const m of members) {
    const li = document.createElement("li");
    const who = document.createElement("code");
    who.textContent = m.handle;
    li.append(who, document.createTextNode(m.handle === me?.public.handleText ? " (you) " : " "));
    const fp = document.createElement("span");
    fp.textContent = m.fingerprint ?? "has not joined yet";
    li.append(fp);
    if (m.newKey && m.handle !== me?.public.handleText) {
      const badge = document.createElement("span");
      badge.className = "badge";
      badge.textContent = "new key";
      li.append(badge);
      line("notice", [["text", `New key for ${short(m.handle)}: ${m.fingerprint}. Compare it with them.`]]);
    }
    list.append(li);
  }
  $("members").hidden = false;
}

async function showKey(): Promise<void> {
  $("no-key").hidden = me !== undefined;
  $("has-key").hidden = me === undefined;
  $("room").hidden = me === undefined;
  if (!me) return;
  $("handle").textContent = me.public.handleText;
  $("fingerprint").textContent = await fingerprint(me.public.der);
}

/** The rooms joined from this browser, as buttons that join them again. */
async function showRecentRooms(): Promise<void> {
  const list = $("recent-rooms");
  list.replaceChildren();
  for (const room of await recentRooms()) {
    const li = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = room;
    button.addEventListener("click", () => {
      $<HTMLInputElement>("room-name").value = room;
      void join(room);
    });
    li.append(button);
    list.append(li);
  }
}

async function join(room: string): Promise<void> {
  if (!me) return;
  session?.close();
  session = undefined;
  $("messages").replaceChildren();
  $("post-form").hidden = true;
  status(`Joining ${room}…`);
  try {
    const s = await Session.join(createGrpcWebTransport({ baseUrl: location.origin }), me, room, device, {
      message: showMessage,
      refused: (r) => line("warning", [["text", `⚠ a message (number ${r.seq}) could not be verified and is not shown: ${r.reason}`]]),
      members: (m) => {
        line("notice", [["text", `Membership changed (revision ${m.revision}).`]]);
        showMembers(m.revision, m.members, m.fingerprint);
      },
      ended: (e) => {
        if (session !== s) return;
        $("post-form").hidden = true;
        status(e ? `Left ${room}: ${reason(e)}` : `Left ${room}.`, e !== undefined);
      },
    });
    session = s;
    await setLastRoom(room);
    await showRecentRooms();
    $("post-form").hidden = false;
    status(`In ${room}.`);
  } catch (e) {
    status(`Could not join ${room}: ${reason(e)}`, true);
  }
}

async function start(): Promise<void> {
  if (!window.isSecureContext || !crypto.subtle) {
    status("This page needs a secure context (HTTPS, or localhost) for its cryptography.", true);
    return;
  }
  const kept = await loadIdentity();
  if (kept) {
    me = kept.identity;
    keyFile = kept.pem;
  }
  await showKey();
  status(me ? "Ready." : "No key in this browser yet.");

  $("create-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const pass = $<HTMLInputElement>("create-pass").value;
    if (pass !== $<HTMLInputElement>("create-pass2").value) return status("The passphrases differ.", true);
    status("Creating an RSA-2048 key…");
    try {
      const { pkcs8 } = await generateIdentity();
      keyFile = await encryptKeyFile(pkcs8, pass);
      me = await identityFromPkcs8(pkcs8, false);
      pkcs8.fill(0);
      await saveIdentity(me, keyFile);
      await showKey();
      status("Key created. Export the key file to keep a copy.");
    } catch (e) {
      status(`Could not create a key: ${reason(e)}`, true);
    }
  });

  $("import-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const file = $<HTMLInputElement>("import-file").files?.[0];
    if (!file) return;
    status("Opening the key file…");
    try {
      const text = await file.text();
      const pkcs8 = await decryptKeyFile(text, $<HTMLInputElement>("import-pass").value);
      me = await identityFromPkcs8(pkcs8, false);
      pkcs8.fill(0);
      keyFile = text;
      await saveIdentity(me, keyFile);
      await showKey();
      status("Key imported.");
    } catch (e) {
      status(`Could not import the key: ${reason(e)}`, true);
    }
  });

  $("export").addEventListener("click", () => {
    const a = document.createElement("a");
    a.href = URL.createObjectURL(new Blob([keyFile], { type: "application/x-pem-file" }));
    a.download = "saferchat-key.pem";
    a.click();
    URL.revokeObjectURL(a.href);
  });

  $("join-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    void join($<HTMLInputElement>("room-name").value);
  });

  $("post-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const box = $<HTMLTextAreaElement>("post-text");
    const text = box.value;
    if (!session || text.length === 0) return;
    box.value = "";
    try {
      await session.post(text);
    } catch (e) {
      box.value = text;
      status(`Not sent: ${reason(e)}`, true);
    }
  });

  await showRecentRooms();
  const room = me ? await lastRoom() : undefined;
  if (room) {
    $<HTMLInputElement>("room-name").value = room;
    await join(room);
  }
}

void start();
