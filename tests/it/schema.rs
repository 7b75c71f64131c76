//! The SQLite and PostgreSQL migrations are twins: after both have run, the two schemas
//! have the same tables, the same columns in each, the same explicit indexes and the
//! same migration versions (types differ by dialect and are not compared).
//!
//! One feature is built differently on purpose: memory's full-text search is an FTS5
//! virtual table (`memory_fts` and its shadow tables) on SQLite and a `tsvector` column
//! with a GIN index on PostgreSQL. Those objects are named below, checked to exist, and
//! left out of the comparison.

use std::collections::BTreeSet;

use meshd::store::Db;
use meshd_tests::Backend;
use meshd_tests::broker::test_config;
use sqlx::Row as _;

/// (tables, table.column, index on table, migration versions) of a migrated store.
type Shape = (
    BTreeSet<String>,
    BTreeSet<String>,
    BTreeSet<String>,
    BTreeSet<i64>,
);

async fn shape(backend: Backend) -> anyhow::Result<Shape> {
    let dir = tempfile::tempdir()?;
    let config = test_config(backend, dir.path()).await?;
    let db = Db::open(&config.storage.backend, config.storage.durability).await?;
    let pairs = |rows: Vec<(String, String)>| -> BTreeSet<String> {
        rows.into_iter().map(|(a, b)| format!("{a}.{b}")).collect()
    };
    let shape = match &db {
        Db::Sqlite(p, _) => {
            let tables: Vec<(String,)> = sqlx::query_as(
                "SELECT name FROM sqlite_master WHERE type = 'table' \
                 AND name NOT LIKE 'sqlite_%' AND name <> '_sqlx_migrations'",
            )
            .fetch_all(p)
            .await?;
            let columns: Vec<(String, String)> = sqlx::query_as(
                "SELECT m.name, c.name FROM sqlite_master m, pragma_table_info(m.name) c \
                 WHERE m.type = 'table' AND m.name NOT LIKE 'sqlite_%' \
                 AND m.name <> '_sqlx_migrations'",
            )
            .fetch_all(p)
            .await?;
            let indexes: Vec<(String, String)> = sqlx::query_as(
                "SELECT tbl_name, name FROM sqlite_master WHERE type = 'index' \
                 AND name NOT LIKE 'sqlite_autoindex_%'",
            )
            .fetch_all(p)
            .await?;
            let versions = sqlx::query("SELECT version FROM _sqlx_migrations")
                .fetch_all(p)
                .await?;
            (
                tables.into_iter().map(|t| t.0).collect(),
                pairs(columns),
                pairs(indexes),
                versions.iter().map(|r| r.get::<i64, _>(0)).collect(),
            )
        }
        Db::Postgres(p) => {
            let tables: Vec<(String,)> = sqlx::query_as(
                "SELECT table_name::text FROM information_schema.tables \
                 WHERE table_schema = 'public' AND table_type = 'BASE TABLE' \
                 AND table_name <> '_sqlx_migrations'",
            )
            .fetch_all(p)
            .await?;
            let columns: Vec<(String, String)> = sqlx::query_as(
                "SELECT table_name::text, column_name::text FROM information_schema.columns \
                 WHERE table_schema = 'public' AND table_name <> '_sqlx_migrations'",
            )
            .fetch_all(p)
            .await?;
            // Indexes PostgreSQL makes for primary keys and UNIQUE constraints are the
            // counterparts of SQLite's autoindexes: only explicit ones are compared.
            let indexes: Vec<(String, String)> = sqlx::query_as(
                "SELECT i.tablename::text, i.indexname::text FROM pg_indexes i \
                 WHERE i.schemaname = 'public' AND i.tablename <> '_sqlx_migrations' \
                 AND NOT EXISTS (SELECT 1 FROM pg_constraint c \
                                 WHERE c.conname = i.indexname AND c.contype IN ('p', 'u'))",
            )
            .fetch_all(p)
            .await?;
            let versions = sqlx::query("SELECT version FROM _sqlx_migrations")
                .fetch_all(p)
                .await?;
            (
                tables.into_iter().map(|t| t.0).collect(),
                pairs(columns),
                pairs(indexes),
                versions.iter().map(|r| r.get::<i64, _>(0)).collect(),
            )
        }
    };
    db.close().await;
    Ok(shape)
}

/// Lists what one side has and the other lacks.
fn differences<T: Ord + std::fmt::Debug>(
    what: &str,
    a: &BTreeSet<T>,
    b: &BTreeSet<T>,
) -> Vec<String> {
    let only = |x: &BTreeSet<T>, y: &BTreeSet<T>| {
        x.difference(y)
            .map(|v| format!("{v:?}"))
            .collect::<Vec<_>>()
    };
    let (s, p) = (only(a, b), only(b, a));
    let mut out = Vec::new();
    if !s.is_empty() {
        out.push(format!("{what} only in SQLite: {}", s.join(", ")));
    }
    if !p.is_empty() {
        out.push(format!("{what} only in PostgreSQL: {}", p.join(", ")));
    }
    out
}

/// Takes the dialect's own full-text objects out of a shape, failing if one is missing.
fn without_search(shape: &mut Shape, tables: &[&str], columns: &[&str], indexes: &[&str]) {
    for t in tables {
        assert!(shape.0.remove(*t), "expected table {t}");
        shape.1.retain(|c| !c.starts_with(&format!("{t}.")));
    }
    for c in columns {
        assert!(shape.1.remove(*c), "expected column {c}");
    }
    for i in indexes {
        assert!(shape.2.remove(*i), "expected index {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_twins_have_the_same_schema() -> anyhow::Result<()> {
    let mut sqlite = shape(Backend::Sqlite).await?;
    let mut postgres = shape(Backend::Postgres).await?;
    let fts: Vec<String> = ["memory_fts", "mesh_log_fts"]
        .iter()
        .flat_map(|t| ["", "_config", "_data", "_docsize", "_idx"].map(|s| format!("{t}{s}")))
        .collect();
    let fts: Vec<&str> = fts.iter().map(String::as_str).collect();
    without_search(&mut sqlite, &fts, &[], &[]);
    without_search(
        &mut postgres,
        &[],
        &["memory.search_vector", "mesh_log.search_vector"],
        &["memory.memory_search", "mesh_log.mesh_log_search"],
    );
    let ((st, sc, si, sv), (pt, pc, pi, pv)) = (sqlite, postgres);
    assert!(
        st.len() > 10 && sc.len() > st.len(),
        "introspection found {st:?}"
    );
    let mut diff = differences("tables", &st, &pt);
    diff.extend(differences("columns", &sc, &pc));
    diff.extend(differences("indexes", &si, &pi));
    diff.extend(differences("migrations", &sv, &pv));
    assert!(
        diff.is_empty(),
        "the migration twins differ:\n{}",
        diff.join("\n")
    );
    Ok(())
}
