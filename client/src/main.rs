//! `saferchat`: keys, chatting, history and room administration from the
//! command line. Messages are encrypted and signed here; the server only
//! ever sees ciphertext.

use std::io::{IsTerminal, Read as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand};
use saferchat_client::admin::Admin;
use saferchat_client::connect::Trust;
use saferchat_client::history::{self, Query};
use saferchat_client::keys::{KeyFile, Protection};
use saferchat_client::session::MembershipChange;
use saferchat_client::verify;
use saferchat_client::{ClientError, Event, Identity, JoinOptions, Message, Session};
use saferchat_consensus::RoomId;
use saferchat_vocabulary::CertificateFingerprint;
use tokio::io::AsyncBufReadExt as _;
use zeroize::Zeroizing;

/// Where the CLI takes the key file's passphrase from, when set (instead
/// of asking on the terminal).
const PASSPHRASE_ENV: &str = "SAFERCHAT_KEY_PASSPHRASE";
/// The new passphrase for `set-passphrase`.
const NEW_PASSPHRASE_ENV: &str = "SAFERCHAT_NEW_KEY_PASSPHRASE";

#[derive(Debug, Parser)]
#[command(name = "saferchat", version, about = "End-to-end encrypted group chat")]
struct Cli {
    /// Node address: host:port (plaintext), or https://host:port (TLS).
    #[arg(
        long,
        short,
        global = true,
        env = "SAFERCHAT_SERVER",
        default_value = "127.0.0.1:8080"
    )]
    server: String,
    /// Private key file (PKCS#8 PEM). Default: ~/.config/saferchat/key.pem.
    #[arg(long, short, global = true, env = "SAFERCHAT_KEY")]
    key: Option<PathBuf>,
    /// TLS: accept only server certificates this CA (PEM file) signed,
    /// instead of the public web CAs.
    #[arg(
        long,
        global = true,
        env = "SAFERCHAT_TLS_CA",
        conflicts_with = "tls_pin"
    )]
    tls_ca: Option<PathBuf>,
    /// TLS: accept only the server certificate with this fingerprint
    /// (sha256:…, as the node logs it); repeat, or separate with commas,
    /// for several nodes.
    #[arg(
        long,
        global = true,
        env = "SAFERCHAT_TLS_PIN",
        value_delimiter = ',',
        value_parser = parse_pin
    )]
    tls_pin: Vec<CertificateFingerprint>,
    #[command(subcommand)]
    command: Command,
}

/// The post durability levels, as the command line names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum DurabilityArg {
    /// A majority of the room's replicas in its home datacenter.
    Local,
    /// Also a majority of its replicas in one other datacenter.
    CrossDatacenter,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate an RSA-2048 key pair and print its handle. The key file is
    /// encrypted with a passphrase, asked for on the terminal or taken from
    /// SAFERCHAT_KEY_PASSPHRASE.
    Keygen {
        /// Replace an existing key file.
        #[arg(long)]
        force: bool,
        /// Store the key unencrypted.
        #[arg(long)]
        no_passphrase: bool,
    },
    /// Encrypt the key file under a new passphrase (asked for on the
    /// terminal, or taken from SAFERCHAT_NEW_KEY_PASSPHRASE), or store it
    /// unencrypted with --no-passphrase.
    SetPassphrase {
        /// Store the key unencrypted.
        #[arg(long)]
        no_passphrase: bool,
    },
    /// Print your handle and key fingerprint.
    Whoami,
    /// Post one message (the words given, or standard input).
    Send {
        /// Room name.
        room: String,
        /// The message; read from standard input when absent.
        message: Vec<String>,
        /// When the server acknowledges: `local` (a majority of the
        /// room's replicas in its home datacenter has it) or
        /// `cross-datacenter` (one other datacenter's majority too).
        #[arg(long, value_enum, default_value_t = DurabilityArg::Local)]
        durability: DurabilityArg,
    },
    /// Chat interactively: lines you type are posted; messages print as
    /// `time sender: text`.
    Chat {
        /// Room name.
        room: String,
        /// How many recent messages to show first.
        #[arg(long, default_value_t = 20)]
        recent: u32,
    },
    /// Print stored messages, oldest first.
    History {
        /// Room name.
        room: String,
        /// How many messages.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Only messages before this id (as printed with --ids).
        #[arg(long)]
        before: Option<String>,
        /// Only messages after this id.
        #[arg(long)]
        after: Option<String>,
        /// Print message ids too.
        #[arg(long)]
        ids: bool,
    },
    /// Members of a room you belong to, with key fingerprints.
    Members {
        /// Room name.
        room: String,
    },
    /// Numbers to compare out of band: the room's fingerprint (members at
    /// the same revision who see the same digits were shown the same
    /// members and keys) and your safety number with each member.
    Verify {
        /// Room name.
        room: String,
    },
    /// Room administration (needs the admin token).
    Admin {
        #[command(flatten)]
        auth: AdminAuth,
        #[command(subcommand)]
        command: AdminCommand,
    },
    /// The cluster (needs the admin token).
    Cluster {
        #[command(flatten)]
        auth: AdminAuth,
        #[command(subcommand)]
        command: ClusterCommand,
    },
}

