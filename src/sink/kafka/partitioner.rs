//! Picks a record's partition the way Kafka's Java client does for keyed records:
//! `toPositive(murmur2(key)) % partitions`. The relay chooses partitions itself (instead
//! of leaving it to librdkafka) because exactly-once publishing must know, before it
//! produces an event, which partition's last record to compare the event with.

/// Kafka's murmur2 hash (the Java client's `Utils.murmur2`): seed 0x9747b28c,
/// little-endian 4-byte blocks.
pub fn murmur2(data: &[u8]) -> i32 {
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h: u32 = 0x9747_b28c ^ (data.len() as u32);
    let mut blocks = data.chunks_exact(4);
    for block in &mut blocks {
        let mut k = u32::from_le_bytes([block[0], block[1], block[2], block[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = blocks.remainder();
    if !tail.is_empty() {
        if tail.len() == 3 {
            h ^= u32::from(tail[2]) << 16;
        }
        if tail.len() >= 2 {
            h ^= u32::from(tail[1]) << 8;
        }
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition Kafka's Java client (and librdkafka's `murmur2_random`) picks for `key`.
pub fn partition_for(key: &[u8], partitions: i32) -> i32 {
    if partitions <= 0 {
        return 0;
    }
    (murmur2(key) & 0x7fff_ffff) % partitions
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_in_range_and_stable() {
        for n in 1..=12 {
            for key in ["", "a", "ab", "abc", "abcd", "order-1001", "k42"] {
                let p = partition_for(key.as_bytes(), n);
                assert!((0..n).contains(&p));
                assert_eq!(p, partition_for(key.as_bytes(), n));
            }
        }
    }

    #[test]
    fn every_tail_length_is_hashed() {
        // Keys differing only in their last 1-3 bytes must not collide wholesale.
        let hashes: std::collections::HashSet<i32> = ["x", "xy", "xyz", "xyzw", "xyzwv", "xyzwvu", "xyzwvut"]
            .iter()
            .map(|k| murmur2(k.as_bytes()))
            .collect();
        assert_eq!(hashes.len(), 7);
    }
}
