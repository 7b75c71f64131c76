//! PostgreSQL for tests: a fresh database per test, on the server named by
//! `MESHD_TEST_POSTGRES_URL` (what `.ci/run` starts), or else on a private cluster this
//! process starts from the installed PostgreSQL binaries and stops when it exits.
//!
//! PostgreSQL refuses to run as root, so as root the cluster runs as user `postgres`
//! (`runuser -u postgres --`) in a directory owned by it.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};
use sqlx::Connection as _;
use tokio::sync::OnceCell;

static CLUSTER: OnceCell<String> = OnceCell::const_new();

/// A URL to a new, empty database.
///
/// # Errors
/// No server configured and none could be started.
pub async fn fresh_database_url() -> anyhow::Result<String> {
    let base = match std::env::var("MESHD_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => url,
        _ => CLUSTER
            .get_or_try_init(|| async { tokio::task::spawn_blocking(start_cluster).await? })
            .await?
            .clone(),
    };
    let name = format!("meshd_t_{}", hex::encode(random::<8>()));
    let mut conn = sqlx::PgConnection::connect(&base)
        .await
        .with_context(|| format!("connecting to the test PostgreSQL at {base}"))?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await?;
    conn.close().await?;
    Ok(replace_database(&base, &name))
}

fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).expect("OS randomness");
    b
}

/// `postgres://u@h:p/db?x` → same URL with database `name`.
fn replace_database(url: &str, name: &str) -> String {
    let (head, query) = url
        .split_once('?')
        .map_or((url, None), |(h, q)| (h, Some(q)));
    let scheme_end = head.find("://").map_or(0, |i| i + 3);
    let base = match head[scheme_end..].find('/') {
        Some(i) => &head[..scheme_end + i],
        None => head,
    };
    match query {
        Some(q) => format!("{base}/{name}?{q}"),
        None => format!("{base}/{name}"),
    }
}

fn bin_dir() -> anyhow::Result<PathBuf> {
    if let Ok(dir) = std::env::var("MESHD_TEST_PG_BIN") {
        return Ok(dir.into());
    }
    for v in ["17", "16", "15", "14"] {
        let dir = PathBuf::from(format!("/usr/lib/postgresql/{v}/bin"));
        if dir.join("initdb").exists() {
            return Ok(dir);
        }
    }
    bail!(
        "no PostgreSQL server binaries found (looked in /usr/lib/postgresql/*/bin); install postgresql-15 \
         or set MESHD_TEST_POSTGRES_URL"
    )
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

fn run_as_pg(bin: &Path, args: &[&str]) -> anyhow::Result<()> {
    let mut cmd = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin);
        c
    } else {
        Command::new(bin)
    };
    let out = cmd
        .args(args)
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "{} {:?} failed: {}{}",
            bin.display(),
            args,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn start_cluster() -> anyhow::Result<String> {
    let bin = bin_dir()?;
    let dir = tempfile::Builder::new()
        .prefix("meshd-pg-")
        .tempdir()?
        .keep();
    let data = dir.join("data");
    std::fs::create_dir(&data)?;
    if is_root() {
        let ok = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&dir)
            .status()?
            .success();
        if !ok {
            bail!("chown postgres {} failed", dir.display());
        }
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let data_s = data.to_string_lossy().to_string();
    let dir_s = dir.to_string_lossy().to_string();
    run_as_pg(
        &bin.join("initdb"),
        &[
            "-D",
            &data_s,
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        ],
    )?;
    let opts = format!(
        "-p {port} -k {dir_s} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
    );
    let log = format!("{dir_s}/log");
    run_as_pg(
        &bin.join("pg_ctl"),
        &["-D", &data_s, "-o", &opts, "-l", &log, "-w", "start"],
    )?;
    // Stop the cluster when this test process exits (nothing else would).
    let pg_ctl = bin.join("pg_ctl");
    let stop = if is_root() {
        format!(
            "runuser -u postgres -- {} -D {data_s} -m immediate stop",
            pg_ctl.display()
        )
    } else {
        format!("{} -D {data_s} -m immediate stop", pg_ctl.display())
    };
    let watchdog = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {stop} >/dev/null 2>&1; rm -rf {dir_s}",
        pid = std::process::id()
    );
    Command::new("sh")
        .args(["-c", &watchdog])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("starting the cluster watchdog")?;
    Ok(format!("postgres://postgres@127.0.0.1:{port}/postgres"))
}

#[cfg(test)]
mod tests {
    use super::replace_database;

    #[test]
    fn database_replacement() {
        assert_eq!(
            replace_database("postgres://u@h:1/postgres", "x"),
            "postgres://u@h:1/x"
        );
        assert_eq!(
            replace_database("postgres://u@h:1", "x"),
            "postgres://u@h:1/x"
        );
        assert_eq!(
            replace_database("postgres://u@h/db?sslmode=disable", "x"),
            "postgres://u@h/x?sslmode=disable"
        );
    }
}
