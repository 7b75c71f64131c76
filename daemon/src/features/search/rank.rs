//! Ranking for `search_peers`: BM25F over a peer's fields, with typo tolerance.
//!
//! Sans-IO and allocation-light: the caller hands in documents (one per peer, each a list
//! of weighted fields), [`Index::build`] tokenizes them once into a vocabulary with
//! postings, and [`Index::search`] scores a query by looking each query term up in the
//! vocabulary — exactly, as a prefix, or within a small edit distance — so the cost per
//! query grows with the vocabulary, not with the number of peers times their text.
//!
//! Per query term `q` and document `d`, each field `f` contributes
//! `w_f · m · idf(q) · tf·(k1+1) / (tf + k1·(1 − b + b·len_f/avglen_f))`, where `tf` counts
//! the field's words matching `q`, `m` is the best match's weight — 1 exact, 0.8 prefix,
//! 0.6 typo, and near misses count 0.4× that when `q` is also some peer's exact word —
//! and `avglen_f` is over the documents that have the field. `idf` counts the documents
//! any variant of `q` matched. A document's sum is scaled by the share of query terms it
//! matched (terms that match nothing anywhere are not counted), so peers matching more
//! of the query rank first but a partial match still ranks.

use std::collections::HashMap;

/// A peer field, with its weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Field {
    Name,
    Groups,
    Role,
    Tags,
    Summary,
    Profile,
    Skills,
    Meta,
}

/// Number of fields.
const FIELDS: usize = 8;

impl Field {
    pub(crate) const fn weight(self) -> f64 {
        match self {
            Self::Name => 3.0,
            Self::Groups => 2.0,
            Self::Role | Self::Tags => 1.5,
            Self::Profile | Self::Skills => 1.2,
            Self::Summary => 1.0,
            Self::Meta => 0.4,
        }
    }

    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            Self::Name => "name",
            Self::Groups => "groups",
            Self::Role => "role",
            Self::Tags => "tags",
            Self::Summary => "summary",
            Self::Profile => "profile",
            Self::Skills => "skills",
            Self::Meta => "meta",
        }
    }

    const fn slot(self) -> usize {
        self as usize
    }
}

/// How a query term matched a peer's word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Match {
    Exact,
    Prefix,
    Typo,
}

impl Match {
    const fn factor(self) -> f64 {
        match self {
            Self::Exact => 1.0,
            Self::Prefix => 0.8,
            Self::Typo => 0.6,
        }
    }

    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            Self::Exact => "exact",
            Self::Prefix => "prefix",
            Self::Typo => "typo",
        }
    }
}

/// Longest word indexed (longer runs are not words).
const MAX_WORD: usize = 40;
/// Most words indexed per field of one peer.
const MAX_WORDS: usize = 256;
/// Most query terms used.
pub(crate) const MAX_TERMS: usize = 12;

/// How much a prefix or typo match counts when the term also matches some word exactly.
const NEAR_MISS_WHEN_EXACT: f64 = 0.4;

const K1: f64 = 1.2;
const B: f64 = 0.75;

/// Lower-cased alphanumeric words of `text`.
pub(crate) fn words(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty() && w.len() <= MAX_WORD)
        .map(str::to_lowercase)
}

/// Why a peer matched: a query term, the field and word it matched, and how.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Why {
    pub(crate) term: String,
    pub(crate) field: Field,
    pub(crate) word: String,
    pub(crate) how: Match,
    /// What this field added to the score (explanations are ordered by it).
    pub(crate) score: f64,
}

/// A ranked document.
#[derive(Debug, Clone)]
pub(crate) struct Hit {
    pub(crate) doc: usize,
    pub(crate) score: f64,
    pub(crate) why: Vec<Why>,
}

/// The documents' words, by word.
#[derive(Debug, Default)]
pub(crate) struct Index {
    /// word → (doc, field, count).
    postings: HashMap<String, Vec<(u32, u8, u16)>>,
    /// Per document, per field: word count.
    lens: Vec<[u16; FIELDS]>,
    avg: [f64; FIELDS],
}

