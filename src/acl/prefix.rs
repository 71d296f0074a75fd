//! Longest-prefix-match tables over IP prefixes (one hash map per prefix length, probed longest first).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::IpAddr;

use ipnet::IpNet;

/// A map from IP prefixes to values with longest-prefix lookup.
///
/// There is one hash map per prefix length present in the table, and a lookup probes them from the
/// longest length down. A lookup costs at most one hash probe per *distinct* prefix length (≤ 33
/// for IPv4, ≤ 129 for IPv6, a handful in practice), whatever the number of entries.
#[derive(Debug, Clone)]
pub(crate) struct PrefixMap<V> {
    v4: Vec<Level<u32, V>>,
    v6: Vec<Level<u128, V>>,
    len: usize,
}

/// All prefixes of one length and family, keyed by the network bits shifted down.
#[derive(Debug, Clone)]
struct Level<K, V> {
    prefix_len: u8,
    map: HashMap<K, (IpNet, V), FastBuild>,
}

/// Hash builder for the lookup tables.
pub(crate) type FastBuild = BuildHasherDefault<FastHasher>;

/// A small multiply-fold hasher (no extra crate). The tables are built from trusted configuration,
/// so flooding protection (SipHash) buys nothing here: a client only chooses what it looks up.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct FastHasher {
    hash: u64,
}

const SEED: u64 = 0x9e37_79b9_7f4a_7c15;
const FOLD: u64 = 0xd6e8_feb8_6659_fd93;

// === impl PrefixMap ===

impl<V> Default for PrefixMap<V> {
    fn default() -> Self {
        Self {
            v4: Vec::new(),
            v6: Vec::new(),
            len: 0,
        }
    }
}

impl<V> PrefixMap<V> {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Inserts `net` (truncated to its network address); returns the value it replaces.
    pub(crate) fn insert(&mut self, net: IpNet, value: V) -> Option<V> {
        let net = net.trunc();
        let old = match net {
            IpNet::V4(n) => {
                let key = key4(u32::from(n.network()), n.prefix_len());
                level_mut(&mut self.v4, n.prefix_len())
                    .map
                    .insert(key, (net, value))
            }
            IpNet::V6(n) => {
                let key = key6(u128::from(n.network()), n.prefix_len());
                level_mut(&mut self.v6, n.prefix_len())
                    .map
                    .insert(key, (net, value))
            }
        };
        if old.is_none() {
            self.len += 1;
        }
        old.map(|(_, v)| v)
    }

    /// The value stored for exactly `net`, inserting `make()` first if there is none.
    pub(crate) fn get_or_insert_with(&mut self, net: IpNet, make: impl FnOnce() -> V) -> &mut V {
        let net = net.trunc();
        let (slot, inserted) = match net {
            IpNet::V4(n) => {
                let key = key4(u32::from(n.network()), n.prefix_len());
                let map = &mut level_mut(&mut self.v4, n.prefix_len()).map;
                let inserted = !map.contains_key(&key);
                (map.entry(key).or_insert_with(|| (net, make())), inserted)
            }
            IpNet::V6(n) => {
                let key = key6(u128::from(n.network()), n.prefix_len());
                let map = &mut level_mut(&mut self.v6, n.prefix_len()).map;
                let inserted = !map.contains_key(&key);
                (map.entry(key).or_insert_with(|| (net, make())), inserted)
            }
        };
        if inserted {
            self.len += 1;
        }
        &mut slot.1
    }

    /// The value stored for exactly `net`.
    pub(crate) fn get(&self, net: IpNet) -> Option<(IpNet, &V)> {
        let net = net.trunc();
        let found = match net {
            IpNet::V4(n) => self
                .v4
                .iter()
                .find(|l| l.prefix_len == n.prefix_len())?
                .map
                .get(&key4(u32::from(n.network()), n.prefix_len())),
            IpNet::V6(n) => self
                .v6
                .iter()
                .find(|l| l.prefix_len == n.prefix_len())?
                .map
                .get(&key6(u128::from(n.network()), n.prefix_len())),
        };
        found.map(|(n, v)| (*n, v))
    }

    /// The most specific prefix containing `ip`, and its value.
    pub(crate) fn longest(&self, ip: IpAddr) -> Option<(IpNet, &V)> {
        let mut found = None;
        self.visit(ip, |net, v| {
            found = Some((net, v));
            false
        });
        found
    }

    /// Calls `f` for every prefix containing `ip`, most specific first.
    pub(crate) fn for_each_match<'a>(&'a self, ip: IpAddr, mut f: impl FnMut(IpNet, &'a V)) {
        self.visit(ip, |net, v| {
            f(net, v);
            true
        });
    }

    /// Visits the prefixes containing `ip`, longest first, while `f` returns true.
    fn visit<'a>(&'a self, ip: IpAddr, mut f: impl FnMut(IpNet, &'a V) -> bool) {
        match ip {
            IpAddr::V4(a) => {
                let bits = u32::from(a);
                for level in &self.v4 {
                    if let Some((net, v)) = level.map.get(&key4(bits, level.prefix_len))
                        && !f(*net, v)
                    {
                        return;
                    }
                }
            }
            IpAddr::V6(a) => {
                let bits = u128::from(a);
                for level in &self.v6 {
                    if let Some((net, v)) = level.map.get(&key6(bits, level.prefix_len))
                        && !f(*net, v)
                    {
                        return;
                    }
                }
            }
        }
    }

