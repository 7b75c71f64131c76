-- Tags (meshd extension): what a message carries, what a returning member subscribed to.
-- Space-separated (the tag alphabet has no space); NULL when there are none.
ALTER TABLE message ADD COLUMN tags TEXT;
ALTER TABLE peer_state ADD COLUMN tags TEXT;
