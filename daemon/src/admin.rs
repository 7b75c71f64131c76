//! Admin operations behind `meshd mesh …`, `meshd invite …` and `meshd member …`.
//!
//! They open the store directly (SQLite's busy timeout lets them run beside a live
//! daemon, which notices new members on their first hello and revocations within two
//! seconds). Mesh owner keys are secret files, `<data_dir>/keys/<mesh_id>.key`, mode 0600.

use std::path::{Path, PathBuf};
use std::time::Duration;

use meshd_config::Config;
use meshd_protocol::invite::{InvitePayload, Role};
use meshd_protocol::keys::SecretKey;
use serde::Serialize;

use crate::ids::{random_bytes, random_id};
use crate::store::{Db, InviteRow, MemberRow, MeshRow, StoreError};
use crate::time::now_ms;

/// Why an admin command failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// Store failure.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No mesh has that slug.
    #[error("no mesh with slug {0:?} (see `meshd mesh list`)")]
    NoSuchMesh(String),
    /// The slug is in use.
    #[error("slug {0:?} is already taken")]
    SlugTaken(String),
    /// The slug has the wrong shape.
    #[error(
        "invalid slug {0:?}: use 1-63 lowercase letters, digits and dashes, starting with a letter or digit"
    )]
    InvalidSlug(String),
    /// A key file problem.
    #[error("mesh owner key: {0}")]
    Key(#[from] meshd_certs::SecretFileError),
    /// The key file does not hold a key.
    #[error("mesh owner key {0} is corrupt")]
    CorruptKey(PathBuf),
    /// No such member.
    #[error("no live member {0:?} in this mesh (give a member id or public key)")]
    NoSuchMember(String),
    /// A bad argument.
    #[error("{0}")]
    Invalid(String),
    /// Running as root on a data directory owned by the daemon's user would leave files
    /// the daemon cannot read.
    #[error(
        "{dir} belongs to uid {owner}; run admin commands as that user (e.g. `sudo -u meshd meshd …`)"
    )]
    WrongUser {
        /// Data directory.
        dir: PathBuf,
        /// Its owner.
        owner: u32,
    },
}

/// A created mesh (`meshd mesh create --json`).
#[derive(Debug, Serialize)]
pub struct MeshCreated {
    /// Id clients put in `hello.meshId`.
    pub mesh_id: String,
    /// Slug.
    pub slug: String,
    /// Name.
    pub name: String,
    /// Owner key (signs invites).
    pub owner_pubkey: String,
}

/// One mesh in `meshd mesh list --json`.
#[derive(Debug, Serialize)]
pub struct MeshInfo {
    /// Id.
    pub mesh_id: String,
    /// Slug.
    pub slug: String,
    /// Name.
    pub name: String,
    /// Owner key.
    pub owner_pubkey: String,
    /// ISO creation time.
    pub created_at: String,
    /// Live members.
    pub members: i64,
}

/// A created invite (`meshd invite create --json`).
#[derive(Debug, Serialize)]
pub struct InviteCreated {
    /// The claudemesh v1 invite token.
    pub token: String,
    /// `ic://join/<token>`, accepted by `claudemesh join`.
    pub url: String,
    /// Expiry, Unix seconds (as in the invite payload).
    pub expires_at: i64,
    /// Mesh.
    pub mesh_id: String,
    /// Slug.
    pub slug: String,
    /// Role granted.
    pub role: String,
    /// Enrollments allowed.
    pub max_uses: i64,
    /// The broker URL the invite pins.
    pub broker_url: String,
    /// The same invite for a person: the web app at the broker's host, the token in
    /// the URL's fragment.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub web_url: Option<String>,
}

/// One member in `meshd member list --json`.
#[derive(Debug, Serialize)]
pub struct MemberInfo {
    /// Id.
    pub member_id: String,
    /// Key.
    pub pubkey: String,
    /// Display name.
    pub display_name: String,
    /// Role.
    pub role: String,
    /// ISO join time.
    pub joined_at: String,
    /// ISO revocation time.
    pub revoked_at: Option<String>,
}

