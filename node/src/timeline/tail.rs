//! The end of one room's timeline: the next id, the next sequence number,
//! and the recent posts a retry is recognised by.
//!
//! Every post is given its id and sequence number here, in the order the
//! room's posts are stored. The computation is a pure function of the
//! tail and of what the post carries (the proposer's clock reading and
//! random seed), so that every replica of a partition that applies the
//! same committed log computes the same ids and sequence numbers, and a
//! replica that applies a slot twice (after a crash between storing and
//! recording what it applied) recognises its own earlier work.
//!
//! A post is a *retry* when its sender and AES-GCM nonce equal those of a
//! post among the room's last [`RECENT_POSTS`]: a client that never saw its
//! acknowledgement sends the same envelope again, and gets the original id
//! and sequence number back instead of a second copy. A nonce is fresh per
//! message (the envelope format requires it), so two different messages of
//! one sender never collide; anyone else replaying the envelope is refused
//! before it gets here, because the sender must be the posting member.

use std::collections::{HashMap, VecDeque};

use saferchat_consensus::{Handle, RoomId};
use saferchat_envelope::{Envelope, NONCE_BYTES};

use crate::error::NodeError;
use crate::message_id::{IdGenerator, MessageId};
use crate::storage::{self, ChatStore, Range};

/// How many recent posts of a room a retry is recognised among. A client
/// retries within seconds of losing an acknowledgement; at 256 the window
/// covers several seconds of even a busy room while the tail of an idle
/// room costs one history page to load.
pub const RECENT_POSTS: usize = 256;

/// Posts stored since a replica's oldest unapplied post that
/// [`RoomTail::load_since`] keeps recognisable, at most: more than the
/// partition log retains of any room.
pub const BEHIND_MAX: usize = 100_000;

/// What identifies a post for retries: its sender and nonce.
pub type PostKey = (Handle, [u8; NONCE_BYTES]);

/// Where a post landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sequenced {
    /// Its id.
    pub id: MessageId,
    /// Its per-room sequence number.
    pub seq: u64,
    /// False when the post is a retry of an earlier one, whose id and
    /// number these are: nothing to store or deliver.
    pub fresh: bool,
}

/// The end of one room's timeline.
#[derive(Debug, Default)]
pub struct RoomTail {
    ids: IdGenerator,
    last_seq: u64,
    recent: VecDeque<PostKey>,
    by_key: HashMap<PostKey, (MessageId, u64)>,
    /// Posts another replica stored past this one's position (see
    /// [`RoomTail::load_since`]); forgotten once a post is placed fresh.
    behind: HashMap<PostKey, (MessageId, u64)>,
}

impl RoomTail {
    /// The tail of `room` as stored.
    ///
    /// # Errors
    /// Whatever the store reports.
    pub async fn load(store: &dyn ChatStore, room: &RoomId) -> Result<RoomTail, NodeError> {
        let newest_first = storage::history(store, room, Range::Before(None), RECENT_POSTS).await?;
        let mut tail = RoomTail::default();
        for m in newest_first.iter().rev() {
            tail.ids = IdGenerator::after(Some(m.id));
            tail.last_seq = tail.last_seq.max(m.seq);
            // Stored envelopes were validated when posted; one that no
            // longer parses simply cannot be retried.
            if let Ok(e) = Envelope::decode(m.envelope.clone()) {
                tail.remember((e.sender, e.nonce), m.id, m.seq);
            }
        }
        Ok(tail)
    }

