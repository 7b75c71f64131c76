-- Federation: shared meshes, members hosted by peer brokers, the per-link outbox and
-- the receiver-side de-duplication cursor. Keep in step with the other backend's file.

-- A member hosted by a peer broker (NULL: hosted here). Only that broker may speak for it.
ALTER TABLE member ADD COLUMN home_broker TEXT;

-- Direct messages whose recipient is hosted by a peer broker: the row is the durable
-- outbox entry, ordered by forward_seq (per peer, assigned by the store writer) until the
-- peer has stored it.
ALTER TABLE message ADD COLUMN forward_to TEXT;
ALTER TABLE message ADD COLUMN forward_seq INTEGER;
ALTER TABLE message ADD COLUMN forwarded_at INTEGER;
ALTER TABLE message ADD COLUMN forward_error TEXT;
CREATE INDEX message_outbox ON message (forward_to, forward_seq) WHERE forward_to IS NOT NULL AND forwarded_at IS NULL;

-- The highest forward_seq committed per peer. Peers de-duplicate by a high-water mark, so
-- a sequence must never go back: not after old rows are swept, not after a restart.
CREATE TABLE fed_outseq (
    peer      TEXT PRIMARY KEY,
    last_seq  INTEGER NOT NULL
);

-- Consent to exchange a mesh with a peer broker. role 'offer': this broker is the home
-- and shares the mesh with peer; 'accept': peer is the home and this broker accepted.
CREATE TABLE fed_share (
    mesh_id     TEXT NOT NULL,
    peer        TEXT NOT NULL,
    role        TEXT NOT NULL CHECK (role IN ('offer', 'accept')),
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (mesh_id, peer)
);

-- Replicas: the home broker and the roster it last announced.
CREATE TABLE fed_replica (
    mesh_id      TEXT PRIMARY KEY,
    home_broker  TEXT NOT NULL,
    roster       TEXT NOT NULL
);

-- Highest outbox seq of each peer broker already processed here (stored in the same
-- transaction as the message, so a resend after any crash is recognised).
CREATE TABLE fed_inbox (
    peer      TEXT PRIMARY KEY,
    high_seq  INTEGER NOT NULL
);
