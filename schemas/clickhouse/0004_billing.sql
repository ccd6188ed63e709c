-- Billing beyond list prices (`meter rate` with contracts, see
-- schemas/contracts.toml): subscription fees and credits are invoice lines
-- too, told apart by line_type (named as the AWS Cost and Usage Report
-- names lineItem/LineItemType): 'Usage' (metered usage at list price),
-- 'Fee' (a subscription fee, usage_type 'Fee:<plan>', under the plan's
-- service), 'Credit' (a credit applied, usage_type 'Credit:<credit id>',
-- under the service it paid for, negative amounts). Rows written before
-- this migration are usage: the column's default.
--
-- credit_ledger: one row per credit and month it could pay for: what was
-- left at the start of the month, what the month's charges used (the sum
-- of its Credit lines, negated), what expired at the month's end, and what
-- carries on. ReplacingMergeTree(revision) keyed by the credit and month:
-- re-rating a month replaces its row.
-- {db} is replaced by the configured database name.

ALTER TABLE {db}.rated_usage ADD COLUMN line_type String DEFAULT 'Usage';

ALTER TABLE {db}.invoice_lines ADD COLUMN line_type String DEFAULT 'Usage';

CREATE TABLE IF NOT EXISTS {db}.credit_ledger
(
    month Date,
    customer_id String,
    credit_id String,
    currency String,
    amount Decimal(38, 2),
    starts Date,
    expires Date,
    opening Decimal(38, 2),
    used Decimal(38, 2),
    expired Decimal(38, 2),
    remaining Decimal(38, 2),
    version_id String,
    rated_at DateTime('UTC'),
    revision UInt64
)
ENGINE = ReplacingMergeTree(revision)
PARTITION BY toYYYYMM(month)
ORDER BY (month, customer_id, credit_id);