/// The admin token, given or in a file.
#[derive(Debug, clap::Args)]
struct AdminAuth {
    /// The admin token.
    #[arg(long, short, env = "SAFERCHAT_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A file holding the admin token (e.g. DATA_DIR/admin.token).
    #[arg(long, env = "SAFERCHAT_ADMIN_TOKEN_FILE")]
    token_file: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// The cluster map as the node you reach has applied it (epoch,
    /// partitions, nodes) and its view of the map's Raft group.
    Status,
    /// Add a node to the cluster map. It joins holding no replica slot
    /// (it serves clients by forwarding to the rooms' owners); start it
    /// with `saferchat-node --join` and its certificate from the cluster CA.
    AddNode {
        /// Its node id (never used in this cluster before).
        id: u64,
        /// Its datacenter.
        #[arg(long)]
        datacenter: String,
        /// host:port of its peer listener, as other nodes reach it.
        #[arg(long)]
        peer_address: String,
        /// host:port of its client listener, as clients reach it.
        #[arg(long)]
        client_address: String,
    },
    /// Remove a node that holds no replica slot from the cluster map (stop
    /// it first). Its id is never given out again.
    RemoveNode {
        /// Its node id.
        id: u64,
    },
    /// Make every joining node active: partitions move to them one replica
    /// slot at a time while clients chat (`status` shows how many still
    /// move).
    Rebalance,
    /// Move every replica slot off an active node, after which
    /// `remove-node` removes it.
    Drain {
        /// Its node id.
        id: u64,
    },
    /// Move the home of every partition homed in a datacenter (or of the
    /// given partitions) to another datacenter: what to do when a home
    /// datacenter is lost. Posts acknowledged at the cross-datacenter
    /// level survive; local-level posts not yet copied out may not.
    MoveHomes {
        /// The datacenter whose partitions move.
        #[arg(long, required_unless_present = "partition")]
        from: Option<String>,
        /// Their new home.
        #[arg(long)]
        to: String,
        /// Only this partition (repeatable).
        #[arg(long)]
        partition: Vec<u32>,
    },
}

#[derive(Debug, Subcommand)]
enum AdminCommand {
    /// Create a room.
    CreateChat {
        /// Room name.
        room: String,
    },
    /// Add a member by handle.
    AddUser {
        /// Room name.
        room: String,
        /// The member's 43-character handle (base64url: it may start
        /// with `-`, which is taken as the handle, not an option).
        #[arg(allow_hyphen_values = true)]
        user: String,
        /// Apply only if the room is still at this revision.
        #[arg(long)]
        expect_revision: Option<u64>,
    },
    /// Remove a member.
    RemoveUser {
        /// Room name.
        room: String,
        /// The member's handle (it may start with `-`).
        #[arg(allow_hyphen_values = true)]
        user: String,
        /// Apply only if the room is still at this revision.
        #[arg(long)]
        expect_revision: Option<u64>,
    },
    /// Members, revision and lease holders of a room.
    Members {
        /// Room name.
        room: String,
    },
    /// All rooms.
    List,
}

