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

/// A running top-k of distinct subjects, with an optional score floor (threshold).
#[derive(Clone, Debug)]
pub struct TopSubjects {
    k: usize,
    floor: f32,
    entries: Vec<Hit>,
    worst: usize,
    bar: f32,
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
}
