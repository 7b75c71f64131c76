-- Positions of a peer's outbox this broker refused, so a resend after a cut is refused
-- again rather than taken for a duplicate of something stored.
CREATE TABLE fed_inbox_reject (
    peer    TEXT NOT NULL,
    seq     INTEGER NOT NULL,
    reason  TEXT NOT NULL,
    at      INTEGER NOT NULL,
    PRIMARY KEY (peer, seq)
);