fn default_key_path() -> PathBuf {
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".config/saferchat/key.pem"),
        None => PathBuf::from("saferchat-key.pem"),
    }
}

/// `saferchat cluster status`, one fact per line.
fn show_cluster_status(s: &saferchat_proto::admin::ClusterStatusReply) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    if s.epoch == 0 {
        let _ = writeln!(out, "cluster map: not created yet (asked node {})", s.node);
    } else {
        let _ = writeln!(
            out,
            "cluster map: epoch {}, {} partitions, {} replicas per datacenter (as node {} applied it)",
            s.epoch, s.partitions, s.replicas_per_datacenter, s.node
        );
    }
    let leader = if s.map_leader == 0 {
        "none known".to_owned()
    } else {
        format!("node {}", s.map_leader)
    };
    let _ = writeln!(
        out,
        "map group: leader {leader}, term {}, node {} is {}, applied index {}",
        s.map_term, s.node, s.role, s.applied_index
    );
    if s.moving_partitions > 0 || s.unestablished_partitions > 0 {
        let _ = writeln!(
            out,
            "moving: {} partitions still to move, {} with a step not established yet",
            s.moving_partitions, s.unestablished_partitions
        );
    }
    if s.moved_homes > 0 || s.failing_over_partitions > 0 {
        let _ = writeln!(
            out,
            "homes: {} partitions homed away from their turn's datacenter, {} of them not established in their new home yet",
            s.moved_homes, s.failing_over_partitions
        );
    }
    for n in &s.nodes {
        let address = if n.peer_address.is_empty() {
            "(not recorded)"
        } else {
            n.peer_address.as_str()
        };
        let role = if n.map_role.is_empty() {
            "not in the map group yet"
        } else {
            n.map_role.as_str()
        };
        let _ = writeln!(
            out,
            "  node {}  {}  {}  peer {address}  client {}  map {role}",
            n.id,
            n.datacenter,
            n.state,
            if n.client_address.is_empty() {
                "(not recorded)"
            } else {
                n.client_address.as_str()
            }
        );
    }
    out
}

fn room(name: &str) -> anyhow::Result<RoomId> {
    RoomId::new(name).with_context(|| format!("room {name:?}"))
}

/// A passphrase from the environment variable `name`, if set. A value
/// that is not UTF-8 is an error, not silently altered.
fn passphrase_from_env(name: &str) -> Result<Option<Zeroizing<String>>, ClientError> {
    std::env::var_os(name)
        .map(|p| {
            p.into_string()
                .map(Zeroizing::new)
                .map_err(|_| ClientError::Input(format!("{name} is not valid UTF-8")))
        })
        .transpose()
}

/// The passphrase of an existing key file: SAFERCHAT_KEY_PASSPHRASE, or
/// asked for on the terminal.
fn passphrase_to_read(path: &Path) -> Result<Zeroizing<String>, ClientError> {
    if let Some(p) = passphrase_from_env(PASSPHRASE_ENV)? {
        return Ok(p);
    }
    if !std::io::stdin().is_terminal() {
        return Err(ClientError::KeyFile {
            path: path.display().to_string(),
            reason: format!("is encrypted: set {PASSPHRASE_ENV} or run on a terminal"),
        });
    }
    rpassword::prompt_password(format!("passphrase for {}: ", path.display()))
        .map(Zeroizing::new)
        .map_err(|e| ClientError::KeyFile {
            path: path.display().to_string(),
            reason: format!("reading the passphrase: {e}"),
        })
}

/// A passphrase for a key file about to be written: `env`, or asked for
/// twice on the terminal; `None` with --no-passphrase.
fn passphrase_to_write(
    env: &str,
    no_passphrase: bool,
) -> anyhow::Result<Option<Zeroizing<String>>> {
    if no_passphrase {
        return Ok(None);
    }
    let passphrase = if let Some(p) = passphrase_from_env(env)? {
        p
    } else if std::io::stdin().is_terminal() {
        let first = Zeroizing::new(rpassword::prompt_password("passphrase for the key file: ")?);
        let again = Zeroizing::new(rpassword::prompt_password("the same again: ")?);
        if first != again {
            bail!("the two passphrases differ; nothing was written");
        }
        first
    } else {
        bail!(
            "the key file needs a passphrase: run on a terminal, set {env}, or pass --no-passphrase"
        );
    };
    if passphrase.is_empty() {
        bail!(
            "an empty passphrase protects nothing; pass --no-passphrase to store the key unencrypted"
        );
    }
    Ok(Some(passphrase))
}