    /// The tail of `room` as stored, also recognising every post stored
    /// with an id at or after `since_ms`, and the [`RECENT_POSTS`] before
    /// it.
    ///
    /// A store shared by the partition's replicas (Cassandra) may be ahead
    /// of the replica loading it: others stored what this one is about to
    /// apply, perhaps far more than [`RECENT_POSTS`] of it (a replica that
    /// was down). Every post's id is at or after the millisecond its
    /// leader proposed it, so loading from the earliest proposal among the
    /// posts about to be applied finds each of them that is stored, and
    /// none is placed a second time under a new number.
    ///
    /// # Errors
    /// Whatever the store reports.
    pub async fn load_since(
        store: &dyn ChatStore,
        room: &RoomId,
        since_ms: i64,
    ) -> Result<RoomTail, NodeError> {
        const PAGE: usize = 1000;
        let mut tail = RoomTail::load(store, room).await?;
        let Some(last) = tail.last_id() else {
            return Ok(tail);
        };
        if last.time_ms() < since_ms {
            return Ok(tail);
        }
        // Strictly after the floor of the millisecond before: every id of
        // `since_ms` itself is included.
        let mut after = Some(MessageId::floor_of_ms(since_ms.saturating_sub(1)));
        loop {
            let page = storage::history(store, room, Range::After(after), PAGE).await?;
            for m in &page {
                // Others may have stored more since the first read: the
                // tail ends at the newest post either read saw, or the
                // next post would be placed under a number in use.
                if tail.ids.last().is_none_or(|last| m.id > last) {
                    tail.ids = IdGenerator::after(Some(m.id));
                }
                tail.last_seq = tail.last_seq.max(m.seq);
                if let Ok(e) = Envelope::decode(m.envelope.clone()) {
                    let key = (e.sender, e.nonce);
                    if !tail.by_key.contains_key(&key) {
                        tail.behind.insert(key, (m.id, m.seq));
                    }
                }
            }
            if page.len() < PAGE || tail.behind.len() >= BEHIND_MAX {
                break;
            }
            after = page.last().map(|m| m.id);
        }
        // A post about to be applied may be a retry of one placed shortly
        // before `since_ms`, which the replicas that applied in order
        // recognised among their recent posts; the recent window here ends
        // at the store's head, maybe far later (a copied timeline). So the
        // posts just before `since_ms` are recognised too.
        let before = storage::history(
            store,
            room,
            Range::Before(Some(MessageId::floor_of_ms(since_ms))),
            RECENT_POSTS,
        )
        .await?;
        for m in before {
            if let Ok(e) = Envelope::decode(m.envelope.clone()) {
                let key = (e.sender, e.nonce);
                if !tail.by_key.contains_key(&key) {
                    tail.behind.entry(key).or_insert((m.id, m.seq));
                }
            }
        }
        Ok(tail)
    }

    /// Places a post: a retry gets its original place, a fresh post the
    /// next id (from `proposed_ms` and `seed`, never below the last id)
    /// and the next sequence number.
    pub fn place(&mut self, key: PostKey, proposed_ms: i64, seed: u64) -> Sequenced {
        if let Some((id, seq)) = self.by_key.get(&key).or_else(|| self.behind.get(&key)) {
            return Sequenced {
                id: *id,
                seq: *seq,
                fresh: false,
            };
        }
        // Past everything stored: the posts still to apply are newer.
        self.behind = HashMap::new();
        let id = self.ids.next(proposed_ms, seed);
        self.last_seq += 1;
        self.remember(key, id, self.last_seq);
        Sequenced {
            id,
            seq: self.last_seq,
            fresh: true,
        }
    }

    /// Where the post `key` landed, when the tail recognises it (a retry
    /// would get that place), without placing anything.
    pub fn recall(&self, key: &PostKey) -> Option<Sequenced> {
        self.by_key
            .get(key)
            .or_else(|| self.behind.get(key))
            .map(|(id, seq)| Sequenced {
                id: *id,
                seq: *seq,
                fresh: false,
            })
    }

    /// The newest id placed (or loaded).
    pub fn last_id(&self) -> Option<MessageId> {
        self.ids.last()
    }

