-- How far each running daemon has applied revocations made in the store by another
-- process (`meshd member revoke`): the command waits until the live daemon has caught
-- up, so a hello refused from the store is refused from the daemon's member cache too.
CREATE TABLE revocation_watch (
    broker           TEXT PRIMARY KEY,
    applied_through  BIGINT NOT NULL,
    beat_at          BIGINT NOT NULL
);