/// Joins `room` for a one-shot command: no history, with this key's
/// device state.
async fn join_once(cli: &Cli, room: &RoomId, id: Arc<Identity>) -> anyhow::Result<Session> {
    let options = JoinOptions {
        no_history: true,
        state_beside: Some(key_path(cli)),
        ..JoinOptions::default()
    };
    Ok(Session::join(&cli.server, room, id, &options).await?)
}

/// The key file: `--key`, else the default path.
fn key_path(cli: &Cli) -> PathBuf {
    cli.key.clone().unwrap_or_else(default_key_path)
}

fn identity(cli: &Cli) -> anyhow::Result<Arc<Identity>> {
    let path = key_path(cli);
    let (id, file) = Identity::load_with(&path, || passphrase_to_read(&path))?;
    if file == KeyFile::Plain {
        eprintln!(
            "warning: {} is not encrypted; `saferchat set-passphrase` encrypts it",
            path.display()
        );
    }
    Ok(Arc::new(id))
}

fn protection(passphrase: Option<&Zeroizing<String>>) -> Protection<'_> {
    passphrase.map_or(Protection::None, |p| Protection::Passphrase(p))
}

fn time(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms).map_or_else(
        || ms.to_string(),
        |t| t.format("%Y-%m-%d %H:%M:%S").to_string(),
    )
}

fn short(handle: &saferchat_consensus::Handle) -> String {
    handle.to_string()[..10].to_owned()
}

fn id_text(id: &[u8]) -> String {
    uuid::Uuid::from_slice(id).map_or_else(|_| "?".into(), |u| u.to_string())
}

/// A membership change, member by member, with key fingerprints.
fn print_change(change: &MembershipChange, room: &RoomId) {
    let revision = change.revision;
    eprintln!("membership changed (revision {revision})");
    for (handle, fingerprint) in &change.added {
        if fingerprint.is_empty() {
            eprintln!("  added {handle} at revision {revision} (has not joined yet)");
        } else {
            eprintln!("  added {handle} ({fingerprint}) at revision {revision}");
        }
    }
    for handle in &change.removed {
        eprintln!("  removed {handle} at revision {revision}");
    }
    for (handle, fingerprint) in &change.keyed {
        eprintln!("  {handle} joined with key {fingerprint}");
    }
    print_first_seen(&change.first_seen, room);
}

/// Keys this device sees for the first time.
fn print_first_seen(keys: &[(saferchat_consensus::Handle, String)], room: &RoomId) {
    for (handle, fingerprint) in keys {
        eprintln!(
            "!! new key: {handle} ({fingerprint}); compare it with its owner (saferchat verify {room})"
        );
    }
}

/// How far the sender's signed clock may be from the server's before
/// both times are shown.
const CLOCK_SKEW_SHOWN_MS: i64 = 60_000;

/// The time a message is shown at: the sender's own, signed time (v1.1),
/// with the server's unsigned one beside it when they differ by more than
/// a minute; the server's time for v1, marked as such.
fn shown_time(server_ms: i64, chain: Option<&saferchat_envelope::Chain>) -> String {
    match chain {
        Some(c) => {
            let sent = i64::try_from(c.sent_at_ms).unwrap_or(i64::MAX);
            if (sent - server_ms).abs() > CLOCK_SKEW_SHOWN_MS {
                format!("{} (server: {})", time(sent), time(server_ms))
            } else {
                time(sent)
            }
        }
        None => format!("{} (server time)", time(server_ms)),
    }
}

