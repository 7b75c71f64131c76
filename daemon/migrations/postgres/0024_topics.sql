-- Topics (HEAD §1): named conversations with a durable history, subscribers, read
-- cursors and an optional per-topic key sealed to each member. Replicated to the
-- brokers a mesh is shared with (ids are global).
CREATE TABLE topic (
    id                   TEXT PRIMARY KEY,
    mesh_id              TEXT NOT NULL REFERENCES mesh(id) ON DELETE CASCADE,
    name                 TEXT NOT NULL,
    description          TEXT,
    visibility           TEXT NOT NULL,
    created_by_member_id TEXT,
    encrypted_key_pubkey TEXT,
    created_at           BIGINT NOT NULL,
    archived_at          BIGINT,
    UNIQUE (mesh_id, name)
);
CREATE TABLE topic_member (
    topic_id     TEXT NOT NULL REFERENCES topic(id) ON DELETE CASCADE,
    member_id    TEXT NOT NULL,
    role         TEXT NOT NULL,
    joined_at    BIGINT NOT NULL,
    last_read_at BIGINT,
    PRIMARY KEY (topic_id, member_id)
);
CREATE INDEX topic_member_member ON topic_member (member_id);
-- One sealed copy of the topic key per member; sealed_for is the member key it was
-- sealed to (a member whose key changed is pending again).
CREATE TABLE topic_member_key (
    topic_id      TEXT NOT NULL REFERENCES topic(id) ON DELETE CASCADE,
    member_id     TEXT NOT NULL,
    encrypted_key TEXT NOT NULL,
    nonce         TEXT NOT NULL,
    sealed_for    TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    rotated_at    BIGINT,
    PRIMARY KEY (topic_id, member_id)
);
CREATE TABLE topic_message (
    id                    TEXT PRIMARY KEY,
    topic_id              TEXT NOT NULL REFERENCES topic(id) ON DELETE CASCADE,
    mesh_id               TEXT NOT NULL,
    sender_member_id      TEXT NOT NULL,
    sender_member_pubkey  TEXT NOT NULL,
    sender_session_pubkey TEXT,
    sender_name           TEXT NOT NULL,
    nonce                 TEXT NOT NULL,
    ciphertext            TEXT NOT NULL,
    body_version          BIGINT NOT NULL,
    reply_to_id           TEXT,
    created_at            BIGINT NOT NULL,
    origin_broker         TEXT
);
CREATE INDEX topic_message_topic ON topic_message (topic_id, created_at);
CREATE INDEX topic_message_mesh ON topic_message (mesh_id, created_at);
CREATE TABLE notification (
    id                  TEXT PRIMARY KEY,
    mesh_id             TEXT NOT NULL,
    topic_id            TEXT NOT NULL REFERENCES topic(id) ON DELETE CASCADE,
    message_id          TEXT NOT NULL REFERENCES topic_message(id) ON DELETE CASCADE,
    recipient_member_id TEXT NOT NULL,
    sender_member_id    TEXT NOT NULL,
    kind                TEXT NOT NULL,
    created_at          BIGINT NOT NULL,
    read_at             BIGINT,
    UNIQUE (message_id, recipient_member_id)
);
CREATE INDEX notification_recipient ON notification (recipient_member_id, created_at);
