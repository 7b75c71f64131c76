-- Stream registry (create_stream / list_streams). Subscriptions and data are live only.
CREATE TABLE stream (
    id          TEXT PRIMARY KEY,
    mesh_id     TEXT NOT NULL,
    name        TEXT NOT NULL,
    created_by  TEXT NOT NULL,
    created_at  INTEGER NOT NULL
);
CREATE UNIQUE INDEX stream_mesh_name ON stream (mesh_id, name);