fn print_message(m: &Message, me: &Identity, ids: bool) {
    let prefix = if ids {
        format!("{} ", id_text(&m.id))
    } else {
        String::new()
    };
    match &m.content {
        Ok(plain) => {
            let who = if plain.sender == me.handle() {
                format!("{} (you)", short(&plain.sender))
            } else {
                short(&plain.sender)
            };
            println!(
                "{prefix}{} {who}: {}",
                shown_time(m.time_ms, plain.chain.as_ref()),
                String::from_utf8_lossy(&plain.body)
            );
            for warning in &m.warnings {
                println!("{prefix}  !! {warning}");
            }
        }
        Err(e) => println!(
            "{prefix}{} !! message {} not shown: {e}",
            time(m.time_ms),
            id_text(&m.id)
        ),
    }
}

fn admin_token(token: Option<String>, file: Option<PathBuf>) -> anyhow::Result<String> {
    if let Some(t) = token {
        return Ok(t);
    }
    if let Some(path) = file {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        return Ok(text.trim().to_owned());
    }
    bail!("no admin token: pass --token, --token-file, or set SAFERCHAT_ADMIN_TOKEN")
}

fn parse_pin(text: &str) -> Result<CertificateFingerprint, String> {
    text.parse().map_err(|e| format!("{e}"))
}

