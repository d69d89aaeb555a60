/**
 * A device: one installation of the client (docs/PROTOCOL.md §5.2). It
 * names itself with 16 random bytes, numbers its envelopes per room, and
 * keeps what the stream checks and key warnings need across sessions.
 * Where it is kept is the caller's choice: memory (tests), IndexedDB (the
 * page).
 */
import { fromHex, toHex } from "../protocol/bytes.js";
import { NO_PREVIOUS, type Position } from "../protocol/envelope.js";
import type { SavedStreams } from "../protocol/streams.js";

/** What a device keeps per room (JSON-safe). */
export interface RoomState {
  /** Number of the device's last envelope in the room (0: none yet). */
  seq: string;
  /** Its message hash (hex). */
  prev: string;
  /** The stream checks' memory. */
  streams: SavedStreams;
  /** SubjectPublicKeyInfo DER (hex) of every member key verified so far. */
  keys: string[];
}

/** Where a device keeps its state. */
export interface DeviceStore {
  /** The device's id, drawn once. */
  id(): Promise<Uint8Array>;
  load(room: string): Promise<RoomState | undefined>;
  save(room: string, state: RoomState): Promise<void>;
}

/** A fresh room state. */
export function emptyRoom(): RoomState {
  return { seq: "0", prev: toHex(NO_PREVIOUS), streams: { last: [], memberships: [] }, keys: [] };
}

/** The position of the device's next envelope in a room. */
export function nextPosition(device: Uint8Array, state: RoomState): Position {
  return { device, seq: BigInt(state.seq) + 1n, prev: fromHex(state.prev) };
}

/** A device kept in memory, for tests and for users who keep nothing. */
export class MemoryDevice implements DeviceStore {
  private readonly device = crypto.getRandomValues(new Uint8Array(16));
  private readonly rooms = new Map<string, string>();

  async id(): Promise<Uint8Array> {
    return this.device;
  }

  async load(room: string): Promise<RoomState | undefined> {
    const saved = this.rooms.get(room);
    return saved === undefined ? undefined : JSON.parse(saved);
  }

  async save(room: string, state: RoomState): Promise<void> {
    this.rooms.set(room, JSON.stringify(state));
  }
}