impl Index {
    /// Indexes `docs` (each a list of fields and their text).
    pub(crate) fn build<'a>(docs: impl IntoIterator<Item = Vec<(Field, &'a str)>>) -> Self {
        let mut ix = Self::default();
        let mut totals = [0u64; FIELDS];
        let mut having = [0u64; FIELDS];
        for (d, fields) in docs.into_iter().enumerate() {
            let d = u32::try_from(d).unwrap_or(u32::MAX);
            let mut lens = [0u16; FIELDS];
            for (field, text) in fields {
                let slot = field.slot();
                let f = field as u8;
                for w in words(text) {
                    if usize::from(lens[slot]) >= MAX_WORDS {
                        break;
                    }
                    lens[slot] += 1;
                    // Postings are appended in document and field order, so a word seen
                    // before in this field has this field's posting last.
                    match ix.postings.get_mut(w.as_str()) {
                        Some(list) => match list.last_mut() {
                            Some(last) if last.0 == d && last.1 == f => {
                                last.2 = last.2.saturating_add(1);
                            }
                            _ => list.push((d, f, 1)),
                        },
                        None => {
                            ix.postings.insert(w, vec![(d, f, 1)]);
                        }
                    }
                }
            }
            for ((t, h), l) in totals.iter_mut().zip(having.iter_mut()).zip(lens) {
                *t += u64::from(l);
                *h += u64::from(l > 0);
            }
            ix.lens.push(lens);
        }
        for ((a, t), h) in ix.avg.iter_mut().zip(totals).zip(having) {
            *a = (t as f64 / h.max(1) as f64).max(1.0);
        }
        ix
    }

    /// The vocabulary words `term` matches, and how.
    fn variants(&self, term: &str) -> Vec<(&str, Match)> {
        let tl = term.chars().count();
        let max_edits = match tl {
            0..=3 => 0,
            4..=7 => 1,
            _ => 2,
        };
        self.postings
            .keys()
            .filter_map(|w| {
                if w == term {
                    return Some((w.as_str(), Match::Exact));
                }
                if tl >= 3 && w.starts_with(term) {
                    return Some((w.as_str(), Match::Prefix));
                }
                if max_edits > 0 {
                    let wl = w.chars().count();
                    if wl.abs_diff(tl) <= max_edits && edits(term, w, max_edits) <= max_edits {
                        return Some((w.as_str(), Match::Typo));
                    }
                }
                None
            })
            .collect()
    }

    /// Ranks the documents for `query`, best first; `keep` says which documents may be
    /// returned (visibility and filters). At most `limit` hits.
    pub(crate) fn search(
        &self,
        query: &str,
        keep: impl Fn(usize) -> bool,
        limit: usize,
    ) -> Vec<Hit> {
        let mut terms: Vec<String> = Vec::new();
        for w in words(query) {
            if !terms.contains(&w) && terms.len() < MAX_TERMS {
                terms.push(w);
            }
        }
        let n = self.lens.len() as f64;
        // doc → (score, terms matched, why)
        let mut acc: HashMap<u32, (f64, usize, Vec<Why>)> = HashMap::new();
        let mut live_terms = 0;
        for term in &terms {
            let variants = self.variants(term);
            if variants.is_empty() {
                continue;
            }
            // When the term is a word some peer has, near misses (a longer word it
            // starts, a typo) count for less: "rust" should find Rust people before
            // "rusty".
            let exact = variants.iter().any(|(_, h)| *h == Match::Exact);
            let factor = |h: Match| {
                if exact && h != Match::Exact {
                    h.factor() * NEAR_MISS_WHEN_EXACT
                } else {
                    h.factor()
                }
            };
            live_terms += 1;
            // Words matched per (doc, field), and the best match (weight, word, how).
            let mut tf: HashMap<(u32, u8), (f64, f64, &str, Match)> = HashMap::new();
            for (word, how) in &variants {
                for &(d, f, c) in &self.postings[*word] {
                    let e = tf.entry((d, f)).or_insert((0.0, 0.0, word, *how));
                    e.0 += f64::from(c);
                    if factor(*how) > e.1 {
                        e.1 = factor(*how);
                        e.2 = word;
                        e.3 = *how;
                    }
                }
            }
            let mut docs: Vec<u32> = tf.keys().map(|(d, _)| *d).collect();
            docs.sort_unstable();
            docs.dedup();
            let df = docs.len() as f64;
            let idf = (1.0 + (n - df + 0.5) / (df + 0.5)).ln();
            let mut per_doc: HashMap<u32, (f64, Vec<Why>)> = HashMap::new();
            for ((d, f), (t, m, word, how)) in tf {
                let field = FIELD_OF[usize::from(f)];
                let len = f64::from(self.lens[d as usize][usize::from(f)]);
                let norm = K1 * (1.0 - B + B * len / self.avg[usize::from(f)]);
                let s = field.weight() * m * idf * t * (K1 + 1.0) / (t + norm);
                let e = per_doc.entry(d).or_default();
                e.0 += s;
                e.1.push(Why {
                    term: term.clone(),
                    field,
                    word: word.to_owned(),
                    how,
                    score: s,
                });
            }
            for (d, (s, mut why)) in per_doc {
                let e = acc.entry(d).or_insert((0.0, 0, Vec::new()));
                e.0 += s;
                e.1 += 1;
                e.2.append(&mut why);
            }
        }
        let live = live_terms.max(1) as f64;
        let mut hits: Vec<Hit> = acc
            .into_iter()
            .filter(|(d, _)| keep(*d as usize))
            .map(|(d, (score, matched, mut why))| {
                let score = score * matched as f64 / live;
                why.sort_by(|a, b| b.score.total_cmp(&a.score));
                Hit {
                    doc: d as usize,
                    score,
                    why,
                }
            })
            .collect();
        hits.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.doc.cmp(&b.doc)));
        hits.truncate(limit);
        hits
    }
}

