-- Tasks replicate across the brokers of a shared mesh: the creating member's key (a
-- broker speaks only for the members it hosts) and when the claim was made (the
-- earliest claim wins everywhere).
ALTER TABLE task ADD COLUMN creator_pubkey TEXT;
