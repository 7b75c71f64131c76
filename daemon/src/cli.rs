//! The `meshd` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use meshd_config::{Config, ConfigError, Environment, Overrides};
use meshd_protocol::invite::Role;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::admin;

/// meshd — a claudemesh broker you run yourself.
///
/// Serves claudemesh clients (the CLI/MCP server and @claudemesh/sdk) over WebSocket at
/// /ws, enrolls them with signed invites (POST /join), stores every acknowledged direct
/// message durably (SQLite by default, PostgreSQL on request), and reports /health and
/// /metrics. The admin commands below work while the daemon runs.
///
/// Configuration: a TOML file (--config or MESHD_CONFIG), MESHD_<SECTION>_<KEY>
/// environment variables, and the flags below, highest first: flags, environment, file.
#[derive(Debug, Parser)]
#[command(name = "meshd", version, about, long_about, propagate_version = true)]
pub struct Cli {
    /// Configuration file (TOML). Unknown keys are errors.
    #[arg(long, global = true, env = "MESHD_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Data directory (database, mesh owner keys). Default: $STATE_DIRECTORY, else
    /// $XDG_DATA_HOME/meshd, else ~/.local/share/meshd.
    #[arg(long, global = true, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Database URL: sqlite://PATH or postgres://USER:PASSWORD@HOST/DB.
    #[arg(long, global = true, value_name = "URL", hide_env_values = true)]
    database_url: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the broker (foreground; systemd-ready with Type=notify).
    Serve {
        /// Listen address for HTTP and WebSocket, e.g. 0.0.0.0:7900.
        #[arg(long, value_name = "ADDR")]
        listen: Option<String>,
        /// Public WebSocket URL clients use (written into invites), e.g. wss://mesh.example.com/ws.
        #[arg(long, value_name = "URL")]
        public_url: Option<String>,
    },
    /// Create and list meshes.
    #[command(subcommand)]
    Mesh(MeshCmd),
    /// Create invites (claudemesh invite v1) that enroll clients with this broker.
    #[command(subcommand)]
    Invite(InviteCmd),
    /// List and revoke members.
    #[command(subcommand)]
    Member(MemberCmd),
    /// Bridges between two meshes of this broker: tagged messages relayed, peers listed.
    #[command(subcommand)]
    Bridge(BridgeCmd),
    /// API keys for the REST API (`/api/v1`) and the external WebSocket.
    #[command(subcommand)]
    Apikey(ApikeyCmd),
    /// Org CA and broker certificates for federation.
    #[command(subcommand)]
    Certs(CertsCmd),
    /// Links to peer brokers.
    #[command(subcommand)]
    Federation(FederationCmd),
    /// The signed audit log.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// What each member of a mesh, and the mesh, keeps stored, against the quotas.
    Usage {
        /// Mesh slug.
        #[arg(long, value_name = "SLUG")]
        mesh: String,
        #[command(flatten)]
        out: Output,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCmd {
    /// Verify a mesh's audit chain offline (hashes, links and the broker's signatures);
    /// exits 1 and names the first bad entry if it does not check out.
    Verify {
        /// Mesh slug.
        #[arg(long, value_name = "SLUG")]
        mesh: String,
        #[command(flatten)]
        out: Output,
    },
}

#[derive(Debug, Subcommand)]
enum CertsCmd {
    /// Create the org CA (or reuse the one in DIR) and issue this broker's certificate
    /// with NAME as its DNS name.
    Init {
        /// The organization's DNS name, e.g. acme.example.
        #[arg(long, value_name = "ORG")]
        org: String,
        /// This broker's DNS name, e.g. mesh.acme.example.
        #[arg(long, value_name = "NAME")]
        broker: String,
        /// Where the CA and certificates live (default: <data_dir>/certs).
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        #[command(flatten)]
        out: Output,
    },
    /// Print the org CA (PEM) and its SHA-256 fingerprint, for peers to trust or pin.
    Bundle {
        /// CA file (default: federation.ca, else <data_dir>/certs/ca.pem).
        #[arg(long, value_name = "FILE")]
        ca: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum FederationCmd {
    /// Show each link of the running daemon (state, RTT, queued, counters, last error).
    Status {
        /// The daemon's HTTP address (default: server.listen).
        #[arg(long, value_name = "ADDR")]
        addr: Option<String>,
        #[command(flatten)]
        out: Output,
    },
}

#[derive(Debug, Subcommand)]
enum MeshCmd {
    /// Create a mesh and its owner key (stored readable by this user only).
    Create {
        /// Human-readable name.
        name: String,
        /// Short unique name used by the other commands (default: derived from NAME).
        #[arg(long)]
        slug: Option<String>,
        /// Start from a template (see `meshd mesh templates`): its state keys are
        /// created and its groups and roles recorded.
        #[arg(long, value_name = "TEMPLATE")]
        template: Option<String>,
        #[command(flatten)]
        out: Output,
    },
    /// The templates `mesh create --template` accepts.
    Templates {
        #[command(flatten)]
        out: Output,
    },
    /// List meshes.
    List {
        #[command(flatten)]
        out: Output,
    },
    /// Share a mesh this broker is home of with a peer broker (it must accept).
    Share {
        /// Mesh slug.
        slug: String,
        /// Peer broker name (one of [[federation.peers]]).
        #[arg(long = "with", value_name = "BROKER")]
        with: String,
        #[command(flatten)]
        out: Output,
    },
    /// Accept a peer broker's shared mesh: this broker hosts a replica with its own invites.
    Accept {
        /// The mesh id (from the home broker's `meshd mesh list`).
        mesh_id: String,
        /// The home broker's name.
        #[arg(long = "from", value_name = "BROKER")]
        from: String,
        /// Wait this long (e.g. `30s`) for the replica to exist: it is created by the
        /// running daemon when the home broker's offer arrives over the link. Without
        /// it the command returns at once, with `slug` null until then.
        #[arg(long, value_name = "DURATION")]
        wait: Option<String>,
        #[command(flatten)]
        out: Output,
    },
    /// Link policies: what of a shared mesh may leave for (export) or enter from
    /// (import) a peer broker. Applied by the running daemon within a second.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Withdraw this broker's consent to exchange a mesh with a peer broker.
    Unshare {
        /// Mesh slug or id.
        mesh: String,
        /// Peer broker name.
        #[arg(long = "with", value_name = "BROKER")]
        with: String,
        #[command(flatten)]
        out: Output,
    },
}

#[derive(Debug, Subcommand)]
enum InviteCmd {
    /// Create a signed invite; give its url to `claudemesh join`.
    Create {
        /// Mesh slug.
        #[arg(long, value_name = "SLUG")]
        mesh: String,
        /// Role granted to whoever enrolls with it.
        #[arg(long, value_enum, default_value_t = RoleArg::Member)]
        role: RoleArg,
        /// How many clients may enroll with it.
        #[arg(long, default_value_t = 1, value_name = "N")]
        max_uses: i64,
        /// Lifetime, e.g. 30m, 12h, 7d.
        #[arg(long, default_value = "7d", value_name = "DURATION")]
        ttl: String,
        /// Broker URL to pin in the invite (default: the configured server.public_url).
        #[arg(long, value_name = "URL")]
        public_url: Option<String>,
        #[command(flatten)]
        out: Output,
    },
}

#[derive(Debug, Subcommand)]
enum MemberCmd {
    /// List the members of a mesh (revoked ones included).
    List {
        /// Mesh slug.
        #[arg(long, value_name = "SLUG")]
        mesh: String,
        #[command(flatten)]
        out: Output,
    },
    /// Link a member to a named person: the REST API's `/me` views of any of the
    /// person's members span all of them (members enrolled with the same key are
    /// linked already).
    Link {
        /// Mesh slug.
        #[arg(long, value_name = "SLUG")]
        mesh: String,
        /// Member id, key or display name.
        member: String,
        /// The person's name (any text; the same name links members).
        #[arg(long, value_name = "NAME")]
        person: String,
        #[command(flatten)]
        out: Output,
    },
    /// Revoke a member: its connections are closed and it can no longer connect.
    Revoke {
        /// Mesh slug.
        #[arg(long, value_name = "SLUG")]
        mesh: String,
        /// Member id or public key.
        member: String,
        #[command(flatten)]
        out: Output,
    },
}

#[derive(Debug, Subcommand)]
enum ApikeyCmd {
    /// Mint a key; its secret is printed this once.
    Create {
        /// Mesh slug.
        #[arg(long, value_name = "SLUG")]
        mesh: String,
        /// Free text.
        #[arg(long)]
        label: String,
        /// Capabilities: send, read, state_write, admin.
        #[arg(long = "cap", value_delimiter = ',', default_value = "send,read")]
        caps: Vec<String>,
        /// Limit the key to these topics (names; default: every topic).
        #[arg(long = "topic", value_delimiter = ',', value_name = "TOPICS")]
        topics: Option<Vec<String>>,
        /// Expiry: an ISO 8601 time or a duration from now (e.g. `24h`).
        #[arg(long, value_name = "WHEN")]
        expires: Option<String>,
        /// The member the key acts as (id, key or display name). Without it the key
        /// belongs to no member, and routes that need one (`/me`, posting as a
        /// member) refuse it.
        #[arg(long, value_name = "MEMBER")]
        member: Option<String>,
        #[command(flatten)]
        out: Output,
    },
    /// List a mesh's keys (never their secrets).
    List {
        /// Mesh slug.
        #[arg(long, value_name = "SLUG")]
        mesh: String,
        #[command(flatten)]
        out: Output,
    },
    /// Revoke a key by id or unique id prefix: refused at once.
    Revoke {
        /// Mesh slug.
        #[arg(long, value_name = "SLUG")]
        mesh: String,
        /// Key id or prefix.
        id: String,
        #[command(flatten)]
        out: Output,
    },
}

async fn apikey(config: Config, cmd: ApikeyCmd) -> anyhow::Result<()> {
    let db = admin::open(&config).await?;
    let r = async {
        match cmd {
            ApikeyCmd::Create {
                mesh,
                label,
                caps,
                topics,
                expires,
                member,
                out,
            } => {
                let mut body = serde_json::json!({"label": label, "capabilities": caps});
                if let Some(t) = topics {
                    body["topicScopes"] = t.into();
                }
                if let Some(e) = expires {
                    let iso = match meshd_config::parse_duration(&e) {
                        Ok(d) => meshd_protocol::time::iso8601_ms(
                            crate::time::now_ms()
                                .saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
                        ),
                        Err(_) => e,
                    };
                    body["expiresAt"] = iso.into();
                }
                let meshd_protocol::apikeys::Request::Create(create) =
                    meshd_protocol::apikeys::decode("apikey_create", &body.to_string())?
                else {
                    anyhow::bail!("not a key request");
                };
                let k = admin::create_api_key(&db, &mesh, &create, member.as_deref()).await?;
                print(out.json, &k, |k| {
                    format!(
                        "api key {} ({}) for {}\n{}\nshown once: store it now",
                        k.key.id,
                        k.key.label,
                        k.member_id.as_deref().unwrap_or("no member"),
                        k.secret
                    )
                })
            }
            ApikeyCmd::List { mesh, out } => {
                #[derive(Serialize)]
                struct List {
                    keys: Vec<meshd_protocol::apikeys::KeyInfo>,
                }
                let list = List {
                    keys: admin::list_api_keys(&db, &mesh).await?,
                };
                print(out.json, &list, |l| {
                    if l.keys.is_empty() {
                        return "no api keys".to_owned();
                    }
                    l.keys
                        .iter()
                        .map(|k| {
                            let caps: Vec<&str> =
                                k.capabilities.iter().map(|c| c.as_str()).collect();
                            format!(
                                "{}  {}  {}  caps={}{}{}",
                                k.id,
                                k.prefix,
                                k.label,
                                caps.join(","),
                                k.topic_scopes
                                    .as_ref()
                                    .map_or(String::new(), |t| format!("  topics={}", t.join(","))),
                                if k.revoked_at.is_some() {
                                    "  revoked"
                                } else {
                                    ""
                                }
                            )
                        })
                        .collect::<Vec<_>>()
                        .join("\n")
                })
            }
            ApikeyCmd::Revoke { mesh, id, out } => {
                let id = admin::revoke_api_key(&db, &mesh, &id).await?;
                print(out.json, &serde_json::json!({"revoked": id}), |_| {
                    format!("api key {id} revoked")
                })
            }
        }
    }
    .await;
    db.close().await;
    r
}

#[derive(Debug, Subcommand)]
enum BridgeCmd {
    /// Join two meshes (slugs or ids). Applied by the running daemon within a second.
    Create {
        /// First mesh.
        a: String,
        /// Second mesh.
        b: String,
        /// Tag prefixes a message must carry one of to be relayed (plain prefixes).
        #[arg(long, value_delimiter = ',', required = true, value_name = "PREFIXES")]
        tags: Vec<String>,
        /// Which way tagged messages are relayed: a-to-b, b-to-a or both.
        #[arg(long, default_value = "both")]
        direction: String,
        /// List each mesh's peers in the other and let them send each other DMs.
        #[arg(long)]
        peers: bool,
        /// B is a mesh id of this peer broker (whose admin creates the mirror bridge).
        #[arg(long, value_name = "BROKER")]
        broker: Option<String>,
        #[command(flatten)]
        out: Output,
    },
    /// List bridges.
    List {
        #[command(flatten)]
        out: Output,
    },
    /// Remove a bridge.
    Delete {
        /// Bridge id (from `meshd bridge list`).
        id: String,
        #[command(flatten)]
        out: Output,
    },
}

async fn bridge(config: Config, cmd: BridgeCmd) -> anyhow::Result<()> {
    let db = admin::open(&config).await?;
    let line = |b: &admin::BridgeRow| {
        format!(
            "{}  {} {} {}{}  tags={}{}",
            b.id,
            b.mesh_a,
            match b.direction.as_str() {
                "a-to-b" => "->",
                "b-to-a" => "<-",
                _ => "<->",
            },
            b.mesh_b,
            b.broker_b
                .as_ref()
                .map_or(String::new(), |x| format!("@{x}")),
            b.tags.replace(' ', ","),
            if b.peers { "  peers" } else { "" }
        )
    };
    let r = match cmd {
        BridgeCmd::Create {
            a,
            b,
            tags,
            direction,
            peers,
            broker,
            out,
        } => {
            let d = admin::BridgeDirection::parse(&direction).ok_or_else(|| {
                anyhow::anyhow!("--direction {direction:?}: use a-to-b, b-to-a or both")
            })?;
            let row = match broker {
                Some(broker) => {
                    admin::create_remote_bridge(&db, &config, &a, &b, &broker, d, &tags, peers)
                        .await?
                }
                None => admin::create_bridge(&db, &a, &b, d, &tags, peers).await?,
            };
            print(out.json, &row, line)
        }
        BridgeCmd::List { out } => {
            #[derive(Serialize)]
            struct List {
                bridges: Vec<admin::BridgeRow>,
            }
            let bridges = admin::list_bridges(&db).await?;
            print(out.json, &List { bridges }, |l| {
                if l.bridges.is_empty() {
                    "no bridges".to_owned()
                } else {
                    l.bridges.iter().map(line).collect::<Vec<_>>().join("\n")
                }
            })
        }
        BridgeCmd::Delete { id, out } => {
            #[derive(Serialize)]
            struct Deleted {
                removed: bool,
            }
            let removed = admin::delete_bridge(&db, &id).await?;
            print(out.json, &Deleted { removed }, |d| {
                if d.removed {
                    format!("bridge {id} removed")
                } else {
                    format!("no bridge {id}")
                }
            })
        }
    };
    db.close().await;
    r
}

#[derive(Debug, Subcommand)]
enum PolicyCmd {
    /// Show a mesh's policies (every peer broker, or one). No rules: everything passes.
    Show {
        /// Mesh slug or id.
        mesh: String,
        /// Only this peer broker.
        #[arg(long, value_name = "BROKER")]
        broker: Option<String>,
        #[command(flatten)]
        out: Output,
    },
    /// Set one direction's rules for a mesh and a peer broker, replacing what was
    /// there. An option left out lets everything of its sort through.
    Set {
        /// Mesh slug or id.
        mesh: String,
        /// Peer broker (one of [[federation.peers]]).
        #[arg(long, value_name = "BROKER")]
        broker: String,
        /// `export` (what this broker sends it) or `import` (what it takes from it).
        #[arg(long, value_enum)]
        direction: DirectionArg,
        /// Message kinds that pass: dm, broadcast, group, tagged (or `none`).
        #[arg(long, value_delimiter = ',', value_name = "KINDS")]
        kinds: Option<Vec<String>>,
        /// Tag prefixes every tag of a message must match (plain prefixes: `ops`
        /// admits `ops/db` and `opsec`; `ops/` only the `ops/…` family).
        #[arg(long, value_delimiter = ',', value_name = "PREFIXES")]
        allow_tags: Option<Vec<String>>,
        /// Tag prefixes no tag of a message may match (checked before the allow list).
        #[arg(long, value_delimiter = ',', value_name = "PREFIXES")]
        deny_tags: Vec<String>,
        /// Presence fields that pass (or `none`): status, summary, groups, tags, cwd,
        /// hostname, profile, stats, peer_type, channel, model, session_id, position. The key,
        /// member and display name always pass.
        #[arg(long, value_delimiter = ',', value_name = "FIELDS")]
        presence_fields: Option<Vec<String>>,
        #[command(flatten)]
        out: Output,
    },
    /// Remove rules (both directions unless --direction): everything passes again.
    Reset {
        /// Mesh slug or id.
        mesh: String,
        /// Peer broker.
        #[arg(long, value_name = "BROKER")]
        broker: String,
        /// Only this direction.
        #[arg(long, value_enum)]
        direction: Option<DirectionArg>,
        #[command(flatten)]
        out: Output,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum DirectionArg {
    Export,
    Import,
}

impl From<DirectionArg> for admin::PolicyDirection {
    fn from(d: DirectionArg) -> Self {
        match d {
            DirectionArg::Export => Self::Export,
            DirectionArg::Import => Self::Import,
        }
    }
}

/// A comma list of names (`none`: the empty list), each parsed by `parse`.
fn names<T>(
    what: &str,
    list: Option<Vec<String>>,
    parse: impl Fn(&str) -> Option<T>,
) -> anyhow::Result<Option<Vec<T>>> {
    let Some(list) = list else { return Ok(None) };
    if list.len() == 1 && list[0] == "none" {
        return Ok(Some(Vec::new()));
    }
    list.iter()
        .map(|n| parse(n.trim()).ok_or_else(|| anyhow::anyhow!("unknown {what} {n:?}")))
        .collect::<anyhow::Result<Vec<T>>>()
        .map(Some)
}

/// One line per policy for `meshd mesh policy show`.
fn policy_text(p: &admin::PolicyInfo) -> String {
    let r = &p.rules;
    let list = |v: &[String]| v.join(",");
    let mut parts = vec![format!("{} {}", p.direction, p.broker)];
    if let Some(k) = &r.kinds {
        let k: Vec<&str> = k.iter().map(|k| k.as_str()).collect();
        parts.push(format!(
            "kinds={}",
            if k.is_empty() {
                "none".into()
            } else {
                k.join(",")
            }
        ));
    }
    if let Some(a) = &r.allow_tags {
        parts.push(format!("allow-tags={}", list(a)));
    }
    if !r.deny_tags.is_empty() {
        parts.push(format!("deny-tags={}", list(&r.deny_tags)));
    }
    if let Some(f) = &r.presence_fields {
        let f: Vec<&str> = f.iter().map(|f| f.as_str()).collect();
        parts.push(format!(
            "presence-fields={}",
            if f.is_empty() {
                "none".into()
            } else {
                f.join(",")
            }
        ));
    }
    if parts.len() == 1 {
        parts.push("(everything passes)".into());
    }
    parts.join("  ")
}

async fn policy(db: &crate::store::Db, config: &Config, cmd: PolicyCmd) -> anyhow::Result<()> {
    match cmd {
        PolicyCmd::Show { mesh, broker, out } => {
            #[derive(Serialize)]
            struct Shown {
                policies: Vec<admin::PolicyInfo>,
            }
            let policies = admin::show_policies(db, &mesh, broker.as_deref()).await?;
            print(out.json, &Shown { policies }, |s| {
                if s.policies.is_empty() {
                    format!("no link policies for {mesh}: everything passes")
                } else {
                    s.policies
                        .iter()
                        .map(policy_text)
                        .collect::<Vec<_>>()
                        .join("\n")
                }
            })
        }
        PolicyCmd::Set {
            mesh,
            broker,
            direction,
            kinds,
            allow_tags,
            deny_tags,
            presence_fields,
            out,
        } => {
            let rules = admin::PolicyRules {
                kinds: names("message kind", kinds, admin::MessageKind::parse)?,
                allow_tags,
                deny_tags,
                presence_fields: names(
                    "presence field",
                    presence_fields,
                    admin::PresenceField::parse,
                )?,
            };
            let p = admin::set_policy(db, config, &mesh, &broker, direction.into(), rules).await?;
            print(out.json, &p, policy_text)
        }
        PolicyCmd::Reset {
            mesh,
            broker,
            direction,
            out,
        } => {
            #[derive(Serialize)]
            struct Reset {
                removed: u64,
            }
            let removed =
                admin::reset_policy(db, &mesh, &broker, direction.map(Into::into)).await?;
            print(out.json, &Reset { removed }, |r| {
                format!(
                    "removed {} rule set(s); everything passes to and from {broker}",
                    r.removed
                )
            })
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum RoleArg {
    Member,
    Admin,
}

#[derive(Debug, Args)]
struct Output {
    /// Print one JSON object on stdout instead of text.
    #[arg(long)]
    json: bool,
}

/// Exit code for configuration errors (`EX_USAGE`).
const EX_USAGE: u8 = 64;

/// Parses the command line and runs it.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(run(cli));
    // Blocking work still running (file I/O of an abandoned request) must not hold the
    // exit beyond the stop's budget.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    code
}

async fn run(cli: Cli) -> ExitCode {
    let config = match load_config(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let result = match cli.command {
        Command::Serve { .. } => serve(config).await,
        Command::Mesh(cmd) => mesh(config, cmd).await,
        Command::Invite(cmd) => invite(config, cmd).await,
        Command::Member(cmd) => member(config, cmd).await,
        Command::Bridge(cmd) => bridge(config, cmd).await,
        Command::Apikey(cmd) => apikey(config, cmd).await,
        Command::Usage { mesh, out } => usage(config, &mesh, out.json).await,
        Command::Certs(cmd) => certs(&config, cmd),
        Command::Audit(AuditCmd::Verify { mesh, out }) => {
            match audit_verify(&config, &mesh, out.json).await {
                Ok(true) => Ok(()),
                Ok(false) => return ExitCode::FAILURE,
                Err(e) => Err(e),
            }
        }
        Command::Federation(FederationCmd::Status { addr, out }) => {
            federation_status(&config, addr, out.json).await
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load_config(cli: &Cli) -> anyhow::Result<Config> {
    let env = Environment::from_vars(std::env::vars());
    let (listen, public_url) = match &cli.command {
        Command::Serve { listen, public_url } => (listen.clone(), public_url.clone()),
        _ => (None, None),
    };
    let overrides = Overrides {
        data_dir: cli.data_dir.clone(),
        listen,
        public_url,
        database_url: cli.database_url.clone(),
    };
    let config = match &cli.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading config file {}", path.display()))?;
            Config::load(Some((&path.display().to_string(), &text)), &env, &overrides)
        }
        None => Config::load(None, &env, &overrides),
    };
    config.map_err(|e: ConfigError| anyhow::anyhow!(e))
}

async fn serve(config: Config) -> anyhow::Result<()> {
    crate::telemetry::init(&config.log);
    tracing::info!(data_dir = %config.data_dir.display(), backend = ?config.storage.backend, "starting meshd {}", env!("CARGO_PKG_VERSION"));
    let bound = crate::Daemon::bind(config).await?;
    let shutdown = CancellationToken::new();
    let signals = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        signals.cancel();
        // A second signal while stopping: the operator will not wait for the budget.
        wait_for_signal().await;
        tracing::warn!("second stop signal; exiting now");
        std::process::exit(1);
    });
    bound.run(shutdown).await?;
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn print<T: Serialize>(
    json: bool,
    value: &T,
    text: impl FnOnce(&T) -> String,
) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(value)?);
    } else {
        println!("{}", text(value));
    }
    Ok(())
}

async fn mesh(config: Config, cmd: MeshCmd) -> anyhow::Result<()> {
    let db = admin::open(&config).await?;
    let r = match cmd {
        MeshCmd::Templates { out } => {
            #[derive(Serialize)]
            struct List {
                templates: &'static [crate::templates::Template],
            }
            print(
                out.json,
                &List {
                    templates: crate::templates::TEMPLATES,
                },
                |l| {
                    l.templates
                        .iter()
                        .map(|t| {
                            format!(
                                "{:<14} {}\n{:<14} groups: {}; state: {}",
                                t.name,
                                t.description,
                                "",
                                t.groups
                                    .iter()
                                    .map(|g| format!("@{}", g.name))
                                    .collect::<Vec<_>>()
                                    .join(", "),
                                t.state_keys
                                    .iter()
                                    .map(|(k, _)| *k)
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            )
                        })
                        .collect::<Vec<_>>()
                        .join("\n")
                },
            )
        }
        MeshCmd::Create {
            name,
            slug,
            template,
            out,
        } => {
            let template = match template.as_deref() {
                None => None,
                Some(t) => Some(crate::templates::find(t).ok_or_else(|| {
                    anyhow::anyhow!(
                        "no template {t:?}; one of: {}",
                        crate::templates::TEMPLATES
                            .iter()
                            .map(|t| t.name)
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                })?),
            };
            let m = admin::create_mesh(&db, &config, &name, slug.as_deref()).await?;
            if let Some(t) = template {
                db.apply_template(
                    &m.mesh_id,
                    t.name,
                    &serde_json::to_string(t)?,
                    t.state_keys,
                    crate::time::now_ms(),
                )
                .await?;
            }
            print(out.json, &m, |m| {
                format!(
                    "created mesh {:?}\n  slug:         {}\n  mesh_id:      {}\n  owner_pubkey: {}\nnext: meshd invite create --mesh {}",
                    m.name, m.slug, m.mesh_id, m.owner_pubkey, m.slug
                )
            })
        }
        MeshCmd::List { out } => {
            #[derive(Serialize)]
            struct List {
                meshes: Vec<admin::MeshInfo>,
            }
            let list = List {
                meshes: admin::list_meshes(&db).await?,
            };
            print(out.json, &list, |l| {
                if l.meshes.is_empty() {
                    return "no meshes yet: meshd mesh create NAME".into();
                }
                let mut s = format!(
                    "{:<24} {:<32} {:>7}  {}",
                    "SLUG", "MESH ID", "MEMBERS", "NAME"
                );
                for m in &l.meshes {
                    s.push_str(&format!(
                        "\n{:<24} {:<32} {:>7}  {}",
                        m.slug, m.mesh_id, m.members, m.name
                    ));
                }
                s
            })
        }
        MeshCmd::Share { slug, with, out } => {
            let s = admin::share_mesh(&db, &config, &slug, &with).await?;
            print(out.json, &s, |s| {
                format!(
                    "shared {} ({}) with {}
next, on {}: meshd mesh accept {} --from {}",
                    s.slug.as_deref().unwrap_or(""),
                    s.mesh_id,
                    s.peer,
                    s.peer,
                    s.mesh_id,
                    config
                        .federation
                        .as_ref()
                        .map_or("THIS_BROKER", |f| f.broker.as_str())
                )
            })
        }
        MeshCmd::Accept {
            mesh_id,
            from,
            wait,
            out,
        } => {
            let wait = wait
                .map(|w| {
                    meshd_config::parse_duration(&w).map_err(|e| anyhow::anyhow!("--wait: {e}"))
                })
                .transpose()?;
            let mut s = admin::accept_mesh(&db, &config, &mesh_id, &from).await?;
            if let Some(wait) = wait {
                let deadline = crate::time::instant() + wait;
                while s.slug.is_none() && crate::time::instant() < deadline {
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    s.slug = db.mesh_by_id(&mesh_id).await?.map(|m| m.slug);
                }
                if s.slug.is_none() {
                    anyhow::bail!(
                        "accepted, but no replica within {}: is the daemon running and linked to {}? (`meshd federation status`)",
                        humantime_secs(wait),
                        s.peer
                    );
                }
            }
            print(out.json, &s, |s| match &s.slug {
                Some(slug) => format!(
                    "accepted mesh {} from {}: replica {slug}",
                    s.mesh_id, s.peer
                ),
                None => format!(
                    "accepted mesh {} from {}; the replica appears in `meshd mesh list` once {} is linked and its offer arrives (or use --wait 30s)",
                    s.mesh_id, s.peer, s.peer
                ),
            })
        }
        MeshCmd::Policy(cmd) => policy(&db, &config, cmd).await,
        MeshCmd::Unshare { mesh, with, out } => {
            #[derive(Serialize)]
            struct Unshared {
                removed: bool,
            }
            let removed = admin::unshare_mesh(&db, &mesh, &with).await?;
            print(out.json, &Unshared { removed }, |u| {
                if u.removed {
                    format!("{mesh} is no longer shared with {with}")
                } else {
                    format!("{mesh} was not shared with {with}")
                }
            })
        }
    };
    db.close().await;
    r
}

/// `meshd audit verify`: `Ok(false)` when the chain is broken (already reported).
async fn audit_verify(config: &Config, slug: &str, json: bool) -> anyhow::Result<bool> {
    let key = crate::features::audit::engine::load_key(&crate::features::audit::engine::key_path(
        &config.data_dir,
    ))?;
    let db = admin::open(config).await?;
    let mesh = db
        .mesh_by_slug(slug)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no mesh {slug:?}"))?;
    let rows = db.audit_rows(&mesh.id).await;
    db.close().await;
    let v = crate::features::audit::engine::verify_rows(&rows?, &key.verifying_key());
    print(json, &v, |v| match (v.broken_at, &v.reason) {
        (Some(at), Some(why)) => format!("BROKEN at entry {at} of {}: {why}", v.entries),
        _ => format!(
            "valid: {} entries, hashes, links and signatures check out",
            v.entries
        ),
    })?;
    Ok(v.valid)
}

fn certs(config: &Config, cmd: CertsCmd) -> anyhow::Result<()> {
    match cmd {
        CertsCmd::Init {
            org,
            broker,
            dir,
            out,
        } => {
            let dir = dir.unwrap_or_else(|| config.data_dir.join("certs"));
            let (ca, created) = meshd_certs::OrgCa::init_or_load(&dir, &org)?;
            let paths = ca.issue_broker(&broker, &dir)?;
            #[derive(Serialize)]
            #[serde(rename_all = "camelCase")]
            struct Init {
                org: String,
                broker: String,
                ca_created: bool,
                ca: String,
                cert: String,
                key: String,
                fingerprint: String,
            }
            let init = Init {
                org: ca.org().to_owned(),
                broker: broker.to_ascii_lowercase(),
                ca_created: created,
                ca: dir.join(meshd_certs::CA_CERT_FILE).display().to_string(),
                cert: paths.cert.display().to_string(),
                key: paths.key.display().to_string(),
                fingerprint: ca.fingerprint(),
            };
            print(out.json, &init, |i| {
                format!(
                    "{} org CA for {}: {}
  pin = \"sha256:{}\"
issued {}:
  cert {}
  key  {}

[federation]
broker = \"{}\"
cert = \"{}\"
key = \"{}\"
ca = \"{}\"

Give peers `meshd certs bundle` (or its fingerprint) to trust this org.",
                    if i.ca_created { "created" } else { "reused" },
                    i.org,
                    i.ca,
                    i.fingerprint,
                    i.broker,
                    i.cert,
                    i.key,
                    i.broker,
                    i.cert,
                    i.key,
                    i.ca
                )
            })
        }
        CertsCmd::Bundle { ca } => {
            let path = ca
                .or_else(|| config.federation.as_ref().map(|f| f.ca.clone()))
                .unwrap_or_else(|| {
                    config
                        .data_dir
                        .join("certs")
                        .join(meshd_certs::CA_CERT_FILE)
                });
            let bundle = meshd_certs::Bundle::from_ca_pem_file(&path)?;
            print!("{}", bundle.to_text());
            Ok(())
        }
    }
}

/// `GET /federation` from the running daemon (a plain HTTP/1.1 request: no client crate).
async fn federation_status(
    config: &Config,
    addr: Option<String>,
    json: bool,
) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let addr = match addr {
        Some(a) => a,
        None => {
            let mut a = config.server.listen;
            if a.ip().is_unspecified() {
                a.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            a.to_string()
        }
    };
    let mut stream = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tokio::net::TcpStream::connect(&addr),
    )
    .await
    .map_err(|_| anyhow::anyhow!("connecting to {addr}: timed out"))?
    .with_context(|| format!("connecting to the daemon at {addr}"))?;
    stream
        .write_all(
            format!("GET /federation HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
    let mut raw = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(5),
        stream.read_to_end(&mut raw),
    )
    .await
    .map_err(|_| anyhow::anyhow!("reading from {addr}: timed out"))??;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("malformed HTTP response from {addr}"))?;
    let status_ok = head.lines().next().is_some_and(|l| l.contains(" 200 "));
    let value: serde_json::Value = serde_json::from_str(body.trim())
        .with_context(|| format!("the daemon at {addr} did not answer JSON"))?;
    if !status_ok {
        anyhow::bail!(
            "{}",
            value["error"]
                .as_str()
                .unwrap_or("the daemon refused the request")
        );
    }
    if json {
        println!("{value}");
        return Ok(());
    }
    println!(
        "broker {} (QUIC {})",
        value["broker"].as_str().unwrap_or("?"),
        value["quic"].as_str().unwrap_or("-")
    );
    print!("{}", status_table(&value));
    Ok(())
}

/// The `federation status` table: one row per link, every column as wide as its widest
/// cell (numbers right-aligned), the last error and meshes after them.
fn status_table(value: &serde_json::Value) -> String {
    let num = |v: &serde_json::Value| v.as_u64().map_or_else(|| "-".to_owned(), |n| n.to_string());
    let head = [
        "PEER", "STATE", "RTT ms", "QUEUED", "SENT", "RECEIVED", "RESENT", "REFUSED", "HELD",
        "MESHES",
    ];
    let mut rows: Vec<Vec<String>> = vec![head.iter().map(|h| (*h).to_owned()).collect()];
    let mut errors = vec![String::from("LAST ERROR")];
    for l in value["links"].as_array().into_iter().flatten() {
        rows.push(vec![
            l["peer"].as_str().unwrap_or("?").to_owned(),
            l["state"].as_str().unwrap_or("?").to_owned(),
            l["rttMs"]
                .as_f64()
                .map_or_else(|| "-".into(), |r| format!("{r:.2}")),
            num(&l["queued"]),
            num(&l["sent"]),
            num(&l["received"]),
            num(&l["resent"]),
            num(&l["refused"]),
            num(&l["held"]),
            l["meshes"].as_array().map_or(0, Vec::len).to_string(),
        ]);
        errors.push(l["lastError"].as_str().unwrap_or("").to_owned());
    }
    let widths: Vec<usize> = (0..head.len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = format!(
        "broker {} (QUIC {})\n",
        value["broker"].as_str().unwrap_or("?"),
        value["quic"].as_str().unwrap_or("-")
    );
    for (row, error) in rows.iter().zip(&errors) {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            let w = widths[c];
            if c < 2 {
                line.push_str(&format!("{cell:<w$}  "));
            } else {
                line.push_str(&format!("{cell:>w$}  "));
            }
        }
        line.push_str(error);
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

async fn usage(config: Config, mesh: &str, json: bool) -> anyhow::Result<()> {
    let db = admin::open(&config).await?;
    let r = admin::usage_report(&db, &config, mesh).await?;
    db.close().await;
    print(json, &r, |r| {
        let fmt = |u: &admin::KindUsage| {
            let q = |n: Option<i64>| n.map_or_else(|| "-".to_owned(), |n| n.to_string());
            format!(
                "  {:<10} {:>9} entries (quota {:>9})  {:>12} bytes (quota {:>12})",
                u.kind,
                u.entries,
                q(u.quota_entries),
                u.bytes,
                q(u.quota_bytes)
            )
        };
        let mut out = format!("mesh {}\n", r.mesh);
        for u in &r.total {
            out.push_str(&fmt(u));
            out.push('\n');
        }
        for m in &r.members {
            out.push_str(&format!("\n{} ({})\n", m.name, m.member_id));
            for u in &m.usage {
                out.push_str(&fmt(u));
                out.push('\n');
            }
        }
        out.trim_end().to_owned()
    })
}

async fn invite(config: Config, cmd: InviteCmd) -> anyhow::Result<()> {
    let InviteCmd::Create {
        mesh,
        role,
        max_uses,
        ttl,
        public_url,
        out,
    } = cmd;
    let ttl = meshd_config::parse_duration(&ttl).map_err(|e| anyhow::anyhow!("--ttl: {e}"))?;
    if ttl.is_zero() {
        anyhow::bail!("--ttl must be greater than zero");
    }
    let broker_url = match public_url {
        Some(u) => {
            if !(u.starts_with("ws://") || u.starts_with("wss://")) {
                anyhow::bail!("--public-url must start with ws:// or wss://");
            }
            u
        }
        None => {
            let (u, derived) = config.public_url();
            if derived {
                eprintln!(
                    "warning: server.public_url is not configured; the invite pins {u}, which only works on this machine (set --public-url or server.public_url)"
                );
            }
            u
        }
    };
    let role = match role {
        RoleArg::Member => Role::Member,
        RoleArg::Admin => Role::Admin,
    };
    let db = admin::open(&config).await?;
    let r = admin::create_invite(&db, &config, &mesh, role, max_uses, ttl, &broker_url).await;
    db.close().await;
    let inv = r?;
    print(out.json, &inv, |i| {
        format!(
            "invite for {} ({} use{}, role {}, expires {})\n{}\n\njoin with: claudemesh join {}{}",
            i.slug,
            i.max_uses,
            if i.max_uses == 1 { "" } else { "s" },
            i.role,
            meshd_protocol::time::iso8601_ms(i.expires_at * 1000),
            i.url,
            i.url,
            i.web_url
                .as_ref()
                .map(|w| format!("\nor in a browser: {w}"))
                .unwrap_or_default()
        )
    })
}

async fn member(config: Config, cmd: MemberCmd) -> anyhow::Result<()> {
    let db = admin::open(&config).await?;
    let r = match cmd {
        MemberCmd::List { mesh, out } => {
            #[derive(Serialize)]
            struct List {
                members: Vec<admin::MemberInfo>,
            }
            let list = List {
                members: admin::list_members(&db, &mesh).await?,
            };
            print(out.json, &list, |l| {
                let mut s = format!(
                    "{:<32} {:<64} {:<7} {:<8} {}",
                    "MEMBER ID", "PUBKEY", "ROLE", "STATE", "NAME"
                );
                for m in &l.members {
                    let state = if m.revoked_at.is_some() {
                        "revoked"
                    } else {
                        "active"
                    };
                    s.push_str(&format!(
                        "\n{:<32} {:<64} {:<7} {:<8} {}",
                        m.member_id, m.pubkey, m.role, state, m.display_name
                    ));
                }
                s
            })
        }
        MemberCmd::Link {
            mesh,
            member,
            person,
            out,
        } => {
            let m = admin::link_member(&db, &mesh, &member, &person).await?;
            print(
                out.json,
                &serde_json::json!({"memberId": m, "person": person}),
                |_| format!("member {m} is now {person:?}"),
            )
        }
        MemberCmd::Revoke { mesh, member, out } => {
            let m = admin::revoke_member(&db, &mesh, &member).await?;
            print(out.json, &m, |m| {
                format!(
                    "revoked {} ({}); its connections close within seconds",
                    m.member_id, m.display_name
                )
            })
        }
    };
    db.close().await;
    r
}

/// A duration as `N s` (for messages).
fn humantime_secs(d: std::time::Duration) -> String {
    format!("{} s", d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_table_columns_line_up() {
        let v = serde_json::json!({
            "broker": "mesh.a.test", "quic": "127.0.0.1:7901",
            "links": [
                {"peer": "mesh.b.test", "state": "up", "rttMs": 0.5, "queued": 0, "sent": 12345678,
                 "received": 3, "resent": 0, "refused": 0, "held": 0, "meshes": ["m1"], "lastError": null},
                {"peer": "a-much-longer-peer-name.example.org", "state": "backoff", "rttMs": null,
                 "queued": 7, "sent": 0, "received": 0, "resent": 0, "refused": 12, "held": 0,
                 "meshes": [], "lastError": "connection to 10.0.0.1:7901: timed out"}
            ]
        });
        let table = status_table(&v);
        let lines: Vec<&str> = table.lines().skip(1).collect();
        assert_eq!(lines.len(), 3);
        // Every column starts at the same offset on every line.
        for col in ["STATE", "SENT", "REFUSED", "MESHES"] {
            let at = lines[0].find(col).unwrap();
            let end = at + col.len();
            for l in &lines[1..] {
                let c = l.as_bytes().get(at.saturating_sub(1)).copied();
                if col == "STATE" {
                    assert_eq!(c, Some(b' '), "{table}");
                    assert_ne!(l.as_bytes()[at], b' ', "{table}");
                } else {
                    // Right-aligned: the cell ends where the heading ends.
                    assert_ne!(l.as_bytes()[end - 1], b' ', "{col}: {table}");
                    assert!(
                        matches!(l.as_bytes().get(end), None | Some(b' ')),
                        "{col}: {table}"
                    );
                }
            }
        }
        assert!(lines[2].ends_with("timed out"), "{table}");
    }
}
