//! The tokenizer's compact lookup tables: token strings by id and back, BPE merges by pair, and a
//! byte trie of the added tokens. Each is a few flat vectors (no per-token allocation), which is
//! what keeps Gemma 3's 262k-token, 515k-merge tokenizer at about 14 MB.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;

const NONE: u32 = u32::MAX;

/// The token has a string (ids may have gaps).
pub(super) const PRESENT: u8 = 1;
/// The token is in the BPE model's vocabulary (not only an added token).
pub(super) const MODEL: u8 = 2;
/// The token is one of `added_tokens`.
pub(super) const ADDED: u8 = 4;
/// The token is an added token marked `special`.
pub(super) const SPECIAL: u8 = 8;

/// Token strings by id, and string → id.
pub(super) struct Vocab {
    /// Every token's string, concatenated in id order.
    text: String,
    /// Token `id` is `text[offsets[id]..offsets[id + 1]]`; `len() + 1` entries.
    offsets: Vec<u32>,
    /// Per id: `PRESENT`, `MODEL`, `ADDED`, `SPECIAL`.
    flags: Vec<u8>,
    /// Open-addressing hash table (linear probing) of ids keyed by their string; `NONE` is free.
    slots: Vec<u32>,
    /// A randomly keyed SipHash: a vocabulary crafted to collide (model files come from the
    /// internet) cannot turn lookups quadratic.
    hasher: RandomState,
}

impl Vocab {
    /// The model's vocabulary from `text`, the tokens' strings in file order, and `entries`,
    /// each token's id and the end of its string in `text` (it starts where the previous ends).
    /// `extra` reserves hash slots for tokens pushed later. Errors are messages for the caller.
    pub fn from_model(text: &str, entries: &[(u32, u32)], extra: usize) -> Result<Vocab, String> {
        let id_space = entries.iter().map(|&(id, _)| id as usize + 1).max().unwrap_or(0);
        let mut entry_of = vec![NONE; id_space];
        for (i, &(id, _)) in entries.iter().enumerate() {
            if entry_of[id as usize] != NONE {
                return Err(format!("the vocabulary gives id {id} to two tokens"));
            }
            entry_of[id as usize] = i as u32;
        }
        let mut vocab = Vocab {
            text: String::with_capacity(text.len()),
            offsets: Vec::with_capacity(id_space + 1),
            flags: Vec::with_capacity(id_space),
            // Load factor at most 2/3 (Gemma 3: 1/2).
            slots: vec![NONE; ((entries.len() + extra) * 3 / 2).next_power_of_two().max(16)],
            hasher: RandomState::new(),
        };
        vocab.offsets.push(0);
        for e in entry_of {
            if e != NONE {
                let start = if e == 0 { 0 } else { entries[e as usize - 1].1 as usize };
                vocab.text.push_str(&text[start..entries[e as usize].1 as usize]);
            }
            vocab.offsets.push(vocab.text.len() as u32);
            vocab.flags.push(if e == NONE { 0 } else { PRESENT | MODEL });
        }
        for id in 0..id_space as u32 {
            if vocab.flags[id as usize] != 0 {
                vocab.insert(id)?;
            }
        }
        Ok(vocab)
    }

    /// Adds a token that is not in the model, with an id past all the current ones.
    pub fn push(&mut self, id: u32, token: &str) -> Result<(), String> {
        if (id as usize) < self.len() {
            return Err(format!(
                "added token {token:?} would get id {id}, inside the model's ids, which this \
                 tokenizer does not support"
            ));
        }
        if self.text.len() + token.len() > u32::MAX as usize {
            return Err("the token strings exceed 4 GiB".into());
        }
        while self.len() < id as usize {
            self.offsets.push(self.text.len() as u32);
            self.flags.push(0);
        }
        self.text.push_str(token);
        self.offsets.push(self.text.len() as u32);
        self.flags.push(PRESENT);
        self.insert(id)
    }

    fn hash(&self, bytes: &[u8]) -> usize {
        self.hasher.hash_one(bytes) as usize
    }

    fn insert(&mut self, id: u32) -> Result<(), String> {
        let token = self.get(id).unwrap_or_default();
        let mask = self.slots.len() - 1;
        let mut i = self.hash(token.as_bytes()) & mask;
        while self.slots[i] != NONE {
            if self.get(self.slots[i]) == Some(token) {
                return Err(format!("token {token:?} appears twice, with ids {} and {id}", self.slots[i]));
            }
            i = (i + 1) & mask;
        }
        self.slots[i] = id;
        Ok(())
    }

    /// The id space: max id + 1.
    pub fn len(&self) -> usize {
        self.flags.len()
    }

    pub fn flags(&self, id: u32) -> u8 {
        self.flags.get(id as usize).copied().unwrap_or(0)
    }

    pub fn add_flags(&mut self, id: u32, flags: u8) {
        if let Some(f) = self.flags.get_mut(id as usize) {
            *f |= flags;
        }
    }

    pub fn get(&self, id: u32) -> Option<&str> {
        if self.flags(id) & PRESENT == 0 {
            return None;
        }
        let (start, end) = (self.offsets[id as usize], self.offsets[id as usize + 1]);
        self.text.get(start as usize..end as usize)
    }

