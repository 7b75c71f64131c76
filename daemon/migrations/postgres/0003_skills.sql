-- The mesh's skills catalogue (share_skill / get_skill / list_skills / remove_skill).
-- Replicated between the brokers of a shared mesh: the newest write wins (updated_at).
CREATE TABLE skill (
    mesh_id       TEXT NOT NULL,
    name          TEXT NOT NULL,
    description   TEXT NOT NULL,
    instructions  TEXT NOT NULL,
    tags          TEXT NOT NULL,
    author        TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL,
    PRIMARY KEY (mesh_id, name)
);
