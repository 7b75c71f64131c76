-- Mesh telemetry: structured log entries written by peers (`mesh_log`), searched with
-- `mesh_logs` (FTS5 here; a tsvector with a GIN index on PostgreSQL), kept for a week
-- and at most 100,000 per mesh (housekeeping trims the oldest).
CREATE TABLE mesh_log (
    id           TEXT PRIMARY KEY,
    mesh_id      TEXT NOT NULL,
    at           INTEGER NOT NULL,
    level        INTEGER NOT NULL,
    member_id    TEXT NOT NULL,
    peer_name    TEXT NOT NULL,
    peer_pubkey  TEXT NOT NULL,
    message      TEXT NOT NULL,
    data         TEXT,
    -- The peer broker the entry was written at (NULL: here).
    broker       TEXT
);
CREATE INDEX mesh_log_mesh ON mesh_log (mesh_id, at);
CREATE VIRTUAL TABLE mesh_log_fts USING fts5(message, data, content='mesh_log', content_rowid='rowid', tokenize='porter unicode61');
CREATE TRIGGER mesh_log_fts_insert AFTER INSERT ON mesh_log BEGIN
    INSERT INTO mesh_log_fts (rowid, message, data) VALUES (new.rowid, new.message, COALESCE(new.data, ''));
END;
CREATE TRIGGER mesh_log_fts_delete AFTER DELETE ON mesh_log BEGIN
    INSERT INTO mesh_log_fts (mesh_log_fts, rowid, message, data) VALUES ('delete', old.rowid, old.message, COALESCE(old.data, ''));
END;