impl From<MemberRow> for MemberInfo {
    fn from(m: MemberRow) -> Self {
        Self {
            member_id: m.id,
            pubkey: m.pubkey,
            display_name: m.display_name,
            role: m.role,
            joined_at: meshd_protocol::time::iso8601_ms(m.joined_at),
            revoked_at: m.revoked_at.map(meshd_protocol::time::iso8601_ms),
        }
    }
}

/// Opens the store for an admin command (after the ownership check).
///
/// # Errors
/// [`AdminError`].
pub async fn open(config: &Config) -> Result<Db, AdminError> {
    check_user(&config.data_dir)?;
    meshd_certs::ensure_private_dir(&config.data_dir)?;
    Ok(Db::open(&config.storage.backend, config.storage.durability).await?)
}

fn check_user(dir: &Path) -> Result<(), AdminError> {
    use std::os::unix::fs::MetadataExt as _;
    // /proc/self belongs to the process's effective uid.
    let (Ok(me), Ok(d)) = (std::fs::metadata("/proc/self"), std::fs::metadata(dir)) else {
        return Ok(());
    };
    if me.uid() == 0 && d.uid() != 0 {
        return Err(AdminError::WrongUser {
            dir: dir.to_owned(),
            owner: d.uid(),
        });
    }
    Ok(())
}

fn key_path(config: &Config, mesh_id: &str) -> PathBuf {
    config.data_dir.join("keys").join(format!("{mesh_id}.key"))
}

/// Turns a name into a slug: lowercase ASCII letters and digits, other runs → `-`.
pub fn slugify(name: &str) -> String {
    let mut slug = String::new();
    for c in name.chars().flat_map(char::to_lowercase) {
        if c.is_ascii_alphanumeric() {
            slug.push(c);
        } else if !slug.ends_with('-') && !slug.is_empty() {
            slug.push('-');
        }
    }
    while slug.ends_with('-') {
        slug.pop();
    }
    slug.truncate(63);
    slug
}

fn valid_slug(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
}

/// `meshd mesh create`.
///
/// # Errors
/// [`AdminError`].
pub async fn create_mesh(
    db: &Db,
    config: &Config,
    name: &str,
    slug: Option<&str>,
) -> Result<MeshCreated, AdminError> {
    let name = name.trim();
    if name.is_empty() || name.len() > 256 {
        return Err(AdminError::Invalid(
            "the mesh name must be 1 to 256 bytes".into(),
        ));
    }
    let slug = slug.map_or_else(|| slugify(name), str::to_owned);
    if !valid_slug(&slug) {
        return Err(AdminError::InvalidSlug(slug));
    }
    if db.mesh_by_slug(&slug).await?.is_some() {
        return Err(AdminError::SlugTaken(slug));
    }
    let owner = SecretKey::from_seed(random_bytes());
    let row = MeshRow {
        id: random_id(),
        name: name.to_owned(),
        slug: slug.clone(),
        owner_pubkey: owner.public().to_hex(),
        root_key: {
            use base64::Engine as _;
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random_bytes::<32>())
        },
        created_at: now_ms(),
        archived_at: None,
    };
    let path = key_path(config, &row.id);
    meshd_certs::write_secret_file(&path, owner.to_hex().as_bytes())?;
    if let Err(e) = db.insert_mesh(&row).await {
        let _ = std::fs::remove_file(&path);
        if db.mesh_by_slug(&slug).await.ok().flatten().is_some() {
            return Err(AdminError::SlugTaken(slug));
        }
        return Err(e.into());
    }
    Ok(MeshCreated {
        mesh_id: row.id,
        slug,
        name: row.name,
        owner_pubkey: row.owner_pubkey,
    })
}

