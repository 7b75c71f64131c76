-- Mesh memory (remember / recall / forget). Full-text search through FTS5 (bm25 ranking);
-- the PostgreSQL flavour uses a tsvector with a GIN index.
CREATE TABLE memory (
    id                  TEXT PRIMARY KEY,
    mesh_id             TEXT NOT NULL,
    content             TEXT NOT NULL,
    tags                TEXT NOT NULL,
    remembered_by       TEXT NOT NULL,
    remembered_by_name  TEXT NOT NULL,
    remembered_at       INTEGER NOT NULL,
    forgotten_at        INTEGER
);
CREATE INDEX memory_mesh ON memory (mesh_id, remembered_at);
-- Rows of `memory` by rowid; content and tags are indexed with the porter stemmer.
CREATE VIRTUAL TABLE memory_fts USING fts5(content, tags, content='memory', content_rowid='rowid', tokenize='porter unicode61');
CREATE TRIGGER memory_fts_insert AFTER INSERT ON memory BEGIN
    INSERT INTO memory_fts (rowid, content, tags) VALUES (new.rowid, new.content, new.tags);
END;
CREATE TRIGGER memory_fts_delete AFTER DELETE ON memory BEGIN
    INSERT INTO memory_fts (memory_fts, rowid, content, tags) VALUES ('delete', old.rowid, old.content, old.tags);
END;