    /// The id of any token, model or added.
    pub fn find(&self, token: &[u8]) -> Option<u32> {
        self.find_from(token, self.hash(token) & (self.slots.len() - 1))
    }

    /// `find`, probing from slot `i` on.
    fn find_from(&self, token: &[u8], mut i: usize) -> Option<u32> {
        let mask = self.slots.len() - 1;
        loop {
            let id = self.slots[i];
            if id == NONE {
                return None;
            }
            if self.get(id).map(str::as_bytes) == Some(token) {
                return Some(id);
            }
            i = (i + 1) & mask;
        }
    }

    /// The id of a token of the BPE model's own vocabulary (what HF's `BPE` looks up).
    pub fn model_id(&self, token: &[u8]) -> Option<u32> {
        self.find(token).filter(|&id| self.flags(id) & MODEL != 0)
    }

    pub fn heap_bytes(&self) -> usize {
        self.text.capacity() + 4 * self.offsets.capacity() + self.flags.capacity() + 4 * self.slots.capacity()
    }
}

/// One BPE merge: the pair (left id << 32 | right id), its rank (line in `merges`), the merged id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Merge {
    pub pair: u64,
    pub rank: u32,
    pub new_id: u32,
}

/// The merges sorted by pair, binary-searched: 16 bytes a merge. Equal tables hold the same
/// (pair → rank, merged id) entries.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Merges(Vec<Merge>);

impl Merges {
    /// Sorts `merges`; a pair listed twice keeps its last rank, as HF's merge map does.
    pub fn new(mut merges: Vec<Merge>) -> Merges {
        merges.sort_unstable_by_key(|m| (m.pair, std::cmp::Reverse(m.rank)));
        merges.dedup_by_key(|m| m.pair);
        merges.shrink_to_fit();
        Merges(merges)
    }

    /// (rank, merged id) of the pair, if it merges.
    pub fn get(&self, left: u32, right: u32) -> Option<(u32, u32)> {
        let pair = u64::from(left) << 32 | u64::from(right);
        let i = self.0.binary_search_by_key(&pair, |m| m.pair).ok()?;
        Some((self.0[i].rank, self.0[i].new_id))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    #[cfg(test)]
    pub fn iter(&self) -> impl Iterator<Item = &Merge> {
        self.0.iter()
    }

    pub fn heap_bytes(&self) -> usize {
        self.0.capacity() * std::mem::size_of::<Merge>()
    }
}

/// A byte trie of the added tokens for leftmost-longest matching. The children of a node are
/// contiguous and sorted by byte; node 0 is the root.
pub(super) struct AddedTrie {
    nodes: Vec<TrieNode>,
}

#[derive(Clone, Copy)]
struct TrieNode {
    byte: u8,
    first_child: u32,
    n_children: u32,
    /// The token ending here, or `NONE`.
    id: u32,
}

impl AddedTrie {
    /// Builds the trie breadth-first from the tokens sorted by bytes: every node owns the range
    /// of tokens that start with its prefix. The tokens must be non-empty.
    pub fn new(mut tokens: Vec<(&[u8], u32)>) -> AddedTrie {
        tokens.sort_unstable();
        let leaf = |byte| TrieNode { byte, first_child: 0, n_children: 0, id: NONE };
        let mut nodes = vec![leaf(0)];
        // Per node: its tokens `lo..hi` and its depth (prefix length).
        let mut ranges = vec![(0, tokens.len(), 0)];
        let mut k = 0;
        while k < nodes.len() {
            let (mut lo, hi, depth) = ranges[k];
            // A token equal to the prefix sorts first among those that extend it.
            while lo < hi && tokens[lo].0.len() == depth {
                nodes[k].id = tokens[lo].1;
                lo += 1;
            }
            let first_child = nodes.len();
            while lo < hi {
                let byte = tokens[lo].0[depth];
                let mut end = lo + 1;
                while end < hi && tokens[end].0[depth] == byte {
                    end += 1;
                }
                nodes.push(leaf(byte));
                ranges.push((lo, end, depth + 1));
                lo = end;
            }
            nodes[k].first_child = first_child as u32;
            nodes[k].n_children = (nodes.len() - first_child) as u32;
            k += 1;
        }
        AddedTrie { nodes }
    }

    /// The longest token that `text` starts with: (id, byte length).
    pub fn longest_prefix(&self, text: &[u8]) -> Option<(u32, usize)> {
        let mut node = self.nodes[0];
        let mut best = None;
        for (i, &b) in text.iter().enumerate() {
            let children = &self.nodes[node.first_child as usize..][..node.n_children as usize];
            match children.binary_search_by_key(&b, |n| n.byte) {
                Ok(j) => node = children[j],
                Err(_) => break,
            }
            if node.id != NONE {
                best = Some((node.id, i + 1));
            }
        }
        best
    }

    pub fn heap_bytes(&self) -> usize {
        self.nodes.capacity() * std::mem::size_of::<TrieNode>()
    }
}
