-- Inbound webhooks: POST /hook/<mesh_id>/<secret> pushes the JSON body to the mesh.
CREATE TABLE webhook (
    id                 TEXT PRIMARY KEY,
    mesh_id            TEXT NOT NULL,
    name               TEXT NOT NULL,
    secret             TEXT NOT NULL,
    creator_member_id  TEXT NOT NULL,
    active             BOOLEAN NOT NULL,
    created_at         BIGINT NOT NULL
);
-- A name is unique among the mesh's active webhooks (a deleted one frees its name).
CREATE UNIQUE INDEX webhook_active_name ON webhook (mesh_id, name) WHERE active;
