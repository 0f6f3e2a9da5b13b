//! Exact selection of the best k *distinct subjects* from a stream of scored rows.
//!
//! Each subject is scored by its best row. [`TopSubjects::offer`] keeps at most k
//! subjects; a subject already held is updated in place. This is exact: a subject in
//! the true top k is never evicted (k others would have to beat its best), and when
//! its best row arrives the bar is at most the final k-th score. Merging two
//! selections over disjoint rows is exact for the same reason, which is what lets
//! threads, shards and segments each select on their own and merge at the end.
//!
//! Order: higher score first; equal scores by subject rank (rank order = id order).

/// One selected subject.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Hit {
    pub score: f32,
    /// Tie-break rank (ascending id order).
    pub rank: u32,
    /// Subject ordinal local to the slab it came from.
    pub subject: u32,
}

impl Hit {
    /// `self` ranks strictly before `other`.
    #[inline]
    pub fn beats(&self, other: &Hit) -> bool {
        self.score > other.score || (self.score == other.score && self.rank < other.rank)
    }
}

/// Up to this many subjects are kept in a plain array (a scan finds a subject, the
/// fastest way for the k a search usually asks for); above it, in a heap with an index
/// by subject, so that each admitted row costs O(log k), not O(k).
const SCAN_UP_TO: usize = 32;

/// A running top-k of distinct subjects, with an optional score floor (threshold).
///
/// Rows below the bar cost one comparison ([`TopSubjects::offer`]); a row at or above
/// it costs O(k) for k <= 32 (a scan of a few cache lines) and O(log k) above (a binary
/// heap, worst subject at the root, and a map from subject to its place in the heap).
#[derive(Clone, Debug)]
pub struct TopSubjects {
    k: usize,
    floor: f32,
    /// For k <= `SCAN_UP_TO`: in any order, `worst` indexing the worst once full. Above:
    /// a binary heap in which every parent is beaten by its children (worst at 0).
    entries: Vec<Hit>,
    worst: usize,
    bar: f32,
    /// Above `SCAN_UP_TO`: each subject's place in `entries`.
    places: Option<std::collections::HashMap<u32, usize, BuildOrdinalHasher>>,
}

impl TopSubjects {
    /// Keep the best `k` subjects scoring at least `floor` (`f32::NEG_INFINITY` for none).
    pub fn new(k: usize, floor: f32) -> TopSubjects {
        TopSubjects {
            k,
            floor,
            entries: Vec::with_capacity(k.min(1024)),
            worst: 0,
            bar: floor,
            places: (k > SCAN_UP_TO).then(|| {
                std::collections::HashMap::with_capacity_and_hasher(k.min(1024), BuildOrdinalHasher::default())
            }),
        }
    }

    /// Scores below this can never enter; callers test it first on the hot path.
    #[inline]
    pub fn bar(&self) -> f32 {
        self.bar
    }

    /// Offer a row's score for `subject` (whose tie-break rank is `rank`).
    #[inline]
    pub fn offer(&mut self, score: f32, subject: u32, rank: u32) {
        if score < self.bar {
            return;
        }
        self.offer_slow(Hit { score, rank, subject });
    }

    #[cold]
    fn offer_slow(&mut self, hit: Hit) {
        if self.places.is_some() {
            self.offer_heap(hit);
            return;
        }
        if let Some(i) = self.entries.iter().position(|e| e.subject == hit.subject) {
            if hit.score > self.entries[i].score {
                self.entries[i].score = hit.score;
                if self.entries.len() == self.k && i == self.worst {
                    self.refresh_worst();
                }
            }
            return;
        }
        if self.entries.len() < self.k {
            self.entries.push(hit);
            if self.entries.len() == self.k {
                self.refresh_worst();
            }
        } else if hit.beats(&self.entries[self.worst]) {
            self.entries[self.worst] = hit;
            self.refresh_worst();
        }
    }

    fn refresh_worst(&mut self) {
        let mut worst = 0;
        for (i, e) in self.entries.iter().enumerate() {
            if self.entries[worst].beats(e) {
                worst = i;
            }
        }
        self.worst = worst;
        self.bar = self.entries[worst].score.max(self.floor);
    }

    /// The heap's offer: a held subject improved in place (it moves away from the
    /// root), a new one pushed while not full, else put at the root in place of the
    /// worst if it beats it.
    fn offer_heap(&mut self, hit: Hit) {
        let places = self.places.as_mut().expect("heap mode");
        if let Some(&i) = places.get(&hit.subject) {
            if hit.score > self.entries[i].score {
                self.entries[i].score = hit.score;
                self.sift_down(i);
                self.heap_bar();
            }
            return;
        }
        if self.entries.len() < self.k {
            places.insert(hit.subject, self.entries.len());
            self.entries.push(hit);
            self.sift_up(self.entries.len() - 1);
            self.heap_bar();
        } else if hit.beats(&self.entries[0]) {
            places.remove(&self.entries[0].subject);
            places.insert(hit.subject, 0);
            self.entries[0] = hit;
            self.sift_down(0);
            self.heap_bar();
        }
    }

    fn heap_bar(&mut self) {
        if self.entries.len() == self.k {
            self.bar = self.entries[0].score.max(self.floor);
        }
    }

    fn swap(&mut self, a: usize, b: usize) {
        self.entries.swap(a, b);
        let places = self.places.as_mut().expect("heap mode");
        places.insert(self.entries[a].subject, a);
        places.insert(self.entries[b].subject, b);
    }

