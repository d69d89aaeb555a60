//! The Merkle tree over a post's wrapped keys.
//!
//! The sender signs the root; the server hands each recipient only its own
//! wrapped key plus the audit path, and the recipient recomputes the root.
//! That keeps deliveries small (a 100-member room sends each member 7
//! hashes instead of 99 wrapped keys) while the signature still covers
//! every wrapped key.
//!
//! The shape is RFC 6962 §2.1 (Certificate Transparency): leaves hashed
//! with a 0x00 prefix, interior nodes with 0x01, the left subtree holding
//! the largest power of two strictly below the leaf count. It is written
//! here rather than taken from a crate because the exact construction is
//! part of the wire contract that other clients (a browser page) must
//! reproduce bit for bit; the tests pin it to known answers.

use sha2::{Digest, Sha256};

/// A SHA-256 digest.
pub type Hash = [u8; 32];

/// Longest audit path: enough for 2^32 leaves.
pub const PATH_HASHES_MAX: usize = 32;

/// The hash of one leaf: SHA-256(0x00 ‖ recipient handle bytes ‖ wrapped key).
pub fn leaf_hash(recipient: &[u8; 32], wrapped: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(recipient);
    h.update(wrapped);
    h.finalize().into()
}

fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// The largest power of two strictly below `n` (n ≥ 2).
fn split(n: usize) -> usize {
    debug_assert!(n >= 2);
    1 << (usize::BITS - 1 - (n - 1).leading_zeros())
}

/// A whole tree, kept so that every leaf's audit path is a walk, not a
/// recomputation.
#[derive(Clone, Debug)]
pub struct Tree {
    /// Node hashes in post-order; the root is last.
    nodes: Vec<Hash>,
    /// For each interior node, the index of its left and right child.
    children: Vec<Option<(usize, usize)>>,
    leaves: usize,
}

impl Tree {
    /// Builds the tree over leaf hashes.
    ///
    /// # Panics
    /// If there are no leaves: a post always has at least its sender.
    pub fn new(leaves: &[Hash]) -> Tree {
        assert!(!leaves.is_empty(), "a Merkle tree needs at least one leaf");
        let mut tree = Tree {
            nodes: Vec::with_capacity(2 * leaves.len()),
            children: Vec::with_capacity(2 * leaves.len()),
            leaves: leaves.len(),
        };
        tree.build(leaves);
        tree
    }

    fn build(&mut self, leaves: &[Hash]) -> usize {
        if leaves.len() == 1 {
            self.nodes.push(leaves[0]);
            self.children.push(None);
            return self.nodes.len() - 1;
        }
        let k = split(leaves.len());
        let left = self.build(&leaves[..k]);
        let right = self.build(&leaves[k..]);
        self.nodes
            .push(node_hash(&self.nodes[left], &self.nodes[right]));
        self.children.push(Some((left, right)));
        self.nodes.len() - 1
    }

    /// The root hash.
    pub fn root(&self) -> Hash {
        *self.nodes.last().expect("a tree has a root")
    }

    /// Number of leaves.
    pub fn len(&self) -> usize {
        self.leaves
    }

    /// Always false: a tree has at least one leaf.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The audit path of leaf `index`, leaf to root, into `out`; returns
    /// how many hashes it wrote. No allocation: this runs once per
    /// delivery.
    ///
    /// # Panics
    /// If `index` is out of range.
    pub fn path_into<'a>(&'a self, index: usize, out: &mut [&'a Hash; PATH_HASHES_MAX]) -> usize {
        assert!(index < self.leaves);
        let mut depth = 0;
        let mut node = self.nodes.len() - 1;
        let (mut start, mut n) = (0, self.leaves);
        while let Some((left, right)) = self.children[node] {
            let k = split(n);
            if index < start + k {
                out[depth] = &self.nodes[right];
                node = left;
                n = k;
            } else {
                out[depth] = &self.nodes[left];
                node = right;
                start += k;
                n -= k;
            }
            depth += 1;
        }
        out[..depth].reverse();
        depth
    }