    /// Every entry, in no particular order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (IpNet, &V)> {
        let v4 = self.v4.iter().flat_map(|l| l.map.values());
        let v6 = self.v6.iter().flat_map(|l| l.map.values());
        v4.chain(v6).map(|(n, v)| (*n, v))
    }
}

impl<V> FromIterator<(IpNet, V)> for PrefixMap<V> {
    fn from_iter<I: IntoIterator<Item = (IpNet, V)>>(iter: I) -> Self {
        let mut map = Self::new();
        for (net, v) in iter {
            map.insert(net, v);
        }
        map
    }
}

/// The level for `prefix_len`, created in its place (levels stay sorted longest first).
fn level_mut<K, V>(levels: &mut Vec<Level<K, V>>, prefix_len: u8) -> &mut Level<K, V> {
    let at = match levels.binary_search_by(|l| prefix_len.cmp(&l.prefix_len)) {
        Ok(at) => at,
        Err(at) => {
            levels.insert(
                at,
                Level {
                    prefix_len,
                    map: HashMap::default(),
                },
            );
            at
        }
    };
    &mut levels[at]
}

/// The network bits of `bits` for a prefix of `len` bits, shifted down.
fn key4(bits: u32, len: u8) -> u32 {
    u32::try_from(u64::from(bits) >> (32 - u32::from(len.min(32)))).unwrap_or(0)
}

fn key6(bits: u128, len: u8) -> u128 {
    bits.checked_shr(128 - u32::from(len.min(128))).unwrap_or(0)
}

// === impl FastHasher ===

impl FastHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(SEED);
    }
}

impl Hasher for FastHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut word = [0u8; 8];
            word[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(word));
        }
    }

    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }

    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }

    #[inline]
    fn write_u128(&mut self, i: u128) {
        self.add(i as u64);
        self.add((i >> 64) as u64);
    }

    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }

    /// Folded multiply, so that low and high output bits both depend on every input bit.
    #[inline]
    fn finish(&self) -> u64 {
        let full = u128::from(self.hash) * u128::from(FOLD);
        (full as u64) ^ ((full >> 64) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().expect("test prefix")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn longest_prefix_wins_with_overlaps() {
        let map: PrefixMap<&str> = [
            ("0.0.0.0/0", "default4"),
            ("10.0.0.0/8", "ten"),
            ("10.1.0.0/16", "ten-one"),
            ("10.1.2.0/24", "ten-one-two"),
            ("10.1.2.3/32", "host"),
            ("::/0", "default6"),
            ("2001:db8::/32", "doc"),
            ("2001:db8:1::/48", "doc-1"),
            ("2001:db8:1:2::/64", "doc-1-2"),
            ("2001:db8:1:2::7/128", "doc-host"),
        ]
        .into_iter()
        .map(|(n, v)| (net(n), v))
        .collect();
        assert_eq!(map.len(), 10);
        let cases = [
            ("10.1.2.3", "host", "10.1.2.3/32"),
            ("10.1.2.4", "ten-one-two", "10.1.2.0/24"),
            ("10.1.2.255", "ten-one-two", "10.1.2.0/24"),
            ("10.1.3.0", "ten-one", "10.1.0.0/16"),
            ("10.1.255.255", "ten-one", "10.1.0.0/16"),
            ("10.2.0.0", "ten", "10.0.0.0/8"),
            ("10.255.255.255", "ten", "10.0.0.0/8"),
            ("11.0.0.0", "default4", "0.0.0.0/0"),
            ("9.255.255.255", "default4", "0.0.0.0/0"),
            ("2001:db8:1:2::7", "doc-host", "2001:db8:1:2::7/128"),
            ("2001:db8:1:2::8", "doc-1-2", "2001:db8:1:2::/64"),
            ("2001:db8:1:3::", "doc-1", "2001:db8:1::/48"),
            ("2001:db8:2::", "doc", "2001:db8::/32"),
            ("2001:db9::", "default6", "::/0"),
        ];
        for (addr, want, want_net) in cases {
            let (n, v) = map.longest(ip(addr)).expect(addr);
            assert_eq!((*v, n), (want, net(want_net)), "{addr}");
        }
        let mut all = Vec::new();
        map.for_each_match(ip("10.1.2.3"), |_, v| all.push(*v));
        assert_eq!(all, ["host", "ten-one-two", "ten-one", "ten", "default4"]);
    }

    #[test]
    fn families_do_not_mix_and_host_bits_are_truncated() {
        let mut map = PrefixMap::new();
        assert!(map.insert(net("10.1.2.3/8"), 1).is_none());
        assert_eq!(map.insert(net("10.0.0.0/8"), 2), Some(1));
        assert_eq!(map.len(), 1);
        assert!(map.longest(ip("::ffff:10.0.0.1")).is_none());
        assert!(map.longest(ip("::a00:1")).is_none());
        assert_eq!(map.get(net("10.0.0.0/8")).map(|(_, v)| *v), Some(2));
        assert!(map.get(net("10.0.0.0/9")).is_none());
        *map.get_or_insert_with(net("::1/128"), || 5) += 1;
        assert_eq!(map.longest(ip("::1")).map(|(_, v)| *v), Some(6));
        assert_eq!(map.len(), 2);
        assert_eq!(map.iter().count(), 2);
    }

    #[test]
    fn empty_map_finds_nothing() {
        let map: PrefixMap<()> = PrefixMap::new();
        assert!(map.is_empty());
        assert!(map.longest(ip("1.2.3.4")).is_none());
        assert!(map.longest(ip("::")).is_none());
    }
}