/// The mesh row of a new replica: the home's id and name, a slug free on this broker,
/// and this broker's own owner key (it signs the replica's invites).
pub(crate) async fn replica_mesh_row(
    ctx: &crate::Ctx,
    mesh_id: &str,
    name: &str,
    slug: &str,
) -> Result<MeshRow, AdminError> {
    let name = if name.trim().is_empty() {
        mesh_id
    } else {
        name.trim()
    };
    let mut candidate = if valid_slug(slug) {
        slug.to_owned()
    } else {
        slugify(name)
    };
    if !valid_slug(&candidate) {
        candidate = format!("mesh-{}", &mesh_id[..mesh_id.len().min(8)]);
    }
    if ctx.db.mesh_by_slug(&candidate).await?.is_some() {
        candidate = format!("{candidate}-{}", &mesh_id[..mesh_id.len().min(6)]);
    }
    let owner = SecretKey::from_seed(random_bytes());
    let row = MeshRow {
        id: mesh_id.to_owned(),
        name: name.to_owned(),
        slug: candidate,
        owner_pubkey: owner.public().to_hex(),
        root_key: {
            use base64::Engine as _;
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random_bytes::<32>())
        },
        created_at: now_ms(),
        archived_at: None,
    };
    let path = key_path(&ctx.config, &row.id);
    match meshd_certs::create_secret_file(&path, owner.to_hex().as_bytes()) {
        Ok(()) => {}
        Err(e) if !meshd_certs::already_exists(&e) => return Err(e.into()),
        // A replica re-created after a failed insert keeps the key already on disk.
        Err(_) => {
            let text = meshd_certs::read_secret_file(&path)?;
            let existing = std::str::from_utf8(&text)
                .ok()
                .and_then(|t| SecretKey::parse_hex(t.trim()).ok())
                .ok_or_else(|| AdminError::CorruptKey(path.clone()))?;
            return Ok(MeshRow {
                owner_pubkey: existing.public().to_hex(),
                ..row
            });
        }
    }
    Ok(row)
}

/// Which broker to share with, checked against the configured peers.
fn configured_peer(config: &Config, broker: &str) -> Result<String, AdminError> {
    let broker = broker.trim().trim_end_matches('.').to_ascii_lowercase();
    let Some(fed) = &config.federation else {
        return Err(AdminError::Invalid(
            "federation is not configured ([federation] in the config file)".into(),
        ));
    };
    if fed.peers.iter().any(|p| p.name == broker) {
        Ok(broker)
    } else {
        Err(AdminError::Invalid(format!(
            "{broker} is not a configured peer broker (add it under [[federation.peers]])"
        )))
    }
}

/// `meshd mesh share SLUG --with BROKER`: this broker is the mesh's home.
///
/// # Errors
/// [`AdminError`].
pub async fn share_mesh(
    db: &Db,
    config: &Config,
    slug: &str,
    broker: &str,
) -> Result<ShareInfo, AdminError> {
    let peer = configured_peer(config, broker)?;
    let m = mesh(db, slug).await?;
    if db.replicas().await?.iter().any(|r| r.mesh_id == m.id) {
        return Err(AdminError::Invalid(format!(
            "{slug} is a replica; only its home broker can share it"
        )));
    }
    db.insert_share(&m.id, &peer, crate::fed::store::ShareRole::Offer, now_ms())
        .await?;
    Ok(ShareInfo {
        mesh_id: m.id,
        slug: Some(m.slug),
        peer,
        role: "offer",
    })
}

/// `meshd mesh accept MESH_ID --from BROKER`: host a replica of a peer's mesh.
///
/// # Errors
/// [`AdminError`].
pub async fn accept_mesh(
    db: &Db,
    config: &Config,
    mesh_id: &str,
    broker: &str,
) -> Result<ShareInfo, AdminError> {
    let peer = configured_peer(config, broker)?;
    if mesh_id.is_empty()
        || mesh_id.len() > 64
        || !mesh_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(AdminError::Invalid(format!("{mesh_id:?} is not a mesh id")));
    }
    if let Some(existing) = db.mesh_by_id(mesh_id).await?
        && !db.replicas().await?.iter().any(|r| r.mesh_id == mesh_id)
    {
        return Err(AdminError::Invalid(format!(
            "mesh {mesh_id} ({}) is hosted here; a broker cannot accept its own mesh",
            existing.slug
        )));
    }
    db.insert_share(
        mesh_id,
        &peer,
        crate::fed::store::ShareRole::Accept,
        now_ms(),
    )
    .await?;
    // A replica already there (accepted before, or the offer came first) has its slug.
    let slug = db.mesh_by_id(mesh_id).await?.map(|m| m.slug);
    Ok(ShareInfo {
        mesh_id: mesh_id.to_owned(),
        slug,
        peer,
        role: "accept",
    })
}

