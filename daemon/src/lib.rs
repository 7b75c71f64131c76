//! meshd: a claudemesh-compatible broker daemon.
//!
//! [`Daemon::bind`] opens the store (migrating it), starts nothing yet and binds the
//! HTTP/WebSocket listener, so the caller knows the address before serving. [`Bound::run`]
//! serves until its cancellation token fires, then shuts down in phases: stop accepting,
//! let sessions flush and save their state, commit and close the store.
//!
//! Entry points for binaries: [`cli::main`]. Library users (the test harness): [`Daemon`].

pub mod admin;
mod api;
pub mod cli;
mod delivery;
pub mod features;
/// The signed audit log (public: `meshd audit verify` and tests use it).
pub use features::audit::engine as audit;
use features::clock::engine as clock;
use features::files::engine as files;
pub use features::files::engine::FilesError;
use features::mcp::engine as mcp;
use features::presence::hooks;
use features::relay::engine as relay;
use features::schedule::engine as reminders;
mod fed;
mod http;
mod hub;
mod ids;
mod metrics;
pub(crate) mod quota;
mod ratelimit;
mod server;
mod session;
pub mod store;
mod systemd;
mod telemetry;
pub mod templates;
mod time;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use meshd_config::Config;
use meshd_protocol::hello::ReplayCache;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::delivery::router::Handle as WriterHandle;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::store::writer::WriteOp;
use crate::store::{Db, StoreError, WriterConn};

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The store could not be opened or migrated.
    #[error("opening the store: {0}")]
    Store(#[from] StoreError),
    /// The audit key could not be loaded or created.
    #[error("audit key: {0}")]
    Audit(#[from] audit::AuditKeyError),
    /// The file store's directory could not be prepared.
    #[error("file store: {0}")]
    Files(#[from] files::FilesError),
    /// Federation could not start (certificates, trust, QUIC endpoint).
    #[error(transparent)]
    Federation(#[from] fed::FedStartError),
    /// `[sandbox]` is enabled but the host cannot make sandboxes.
    #[error("sandbox: {0}")]
    Sandbox(String),
    /// The listen address could not be bound.
    #[error("binding {addr}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
}

/// State shared by every connection and background task.
#[derive(Debug)]
pub(crate) struct Ctx {
    pub(crate) config: Config,
    pub(crate) db: Db,
    pub(crate) writer: WriterHandle,
    pub(crate) hub: Hub,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) replay: std::sync::Mutex<ReplayCache>,
    /// Every session task.
    pub(crate) sessions: TaskTracker,
    /// Cancelled when sessions must end (shutdown phase 2).
    pub(crate) sessions_cancel: CancellationToken,
    /// Limits simultaneous WebSocket connections.
    pub(crate) connections: Arc<Semaphore>,
    /// Unauthenticated connections per client address (see `server`).
    pub(crate) pending: Arc<server::PendingTable>,
    /// Federation with peer brokers, when configured.
    pub(crate) fed: Option<Arc<fed::Fed>>,
    /// Simulation clocks.
    pub(crate) clocks: clock::Clocks,
    /// The signed audit log.
    pub(crate) audit: Arc<audit::Audit>,
    pub(crate) reminders: reminders::Reminders,
    pub(crate) mcp: mcp::Mcp,
    pub(crate) exec: features::exec::Exec,
    pub(crate) telemetry: features::telemetry::Telemetry,
    pub(crate) search: std::sync::Mutex<features::search::Cache>,
    pub(crate) files: files::Files,
    pub(crate) relay: relay::Relay,
    /// What every member and mesh holds, by kind, against the quotas (see `quota`).
    pub(crate) usage_book: quota::UsageBook,
    /// Each mesh's usage by kind, for `/metrics`.
    pub(crate) usage: quota::Snapshot,
    /// Status hooks' rate limits and waiting statuses.
    pub(crate) hooks: hooks::StatusHooks,
    /// Rate limits of inbound webhooks, by webhook id (only existing webhooks get one).
    pub(crate) webhook_buckets: std::sync::Mutex<ratelimit::Buckets<String>>,
    /// Rate limits of webhook posts by source address (before the secret is looked up).
    pub(crate) webhook_sources: std::sync::Mutex<ratelimit::Buckets<std::net::IpAddr>>,
    /// Bridges between meshes in force (`features::bridges`).
    pub(crate) bridges: crate::features::bridges::Bridges,
    /// URL watches in force (`features::watch`).
    pub(crate) watches: crate::features::watch::Watches,
    /// External API-key WebSocket connections, by key (`api::ws`).
    pub(crate) external: crate::api::ws::ExternalConns,
    next_conn: AtomicU64,
    started: tokio::time::Instant,
}

impl Ctx {
    pub(crate) fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub(crate) fn uptime(&self) -> Duration {
        time::since(self.started)
    }
}

/// Entry point for running a broker.
#[derive(Debug)]
pub struct Daemon;

/// What [`Daemon::bind_with`] takes besides the configuration.
#[derive(Debug, Default, Clone)]
#[non_exhaustive]
pub struct DaemonOptions {
    /// Test hooks for the federation link manager (see
    /// [`meshd_federation::LinkHooks`]); `None` in production.
    pub link_hooks: Option<Arc<dyn meshd_federation::LinkHooks>>,
}

impl DaemonOptions {
    /// Options with federation link hooks.
    pub fn with_link_hooks(hooks: Arc<dyn meshd_federation::LinkHooks>) -> Self {
        Self {
            link_hooks: Some(hooks),
        }
    }
}

/// The store's write path: the router (hot-path pushes, in channel order) in front of
/// the writer (batches and commits). Stopping the router ends the writer once it has
/// committed what was queued.
#[derive(Debug)]
struct WriterTask {
    router: delivery::router::Router,
    store_writer: store::writer::Writer,
}

impl WriterTask {
    async fn run(self, stop: CancellationToken) {
        tokio::join!(self.router.run(stop), self.store_writer.run());
    }
}

/// A broker with its store open and its listener bound, not yet serving.
#[derive(Debug)]
pub struct Bound {
    ctx: Arc<Ctx>,
    listener: tokio::net::TcpListener,
    writer: WriterTask,
    endpoint: Option<meshd_federation::Endpoint>,
}

impl Daemon {
    /// Opens the store and binds the listener.
    ///
    /// # Errors
    /// [`StartError`].
    pub async fn bind(config: Config) -> Result<Bound, StartError> {
        Self::bind_with(config, DaemonOptions::default()).await
    }

    /// [`Daemon::bind`] with options.
    ///
    /// # Errors
    /// [`StartError`].
    pub async fn bind_with(config: Config, options: DaemonOptions) -> Result<Bound, StartError> {
        // First: a broker asked to run code that cannot sandbox it does not start at all.
        let exec = features::exec::Exec::new(&config.sandbox)
            .map_err(|e| StartError::Sandbox(e.to_string()))?;
        let db = Db::open(&config.storage.backend, config.storage.durability).await?;
        let conn = WriterConn::open(&config.storage.backend, config.storage.durability).await?;
        let metrics = Arc::new(Metrics::default());
        let (to_store, store_writer) = store::writer::channel(
            conn,
            (config.storage.backend.clone(), config.storage.durability),
            db.write_gate(),
            config.storage.max_batch * 4,
            config.storage.max_batch,
            metrics.clone(),
        );
        let (writer, router) = delivery::router::channel(
            to_store,
            config.storage.max_batch * 4,
            config.storage.max_batch,
            config.limits.outbound_queue_bytes.saturating_mul(4),
            metrics.clone(),
            delivery::router::OutSeqs::from_committed(db.outseqs().await?, time::now_ms()),
        );
        let task = WriterTask {
            router,
            store_writer,
        };
        // No connection survives a restart, so no lease does either.
        writer.send(WriteOp::ClearLeases).await?;
        let addr = config.server.listen;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { addr, source })?;
        // URLs derived from the listen address (webhooks, without a public_url) must name
        // the port actually bound, not port 0.
        let mut config = config;
        if let Ok(bound) = listener.local_addr() {
            config.server.listen = bound;
        }
        let (fed, endpoint) = match &config.federation {
            Some(f) => {
                let (fed, ep) = fed::Fed::bind(f, options.link_hooks.clone(), metrics.clone())?;
                (Some(fed), Some(ep))
            }
            None => (None, None),
        };
        let audit_key = audit::load_or_create_key(&config.data_dir)?;
        let files = files::Files::open(&config.data_dir)?;
        let skew = meshd_protocol::hello::DEFAULT_SKEW_MS;
        let ctx = Arc::new(Ctx {
            fed,
            clocks: clock::Clocks::new(
                config.federation.as_ref().map_or("", |f| f.broker.as_str()),
            ),
            reminders: reminders::Reminders::default(),
            files,
            relay: relay::Relay::default(),
            exec,
            telemetry: features::telemetry::Telemetry::default(),
            search: std::sync::Mutex::default(),
            mcp: {
                let mcp = mcp::Mcp::default();
                mcp.load(db.mcp_servers().await?, time::now_ms());
                mcp
            },
            audit: Arc::new(audit::Audit::new(audit_key, db.clone(), writer.clone())),
            webhook_buckets: std::sync::Mutex::new(ratelimit::Buckets::per_second(
                http::WEBHOOK_RATE.0,
                http::WEBHOOK_RATE.1,
                65_536,
            )),
            hooks: hooks::StatusHooks::default(),
            webhook_sources: std::sync::Mutex::new(ratelimit::Buckets::per_minute(
                WEBHOOK_POSTS_PER_ADDRESS_PER_MIN,
                16_384,
            )),
            usage: quota::Snapshot::default(),
            bridges: crate::features::bridges::Bridges::default(),
            watches: crate::features::watch::Watches::default(),
            external: crate::api::ws::ExternalConns::default(),
            usage_book: quota::UsageBook::load(&db).await?,
            connections: Arc::new(Semaphore::new(config.limits.max_connections)),
            pending: server::PendingTable::new(config.limits.max_pending_per_address),
            replay: std::sync::Mutex::new(ReplayCache::new(skew, 1_000_000)),
            config,
            db,
            writer,
            hub: Hub::default(),
            metrics,
            sessions: TaskTracker::new(),
            sessions_cancel: CancellationToken::new(),
            next_conn: AtomicU64::new(0),
            started: crate::time::instant(),
        });
        if let Some(f) = &ctx.fed {
            f.reload_consent(&ctx).await?;
        }
        crate::features::dashboard::tap_audit(&ctx);
        Ok(Bound {
            ctx,
            listener,
            writer: task,
            endpoint,
        })
    }
}

impl Bound {
    /// The bound HTTP/WebSocket address (useful with port 0).
    ///
    /// # Panics
    /// Never in practice: a bound TCP listener always has a local address.
    #[allow(clippy::expect_used)]
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has a local address")
    }

    /// The bound federation (QUIC) address, when federation is configured.
    pub fn federation_addr(&self) -> Option<SocketAddr> {
        self.endpoint.as_ref().and_then(|e| e.local_addr().ok())
    }

    /// Serves until `shutdown` is cancelled, then shuts down gracefully.
    ///
    /// # Errors
    /// An I/O error of the listener.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), std::io::Error> {
        let Self {
            ctx,
            listener,
            writer,
            endpoint,
        } = self;
        let writer_stop = CancellationToken::new();
        let addr = listener.local_addr()?;
        let background = TaskTracker::new();
        let background_cancel = CancellationToken::new();

        let writer_task = background.spawn(writer.run(writer_stop.clone()));
        // Kept to abort what outlives the stop's budget (a sick store can stall them).
        let mut upkeep = vec![
            background.spawn(housekeeping(ctx.clone(), background_cancel.clone())),
            background.spawn(crate::features::moderation::watch_revocations(
                ctx.clone(),
                background_cancel.clone(),
            )),
            background.spawn(checkpoints(ctx.clone(), background_cancel.clone())),
        ];
        // Reminders stop with the sessions (phase 2): what they fire must still reach
        // the store writer, which stops last.
        let reminders_cancel = CancellationToken::new();
        let reminders_task =
            background.spawn(reminders::run(ctx.clone(), reminders_cancel.clone()));
        upkeep.push(background.spawn(mcp::run(ctx.clone(), background_cancel.clone())));
        upkeep.push(background.spawn(crate::features::bridges::run(
            ctx.clone(),
            background_cancel.clone(),
        )));
        upkeep.push(background.spawn(mcp::run_store(ctx.clone(), background_cancel.clone())));
        upkeep.push(background.spawn(crate::features::watch::run(
            ctx.clone(),
            background_cancel.clone(),
        )));

        let accept_cancel = CancellationToken::new();
        let app = http::router(ctx.clone());
        // Every HTTP connection's task: shutdown waits for them (within the grace).
        let http_conns = TaskTracker::new();
        let server = tokio::spawn(server::serve(
            ctx.clone(),
            listener,
            app,
            accept_cancel.clone(),
            http_conns.clone(),
        ));

        if let (Some(f), Some(ep)) = (&ctx.fed, endpoint) {
            let quic = ep.local_addr().ok();
            f.start(&ctx, ep).await;
            info!(broker = f.name(), ?quic, "federation endpoint listening");
            if let Some(q) = quic {
                systemd::notify(&format!("STATUS=federation quic on {q}"));
            }
        }
        let (public_url, _) = ctx.config.public_url();
        info!(%addr, store = ctx.db.kind(), %public_url, "meshd serving");
        systemd::notify(&format!("READY=1\nSTATUS=serving http on {addr}"));

        shutdown.cancelled().await;
        let grace = ctx.config.server.shutdown_grace;
        info!(?grace, "shutting down");
        systemd::notify("STOPPING=1\nSTATUS=draining connections");

        // Phase 1: stop accepting. Phase 2: sessions flush, release leases and save state.
        // Sessions and everything that carries their last words (server, reminders,
        // clocks, audit, links) share one grace period; the store gets another, and
        // closing it at most `STORE_CLOSE_BUDGET` more, so a stop takes at most twice the
        // grace plus that, however sick the store (systemd's TimeoutStopSec must stay
        // above it). What outlives its phase is abandoned: nothing acknowledged is lost,
        // since every acknowledgement follows its commit.
        accept_cancel.cancel();
        ctx.sessions_cancel.cancel();
        reminders_cancel.cancel();
        ctx.sessions.close();
        let deadline = crate::time::instant() + grace;
        if tokio::time::timeout_at(deadline, ctx.sessions.wait())
            .await
            .is_err()
        {
            warn!("sessions did not finish within the grace period");
        }
        match tokio::time::timeout_at(deadline, server).await {
            Ok(Err(e)) => warn!(cause = %e, "http server task failed"),
            Err(_) => warn!("http server did not stop within the grace period"),
            Ok(Ok(())) => {}
        }
        http_conns.close();
        if tokio::time::timeout_at(deadline, http_conns.wait())
            .await
            .is_err()
        {
            warn!("http connections did not finish within the grace period");
        }
        if tokio::time::timeout_at(deadline, reminders_task)
            .await
            .is_err()
        {
            warn!("the reminder task did not stop within the grace period");
        }
        if tokio::time::timeout_at(deadline, ctx.clocks.shutdown())
            .await
            .is_err()
        {
            warn!("simulation clocks did not stop within the grace period");
        }
        if tokio::time::timeout_at(deadline, ctx.audit.flush())
            .await
            .is_err()
        {
            warn!("the audit log was not flushed within the grace period");
        }
        // Links close after the sessions (whose last updates they carry) and before the
        // store flush (acks they received are still written).
        if let Some(f) = &ctx.fed
            && tokio::time::timeout_at(deadline, f.shutdown())
                .await
                .is_err()
        {
            warn!("federation links did not close within the grace period");
        }
        // Phase 3: commit everything queued, then stop the writer and close the store.
        background_cancel.cancel();
        let deadline = crate::time::instant() + grace;
        if tokio::time::timeout_at(deadline, ctx.writer.flush())
            .await
            .is_err()
        {
            warn!("store flush did not finish within the grace period");
        }
        writer_stop.cancel();
        background.close();
        let writer_abort = writer_task.abort_handle();
        if tokio::time::timeout_at(deadline, writer_task)
            .await
            .is_err()
        {
            warn!("store writer did not stop within the grace period; abandoning it");
            writer_abort.abort();
        }
        for task in upkeep {
            let abort = task.abort_handle();
            if tokio::time::timeout_at(deadline, task).await.is_err() {
                abort.abort();
            }
        }
        if tokio::time::timeout_at(deadline, background.wait())
            .await
            .is_err()
        {
            warn!("background tasks did not stop within the grace period");
        }
        if tokio::time::timeout(STORE_CLOSE_BUDGET, ctx.db.close())
            .await
            .is_err()
        {
            warn!("the store did not close in time; it recovers at the next start");
        }
        info!("shutdown complete");
        Ok(())
    }
}

