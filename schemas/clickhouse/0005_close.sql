-- Closed months (`meter close --month YYYY-MM`): one row per customer and
-- month whose invoice is final. The lines and invoice of a closed month are
-- never written again; `meter rate` bills later changes to it as Adjustment
-- lines (usage type 'Adjustment:<month>:<usage type>') on the customer's
-- next open month. checksum is the SHA-256 published on
-- billing.period_close (see schemas/avro/period_close.avsc).
-- {db} is replaced by the configured database name.

CREATE TABLE IF NOT EXISTS {db}.closed_periods
(
    month Date,
    customer_id String,
    version_id String,
    invoice_id String,
    currency String,
    line_count UInt32,
    total Decimal(38, 2),
    checksum String,
    closed_at DateTime('UTC'),
    revision UInt64
)
ENGINE = ReplacingMergeTree(revision)
ORDER BY (month, customer_id);