/// The certificates `https://` addresses accept, from `--tls-ca` or
/// `--tls-pin`; neither: the public web CAs.
fn set_trust(cli: &Cli) -> anyhow::Result<()> {
    let trust = if let Some(path) = &cli.tls_ca {
        let pem =
            std::fs::read(path).with_context(|| format!("reading the CA {}", path.display()))?;
        if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
            bail!("{}: no PEM certificate in it", path.display());
        }
        Trust::Ca(pem)
    } else if !cli.tls_pin.is_empty() {
        Trust::Pinned(cli.tls_pin.clone())
    } else {
        return Ok(());
    };
    saferchat_client::connect::set_trust(trust)?;
    Ok(())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    set_trust(&cli)?;
    match &cli.command {
        Command::Keygen {
            force,
            no_passphrase,
        } => {
            let path = cli.key.clone().unwrap_or_else(default_key_path);
            if path.exists() && !*force {
                bail!(
                    "{} already exists (pass --force to replace it)",
                    path.display()
                );
            }
            let passphrase = passphrase_to_write(PASSPHRASE_ENV, *no_passphrase)?;
            eprintln!("generating an RSA-2048 key…");
            let id = Identity::generate()?;
            id.save_as(&path, *force, protection(passphrase.as_ref()))?;
            println!("key:         {}", path.display());
            println!("handle:      {}", id.handle());
            println!("fingerprint: {}", id.fingerprint());
            eprintln!("give your handle to a room admin; keep the key file private");
        }
        Command::SetPassphrase { no_passphrase } => {
            let path = cli.key.clone().unwrap_or_else(default_key_path);
            let (id, _) = Identity::load_with(&path, || passphrase_to_read(&path))?;
            let passphrase = passphrase_to_write(NEW_PASSPHRASE_ENV, *no_passphrase)?;
            id.save_as(&path, true, protection(passphrase.as_ref()))?;
            if passphrase.is_some() {
                println!("{}: encrypted under the new passphrase", path.display());
            } else {
                println!("{}: stored unencrypted", path.display());
            }
        }
        Command::Whoami => {
            let id = identity(&cli)?;
            println!("handle:      {}", id.handle());
            println!("fingerprint: {}", id.fingerprint());
        }
        Command::Send {
            room: name,
            message,
            durability,
        } => {
            let room = room(name)?;
            let body = if message.is_empty() {
                if std::io::stdin().is_terminal() {
                    eprintln!("reading the message from standard input (end with Ctrl-D)");
                }
                let mut text = String::new();
                std::io::stdin().read_to_string(&mut text)?;
                text.trim_end_matches('\n').to_owned()
            } else {
                message.join(" ")
            };
            // Refuse what cannot be sent before joining (a join registers the
            // key, which is a membership change).
            if body.is_empty() {
                bail!("message is empty");
            }
            if body.len() > saferchat_envelope::PLAINTEXT_BYTES_MAX {
                bail!(
                    "message is {} bytes; the limit is {}",
                    body.len(),
                    saferchat_envelope::PLAINTEXT_BYTES_MAX
                );
            }
            let id = identity(&cli)?;
            let mut session = join_once(&cli, &room, id).await?;
            session.set_durability(match durability {
                DurabilityArg::Local => saferchat_proto::chat::Durability::Local,
                DurabilityArg::CrossDatacenter => {
                    saferchat_proto::chat::Durability::CrossDatacenter
                }
            });
            let seq = session.post(body.as_bytes()).await?;
            loop {
                match session.next().await? {
                    Some(Event::Accepted {
                        seq: s,
                        id,
                        time_ms,
                        room_seq,
                    }) if s == seq => {
                        println!("sent {} (#{room_seq}) at {}", id_text(&id), time(time_ms));
                        return Ok(());
                    }
                    Some(Event::Rejected {
                        seq: s,
                        code,
                        message,
                    }) if s == seq => {
                        bail!(
                            "the server refused the message ({}): {message}",
                            saferchat_client::error::code_name(code)
                        );
                    }
                    Some(_) => {}
                    None => bail!("the server closed the session before acknowledging"),
                }
            }
        }
        Command::Chat { room: name, recent } => chat(&cli, room(name)?, *recent).await?,
        Command::History {
            room: name,
            limit,
            before,
            after,
            ids,
        } => {
            let room = room(name)?;
            let id = identity(&cli)?;
            let mut session = join_once(&cli, &room, Arc::clone(&id)).await?;
            let parse = |s: &Option<String>| -> anyhow::Result<Option<Bytes>> {
                s.as_deref()
                    .map(|t| uuid::Uuid::parse_str(t).map(|u| Bytes::copy_from_slice(u.as_bytes())))
                    .transpose()
                    .context("message ids look like 019abcde-…")
            };
            let query = Query {
                before_id: parse(before)?,
                after_id: parse(after)?,
                // A typed id is a bound: whatever the room holds after it.
                after_seq: 0,
                limit: *limit,
            };
            let mut messages = history::read(&session, &query).await?;
            if query.after_id.is_none() {
                messages.reverse();
            }
            session.judge(&mut messages, false)?;
            for m in &messages {
                print_message(m, &id, *ids);
            }
        }
        Command::Members { room: name } => {
            let room = room(name)?;
            let id = identity(&cli)?;
            let session = join_once(&cli, &room, id).await?;
            let members = session.members();
            println!("room {room} at revision {}", members.revision);
            for (handle, fingerprint) in &members.all {
                let shown = if fingerprint.is_empty() {
                    "(has not joined yet)"
                } else {
                    fingerprint.as_str()
                };
                println!("  {handle}  {shown}");
            }
        }
        Command::Verify { room: name } => {
            let room = room(name)?;
            let id = identity(&cli)?;
            let mut session = join_once(&cli, &room, Arc::clone(&id)).await?;
            print_first_seen(&session.take_first_seen(), &room);
            let members = session.members();
            println!("room {room} at revision {}", members.revision);
            println!(
                "room fingerprint: {}",
                verify::room_fingerprint(&room, members.revision, &members.recipients)
            );
            println!(
                "  (the same digits for another member at revision {}: you were both shown the same members and keys)",
                members.revision
            );
            println!("safety numbers (compare each with that person, in person or on a call):");
            let me = (&id.handle(), id.public_der().as_ref());
            for r in &members.recipients {
                if r.handle == id.handle() {
                    continue;
                }
                println!(
                    "  {}  {}",
                    r.handle,
                    saferchat_vocabulary::fingerprint_of(&r.der)
                );
                println!(
                    "    {}",
                    verify::safety_number(me, (&r.handle, r.der.as_ref()))
                );
            }
            for (handle, fingerprint) in &members.all {
                if fingerprint.is_empty() {
                    println!("  {handle}  (has not joined yet: no key to verify)");
                }
            }
        }
        Command::Cluster { auth, command } => {
            let token = admin_token(auth.token.clone(), auth.token_file.clone())?;
            let mut admin = Admin::connect(&cli.server, &token).await?;
            match command {
                ClusterCommand::Status => {
                    print!("{}", show_cluster_status(&admin.cluster_status().await?));
                }
                ClusterCommand::AddNode {
                    id,
                    datacenter,
                    peer_address,
                    client_address,
                } => {
                    let r = admin
                        .add_node(saferchat_proto::admin::AddNodeRequest {
                            id: *id,
                            datacenter: datacenter.clone(),
                            peer_address: peer_address.clone(),
                            client_address: client_address.clone(),
                        })
                        .await?;
                    println!(
                        "added node {id} as joining (cluster map epoch {}); start it with --join",
                        r.epoch
                    );
                }
                ClusterCommand::RemoveNode { id } => {
                    let r = admin.remove_node(*id).await?;
                    println!("removed node {id} (cluster map epoch {})", r.epoch);
                }
                ClusterCommand::Rebalance => {
                    let r = admin.rebalance().await?;
                    println!(
                        "rebalancing (cluster map epoch {}): partitions move to the joined nodes; `saferchat cluster status` shows how many still move",
                        r.epoch
                    );
                }
                ClusterCommand::Drain { id } => {
                    let r = admin.drain(*id).await?;
                    println!(
                        "draining node {id} (cluster map epoch {}): remove it with `saferchat cluster remove-node {id}` once it holds no partition",
                        r.epoch
                    );
                }
                ClusterCommand::MoveHomes {
                    from,
                    to,
                    partition,
                } => {
                    let from = from.clone().unwrap_or_default();
                    let r = admin.move_homes(&from, to, partition.clone()).await?;
                    println!(
                        "moved the home of {} partition(s) to {to} (cluster map epoch {}); each serves again once a leader in {to} is elected by a majority of every other datacenter",
                        r.moved.len(),
                        r.epoch
                    );
                    for refused in &r.refused {
                        println!("not moved: {refused}");
                    }
                }
            }
        }
        Command::Admin { auth, command } => {
            let token = admin_token(auth.token.clone(), auth.token_file.clone())?;
            let mut admin = Admin::connect(&cli.server, &token).await?;
            match command {
                AdminCommand::CreateChat { room: name } => {
                    let r = admin.create_chat(room(name)?.as_str()).await?;
                    println!("created room {} (revision {})", r.chat, r.revision);
                }
                AdminCommand::AddUser {
                    room: name,
                    user,
                    expect_revision,
                } => {
                    let r = admin
                        .add_user(room(name)?.as_str(), user, *expect_revision)
                        .await?;
                    let what = if r.changed {
                        "added"
                    } else {
                        "already a member:"
                    };
                    println!("{what} {user} in {} (revision {})", r.chat, r.revision);
                }
                AdminCommand::RemoveUser {
                    room: name,
                    user,
                    expect_revision,
                } => {
                    let r = admin
                        .remove_user(room(name)?.as_str(), user, *expect_revision)
                        .await?;
                    println!("removed {user} from {} (revision {})", r.chat, r.revision);
                }
                AdminCommand::Members { room: name } => {
                    let r = admin.members(room(name)?.as_str()).await?;
                    let m = r.membership.unwrap_or_default();
                    println!(
                        "room {} at revision {} (read via {})",
                        m.chat, m.revision, r.read_path
                    );
                    println!(
                        "lease holders: {}",
                        if r.lease_holders.is_empty() {
                            "none".into()
                        } else {
                            r.lease_holders.join(", ")
                        }
                    );
                    for member in m.members {
                        let shown = if member.fingerprint.is_empty() {
                            "(has not joined yet)".to_owned()
                        } else {
                            member.fingerprint
                        };
                        println!("  {}  {shown}", member.user);
                    }
                }
                AdminCommand::List => {
                    let rooms = admin.list_chats().await?;
                    if rooms.is_empty() {
                        println!("no rooms");
                    }
                    for r in rooms {
                        println!("{}  revision {}  {} members", r.chat, r.revision, r.members);
                    }
                }
            }
        }
    }
    Ok(())
}

