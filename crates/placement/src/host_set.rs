//! A fixed-size set of host indices as a bit vector: the placement filters are intersections of
//! these (ready hosts, hosts with a label, hosts holding an image), a few hundred words each even
//! for ten thousand hosts.

/// A set of host indices `0..len`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HostSet {
    words: Vec<u64>,
    len: usize,
}

impl HostSet {
    /// The empty set over `len` hosts.
    pub(crate) fn empty(len: usize) -> Self {
        Self {
            words: vec![0; len.div_ceil(64)],
            len,
        }
    }

    /// Grows the universe to `len` hosts; new hosts are not members.
    pub(crate) fn grow(&mut self, len: usize) {
        debug_assert!(len >= self.len);
        self.words.resize(len.div_ceil(64), 0);
        self.len = len;
    }

    pub(crate) fn insert(&mut self, index: usize) {
        debug_assert!(index < self.len);
        self.words[index / 64] |= 1 << (index % 64);
    }

    pub(crate) fn remove(&mut self, index: usize) {
        debug_assert!(index < self.len);
        self.words[index / 64] &= !(1 << (index % 64));
    }

    pub(crate) fn contains(&self, index: usize) -> bool {
        index < self.len && self.words[index / 64] & (1 << (index % 64)) != 0
    }

    /// Keeps only members that are also in `other`.
    pub(crate) fn intersect(&mut self, other: &HostSet) {
        for (word, other_word) in self.words.iter_mut().zip(&other.words) {
            *word &= other_word;
        }
    }

    /// Removes every member.
    pub(crate) fn clear(&mut self) {
        self.words.iter_mut().for_each(|word| *word = 0);
    }

    pub(crate) fn count(&self) -> usize {
        self.words
            .iter()
            .map(|word| word.count_ones() as usize)
            .sum()
    }

    /// Members in increasing order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.words
            .iter()
            .enumerate()
            .flat_map(|(word_index, &word)| {
                let mut remaining = word;
                std::iter::from_fn(move || {
                    if remaining == 0 {
                        return None;
                    }
                    let bit = remaining.trailing_zeros() as usize;
                    remaining &= remaining - 1;
                    Some(word_index * 64 + bit)
                })
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_operations_agree_with_a_btreeset() {
        let mut set = HostSet::empty(130);
        for index in [0, 1, 63, 64, 65, 127, 128, 129] {
            set.insert(index);
        }
        set.remove(64);
        assert_eq!(
            set.iter().collect::<Vec<_>>(),
            vec![0, 1, 63, 65, 127, 128, 129]
        );
        assert_eq!(set.count(), 7);
        let mut other = HostSet::empty(130);
        other.insert(63);
        other.insert(129);
        other.insert(2);
        set.intersect(&other);
        assert_eq!(set.iter().collect::<Vec<_>>(), vec![63, 129]);
        assert!(set.contains(129) && !set.contains(2) && !set.contains(500));
        set.grow(200);
        set.insert(199);
        assert_eq!(set.count(), 3);
        set.clear();
        assert_eq!(set.count(), 0);
    }
}
