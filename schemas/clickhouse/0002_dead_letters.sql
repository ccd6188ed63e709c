-- Records the processor refused, from usage.dlq, one row per refused input
-- record (keyed by its source position, so a replayed batch changes nothing).
-- record_key and payload hold the original bytes unchanged.

CREATE TABLE IF NOT EXISTS {db}.dead_letters
(
    dead_lettered_at DateTime('UTC'),
    reason String,
    detail String,
    source_topic String,
    source_partition Int32,
    source_offset Int64,
    has_key UInt8,
    record_key String,
    payload String
)
ENGINE = ReplacingMergeTree()
PARTITION BY toYYYYMM(dead_lettered_at)
ORDER BY (source_topic, source_partition, source_offset);
