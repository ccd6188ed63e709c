-- Usage per minute, hour and day, written only by `meter sink` from
-- usage.aggregates. Every window revision is inserted; ReplacingMergeTree
-- keeps the highest revision per window key after merges, so a retried or
-- replayed batch changes nothing. Readers must use FINAL or argMax(x, revision)
-- to see exactly one row per window before merges have run.
--
-- Quantities are in the usage type's base unit (schemas/catalog.toml).
-- quantity_sum and delta_sum are Decimal(38, 0): 128-bit exact integers.
-- {db} is replaced by the configured database name.

CREATE TABLE IF NOT EXISTS {db}.usage_minute
(
    window_start DateTime('UTC'),
    window_end DateTime('UTC'),
    customer_id String,
    service String,
    usage_type String,
    region String,
    resource_id String,
    event_count Int64,
    quantity_sum Decimal(38, 0),
    quantity_min Int64,
    quantity_max Int64,
    first_event_time_ms Int64,
    last_event_time_ms Int64,
    revision UInt64,
    is_final UInt8,
    delta_sum Decimal(38, 0)
)
ENGINE = ReplacingMergeTree(revision)
PARTITION BY toYYYYMM(window_start)
ORDER BY (customer_id, service, usage_type, region, resource_id, window_start);

CREATE TABLE IF NOT EXISTS {db}.usage_hour
(
    window_start DateTime('UTC'),
    window_end DateTime('UTC'),
    customer_id String,
    service String,
    usage_type String,
    region String,
    resource_id String,
    event_count Int64,
    quantity_sum Decimal(38, 0),
    quantity_min Int64,
    quantity_max Int64,
    first_event_time_ms Int64,
    last_event_time_ms Int64,
    revision UInt64,
    is_final UInt8,
    delta_sum Decimal(38, 0)
)
ENGINE = ReplacingMergeTree(revision)
PARTITION BY toYYYYMM(window_start)
ORDER BY (customer_id, service, usage_type, region, resource_id, window_start);

CREATE TABLE IF NOT EXISTS {db}.usage_day
(
    window_start DateTime('UTC'),
    window_end DateTime('UTC'),
    customer_id String,
    service String,
    usage_type String,
    region String,
    resource_id String,
    event_count Int64,
    quantity_sum Decimal(38, 0),
    quantity_min Int64,
    quantity_max Int64,
    first_event_time_ms Int64,
    last_event_time_ms Int64,
    revision UInt64,
    is_final UInt8,
    delta_sum Decimal(38, 0)
)
ENGINE = ReplacingMergeTree(revision)
PARTITION BY toYYYYMM(window_start)
ORDER BY (customer_id, service, usage_type, region, resource_id, window_start);
