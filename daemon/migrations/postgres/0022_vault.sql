-- Vault (HEAD §5): a member's own client-encrypted secrets. Opaque to the broker; one
-- row per (mesh, member, key). Not replicated: a member always connects to its home broker.
CREATE TABLE vault_entry (
    id          TEXT PRIMARY KEY,
    mesh_id     TEXT NOT NULL REFERENCES mesh(id) ON DELETE CASCADE,
    member_id   TEXT NOT NULL,
    key         TEXT NOT NULL,
    ciphertext  TEXT NOT NULL,
    nonce       TEXT NOT NULL,
    sealed_key  TEXT NOT NULL,
    entry_type  TEXT NOT NULL,
    mount_path  TEXT,
    description TEXT,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL,
    UNIQUE (mesh_id, member_id, key)
);