async fn chat(cli: &Cli, room: RoomId, recent: u32) -> anyhow::Result<()> {
    let id = identity(cli)?;
    let options = JoinOptions {
        recent,
        state_beside: Some(key_path(cli)),
        ..JoinOptions::default()
    };
    let mut session = Session::join(&cli.server, &room, Arc::clone(&id), &options).await?;
    eprintln!(
        "joined {room} as {} ({} members with keys, revision {}); type a line to send, Ctrl-D to leave",
        short(&id.handle()),
        session.members().recipients.len(),
        session.members().revision
    );
    print_first_seen(&session.take_first_seen(), &room);
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut stdin_open = true;
    let mut unacknowledged = 0usize;
    // Accepted posts whose echo has not come back yet: leaving before the
    // echo would hide from the user that the room has the message.
    let mut echoes: std::collections::HashSet<Bytes> = std::collections::HashSet::new();
    // Own posts whose echo came before their acknowledgement (in a
    // cluster the two travel separately).
    let mut echoed_early: std::collections::HashSet<Bytes> = std::collections::HashSet::new();
    loop {
        if !stdin_open && unacknowledged == 0 && echoes.is_empty() {
            return Ok(());
        }
        tokio::select! {
            line = lines.next_line(), if stdin_open => match line? {
                Some(line) if line.trim().is_empty() => {}
                Some(line) => match session.post(line.as_bytes()).await {
                    Ok(_) => unacknowledged += 1,
                    Err(e) => eprintln!("not sent: {e}"),
                },
                None => stdin_open = false,
            },
            event = session.next() => match event? {
                Some(Event::Message(m)) => {
                    let mine = m.content.as_ref().is_ok_and(|p| p.sender == id.handle());
                    if !echoes.remove(&m.id) && mine {
                        echoed_early.insert(m.id.clone());
                    }
                    print_message(&m, &id, false);
                }
                Some(Event::Accepted { id, .. }) => {
                    unacknowledged = unacknowledged.saturating_sub(1);
                    if !echoed_early.remove(&id) {
                        echoes.insert(id);
                    }
                }
                Some(Event::Rejected { code, message, .. }) => {
                    unacknowledged = unacknowledged.saturating_sub(1);
                    eprintln!("not sent ({}): {message}", saferchat_client::error::code_name(code));
                }
                Some(Event::Membership(change)) => print_change(&change, &room),
                None => bail!("the server closed the session"),
            },
        }
    }
}