/// Webhook posts one source address may make a minute (before any secret is checked).
const WEBHOOK_POSTS_PER_ADDRESS_PER_MIN: f64 = 1_200.0;

/// The most a stop spends closing the store after its grace periods (SQLite's WAL is
/// folded into the database; an unfinished fold is redone at the next start).
pub const STORE_CLOSE_BUDGET: Duration = Duration::from_secs(2);

/// Folds SQLite's WAL into the database often enough that the WAL stays small and is
/// reused rather than grown (growing it costs the writer page zeroing in the kernel).
/// Runs beside the writer, never in its commit path.
async fn checkpoints(ctx: Arc<Ctx>, cancel: CancellationToken) {
    if ctx.db.kind() != "sqlite" {
        return;
    }
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            _ = tick.tick() => {}
        }
        if let Err(e) = ctx.db.checkpoint().await {
            warn!(cause = %e, "WAL checkpoint");
        }
    }
}

/// Periodic upkeep: expiry sweeps, the API key revocation watch, health and gauges.
async fn housekeeping(ctx: Arc<Ctx>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut keys_watermark = time::now_ms() - 60_000;
    let mut n: u64 = 0;
    let mut last_recount = crate::time::instant();
    let mut last_purge = crate::time::instant();
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            _ = tick.tick() => {}
        }
        n += 1;
        let now = time::now_ms();
        // API keys revoked by `meshd apikey revoke` (another process) close their
        // external connections.
        if !ctx.external.keys().is_empty() {
            match ctx.db.api_keys_revoked_since(keys_watermark - 10_000).await {
                Ok(ids) => {
                    ids.iter().for_each(|id| ctx.external.key_revoked(id));
                    keys_watermark = now;
                }
                Err(e) => warn!(cause = %e, "api key revocation watch"),
            }
        }
        ctx.hooks.prune(now, crate::time::instant());
        hub::lock(&ctx.webhook_buckets).prune(crate::time::instant());
        hub::lock(&ctx.webhook_sources).prune(crate::time::instant());
        let ttl = i64::try_from(ctx.config.limits.status_ttl.as_millis()).unwrap_or(i64::MAX);
        for mesh in ctx.hub.all() {
            for conn in mesh.expire_statuses(now, ttl) {
                if let Some(fed) = &ctx.fed {
                    fed.presence_changed(&mesh, conn);
                }
            }
        }
        // Quotas: messages recounted (deliveries and sweeps free room) and the usage
        // gauges refreshed every `quotas.recount_interval`; what outlived its retention
        // purged every `quotas.purge_interval`.
        if time::since(last_recount) >= ctx.config.quotas.recount_interval {
            last_recount = crate::time::instant();
            if let Err(e) = quota::refresh(&ctx).await {
                warn!(cause = %e, "recounting usage");
            }
        }
        if time::since(last_purge) >= ctx.config.quotas.purge_interval {
            last_purge = crate::time::instant();
            // A purge frees room: the counts follow at once.
            match quota::purge(&ctx, now).await {
                Ok(()) => {
                    last_recount = crate::time::instant();
                    if let Err(e) = quota::refresh(&ctx).await {
                        warn!(cause = %e, "recounting usage");
                    }
                }
                Err(e) => warn!(cause = %e, "purging expired rows"),
            }
        }
        if n % 600 == 3 {
            match ctx.db.purge_logs(now).await {
                Ok(0) => {}
                Ok(gone) => tracing::debug!(gone, "mesh log entries purged"),
                Err(e) => warn!(cause = %e, "purging mesh log entries"),
            }
        }
        if n % 30 == 2 {
            match ctx.db.expire_files(now).await {
                Ok(gone) => {
                    for (mesh_id, id) in gone {
                        ctx.files.remove(&mesh_id, &id).await;
                        files::publish(&ctx, &mesh_id, vec![files::file_removal(&id)]);
                    }
                }
                Err(e) => warn!(cause = %e, "expiring files"),
            }
        }
        let healthy = ctx.db.ping().await.is_ok();
        ctx.metrics.db_reachable.store(healthy, Ordering::Relaxed);
        if n % 15 == 1
            && let Ok(depth) = ctx.db.queue_depth().await
        {
            ctx.metrics.queue_depth.store(depth, Ordering::Relaxed);
        }
        if n % 30 == 1 {
            let retention = i64::try_from(ctx.config.limits.delivered_retention.as_millis())
                .unwrap_or(i64::MAX);
            // Bounded steps, each its own writer operation, until a step comes back short.
            let mut total = store::writer::Swept::default();
            for _ in 0..100 {
                let r = ctx
                    .writer
                    .call(|reply| WriteOp::Sweep {
                        delivered_before: now.saturating_sub(retention),
                        now,
                        reply,
                    })
                    .await;
                match r {
                    Ok(swept) => {
                        total.delivered += swept.delivered;
                        total.expired += swept.expired;
                        if swept.delivered < store::writer::SWEEP_CHUNK
                            && swept.expired < store::writer::SWEEP_CHUNK
                        {
                            break;
                        }
                    }
                    Err(e) => {
                        warn!(cause = %e, "message sweep");
                        break;
                    }
                }
            }
            if total.delivered + total.expired > 0 {
                info!(
                    delivered_removed = total.delivered,
                    expired_undelivered = total.expired,
                    "swept messages"
                );
            }
        }
    }
}
