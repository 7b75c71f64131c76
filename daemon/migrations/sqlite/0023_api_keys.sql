-- API keys (HEAD §2): bearer secrets for the REST API and the external WebSocket.
-- Only the SHA-256 of a secret is stored, with its first 11 characters to find it.
-- capabilities: space-separated; topic_scopes: a JSON array of topic names, or NULL
-- for every topic. issued_by_member_id is NULL for keys an operator minted unattached.
CREATE TABLE api_key (
    id                  TEXT PRIMARY KEY,
    mesh_id             TEXT NOT NULL REFERENCES mesh(id) ON DELETE CASCADE,
    label               TEXT NOT NULL,
    secret_hash         TEXT NOT NULL UNIQUE,
    secret_prefix       TEXT NOT NULL,
    capabilities        TEXT NOT NULL,
    topic_scopes        TEXT,
    issued_by_member_id TEXT,
    created_at          BIGINT NOT NULL,
    last_used_at        BIGINT,
    revoked_at          BIGINT,
    expires_at          BIGINT
);
CREATE INDEX api_key_prefix ON api_key (secret_prefix);
CREATE INDEX api_key_mesh ON api_key (mesh_id, created_at);
