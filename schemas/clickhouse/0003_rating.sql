-- Rating: the price book as loaded by `meter prices load`, and what
-- `meter rate --month YYYY-MM` produced from final usage (usage_day, and
-- usage_minute for usage types with a per-run minimum).
--
-- Every table is a ReplacingMergeTree(revision) keyed by the month, the
-- price-book version and the line's key: re-rating a (month, version)
-- replaces lines in place, and `meter rate` only inserts lines that are new
-- or changed (running it twice inserts nothing). Readers use FINAL or
-- argMax(x, revision). Reports read the version rated last for a month:
-- argMax(version_id, revision) over invoices of that month.
--
-- Quantities in base units are Decimal(38, 0) (exact 128-bit integers);
-- quantities in pricing units and amounts at full precision are
-- Decimal(38, 12); billed amounts (rounded half to even to the currency's
-- minor unit) are Decimal(38, 2). month is the first day of the month.
-- A line that disappeared from a re-rating (its usage is gone) is replaced
-- by a row with zero quantities and amounts, so sums stay right.
-- {db} is replaced by the configured database name.

CREATE TABLE IF NOT EXISTS {db}.price_book
(
    version_id String,
    effective_from Date,
    currency String,
    service String,
    usage_type String,
    region String,
    pricing_unit String,
    model String,
    tier UInt16,
    tier_from Decimal(38, 12),
    tier_up_to Nullable(Decimal(38, 12)),
    rate Nullable(Decimal(38, 12)),
    package_size Nullable(Decimal(38, 12)),
    package_price Nullable(Decimal(38, 12)),
    free_allowance Decimal(38, 12),
    minimum_seconds UInt32,
    description String,
    loaded_at DateTime('UTC'),
    revision UInt64
)
ENGINE = ReplacingMergeTree(revision)
ORDER BY (version_id, service, usage_type, region, tier);

CREATE TABLE IF NOT EXISTS {db}.rated_usage
(
    month Date,
    version_id String,
    day Date,
    customer_id String,
    service String,
    usage_type String,
    region String,
    resource_ids Array(String),
    usage_quantity Decimal(38, 0),
    minimum_uplift Decimal(38, 0),
    pricing_unit String,
    quantity Decimal(38, 12),
    cost Decimal(38, 12),
    unit_rate Nullable(Decimal(38, 12)),
    currency String,
    line_id String,
    rated_at DateTime('UTC'),
    revision UInt64
)
ENGINE = ReplacingMergeTree(revision)
PARTITION BY toYYYYMM(month)
ORDER BY (month, version_id, customer_id, service, usage_type, region, day);

CREATE TABLE IF NOT EXISTS {db}.invoice_lines
(
    month Date,
    version_id String,
    customer_id String,
    service String,
    usage_type String,
    region String,
    line_id String,
    usage_quantity Decimal(38, 0),
    minimum_uplift Decimal(38, 0),
    pricing_unit String,
    quantity Decimal(38, 12),
    free_allowance_used Decimal(38, 12),
    billable_quantity Decimal(38, 12),
    tier_from Array(Decimal(38, 12)),
    tier_up_to Array(Nullable(Decimal(38, 12))),
    tier_quantity Array(Decimal(38, 12)),
    tier_unit_rate Array(Decimal(38, 12)),
    tier_amount Array(Decimal(38, 12)),
    packages Nullable(Decimal(38, 12)),
    unit_rate Nullable(Decimal(38, 12)),
    amount_full Decimal(38, 12),
    amount Decimal(38, 2),
    currency String,
    rated_at DateTime('UTC'),
    revision UInt64
)
ENGINE = ReplacingMergeTree(revision)
PARTITION BY toYYYYMM(month)
ORDER BY (month, version_id, customer_id, service, usage_type, region);

CREATE TABLE IF NOT EXISTS {db}.invoices
(
    month Date,
    version_id String,
    customer_id String,
    invoice_id String,
    currency String,
    line_count UInt32,
    total Decimal(38, 2),
    rated_at DateTime('UTC'),
    revision UInt64
)
ENGINE = ReplacingMergeTree(revision)
PARTITION BY toYYYYMM(month)
ORDER BY (month, version_id, customer_id);