const FIELD_OF: [Field; FIELDS] = [
    Field::Name,
    Field::Groups,
    Field::Role,
    Field::Tags,
    Field::Summary,
    Field::Profile,
    Field::Skills,
    Field::Meta,
];

/// Damerau–Levenshtein (optimal string alignment) distance between `a` and `b`, or
/// `max + 1` once it is certain to exceed `max`.
fn edits(a: &str, b: &str, max: usize) -> usize {
    if a.is_ascii() && b.is_ascii() {
        return edits_of(a.as_bytes(), b.as_bytes(), max);
    }
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    edits_of(&a, &b, max)
}

/// [`edits`] over any comparable units (bytes for ASCII words: no allocation for rows
/// of up to [`MAX_WORD`] + 1).
fn edits_of<T: PartialEq>(a: &[T], b: &[T], max: usize) -> usize {
    let (n, m) = (a.len(), b.len());
    if m > MAX_WORD {
        return max + 1;
    }
    let mut rows = [[0usize; MAX_WORD + 1]; 3];
    let [prev2, prev, cur] = &mut rows;
    for (j, v) in prev.iter_mut().enumerate().take(m + 1) {
        *v = j;
    }
    for i in 1..=n {
        cur[0] = i;
        let mut row_min = cur[0];
        for j in 1..=m {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut v = (prev[j] + 1).min(cur[j - 1] + 1).min(prev[j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                v = v.min(prev2[j - 2] + 1);
            }
            cur[j] = v;
            row_min = row_min.min(v);
        }
        if row_min > max {
            return max + 1;
        }
        std::mem::swap(prev2, prev);
        std::mem::swap(prev, cur);
    }
    prev[m]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ix() -> Index {
        Index::build(vec![
            vec![
                (Field::Name, "ada-frontend"),
                (Field::Summary, "building the react dashboard"),
            ],
            vec![
                (Field::Name, "bob"),
                (Field::Groups, "backend db"),
                (Field::Summary, "postgres migrations"),
            ],
            vec![
                (Field::Name, "carol"),
                (Field::Profile, "rust tokio quic"),
                (Field::Summary, "federation links"),
            ],
            vec![(Field::Name, "rusty"), (Field::Summary, "reviews docs")],
        ])
    }

    #[test]
    fn exact_prefix_and_typo_matches_rank_by_field_weight() {
        let ix = ix();
        let hits = ix.search("postgres", |_| true, 5);
        assert_eq!(hits.iter().map(|h| h.doc).collect::<Vec<_>>(), [1]);
        assert_eq!(hits[0].why[0].how, Match::Exact);
        // A typo finds it too.
        let hits = ix.search("postgras", |_| true, 5);
        assert_eq!(
            hits.first().map(|h| (h.doc, h.why[0].how)),
            Some((1, Match::Typo))
        );
        // A prefix of a word.
        let hits = ix.search("migr", |_| true, 5);
        assert_eq!(
            hits.first().map(|h| (h.doc, h.why[0].how)),
            Some((1, Match::Prefix))
        );
        // "rust": the profile word (exact) outranks the name that only starts with it.
        let hits = ix.search("rust", |_| true, 5);
        let docs: Vec<usize> = hits.iter().map(|h| h.doc).collect();
        assert_eq!(docs.first(), Some(&2), "{hits:?}");
        assert!(docs.contains(&3));
    }

    #[test]
    fn peers_matching_more_terms_rank_first_and_filters_apply() {
        let ix = ix();
        // Either term: both peers, each with half its score.
        let hits = ix.search("react postgres", |_| true, 5);
        let mut docs: Vec<usize> = hits.iter().map(|h| h.doc).collect();
        docs.sort_unstable();
        assert_eq!(docs, [0, 1]);
        let hits = ix.search("postgres migrations federation", |_| true, 5);
        assert_eq!(
            hits.first().map(|h| h.doc),
            Some(1),
            "two of three terms first: {hits:?}"
        );
        let hits = ix.search("react dashboard", |_| true, 5);
        assert_eq!(hits.iter().map(|h| h.doc).collect::<Vec<_>>(), [0]);
        // A word nothing has is ignored rather than emptying the result.
        let hits = ix.search("react zzzzzz", |_| true, 5);
        assert_eq!(hits.iter().map(|h| h.doc).collect::<Vec<_>>(), [0]);
        assert!(ix.search("react", |d| d != 0, 5).is_empty());
        assert!(ix.search("", |_| true, 5).is_empty());
    }

    #[test]
    fn edit_distance_counts_transpositions_once() {
        assert_eq!(edits("kitten", "sitting", 5), 3);
        assert_eq!(edits("ab", "ba", 2), 1);
        assert_eq!(edits("rust", "rust", 0), 0);
        assert_eq!(edits("abcdef", "uvwxyz", 1), 2, "stops past the bound");
    }
}
