/**
 * Real saferchat processes for the browser client's tests: a node with
 * its web listener, and the Rust CLI. Binaries come from
 * $SAFERCHAT_BIN_DIR or ../target/debug (`cargo build --workspace`; the
 * test command builds them first).
 */
import { type ChildProcess, spawn, spawnSync } from "node:child_process";
import { createWriteStream, existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { createConnection, createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";

export const BIN_DIR =
  process.env.SAFERCHAT_BIN_DIR ?? fileURLToPath(new URL("../../../target/debug/", import.meta.url));

/** A built binary's path; throws, saying how to build it, when missing. */
export function bin(name: string): string {
  const path = join(BIN_DIR, name);
  if (!existsSync(path)) {
    throw new Error(`${path} is missing: run \`cargo build --workspace --all-targets\` first (or set SAFERCHAT_BIN_DIR)`);
  }
  return path;
}

/** A loopback port free right now (the OS picks it). */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address() as { port: number };
      server.close(() => resolve(port));
    });
  });
}

/** Resolves once `port` accepts connections, or throws after `deadlineMs`. */
export async function waitForPort(port: number, deadlineMs: number, alive: () => boolean): Promise<void> {
  const until = Date.now() + deadlineMs;
  for (;;) {
    const ok = await new Promise<boolean>((resolve) => {
      const socket = createConnection({ host: "127.0.0.1", port }, () => {
        socket.end();
        resolve(true);
      });
      socket.once("error", () => resolve(false));
    });
    if (ok) return;
    if (!alive()) throw new Error("the node exited before it listened");
    if (Date.now() > until) throw new Error(`nothing listens on ${port} after ${deadlineMs} ms`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

export const ADMIN_TOKEN = "web-test-admin-token-0123456789";

/** A node process with its client and web listeners on loopback. */
export class NodeProcess {
  private constructor(
    readonly dir: string,
    /** The client listener, as the CLI's `-s` takes it. */
    readonly server: string,
    readonly web: string,
    private readonly child: ChildProcess,
    readonly log: string,
  ) {}

  /** Starts a node; `tls`: its listeners (the web one included) serve TLS with a self-signed certificate. */
  static async start(tls = false): Promise<NodeProcess> {
    const dir = mkdtempSync(join(tmpdir(), "saferchat-web-"));
    const [client, web] = [await freePort(), await freePort()];
    const log = join(dir, "node.log");
    const out = createWriteStream(log);
    const child = spawn(
      bin("saferchat-node"),
      [
        "--listen",
        `127.0.0.1:${client}`,
        "--web-listen",
        `127.0.0.1:${web}`,
        "--data-dir",
        join(dir, "data"),
        ...(tls ? ["--tls-self-signed"] : []),
      ],
      { env: { ...process.env, SAFERCHAT_ADMIN_TOKEN: ADMIN_TOKEN, RUST_LOG: "info" }, stdio: ["ignore", "pipe", "pipe"] },
    );
    child.stdout!.pipe(out);
    child.stderr!.pipe(out);
    const [server, page] = tls
      ? [`https://127.0.0.1:${client}`, `https://127.0.0.1:${web}`]
      : [`127.0.0.1:${client}`, `http://127.0.0.1:${web}`];
    const node = new NodeProcess(dir, server, page, child, log);
    try {
      await waitForPort(web, 120_000, () => child.exitCode === null);
    } catch (e) {
      node.stop();
      throw new Error(`${(e as Error).message}\n${readFileSync(log, "utf8")}`);
    }
    return node;
  }

  /** Stops the node and deletes its folder. */
  stop(): void {
    if (this.child.exitCode === null) this.child.kill("SIGKILL");
    rmSync(this.dir, { recursive: true, force: true });
  }
}

/** Runs the CLI; returns its exit status and output. */
export function cli(
  args: string[],
  env: Record<string, string> = {},
  input?: string,
): { status: number | null; stdout: string; stderr: string } {
  const run = spawnSync(bin("saferchat"), args, {
    env: { ...process.env, SAFERCHAT_ADMIN_TOKEN: ADMIN_TOKEN, ...env },
    encoding: "utf8",
    timeout: 120_000,
    ...(input === undefined ? {} : { input }),
  });
  if (run.error) throw run.error;
  return { status: run.status, stdout: run.stdout, stderr: run.stderr };
}

/** Runs the CLI and throws with its output unless it succeeds. */
export function cliOk(args: string[], env: Record<string, string> = {}, input?: string): string {
  const r = cli(args, env, input);
  if (r.status !== 0) throw new Error(`saferchat ${args.join(" ")} failed (${r.status}):\n${r.stdout}\n${r.stderr}`);
  return r.stdout;
}

/**
 * Waits until `check` holds, polling every 50 ms, or throws `what` after
 * `deadlineMs` (generous: the tests run on loaded 2-core machines).
 */
export async function eventually(what: string, check: () => boolean, deadlineMs = 60_000): Promise<void> {
  const until = Date.now() + deadlineMs;
  while (!check()) {
    if (Date.now() > until) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}
