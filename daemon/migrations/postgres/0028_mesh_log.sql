-- Mesh telemetry: structured log entries written by peers (`mesh_log`), searched with
-- `mesh_logs` (a tsvector with a GIN index here; FTS5 on SQLite), kept for a week and at
-- most 100,000 per mesh (housekeeping trims the oldest).
CREATE TABLE mesh_log (
    id            TEXT PRIMARY KEY,
    mesh_id       TEXT NOT NULL,
    at            BIGINT NOT NULL,
    level         BIGINT NOT NULL,
    member_id     TEXT NOT NULL,
    peer_name     TEXT NOT NULL,
    peer_pubkey   TEXT NOT NULL,
    message       TEXT NOT NULL,
    data          TEXT,
    -- The peer broker the entry was written at (NULL: here).
    broker        TEXT,
    search_vector tsvector GENERATED ALWAYS AS (to_tsvector('english', message || ' ' || COALESCE(data, ''))) STORED
);
CREATE INDEX mesh_log_mesh ON mesh_log (mesh_id, at);
CREATE INDEX mesh_log_search ON mesh_log USING GIN (search_vector);
