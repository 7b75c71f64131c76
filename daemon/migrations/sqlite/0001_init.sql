-- meshd schema, SQLite flavour. Times are milliseconds since the Unix epoch (INTEGER).
-- Keep in step with ../postgres/0001_init.sql: the same queries run on both.

CREATE TABLE mesh (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    slug          TEXT NOT NULL UNIQUE,
    owner_pubkey  TEXT NOT NULL,
    root_key      TEXT NOT NULL,
    created_at    INTEGER NOT NULL,
    archived_at   INTEGER
);

CREATE TABLE member (
    id            TEXT PRIMARY KEY,
    mesh_id       TEXT NOT NULL REFERENCES mesh(id),
    pubkey        TEXT NOT NULL,
    display_name  TEXT NOT NULL,
    role          TEXT NOT NULL,
    joined_at     INTEGER NOT NULL,
    revoked_at    INTEGER,
    invite_id     TEXT
);
-- One row per key per mesh: a revoked key stays revoked.
CREATE UNIQUE INDEX member_mesh_pubkey ON member (mesh_id, pubkey);
CREATE INDEX member_revoked ON member (revoked_at) WHERE revoked_at IS NOT NULL;

CREATE TABLE invite (
    id            TEXT PRIMARY KEY,
    mesh_id       TEXT NOT NULL REFERENCES mesh(id),
    token         TEXT NOT NULL UNIQUE,
    role          TEXT NOT NULL,
    max_uses      INTEGER NOT NULL,
    used_count    INTEGER NOT NULL DEFAULT 0,
    expires_at    INTEGER NOT NULL,
    created_at    INTEGER NOT NULL,
    revoked_at    INTEGER
);

-- Session keys seen in hellos, bound to the member that first presented them.
CREATE TABLE session_key (
    mesh_id       TEXT NOT NULL,
    pubkey        TEXT NOT NULL,
    member_id     TEXT NOT NULL,
    first_seen    INTEGER NOT NULL,
    last_seen     INTEGER NOT NULL,
    PRIMARY KEY (mesh_id, pubkey)
);

-- Envelopes. Direct messages keep their ciphertext until delivered; multicast rows keep
-- only metadata (for message_status). seq orders delivery per recipient.
CREATE TABLE message (
    seq                   INTEGER PRIMARY KEY,
    id                    TEXT NOT NULL UNIQUE,
    mesh_id               TEXT NOT NULL,
    sender_member_id      TEXT NOT NULL,
    sender_pubkey         TEXT NOT NULL,
    sender_member_pubkey  TEXT NOT NULL,
    sender_name           TEXT NOT NULL,
    target_spec           TEXT NOT NULL,
    target_key            TEXT,
    priority              INTEGER NOT NULL,
    nonce                 TEXT NOT NULL,
    ciphertext            TEXT NOT NULL,
    subtype               TEXT,
    client_message_id     TEXT,
    created_at            INTEGER NOT NULL,
    expires_at            INTEGER NOT NULL,
    delivered_at          INTEGER,
    lease_conn            INTEGER,
    lease_until           INTEGER
);
CREATE INDEX message_pending ON message (mesh_id, target_key, seq) WHERE delivered_at IS NULL;
CREATE INDEX message_expires ON message (expires_at);
CREATE INDEX message_client_id ON message (mesh_id, client_message_id) WHERE client_message_id IS NOT NULL;

CREATE TABLE state (
    mesh_id       TEXT NOT NULL,
    key           TEXT NOT NULL,
    value         TEXT NOT NULL,
    updated_by    TEXT NOT NULL,
    updated_at    INTEGER NOT NULL,
    PRIMARY KEY (mesh_id, key)
);

-- "Welcome back": what a member's last session looked like.
CREATE TABLE peer_state (
    mesh_id            TEXT NOT NULL,
    member_id          TEXT NOT NULL,
    groups             TEXT NOT NULL,
    profile            TEXT NOT NULL,
    visible            BOOLEAN NOT NULL,
    last_summary       TEXT,
    last_display_name  TEXT,
    stats              TEXT NOT NULL,
    last_seen_at       INTEGER NOT NULL,
    created_at         INTEGER NOT NULL,
    updated_at         INTEGER NOT NULL,
    PRIMARY KEY (mesh_id, member_id)
);