/// `meshd mesh unshare MESH --with BROKER` (slug or mesh id): withdraws either side's
/// consent; nothing of the mesh crosses that link afterwards.
///
/// # Errors
/// [`AdminError`].
pub async fn unshare_mesh(db: &Db, mesh_ref: &str, broker: &str) -> Result<bool, AdminError> {
    let broker = broker.trim().trim_end_matches('.').to_ascii_lowercase();
    let id = match db.mesh_by_slug(mesh_ref).await? {
        Some(m) => m.id,
        None => mesh_ref.to_owned(),
    };
    Ok(db.delete_share(&id, &broker).await?)
}

pub use crate::fed::policy::{
    Direction as PolicyDirection, Field as PresenceField, Kind as MessageKind, Rules as PolicyRules,
};

/// A stored link policy, as `meshd mesh policy show` prints it.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyInfo {
    /// Mesh id.
    pub mesh_id: String,
    /// Peer broker.
    pub broker: String,
    /// `export` or `import`.
    pub direction: String,
    /// The rules (a field left out lets everything of its sort through).
    pub rules: PolicyRules,
    /// Last change.
    pub updated_at: String,
}

/// A mesh by slug or id.
async fn mesh_ref(db: &Db, r: &str) -> Result<MeshRow, AdminError> {
    match db.mesh_by_slug(r).await? {
        Some(m) => Ok(m),
        None => db
            .mesh_by_id(r)
            .await?
            .ok_or_else(|| AdminError::NoSuchMesh(r.to_owned())),
    }
}

/// `meshd mesh policy set MESH --broker B --direction D …`: replaces one direction's
/// rules; the running daemon applies them within a second.
///
/// # Errors
/// [`AdminError`]: no such mesh, a broker that is not configured, bad prefixes.
pub async fn set_policy(
    db: &Db,
    config: &Config,
    mesh: &str,
    broker: &str,
    direction: PolicyDirection,
    rules: PolicyRules,
) -> Result<PolicyInfo, AdminError> {
    let broker = configured_peer(config, broker)?;
    let m = mesh_ref(db, mesh).await?;
    rules.validate().map_err(AdminError::Invalid)?;
    let now = now_ms();
    db.set_policy(&m.id, &broker, direction, &rules, now)
        .await?;
    Ok(PolicyInfo {
        mesh_id: m.id,
        broker,
        direction: direction.as_str().to_owned(),
        rules,
        updated_at: meshd_protocol::time::iso8601_ms(now),
    })
}

/// `meshd mesh policy show MESH [--broker B]`.
///
/// # Errors
/// [`AdminError`].
pub async fn show_policies(
    db: &Db,
    mesh: &str,
    broker: Option<&str>,
) -> Result<Vec<PolicyInfo>, AdminError> {
    let m = mesh_ref(db, mesh).await?;
    let broker = broker.map(|b| b.trim().trim_end_matches('.').to_ascii_lowercase());
    let mut out = Vec::new();
    for r in db.policies().await? {
        if r.mesh_id != m.id || broker.as_ref().is_some_and(|b| *b != r.broker) {
            continue;
        }
        let rules = serde_json::from_str(&r.rules).map_err(|e| {
            AdminError::Invalid(format!(
                "stored policy for {} {} does not parse: {e}",
                r.broker, r.direction
            ))
        })?;
        out.push(PolicyInfo {
            mesh_id: r.mesh_id,
            broker: r.broker,
            direction: r.direction,
            rules,
            updated_at: meshd_protocol::time::iso8601_ms(r.updated_at),
        });
    }
    Ok(out)
}

/// `meshd mesh policy reset MESH --broker B [--direction D]`: everything passes again.
/// Returns how many directions had rules.
///
/// # Errors
/// [`AdminError`].
pub async fn reset_policy(
    db: &Db,
    mesh: &str,
    broker: &str,
    direction: Option<PolicyDirection>,
) -> Result<u64, AdminError> {
    let m = mesh_ref(db, mesh).await?;
    let broker = broker.trim().trim_end_matches('.').to_ascii_lowercase();
    Ok(db.delete_policy(&m.id, &broker, direction).await?)
}

