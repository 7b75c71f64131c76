-- URL watches (HEAD §6). Unlike the reference (in memory, owned by one connection),
-- a watch belongs to its member and survives restarts and reconnects.
CREATE TABLE watch (
    id          TEXT PRIMARY KEY,
    mesh_id     TEXT NOT NULL REFERENCES mesh(id) ON DELETE CASCADE,
    member_id   TEXT NOT NULL,
    url         TEXT NOT NULL,
    mode        TEXT NOT NULL,
    extract     TEXT,
    interval_s  BIGINT NOT NULL,
    notify_on   TEXT NOT NULL,
    headers     TEXT NOT NULL,
    label       TEXT,
    last_value  TEXT,
    last_check  BIGINT,
    last_error  TEXT,
    created_at  BIGINT NOT NULL
);
CREATE INDEX watch_member ON watch (mesh_id, member_id);
