-- Mesh memory (remember / recall / forget). Full-text search through a tsvector (english
-- configuration, ts_rank); the SQLite flavour uses FTS5.
CREATE TABLE memory (
    id                  TEXT PRIMARY KEY,
    mesh_id             TEXT NOT NULL,
    content             TEXT NOT NULL,
    tags                TEXT NOT NULL,
    remembered_by       TEXT NOT NULL,
    remembered_by_name  TEXT NOT NULL,
    remembered_at       BIGINT NOT NULL,
    forgotten_at        BIGINT,
    search_vector       tsvector GENERATED ALWAYS AS (to_tsvector('english', content || ' ' || tags)) STORED
);
CREATE INDEX memory_mesh ON memory (mesh_id, remembered_at);
CREATE INDEX memory_search ON memory USING GIN (search_vector);