pub use crate::features::bridges::{BridgeRow, Direction as BridgeDirection};

/// `meshd bridge create A B --tags P,.. [--direction D] [--peers]`: joins two meshes of
/// this broker; the running daemon applies it within a second.
///
/// # Errors
/// [`AdminError`]: a mesh that does not exist, the same mesh twice, bad prefixes, too
/// many bridges.
pub async fn create_bridge(
    db: &Db,
    a: &str,
    b: &str,
    direction: BridgeDirection,
    tags: &[String],
    peers: bool,
) -> Result<BridgeRow, AdminError> {
    let mb = mesh_ref(db, b).await?;
    bridge_row(db, a, mb.id, None, direction, tags, peers).await
}

/// `meshd bridge create A MESH_ID --broker B …`: this broker's side of a bridge between
/// its mesh `a` and the mesh `remote_mesh` of the peer broker `broker`, whose admin
/// creates the mirror (`meshd bridge create MESH_ID_THERE A_ID --broker THIS_BROKER`).
/// It flows while both sides keep it.
///
/// # Errors
/// [`AdminError`]: as [`create_bridge`], and a broker that is not configured.
#[allow(clippy::too_many_arguments)]
pub async fn create_remote_bridge(
    db: &Db,
    config: &Config,
    a: &str,
    remote_mesh: &str,
    broker: &str,
    direction: BridgeDirection,
    tags: &[String],
    peers: bool,
) -> Result<BridgeRow, AdminError> {
    let broker = configured_peer(config, broker)?;
    if !crate::ids::plausible_id(remote_mesh) {
        return Err(AdminError::Invalid(format!(
            "{remote_mesh:?} is not a mesh id (the other broker's `meshd mesh list` shows it)"
        )));
    }
    bridge_row(
        db,
        a,
        remote_mesh.to_owned(),
        Some(broker),
        direction,
        tags,
        peers,
    )
    .await
}

async fn bridge_row(
    db: &Db,
    a: &str,
    mesh_b: String,
    broker_b: Option<String>,
    direction: BridgeDirection,
    tags: &[String],
    peers: bool,
) -> Result<BridgeRow, AdminError> {
    let ma = mesh_ref(db, a).await?;
    if ma.id == mesh_b && broker_b.is_none() {
        return Err(AdminError::Invalid(
            "a bridge joins two different meshes".into(),
        ));
    }
    if tags.is_empty() || tags.len() > crate::fed::policy::MAX_PREFIXES {
        return Err(AdminError::Invalid(
            "--tags: 1 to 64 tag prefixes (what the bridge relays)".into(),
        ));
    }
    if let Some(bad) = tags.iter().find(|t| !meshd_protocol::tags::valid(t)) {
        return Err(AdminError::Invalid(format!(
            "invalid tag prefix {bad:?}: 1..=64 bytes of letters, digits and - _ . : /"
        )));
    }
    let row = BridgeRow {
        id: crate::ids::random_id(),
        mesh_a: ma.id,
        mesh_b,
        broker_b,
        direction: direction.as_str().to_owned(),
        tags: tags.join(" "),
        peers,
        created_at: now_ms(),
    };
    if !db.insert_bridge(&row).await? {
        return Err(AdminError::Invalid(format!(
            "this broker has {} bridges already",
            crate::features::bridges::MAX_BRIDGES
        )));
    }
    Ok(row)
}

/// `meshd bridge list`.
///
/// # Errors
/// [`AdminError`].
pub async fn list_bridges(db: &Db) -> Result<Vec<BridgeRow>, AdminError> {
    Ok(db.bridges().await?)
}

/// `meshd bridge delete ID`: whether it existed.
///
/// # Errors
/// [`AdminError`].
pub async fn delete_bridge(db: &Db, id: &str) -> Result<bool, AdminError> {
    Ok(db.delete_bridge(id).await?)
}

