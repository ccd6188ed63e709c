//! The key contract of `usage.events`: the record key is the customer id in
//! UTF-8, and its partition is what Java's default partitioner computes for
//! that key (`Utils.toPositive(Utils.murmur2(key)) % partitions`), which is
//! also librdkafka's `murmur2_random` for keyed records. Every producer
//! that follows it puts all of a customer's events on one partition, so
//! aggregation stays partition-local; the processor dead-letters a record
//! found on any other partition (`wrong_partition`).
//!
//! librdkafka's own default (`consistent_random`) hashes keys with CRC-32
//! instead, which puts most keys on a different partition: [`Partitioner`]
//! names both so that a fleet still on the old default can be accepted
//! until it is upgraded (see the runbook).

/// Kafka's murmur2 (the Java client's `Utils.murmur2`), as a signed 32-bit
/// value.
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let len = data.len();
    let mut h: u32 = SEED ^ (len as u32);
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if !rest.is_empty() {
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// CRC-32 (IEEE), what librdkafka's `consistent` partitioners hash with.
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xedb8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

/// How a key maps to a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Partitioner {
    /// Java's default partitioner and librdkafka's `murmur2_random`: the key
    /// contract of `usage.events`.
    #[default]
    Murmur2,
    /// librdkafka's default `consistent_random` (CRC-32 of the key): what
    /// meterline's agents used before the key contract was fixed.
    Crc32,
}

impl Partitioner {
    /// The partition of `key` among `partitions` (> 0).
    pub fn partition(self, key: &[u8], partitions: i32) -> i32 {
        let n = partitions.max(1);
        match self {
            Partitioner::Murmur2 => (murmur2(key) & 0x7fff_ffff) % n,
            Partitioner::Crc32 => (crc32(key) % n as u32) as i32,
        }
    }

    /// The name of the matching librdkafka `partitioner` setting.
    pub fn librdkafka(self) -> &'static str {
        match self {
            Partitioner::Murmur2 => "murmur2_random",
            Partitioner::Crc32 => "consistent_random",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_matches_the_java_client() {
        // Values from Kafka's own UtilsTest (testMurmur2).
        let cases: [(&[u8], i32); 6] = [
            (b"21", -973932308),
            (b"foobar", -790332482),
            (b"a-little-bit-long-string", -985981536),
            (b"a-little-bit-longer-string", -1486304829),
            (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
            (b"abc", 479470107),
        ];
        for (key, want) in cases {
            assert_eq!(murmur2(key), want, "{}", String::from_utf8_lossy(key));
        }
    }

    #[test]
    fn crc32_is_ieee() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn partitions_are_in_range() {
        for key in ["cust-0001", "", "ü", "a-much-longer-customer-identifier"] {
            for n in [1, 3, 6, 7, 100] {
                for p in [Partitioner::Murmur2, Partitioner::Crc32] {
                    assert!((0..n).contains(&p.partition(key.as_bytes(), n)));
                }
            }
        }
    }
}
