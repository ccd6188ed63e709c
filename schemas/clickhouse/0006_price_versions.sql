-- A month can be priced by two price-book versions when one takes effect
-- inside it: each daily rated line records the version whose prices priced
-- that day (usage lines; empty for the lines contracts add). version_id
-- stays the month's rating id: the version's id, or every version's id
-- joined by '+' ('2026-04+2026-07-15').
-- {db} is replaced by the configured database name.

ALTER TABLE {db}.rated_usage ADD COLUMN price_version_id String DEFAULT '';