/// A consent as printed by the CLI.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ShareInfo {
    /// Mesh id.
    pub mesh_id: String,
    /// Slug; for an accept, `None` until the home's offer has arrived and the replica
    /// exists (see `meshd mesh accept --wait`).
    pub slug: Option<String>,
    /// Peer broker.
    pub peer: String,
    /// `offer` or `accept`.
    pub role: &'static str,
}

/// `meshd mesh list`.
///
/// # Errors
/// [`AdminError`].
pub async fn list_meshes(db: &Db) -> Result<Vec<MeshInfo>, AdminError> {
    let mut out = Vec::new();
    for m in db.meshes().await? {
        let members = db.member_count(&m.id).await?;
        out.push(MeshInfo {
            mesh_id: m.id,
            slug: m.slug,
            name: m.name,
            owner_pubkey: m.owner_pubkey,
            created_at: meshd_protocol::time::iso8601_ms(m.created_at),
            members,
        });
    }
    Ok(out)
}

async fn mesh(db: &Db, slug: &str) -> Result<MeshRow, AdminError> {
    db.mesh_by_slug(slug)
        .await?
        .ok_or_else(|| AdminError::NoSuchMesh(slug.to_owned()))
}

/// `meshd invite create`.
///
/// # Errors
/// [`AdminError`].
pub async fn create_invite(
    db: &Db,
    config: &Config,
    slug: &str,
    role: Role,
    max_uses: i64,
    ttl: Duration,
    broker_url: &str,
) -> Result<InviteCreated, AdminError> {
    if max_uses < 1 {
        return Err(AdminError::Invalid("--max-uses must be at least 1".into()));
    }
    let m = mesh(db, slug).await?;
    let path = key_path(config, &m.id);
    let text = meshd_certs::read_secret_file(&path)?;
    let owner = std::str::from_utf8(&text)
        .ok()
        .and_then(|t| SecretKey::parse_hex(t.trim()).ok())
        .filter(|k| k.public().to_hex() == m.owner_pubkey)
        .ok_or_else(|| AdminError::CorruptKey(path.clone()))?;
    let now = now_ms();
    let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
    let mut expires_at = now.saturating_add(ttl_ms) / 1000;
    // The v1 payload has no nonce, so two invites of one mesh with the same role, URL and
    // expiry second would share a token (and a use counter). Push the expiry one second
    // further until the token is unique; the payload keeps exactly the v1 shape.
    let token = loop {
        let payload = InvitePayload::sign(
            &owner,
            &m.id,
            &m.slug,
            broker_url,
            expires_at,
            &m.root_key,
            role,
        );
        let token = payload.to_token();
        if db.invite_by_token(&token).await?.is_none() {
            break token;
        }
        expires_at += 1;
    };
    db.insert_invite(&InviteRow {
        id: random_id(),
        mesh_id: m.id.clone(),
        token: token.clone(),
        role: role.as_str().to_owned(),
        max_uses,
        used_count: 0,
        // The stored expiry is authoritative and matches the signed payload's second.
        expires_at: expires_at * 1000,
        created_at: now,
        revoked_at: None,
    })
    .await?;
    Ok(InviteCreated {
        url: format!("ic://join/{token}"),
        web_url: crate::features::webapp::invite_link(broker_url, &token),
        token,
        expires_at,
        mesh_id: m.id,
        slug: m.slug,
        role: role.as_str().to_owned(),
        max_uses,
        broker_url: broker_url.to_owned(),
    })
}

/// `meshd member list`.
///
/// # Errors
/// [`AdminError`].
pub async fn list_members(db: &Db, slug: &str) -> Result<Vec<MemberInfo>, AdminError> {
    let m = mesh(db, slug).await?;
    Ok(db
        .members(&m.id)
        .await?
        .into_iter()
        .map(Into::into)
        .collect())
}

