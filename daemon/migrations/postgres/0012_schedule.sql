-- Scheduled messages and cron reminders (schedule / list_scheduled / cancel_scheduled).
-- A schedule fires as the member who created it, whether or not that session is still
-- connected; next_at is NULL once a one-shot fired or the schedule was cancelled.
CREATE TABLE scheduled_message (
    id             TEXT PRIMARY KEY,
    mesh_id        TEXT NOT NULL,
    member_id      TEXT NOT NULL,
    member_pubkey  TEXT NOT NULL,
    -- The creating presence's routing key (its session key, else the member key).
    sender_pubkey  TEXT NOT NULL,
    sender_name    TEXT NOT NULL,
    target_spec    TEXT NOT NULL,
    message        TEXT NOT NULL,
    cron           TEXT,
    next_at        BIGINT,
    fired_count    BIGINT NOT NULL DEFAULT 0,
    cancelled      BIGINT NOT NULL DEFAULT 0,
    fired_at       BIGINT,
    created_at     BIGINT NOT NULL
);
CREATE INDEX scheduled_due ON scheduled_message (next_at) WHERE next_at IS NOT NULL;
CREATE INDEX scheduled_member ON scheduled_message (mesh_id, member_id);