/// Whether a failed call over plaintext may have reached a TLS listener:
/// the listener drops the connection at the first bytes, which gRPC
/// reports (depending on timing) as cancelled, unknown, unavailable or
/// internal ("h2 protocol error", "transport error").
fn may_be_tls(error: &anyhow::Error, server: &str) -> bool {
    if server.starts_with("https://") {
        return false;
    }
    match error.downcast_ref::<ClientError>() {
        // Refused: nothing listens there at all.
        Some(ClientError::Connect { reason, .. }) => !reason.contains("refused"),
        Some(ClientError::Status(s)) => matches!(
            s.code(),
            tonic::Code::Cancelled
                | tonic::Code::Unknown
                | tonic::Code::Unavailable
                | tonic::Code::Internal
        ),
        _ => false,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("saferchat: {e}");
            return ExitCode::FAILURE;
        }
    };
    let server = cli.server.clone();
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("saferchat: {e:#}");
            if may_be_tls(&e, &server) {
                eprintln!(
                    "saferchat: if that node serves TLS, use https://{server} (with --tls-pin or --tls-ca)"
                );
            }
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A handle is base64url: one in 64 starts with `-`, and it is still
    /// a handle, not an unknown option.
    #[test]
    fn a_handle_starting_with_a_dash_is_a_handle() {
        let handle = "-6dPdjEn6fBDTFff3tGPQTu09Y5uAiTfe-2Zicyula0";
        for verb in ["add-user", "remove-user"] {
            let cli = Cli::try_parse_from(["saferchat", "admin", verb, "room", handle])
                .unwrap_or_else(|e| panic!("{verb}: {e}"));
            let Command::Admin { command, .. } = cli.command else {
                panic!("{verb}: not an admin command");
            };
            let user = match command {
                AdminCommand::AddUser { user, .. } | AdminCommand::RemoveUser { user, .. } => user,
                _ => panic!("{verb}: another command"),
            };
            assert_eq!(user, handle);
        }
    }
}