/// `meshd member revoke`.
///
/// # Errors
/// [`AdminError`].
pub async fn revoke_member(db: &Db, slug: &str, member: &str) -> Result<MemberInfo, AdminError> {
    let m = mesh(db, slug).await?;
    let row = db
        .revoke_member(&m.id, member, now_ms())
        .await?
        .ok_or_else(|| AdminError::NoSuchMember(member.to_owned()))?;
    // A running daemon checks hellos against its member cache: return once it has
    // applied the revocation, so the member is refused from now on.
    if !crate::features::moderation::wait_applied(db, now_ms()).await? {
        tracing::warn!(
            "the running daemon has not applied the revocation yet; \
             it refuses the member as soon as it does"
        );
    }
    Ok(row.into())
}

/// A key minted by `meshd apikey create` (the secret is shown this once).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ApiKeyCreated {
    /// The key as listed.
    #[serde(flatten)]
    pub key: meshd_protocol::apikeys::KeyInfo,
    /// The bearer secret.
    pub secret: String,
    /// The member it acts as.
    pub member_id: Option<String>,
}

/// The live member of mesh `m` named by id, key or display name.
async fn member_named(db: &Db, m: &MeshRow, who: &str) -> Result<MemberRow, AdminError> {
    let hits: Vec<MemberRow> = db
        .members(&m.id)
        .await?
        .into_iter()
        .filter(|r| {
            r.revoked_at.is_none()
                && (r.id == who || r.pubkey == who.to_ascii_lowercase() || r.display_name == who)
        })
        .collect();
    match <[MemberRow; 1]>::try_from(hits) {
        Ok([r]) => Ok(r),
        Err(v) if v.is_empty() => Err(AdminError::NoSuchMember(who.to_owned())),
        Err(_) => Err(AdminError::Invalid(format!(
            "several members are named {who:?}; give a member id or key"
        ))),
    }
}

/// `meshd member link`: links a member (id, key or name) to a named person. Returns
/// the member id.
///
/// # Errors
/// [`AdminError`].
pub async fn link_member(
    db: &Db,
    slug: &str,
    who: &str,
    person: &str,
) -> Result<String, AdminError> {
    let person = person.trim();
    if person.is_empty() || person.len() > 256 {
        return Err(AdminError::Invalid("a person's name is 1-256 bytes".into()));
    }
    let m = mesh(db, slug).await?;
    let member = member_named(db, &m, who).await?;
    db.link_person(&member.id, person).await?;
    Ok(member.id)
}

/// `meshd apikey create`: an operator mints a key, acting as `member` (id, key or
/// name; any capability) or unattached (the routes that need a member refuse it).
///
/// # Errors
/// [`AdminError`].
pub async fn create_api_key(
    db: &Db,
    slug: &str,
    create: &meshd_protocol::apikeys::CreateKey,
    member: Option<&str>,
) -> Result<ApiKeyCreated, AdminError> {
    use crate::features::apikeys::{MintError, key_info, mint};
    let m = mesh(db, slug).await?;
    let issuer = match member {
        Some(who) => Some(member_named(db, &m, who).await?.id),
        None => None,
    };
    let (row, secret) = mint(
        db,
        &m.id,
        issuer.as_deref().map(|i| (i, true)),
        create,
        now_ms(),
    )
    .await
    .map_err(|e| match e {
        MintError::Store(e) => AdminError::Store(e),
        MintError::Invalid(m) | MintError::Forbidden(m) => AdminError::Invalid(m),
    })?;
    Ok(ApiKeyCreated {
        key: key_info(row),
        secret,
        member_id: issuer,
    })
}

/// `meshd apikey list`: every key of a mesh, newest first.
///
/// # Errors
/// [`AdminError`].
pub async fn list_api_keys(
    db: &Db,
    slug: &str,
) -> Result<Vec<meshd_protocol::apikeys::KeyInfo>, AdminError> {
    let m = mesh(db, slug).await?;
    Ok(db
        .api_keys(&m.id, None)
        .await?
        .into_iter()
        .map(crate::features::apikeys::key_info)
        .collect())
}

