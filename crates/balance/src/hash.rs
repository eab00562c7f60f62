//! Consistent hashing as Envoy does it: a ring of xxHash64 points placed by weight, and a
//! Maglev lookup table. Both are built once per snapshot; a lookup is a binary search or
//! an index.

use crate::xxhash::xxhash64;

/// Envoy's default `minimum_ring_size`.
pub const DEFAULT_MINIMUM_RING_SIZE: u64 = 1024;
/// Envoy's default `maximum_ring_size`.
pub const DEFAULT_MAXIMUM_RING_SIZE: u64 = 8 * 1024 * 1024;
/// Envoy's default Maglev `table_size`.
pub const DEFAULT_MAGLEV_TABLE_SIZE: u64 = 65537;

/// Whether `n` is prime: a Maglev table needs a prime size so that every endpoint's
/// permutation visits every slot (Envoy refuses other sizes).
pub fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    if n.is_multiple_of(2) {
        return n == 2;
    }
    let mut d = 3u64;
    while d.saturating_mul(d) <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

/// A lookup structure mapping a request hash to an endpoint index.
#[derive(Debug)]
pub(crate) enum HashTable {
    /// Points sorted by hash, each owned by an endpoint.
    Ring(Box<[(u64, u32)]>),
    /// Slot `hash % len` names the endpoint.
    Maglev(Box<[u32]>),
}

impl HashTable {
    /// Envoy's ring: each endpoint gets points `"KEY_0"`, `"KEY_1"`, … in proportion to its
    /// share of the weight, scaled so that the lightest endpoint gets enough points for a
    /// ring of at least `minimum` and at most `maximum` points.
    pub(crate) fn ring(keys: &[String], weights: &[u64], minimum: u64, maximum: u64) -> Self {
        let total: u64 = weights.iter().sum();
        if keys.is_empty() || total == 0 {
            return HashTable::Ring(Box::new([]));
        }
        let normalized: Vec<f64> = weights.iter().map(|&w| w as f64 / total as f64).collect();
        let lightest = normalized.iter().copied().fold(1.0, f64::min);
        let scale = ((lightest * minimum as f64).ceil() / lightest).min(maximum.max(1) as f64);
        let mut ring = Vec::with_capacity(scale.ceil() as usize);
        let (mut current, mut target) = (0.0, 0.0);
        let mut key = String::new();
        for (index, (base, share)) in keys.iter().zip(&normalized).enumerate() {
            target += scale * share;
            let mut point = 0u64;
            while current < target {
                key.clear();
                key.push_str(base);
                key.push('_');
                key.push_str(&point.to_string());
                ring.push((xxhash64(key.as_bytes(), 0), index as u32));
                point += 1;
                current += 1.0;
            }
        }
        ring.sort_unstable();
        HashTable::Ring(ring.into_boxed_slice())
    }

    /// Envoy's weighted Maglev table of `size` slots (a prime): each endpoint walks its own
    /// permutation (offset and skip from the key's hash with seeds 0 and 1), taking a free
    /// slot in turns, the lighter endpoints skipping turns in proportion to weight. A size
    /// that is not prime (which the config parsers refuse) takes Envoy's default instead,
    /// since a permutation might then never reach a free slot.
    pub(crate) fn maglev(keys: &[String], weights: &[u64], size: u64) -> Self {
        let total: u64 = weights.iter().sum();
        if keys.is_empty() || total == 0 {
            return HashTable::Maglev(Box::new([]));
        }
        let size = if is_prime(size) {
            size
        } else {
            DEFAULT_MAGLEV_TABLE_SIZE
        };
        struct Entry {
            offset: u64,
            skip: u64,
            weight: f64,
            target: f64,
            next: u64,
        }
        let mut entries: Vec<Entry> = keys
            .iter()
            .zip(weights)
            .map(|(key, &w)| Entry {
                offset: xxhash64(key.as_bytes(), 0) % size,
                skip: xxhash64(key.as_bytes(), 1) % (size - 1) + 1,
                weight: w as f64 / total as f64,
                target: 0.0,
                next: 0,
            })
            .collect();
        let heaviest = entries.iter().map(|e| e.weight).fold(0.0, f64::max);
        let slots = usize::try_from(size).unwrap_or(usize::MAX);
        let mut table: Vec<Option<u32>> = vec![None; slots];
        let mut filled = 0usize;
        let mut iteration = 1u64;
        while filled < slots {
            for (index, entry) in entries.iter_mut().enumerate() {
                if filled == slots {
                    break;
                }
                if (iteration as f64) * entry.weight < entry.target {
                    continue;
                }
                entry.target += heaviest;
                let mut slot;
                loop {
                    slot = (entry.offset + entry.skip * entry.next) % size;
                    entry.next += 1;
                    if table[slot as usize].is_none() {
                        break;
                    }
                }
                table[slot as usize] = Some(index as u32);
                filled += 1;
            }
            iteration += 1;
        }
        HashTable::Maglev(table.into_iter().map(|s| s.unwrap_or(0)).collect())
    }