    /// Move entry `i` towards the root while its parent beats it.
    fn sift_up(&mut self, mut i: usize) {
        while i > 0 {
            let parent = (i - 1) / 2;
            if !self.entries[parent].beats(&self.entries[i]) {
                break;
            }
            self.swap(parent, i);
            i = parent;
        }
    }

    /// Move entry `i` away from the root while it beats the worse of its children.
    fn sift_down(&mut self, mut i: usize) {
        let n = self.entries.len();
        loop {
            let (l, r) = (2 * i + 1, 2 * i + 2);
            let mut worse = i;
            if l < n && self.entries[worse].beats(&self.entries[l]) {
                worse = l;
            }
            if r < n && self.entries[worse].beats(&self.entries[r]) {
                worse = r;
            }
            if worse == i {
                return;
            }
            self.swap(i, worse);
            i = worse;
        }
    }

    /// Fold in a selection made over other rows of the same slab.
    pub fn merge(&mut self, other: &TopSubjects) {
        for e in &other.entries {
            if e.score >= self.bar {
                self.offer_slow(*e);
            }
        }
    }

    /// The selection, best first.
    pub fn into_sorted(mut self) -> Vec<Hit> {
        self.entries
            .sort_unstable_by(|a, b| b.score.total_cmp(&a.score).then(a.rank.cmp(&b.rank)));
        self.entries
    }
}

/// Hashes a subject ordinal with one multiplication (Fibonacci hashing): ordinals are
/// small dense integers, and nothing adversarial chooses them.
#[derive(Clone, Copy, Debug, Default)]
struct OrdinalHasher(u64);

impl std::hash::Hasher for OrdinalHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8 | u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.0 = u64::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type BuildOrdinalHasher = std::hash::BuildHasherDefault<OrdinalHasher>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_best_per_subject_and_breaks_ties_by_rank() {
        let mut t = TopSubjects::new(2, f32::NEG_INFINITY);
        t.offer(0.5, 7, 7);
        t.offer(0.9, 7, 7); // same subject, better row
        t.offer(0.6, 3, 3);
        t.offer(0.6, 1, 1); // tie with subject 3, smaller rank wins
        t.offer(0.55, 9, 9);
        let got: Vec<(f32, u32)> = t.into_sorted().iter().map(|h| (h.score, h.subject)).collect();
        assert_eq!(got, vec![(0.9, 7), (0.6, 1)]);
    }

    #[test]
    fn updating_a_subject_before_the_selection_is_full_keeps_the_bar_low() {
        let mut t = TopSubjects::new(5, f32::NEG_INFINITY);
        t.offer(0.0, 0, 0);
        t.offer(0.9, 0, 0);
        t.offer(0.5, 1, 1);
        assert_eq!(t.into_sorted().len(), 2);
    }

    #[test]
    fn floor_is_inclusive() {
        let mut t = TopSubjects::new(5, 0.5);
        t.offer(0.5, 1, 1);
        t.offer(0.4999, 2, 2);
        assert_eq!(t.into_sorted().len(), 1);
    }

    #[test]
    fn merge_equals_one_pass() {
        let rows: Vec<(f32, u32)> = (0..500)
            .map(|i| (((i * 7919) % 101) as f32 / 101.0, (i * 31 % 53) as u32))
            .collect();
        let mut whole = TopSubjects::new(7, f32::NEG_INFINITY);
        for &(s, o) in &rows {
            whole.offer(s, o, o);
        }
        let (mut a, mut b) = (
            TopSubjects::new(7, f32::NEG_INFINITY),
            TopSubjects::new(7, f32::NEG_INFINITY),
        );
        for (i, &(s, o)) in rows.iter().enumerate() {
            if i.is_multiple_of(3) {
                a.offer(s, o, o)
            } else {
                b.offer(s, o, o)
            }
        }
        a.merge(&b);
        assert_eq!(a.into_sorted(), whole.into_sorted());
    }

    /// The heap (k > 32) selects exactly what a sort of every subject's best row
    /// selects, with ties, repeated subjects, a floor and merges.
    #[test]
    fn the_heap_equals_a_full_sort_for_large_k() {
        let mut x = 12345u64;
        let mut next = move || {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (x >> 33) as u32
        };
        for (k, subjects, rows, floor) in [
            (33, 50, 400, f32::NEG_INFINITY),
            (100, 3000, 20_000, 0.3),
            (3000, 2500, 9000, f32::NEG_INFINITY),
            (1000, 5000, 40_000, 0.5),
        ] {
            let data: Vec<(f32, u32)> = (0..rows)
                .map(|_| ((next() % 1000) as f32 / 1000.0, next() % subjects))
                .collect();
            let mut best = std::collections::HashMap::new();
            for &(s, o) in &data {
                let e = best.entry(o).or_insert(s);
                *e = f32::max(*e, s);
            }
            let mut want: Vec<Hit> = best
                .into_iter()
                .filter(|&(_, s)| s >= floor)
                .map(|(o, s)| Hit {
                    score: s,
                    rank: o,
                    subject: o,
                })
                .collect();
            want.sort_unstable_by(|a, b| b.score.total_cmp(&a.score).then(a.rank.cmp(&b.rank)));
            want.truncate(k);
            let mut one = TopSubjects::new(k, floor);
            let (mut a, mut b) = (TopSubjects::new(k, floor), TopSubjects::new(k, floor));
            for (i, &(s, o)) in data.iter().enumerate() {
                one.offer(s, o, o);
                if i % 3 == 0 { a.offer(s, o, o) } else { b.offer(s, o, o) }
            }
            a.merge(&b);
            assert_eq!(one.into_sorted(), want, "k {k}");
            assert_eq!(a.into_sorted(), want, "k {k}, merged");
        }
    }
}
