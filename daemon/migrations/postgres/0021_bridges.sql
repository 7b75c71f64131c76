-- Bridges between two meshes (meshd extension): messages carrying the bridge's tags
-- are relayed, and with `peers` each mesh's peers are listed and reachable by DM in the
-- other. `mesh_b` is on this broker, or on `broker_b` (whose admin keeps the mirror
-- row). Tags: space-separated prefixes.
CREATE TABLE bridge (
    id          TEXT PRIMARY KEY,
    mesh_a      TEXT NOT NULL,
    mesh_b      TEXT NOT NULL,
    broker_b    TEXT,
    direction   TEXT NOT NULL,
    tags        TEXT NOT NULL,
    peers       BOOLEAN NOT NULL,
    created_at  BIGINT NOT NULL
);
-- A DM that reached its recipient through a bridge: the mesh its sender is in (JSON).
ALTER TABLE message ADD COLUMN bridged TEXT;