/// `meshd apikey revoke`: by id or unique id prefix. Refused from the next request on;
/// a running daemon closes the key's WebSocket connections within seconds.
///
/// # Errors
/// [`AdminError`].
pub async fn revoke_api_key(db: &Db, slug: &str, id: &str) -> Result<String, AdminError> {
    use crate::features::apikeys::{Revoked, revoke_among};
    let m = mesh(db, slug).await?;
    let keys = db.api_keys(&m.id, None).await?;
    match revoke_among(db, &keys, id, now_ms()).await? {
        Revoked::Key(id) => Ok(id),
        Revoked::NotFound => Err(AdminError::Invalid(format!(
            "no api key {id:?} in this mesh"
        ))),
        Revoked::NotUnique(n) => Err(AdminError::Invalid(format!(
            "{n} api keys start with {id:?}; give more of the id"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs() {
        assert_eq!(slugify("My Team!  Alpha"), "my-team-alpha");
        assert_eq!(slugify("--x--"), "x");
        assert_eq!(slugify("Équipe"), "quipe");
        assert!(valid_slug("ops-2"));
        assert!(!valid_slug("Ops"));
        assert!(!valid_slug("-x"));
        assert!(!valid_slug(""));
    }
}

/// One member's (or the whole mesh's) use of one stored kind, against its quota.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KindUsage {
    /// The kind (`messages`, `memory`, …).
    pub kind: &'static str,
    /// Entries stored.
    pub entries: i64,
    /// Bytes stored (messages: bodies not yet delivered).
    pub bytes: i64,
    /// The quota on entries (`null`: none).
    pub quota_entries: Option<i64>,
    /// The quota on bytes (`null`: none).
    pub quota_bytes: Option<i64>,
}

/// One member's usage.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MemberUsage {
    /// Member id.
    pub member_id: String,
    /// Display name.
    pub name: String,
    /// By kind (kinds it uses none of are left out).
    pub usage: Vec<KindUsage>,
}

/// `meshd usage --mesh SLUG`: what each member, and the mesh, keeps stored.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UsageReport {
    /// Mesh slug.
    pub mesh: String,
    /// The mesh as a whole.
    pub total: Vec<KindUsage>,
    /// Each member with any usage, the heaviest first.
    pub members: Vec<MemberUsage>,
}

/// `meshd usage`.
///
/// # Errors
/// [`AdminError`].
pub async fn usage_report(db: &Db, config: &Config, slug: &str) -> Result<UsageReport, AdminError> {
    use crate::quota::{Kind, caps};
    let m = mesh(db, slug).await?;
    let members = db.members(&m.id).await?;
    let name_of = |key: &str| {
        members
            .iter()
            .find(|r| r.id == key || r.pubkey == key)
            .map(|r| (r.id.clone(), r.display_name.clone()))
    };
    let cap = |v: i64| (v != i64::MAX).then_some(v);
    let mut total = Vec::new();
    let mut by_member: std::collections::BTreeMap<String, MemberUsage> = Default::default();
    for kind in Kind::ALL {
        let c = caps(kind, config);
        let rows = db.usage_by_member(kind, Some(&m.id)).await?;
        let (mut entries, mut bytes) = (0i64, 0i64);
        for r in rows {
            entries = entries.saturating_add(r.rows);
            bytes = bytes.saturating_add(r.bytes);
            let (id, name) = name_of(&r.member).unwrap_or_else(|| {
                (
                    r.member.clone(),
                    if r.member.is_empty() {
                        "(unattributed)".into()
                    } else {
                        "(unknown)".into()
                    },
                )
            });
            by_member
                .entry(id.clone())
                .or_insert_with(|| MemberUsage {
                    member_id: id,
                    name,
                    usage: Vec::new(),
                })
                .usage
                .push(KindUsage {
                    kind: kind.as_str(),
                    entries: r.rows,
                    bytes: r.bytes,
                    quota_entries: cap(c.member.rows),
                    quota_bytes: cap(c.member.bytes),
                });
        }
        total.push(KindUsage {
            kind: kind.as_str(),
            entries,
            bytes,
            quota_entries: cap(c.mesh.rows),
            quota_bytes: cap(c.mesh.bytes),
        });
    }
    let mut members: Vec<MemberUsage> = by_member.into_values().collect();
    members.sort_by_key(|m| std::cmp::Reverse(m.usage.iter().map(|u| u.bytes).sum::<i64>()));
    Ok(UsageReport {
        mesh: m.slug,
        total,
        members,
    })
}