    /// The newest sequence number placed (or loaded).
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    fn remember(&mut self, key: PostKey, id: MessageId, seq: u64) {
        if self.by_key.insert(key, (id, seq)).is_none() {
            self.recent.push_back(key);
        }
        while self.recent.len() > RECENT_POSTS {
            if let Some(old) = self.recent.pop_front() {
                self.by_key.remove(&old);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(sender: u8, nonce: u8) -> PostKey {
        (Handle::from_bytes([sender; 32]), [nonce; NONCE_BYTES])
    }

    #[test]
    fn fresh_posts_get_increasing_ids_and_gapless_numbers() {
        let mut tail = RoomTail::default();
        let a = tail.place(key(1, 1), 1_000, 7);
        let b = tail.place(key(1, 2), 999, 3); // clock stepped back
        let c = tail.place(key(2, 1), 1_005, 9);
        assert_eq!((a.seq, b.seq, c.seq), (1, 2, 3));
        assert!(a.id < b.id && b.id < c.id);
        assert!(a.fresh && b.fresh && c.fresh);
    }

    #[test]
    fn a_retry_gets_the_original_place_and_nothing_new() {
        let mut tail = RoomTail::default();
        let first = tail.place(key(1, 1), 1_000, 7);
        tail.place(key(1, 2), 1_001, 7);
        let again = tail.place(key(1, 1), 5_000, 1);
        assert_eq!((again.id, again.seq, again.fresh), (first.id, 1, false));
        assert_eq!(tail.last_seq(), 2);
        // Same nonce, another sender: another post.
        assert!(tail.place(key(2, 1), 1_002, 7).fresh);
    }

    #[test]
    fn recalling_finds_what_a_retry_would_get_and_places_nothing() {
        let mut tail = RoomTail::default();
        let first = tail.place(key(1, 1), 1_000, 7);
        assert_eq!(
            tail.recall(&key(1, 1)),
            Some(Sequenced {
                fresh: false,
                ..first
            })
        );
        assert_eq!(tail.recall(&key(1, 2)), None);
        assert_eq!(tail.last_seq(), 1);
        assert_eq!(tail.place(key(1, 2), 1_001, 7).seq, 2);
    }

    #[test]
    fn placing_is_a_function_of_the_tail_and_the_post() {
        let posts = [(key(1, 1), 10, 1), (key(2, 1), 10, 2), (key(1, 1), 11, 3)];
        let run = || {
            let mut tail = RoomTail::default();
            posts
                .iter()
                .map(|(k, ms, seed)| tail.place(*k, *ms, *seed))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(), run());
    }

    #[test]
    fn the_window_forgets_the_oldest_posts() {
        let mut tail = RoomTail::default();
        let first = tail.place(key(1, 0), 1, 1);
        for i in 1..=RECENT_POSTS {
            let nonce = u8::try_from(i % 251).unwrap();
            tail.place(key(2 + u8::try_from(i / 251).unwrap(), nonce), 1, 1);
        }
        let again = tail.place(key(1, 0), 1, 1);
        assert!(again.fresh && again.id != first.id);
    }

    /// Post `n` of the test sender in `room`: its key, proposal time, seed
    /// and envelope.
    fn test_post(room: &RoomId, n: u32) -> (PostKey, i64, u64, bytes::Bytes) {
        let envelope = crate::timeline::test_envelope(room, n);
        let e = Envelope::decode(envelope.clone()).unwrap();
        (
            (e.sender, e.nonce),
            1_800_000_000_000 + i64::from(n),
            u64::from(n),
            envelope,
        )
    }

    /// Another replica stored far more than the recent window past this
    /// one's position in a shared store: loaded from the earliest post
    /// about to be applied, the tail recognises every one of them, and
    /// the first post past the store's head is fresh with the next number.
    /// (A tail of only the recent window places the early ones again.)
    #[tokio::test]
    async fn a_tail_loaded_behind_a_shared_store_recognises_what_others_stored() {
        use crate::storage::StoredMessage;
        use crate::storage::memory::MemoryChat;
        let room = RoomId::new("team").unwrap();
        let post = |n: u32| test_post(&room, n);
        let total = 3 * RECENT_POSTS as u32;
        let store = MemoryChat::default();
        let mut ahead = RoomTail::default();
        let mut placed = Vec::new();
        for n in 0..total {
            let (key, ms, seed, envelope) = post(n);
            let p = ahead.place(key, ms, seed);
            store
                .append(&[StoredMessage {
                    room: room.clone(),
                    id: p.id,
                    seq: p.seq,
                    envelope,
                }])
                .await
                .unwrap();
            placed.push(p);
        }
        // This replica applied up to post 9.
        let from = 10;
        let mut windowed = RoomTail::load(&store, &room).await.unwrap();
        let (key, ms, seed, _) = post(from);
        assert!(
            windowed.place(key, ms, seed).fresh,
            "the window alone misses it"
        );

        let mut behind = RoomTail::load_since(&store, &room, post(from).1)
            .await
            .unwrap();
        for n in from..total {
            let (key, ms, seed, _) = post(n);
            let p = behind.place(key, ms, seed);
            assert!(!p.fresh, "post {n} is stored already");
            assert_eq!(
                (p.id, p.seq),
                (placed[n as usize].id, placed[n as usize].seq)
            );
        }
        // A retry of a post placed shortly before the tail's start (a
        // replica that applied in order had it among its recent posts),
        // with far more than the recent window stored after it: recognised.
        let mut again = RoomTail::load_since(&store, &room, post(from + 300).1)
            .await
            .unwrap();
        let (key, ms, seed, _) = post(from + 300 - 200);
        let p = again.place(key, ms, seed);
        assert!(!p.fresh, "a retry from just before the tail's start");
        assert_eq!(p.seq, placed[(from + 100) as usize].seq);
        let (key, ms, seed, _) = post(total);
        let next = behind.place(key, ms, seed);
        assert!(next.fresh);
        assert_eq!(next.seq, u64::from(total) + 1);
        assert_eq!(
            next,
            ahead.place(key, ms, seed),
            "as the replica ahead places it"
        );
    }

    /// A store that another replica appends to between the tail's two
    /// reads (right after the first, newest-first one).
    #[derive(Debug)]
    struct Racing {
        inner: crate::storage::memory::MemoryChat,
        later: std::sync::Mutex<Vec<crate::storage::StoredMessage>>,
    }

    #[async_trait::async_trait]
    impl ChatStore for Racing {
        async fn load_room(
            &self,
            room: &RoomId,
        ) -> Result<Option<crate::storage::CommittedRoom>, NodeError> {
            self.inner.load_room(room).await
        }
        async fn save_room(
            &self,
            room: &RoomId,
            committed: &crate::storage::CommittedRoom,
        ) -> Result<bool, NodeError> {
            self.inner.save_room(room, committed).await
        }
        async fn list_rooms(
            &self,
            after: Option<&RoomId>,
            limit: usize,
        ) -> Result<Vec<crate::storage::RoomSummary>, NodeError> {
            self.inner.list_rooms(after, limit).await
        }
        async fn append(&self, batch: &[crate::storage::StoredMessage]) -> Result<(), NodeError> {
            self.inner.append(batch).await
        }
        async fn buckets(
            &self,
            room: &RoomId,
        ) -> Result<Vec<crate::message_id::Bucket>, NodeError> {
            self.inner.buckets(room).await
        }
        async fn rooms_with_messages(
            &self,
            after: Option<&RoomId>,
            limit: usize,
        ) -> Result<Vec<RoomId>, NodeError> {
            self.inner.rooms_with_messages(after, limit).await
        }
        async fn truncate_room(
            &self,
            room: &RoomId,
            after: Option<crate::message_id::MessageId>,
        ) -> Result<u64, NodeError> {
            self.inner.truncate_room(room, after).await
        }
        async fn read_bucket(
            &self,
            room: &RoomId,
            bucket: crate::message_id::Bucket,
            range: Range,
            limit: usize,
        ) -> Result<Vec<crate::storage::StoredMessage>, NodeError> {
            let page = self.inner.read_bucket(room, bucket, range, limit).await?;
            if matches!(range, Range::Before(_)) {
                let later = std::mem::take(&mut *self.later.lock().unwrap());
                self.inner.append(&later).await?;
            }
            Ok(page)
        }
    }

    /// Posts stored by another replica between the tail's two reads are
    /// recognised, and the tail ends after them: the next post gets the
    /// next number, not one of theirs (found by the Cassandra chaos
    /// schedule: every post after such a load was numbered two too low).
    #[tokio::test]
    async fn a_tail_ends_after_posts_stored_between_its_reads() {
        use crate::storage::StoredMessage;
        let room = RoomId::new("team").unwrap();
        let post = |n: u32| test_post(&room, n);
        let mut ahead = RoomTail::default();
        let mut stored = Vec::new();
        for n in 0..20 {
            let (key, ms, seed, envelope) = post(n);
            let p = ahead.place(key, ms, seed);
            stored.push(StoredMessage {
                room: room.clone(),
                id: p.id,
                seq: p.seq,
                envelope,
            });
        }
        let store = Racing {
            inner: crate::storage::memory::MemoryChat::default(),
            later: std::sync::Mutex::new(stored.split_off(18)),
        };
        store.append(&stored).await.unwrap();

        let mut tail = RoomTail::load_since(&store, &room, post(0).1)
            .await
            .unwrap();
        for n in 0..20 {
            let (key, ms, seed, _) = post(n);
            assert!(!tail.place(key, ms, seed).fresh, "post {n} is stored");
        }
        let (key, ms, seed, _) = post(20);
        assert_eq!(tail.place(key, ms, seed), ahead.place(key, ms, seed));
    }
}
