/**
 * What the page keeps in the browser, in IndexedDB: the user's key (the
 * two private CryptoKeys, imported non-extractable, and the encrypted key
 * file they came from, the only form the key ever leaves in), the
 * device's id and per-room state, and the last room joined. Never the
 * session token, never plaintext.
 */
import type { DeviceStore, RoomState } from "../client/device.js";
import { type Identity, importPublicKey } from "../protocol/keys.js";

const DB = "saferchat";
const STORE = "kv";

interface SavedIdentity {
  /** The encrypted key file (`ENCRYPTED PRIVATE KEY` PEM): what export downloads. */
  pem: string;
  signKey: CryptoKey;
  unwrapKey: CryptoKey;
  publicDer: Uint8Array;
}

function openDb(): Promise<IDBDatabase> {
  return new Promise((resolve, reject) => {
    const req = indexedDB.open(DB, 1);
    req.onupgradeneeded = () => req.result.createObjectStore(STORE);
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
}

async function get<T>(key: string): Promise<T | undefined> {
  const db = await openDb();
  return new Promise((resolve, reject) => {
    const req = db.transaction(STORE).objectStore(STORE).get(key);
    req.onsuccess = () => resolve(req.result as T | undefined);
    req.onerror = () => reject(req.error);
  });
}

async function put(key: string, value: unknown): Promise<void> {
  const db = await openDb();
  return new Promise((resolve, reject) => {
    const tx = db.transaction(STORE, "readwrite");
    tx.objectStore(STORE).put(value, key);
    tx.oncomplete = () => resolve();
    tx.onerror = () => reject(tx.error);
  });
}

/** Keeps the identity and its encrypted key file. */
export async function saveIdentity(id: Identity, pem: string): Promise<void> {
  const saved: SavedIdentity = { pem, signKey: id.signKey, unwrapKey: id.unwrapKey, publicDer: id.public.der };
  await put("identity", saved);
}

/** The kept identity, if any. */
export async function loadIdentity(): Promise<{ identity: Identity; pem: string } | undefined> {
  const saved = await get<SavedIdentity>("identity");
  if (!saved) return undefined;
  const identity = { public: await importPublicKey(saved.publicDer), signKey: saved.signKey, unwrapKey: saved.unwrapKey };
  return { identity, pem: saved.pem };
}

/** The last room joined. */
export async function lastRoom(): Promise<string | undefined> {
  return get<string>("last-room");
}

/** Rooms joined from this browser, the most recent first. */
export async function recentRooms(): Promise<string[]> {
  return (await get<string[]>("rooms")) ?? [];
}

/** Remembers `room` as the last one joined. */
export async function setLastRoom(room: string): Promise<void> {
  await put("last-room", room);
  const rooms = [room, ...(await recentRooms()).filter((r) => r !== room)].slice(0, RECENT_ROOMS_MAX);
  await put("rooms", rooms);
}

/** Rooms the page lists for a quick switch. */
const RECENT_ROOMS_MAX = 20;

/** The device, kept in IndexedDB. */
export class IdbDevice implements DeviceStore {
  async id(): Promise<Uint8Array> {
    const known = await get<Uint8Array>("device");
    if (known) return known;
    const fresh = crypto.getRandomValues(new Uint8Array(16));
    await put("device", fresh);
    return fresh;
  }

  async load(room: string): Promise<RoomState | undefined> {
    return get<RoomState>(`room:${room}`);
  }

  async save(room: string, state: RoomState): Promise<void> {
    await put(`room:${room}`, state);
  }
}
