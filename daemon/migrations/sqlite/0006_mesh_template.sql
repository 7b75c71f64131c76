-- The template a mesh was created from: its groups (with roles), suggested roles and hint.
CREATE TABLE mesh_template (
    mesh_id     TEXT PRIMARY KEY,
    template    TEXT NOT NULL,
    definition  TEXT NOT NULL
);