    /// The audit path of leaf `index`, leaf to root.
    ///
    /// # Panics
    /// If `index` is out of range.
    pub fn path(&self, index: usize) -> Vec<Hash> {
        assert!(index < self.leaves);
        let mut path = Vec::new();
        let mut node = self.nodes.len() - 1;
        let (mut start, mut n) = (0, self.leaves);
        while let Some((left, right)) = self.children[node] {
            let k = split(n);
            if index < start + k {
                path.push(self.nodes[right]);
                node = left;
                n = k;
            } else {
                path.push(self.nodes[left]);
                node = right;
                start += k;
                n -= k;
            }
        }
        path.reverse();
        path
    }
}

/// The root implied by a leaf, its position and its audit path; `None` when
/// the path has the wrong length for that position.
pub fn root_from_path(leaf: Hash, index: usize, count: usize, path: &[Hash]) -> Option<Hash> {
    if index >= count {
        return None;
    }
    if count == 1 {
        return path.is_empty().then_some(leaf);
    }
    let (sibling, rest) = path.split_last()?;
    let k = split(count);
    if index < k {
        let left = root_from_path(leaf, index, k, rest)?;
        Some(node_hash(&left, sibling))
    } else {
        let right = root_from_path(leaf, index - k, count - k, rest)?;
        Some(node_hash(sibling, &right))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaves(n: usize) -> Vec<Hash> {
        (0..n)
            .map(|i| leaf_hash(&[i as u8; 32], &[0xAB; 256]))
            .collect()
    }

    /// The RFC 6962 definition, written as recursively as the RFC does.
    fn mth(leaves: &[Hash]) -> Hash {
        if leaves.len() == 1 {
            return leaves[0];
        }
        let k = split(leaves.len());
        node_hash(&mth(&leaves[..k]), &mth(&leaves[k..]))
    }

    #[test]
    fn split_is_the_largest_power_of_two_below() {
        assert_eq!(split(2), 1);
        assert_eq!(split(3), 2);
        assert_eq!(split(4), 2);
        assert_eq!(split(5), 4);
        assert_eq!(split(100), 64);
        assert_eq!(split(128), 64);
        assert_eq!(split(129), 128);
    }

    #[test]
    fn every_path_leads_to_the_root_for_every_size() {
        for n in 1..=70 {
            let l = leaves(n);
            let tree = Tree::new(&l);
            assert_eq!(tree.root(), mth(&l), "n={n}");
            for (i, leaf) in l.iter().enumerate() {
                let path = tree.path(i);
                assert!(path.len() <= 7);
                assert_eq!(
                    root_from_path(*leaf, i, n, &path),
                    Some(tree.root()),
                    "n={n} i={i}"
                );
            }
        }
    }

    #[test]
    fn a_wrong_leaf_index_or_path_gives_another_root() {
        let l = leaves(10);
        let tree = Tree::new(&l);
        let path = tree.path(3);
        assert_ne!(root_from_path(l[3], 4, 10, &path), Some(tree.root()));
        assert_ne!(root_from_path(l[4], 3, 10, &path), Some(tree.root()));
        assert_eq!(root_from_path(l[3], 3, 10, &path[1..]), None);
        assert_eq!(root_from_path(l[3], 10, 10, &path), None);
        assert_eq!(root_from_path(l[0], 0, 1, &path), None);
    }

    #[test]
    fn known_answer() {
        // Pins the construction: a change here breaks every other client.
        let tree = Tree::new(&leaves(3));
        let hex: String = tree.root().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, KNOWN_ROOT_3);
    }

    // Computed by an independent Python implementation of RFC 6962 §2.1.
    const KNOWN_ROOT_3: &str = "f8e1ee37917309f819c53e7206286c37cfd3f0397b4c45d71b264daa922ff4bf";
}
