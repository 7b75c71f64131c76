-- A scheduled message keeps the subtype it was scheduled with ("reminder" or none), as
-- the reference does: the CLI's `remind` command schedules without one.
ALTER TABLE scheduled_message ADD COLUMN subtype TEXT;
