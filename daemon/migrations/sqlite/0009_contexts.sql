-- Shared contexts (share_context / get_context / list_contexts): one per member and mesh.
CREATE TABLE context (
    mesh_id       TEXT NOT NULL,
    member_id     TEXT NOT NULL,
    peer_name     TEXT NOT NULL,
    summary       TEXT NOT NULL,
    files_read    TEXT NOT NULL,
    key_findings  TEXT NOT NULL,
    tags          TEXT NOT NULL,
    updated_at    INTEGER NOT NULL,
    PRIMARY KEY (mesh_id, member_id)
);