    /// Number of points or slots.
    pub(crate) fn len(&self) -> usize {
        match self {
            HashTable::Ring(r) => r.len(),
            HashTable::Maglev(t) => t.len(),
        }
    }

    /// The position `hash` falls on: the first ring point at or after it (wrapping), or
    /// the Maglev slot.
    fn position(&self, hash: u64) -> usize {
        match self {
            HashTable::Ring(r) => r.partition_point(|&(point, _)| point < hash) % r.len(),
            HashTable::Maglev(t) => (hash % t.len() as u64) as usize,
        }
    }

    fn owner(&self, position: usize) -> usize {
        match self {
            HashTable::Ring(r) => r[position].1 as usize,
            HashTable::Maglev(t) => t[position] as usize,
        }
    }

    /// The endpoint `hash` maps to; when it is one `usable` refuses, the next one along the
    /// ring or table that it accepts. `None` only for an empty table or when no position
    /// is usable.
    pub(crate) fn lookup(&self, hash: u64, usable: impl Fn(usize) -> bool) -> Option<usize> {
        let len = self.len();
        if len == 0 {
            return None;
        }
        let start = self.position(hash);
        (0..len)
            .map(|step| self.owner((start + step) % len))
            .find(|&index| usable(index))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{}:80", i + 1)).collect()
    }

    #[test]
    fn ring_size_follows_the_lightest_weight() {
        let HashTable::Ring(r) = HashTable::ring(&keys(3), &[1, 1, 1], 1024, 8 << 20) else {
            unreachable!()
        };
        // ceil(1024/3) points each.
        assert_eq!(r.len(), 3 * 342);
        let HashTable::Ring(r) = HashTable::ring(&keys(2), &[1, 3], 1024, 8 << 20) else {
            unreachable!()
        };
        // The light endpoint gets a quarter of a ring scaled to give it 256 points.
        assert_eq!(r.iter().filter(|p| p.1 == 0).count(), 256);
        assert_eq!(r.iter().filter(|p| p.1 == 1).count(), 768);
        let HashTable::Ring(r) = HashTable::ring(&keys(2), &[1, 1_000_000], 1024, 4096) else {
            unreachable!()
        };
        assert!(r.len() <= 4096, "{}", r.len());
    }

    #[test]
    fn primes() {
        let primes: Vec<u64> = (0..30).filter(|&n| is_prime(n)).collect();
        assert_eq!(primes, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]);
        assert!(is_prime(DEFAULT_MAGLEV_TABLE_SIZE));
        assert!(!is_prime(65536));
        let HashTable::Maglev(t) = HashTable::maglev(&keys(2), &[1, 1], 100) else {
            unreachable!()
        };
        assert_eq!(t.len() as u64, DEFAULT_MAGLEV_TABLE_SIZE);
    }

    #[test]
    fn ring_points_are_envoys() {
        let HashTable::Ring(r) = HashTable::ring(&keys(1), &[1], 1, 8) else {
            unreachable!()
        };
        assert_eq!(r.as_ref(), &[(0x7504_1381_e737_1a08, 0)]);
    }

    #[test]
    fn maglev_fills_every_slot_by_weight() {
        let table = HashTable::maglev(&keys(3), &[1, 2, 1], 65537);
        let HashTable::Maglev(t) = &table else {
            unreachable!()
        };
        assert_eq!(t.len(), 65537);
        let mut counts = [0usize; 3];
        for &owner in t.iter() {
            counts[owner as usize] += 1;
        }
        let share = counts[1] as f64 / 65537.0;
        assert!((share - 0.5).abs() < 0.01, "{counts:?}");
        let even = counts[0] as f64 / counts[2] as f64;
        assert!((even - 1.0).abs() < 0.02, "{counts:?}");
    }

    #[test]
    fn lookup_walks_past_unusable_endpoints() {
        for table in [
            HashTable::ring(&keys(3), &[1, 1, 1], 1024, 8 << 20),
            HashTable::maglev(&keys(3), &[1, 1, 1], 251),
        ] {
            for hash in (0..200u64).map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15)) {
                let first = table.lookup(hash, |_| true).expect("non-empty");
                let other = table.lookup(hash, |i| i != first).expect("another");
                assert_ne!(first, other);
                assert_eq!(table.lookup(hash, |_| false), None);
            }
        }
        assert_eq!(
            HashTable::ring(&[], &[], 1024, 2048).lookup(7, |_| true),
            None
        );
    }
}
