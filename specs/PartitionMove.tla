---------------------------- MODULE PartitionMove ----------------------------
(***************************************************************************)
(* Changing the replica set of one partition's log (PartitionLog.tla) as   *)
(* the cluster map moves a replica slot from one node to another: a node   *)
(* joins and takes the slot, or a drained node gives it up.  The map does  *)
(* it in two steps, each a new map epoch:                                  *)
(*                                                                         *)
(*   epoch 1: Old            (e.g. {1, 2, 3})                               *)
(*   epoch 2: Old + the new node          ({1, 2, 3, 4}: grow)              *)
(*   epoch 3: that minus the old node     ({1, 2, 4}: shrink)               *)
(*                                                                         *)
(* Quorums are majorities of the epoch's set.  Any quorum of epoch 2       *)
(* meets any quorum of epoch 1 and any quorum of epoch 3 (one node more or *)
(* fewer), but a quorum of epoch 3 need not meet one of epoch 1 ({2, 4}    *)
(* and {1, 3}).  The protocol makes sure the two never both act:           *)
(*                                                                         *)
(*  - EPOCH_IN_TERM: terms are <<epoch, round, node>>, compared in that    *)
(*    order, so a replica that promised a term of epoch e refuses every    *)
(*    write and every Prepare of an earlier epoch: electing a leader of    *)
(*    epoch e fences every earlier epoch on a quorum of epoch e.           *)
(*  - ESTABLISH_BEFORE_SHRINK: the map moves from epoch 2 to epoch 3 only  *)
(*    once a leader of epoch 2 has *established* it: was elected by a      *)
(*    quorum of epoch 2 (so epoch 1 is fenced on a quorum of epoch 1: no   *)
(*    epoch-1 leader can be elected or commit again) and has committed,    *)
(*    in its epoch-2 term, every entry it recovered (so everything chosen  *)
(*    in epoch 1 is on a quorum of epoch 2, which meets every quorum of    *)
(*    epoch 3).  Growing needs no such wait: quorums of epochs 1 and 2     *)
(*    always meet.                                                         *)
(*                                                                         *)
(* A node that may campaign learns the map's epochs one by one, at any     *)
(* time after the map committed them (Learn; no other node reads what it  *)
(* knows), and campaigns only in the epoch it knows and only if that      *)
(* epoch's set names it (and Campaigns allows it).  A replica answers a    *)
(* Prepare or an Accept of epoch e only if epoch e's set names it,         *)
(* whatever epoch it knows: a removed node keeps answering the epochs it   *)
(* was part of, which is safe because fencing, not knowledge of the map,   *)
(* keeps them apart.                                                       *)
(* The new node joins with an empty log; in the node it then copies the    *)
(* timeline (timeline/copy.rs), which is below the log's compaction floor  *)
(* and not modelled (no compaction here).                                  *)
(*                                                                         *)
(* Everything else is PartitionLog.tla (copied in, so the file stands     *)
(* alone): the network is a set of messages (repeat, reorder, never), a    *)
(* replica's promise and log are durable, the tail read recovers the       *)
(* highest-term entry of every slot from a quorum.                         *)
(***************************************************************************)
EXTENDS Naturals, FiniteSets, Sequences

CONSTANTS
    Old,         \* the replicas of epoch 1
    Joiner,      \* the node that takes a slot (in epochs 2 and 3)
    Leaver,      \* the node that gives its slot up (in epochs 1 and 2)
    OldLeader,        \* a node of Old that may campaign...
    OldLeaderEpochs,  \* ...in these epochs
    NewLeader,        \* the joiner, or another node, that may campaign...
    NewLeaderEpochs,  \* ...in these epochs
    Posts,       \* post ids clients submit (each once)
    MaxRound,    \* rounds per epoch are 1..MaxRound
    MaxSlot,     \* slots are 1..MaxSlot
    EPOCH_IN_TERM,            \* TRUE: terms are ordered by epoch first
    ESTABLISH_BEFORE_SHRINK   \* TRUE: epoch 3 only after an epoch-2 leader established epoch 2

(* The replica set of each epoch: grow, then shrink.                      *)
Sets == <<Old, Old \cup {Joiner}, (Old \cup {Joiner}) \ {Leaver}>>
Epochs == 1..Len(Sets)
Node == UNION {Sets[e] : e \in Epochs}
(* Who may campaign in which epoch (the epoch's set must name it too).     *)
Campaigns == ({OldLeader} \X OldLeaderEpochs) \cup ({NewLeader} \X NewLeaderEpochs)
Leaders == {OldLeader, NewLeader}
Quorums(e) == {Q \in SUBSET Sets[e] : 2 * Cardinality(Q) > Cardinality(Sets[e])}
Slots == 1..MaxSlot

(* Terms <<epoch, round, node>>.  With EPOCH_IN_TERM they are ordered by   *)
(* epoch, round, node; without (broken), by round and node only, the epoch *)
(* riding along.                                                           *)
Zero == <<0, 0, 0>>
Key(t) == IF EPOCH_IN_TERM THEN <<t[1], t[2], t[3]>> ELSE <<0, t[2], t[3]>>
LexLT(a, b) ==
    \/ a[1] < b[1]
    \/ a[1] = b[1] /\ a[2] < b[2]
    \/ a[1] = b[1] /\ a[2] = b[2] /\ a[3] < b[3]
TLT(a, b) == LexLT(Key(a), Key(b)) \/ (Key(a) = Key(b) /\ LexLT(a, b))
TLE(a, b) == a = b \/ TLT(a, b)
Terms == {Zero} \cup (Epochs \X (1..MaxRound) \X Leaders)
EpochOf(t) == t[1]

None == [term |-> Zero, post |-> 0]
Entries == {None} \cup [term : Terms, post : Posts]
EmptyLog == [i \in Slots |-> None]

VARIABLES
    epoch,       \* the map's committed epoch
    known,       \* [Node -> Epochs]: the epoch each node has learned
    established, \* epochs a leader of that epoch has established
    promised,    \* [Node -> Terms]: durable
    log,         \* [Node -> [Slots -> Entries]]: durable
    role,        \* [Node -> {"follower", "candidate", "leader"}]
    term,        \* [Node -> Terms]: the term it leads or runs for
    next,        \* [Node -> Nat]: the leader's next free slot
    acks,        \* [Node -> [Slots -> SUBSET Node]]: Accepted heard this term
    proposed,    \* [Node -> [Slots -> Entries]]: what the leader wrote this term
    unsent,      \* posts no leader has taken yet
    msgs,        \* every message ever sent
    votes,       \* history: <<node, term, slot, post>> ever stored
    acked        \* history: <<slot, post>> ever acknowledged to a sender

vars == <<epoch, known, established, promised, log, role, term, next, acks,
          proposed, unsent, msgs, votes, acked>>

Send(m) == msgs' = msgs \cup {m}
SendAll(ms) == msgs' = msgs \cup ms

TypeOK ==
    /\ epoch \in Epochs
    /\ known \in [Node -> Epochs]
    /\ established \subseteq Epochs
    /\ promised \in [Node -> Terms]
    /\ log \in [Node -> [Slots -> Entries]]
    /\ role \in [Node -> {"follower", "candidate", "leader"}]
    /\ term \in [Node -> Terms]
    /\ next \in [Node -> 1..MaxSlot + 1]
    /\ unsent \subseteq Posts

Init ==
    /\ epoch = 1
    /\ known = [n \in Node |-> 1]
    /\ established = {}
    /\ promised = [n \in Node |-> Zero]
    /\ log = [n \in Node |-> EmptyLog]
    /\ role = [n \in Node |-> "follower"]
    /\ term = [n \in Node |-> Zero]
    /\ next = [n \in Node |-> 1]
    /\ acks = [n \in Node |-> [i \in Slots |-> {}]]
    /\ proposed = [n \in Node |-> EmptyLog]
    /\ unsent = Posts
    /\ msgs = {}
    /\ votes = {}
    /\ acked = {}

Frozen == <<promised, log, role, term, next, acks, proposed, unsent, msgs, votes, acked>>

(* The map commits the next epoch: growing at any time, shrinking only    *)
(* once epoch 2 is established (ESTABLISH_BEFORE_SHRINK).                 *)
MapAdvance ==
    /\ epoch < Len(Sets)
    /\ (epoch >= 2 /\ ESTABLISH_BEFORE_SHRINK) => epoch \in established
    /\ epoch' = epoch + 1
    /\ UNCHANGED <<known, established>>
    /\ UNCHANGED Frozen

Learn(n) ==
    /\ n \in Leaders          \* only campaigning reads it
    /\ known[n] < epoch
    /\ known' = [known EXCEPT ![n] = known[n] + 1]
    /\ UNCHANGED <<epoch, established>>
    /\ UNCHANGED Frozen

Campaign(n, r) ==
    /\ <<n, known[n]>> \in Campaigns
    /\ n \in Sets[known[n]]
    /\ LET t == <<known[n], r, n>> IN
       /\ TLT(promised[n], t)
       /\ TLT(term[n], t)
       /\ role' = [role EXCEPT ![n] = "candidate"]
       /\ term' = [term EXCEPT ![n] = t]
       /\ acks' = [acks EXCEPT ![n] = [i \in Slots |-> {}]]
       /\ proposed' = [proposed EXCEPT ![n] = EmptyLog]
       /\ Send([type |-> "prepare", term |-> t])
    /\ UNCHANGED <<epoch, known, established, promised, log, next, unsent, votes, acked>>

OnPrepare(n, m) ==
    /\ m.type = "prepare"
    /\ n \in Sets[EpochOf(m.term)]
    /\ TLT(promised[n], m.term)
    /\ promised' = [promised EXCEPT ![n] = m.term]
    /\ role' = [role EXCEPT ![n] = IF TLT(term[n], m.term) THEN "follower" ELSE role[n]]
    /\ Send([type |-> "promise", term |-> m.term, from |-> n, log |-> log[n]])
    /\ UNCHANGED <<epoch, known, established, log, term, next, acks, proposed, unsent, votes, acked>>

Promises(n) == {m \in msgs : m.type = "promise" /\ m.term = term[n]}

Highest(ps, i) ==
    LET filled == {p \in ps : p.log[i] # None} IN
    IF filled = {} THEN None
    ELSE (CHOOSE p \in filled : \A q \in filled : TLE(q.log[i].term, p.log[i].term)).log[i]

BecomeLeader(n) ==
    /\ role[n] = "candidate"
    /\ \E Q \in Quorums(EpochOf(term[n])) :
        /\ \A q \in Q : \E p \in Promises(n) : p.from = q
        /\ LET ps == {p \in Promises(n) : p.from \in Q}
               recovered == [i \in Slots |-> Highest(ps, i)]
               filled == {i \in Slots : recovered[i] # None}
               last == IF filled = {} THEN 0
                       ELSE CHOOSE i \in filled : \A j \in filled : j <= i
           IN /\ role' = [role EXCEPT ![n] = "leader"]
              /\ next' = [next EXCEPT ![n] = last + 1]
              /\ proposed' = [proposed EXCEPT ![n] =
                     [i \in Slots |-> IF recovered[i] = None THEN None
                                      ELSE [term |-> term[n], post |-> recovered[i].post]]]
              /\ SendAll({[type |-> "accept", term |-> term[n], slot |-> i,
                           post |-> recovered[i].post] : i \in filled})
    /\ UNCHANGED <<epoch, known, established, promised, log, term, acks, unsent, votes, acked>>

AppendPost(n, p) ==
    /\ role[n] = "leader"
    /\ p \in unsent
    /\ next[n] <= MaxSlot
    /\ unsent' = unsent \ {p}
    /\ next' = [next EXCEPT ![n] = next[n] + 1]
    /\ proposed' = [proposed EXCEPT ![n][next[n]] = [term |-> term[n], post |-> p]]
    /\ Send([type |-> "accept", term |-> term[n], slot |-> next[n], post |-> p])
    /\ UNCHANGED <<epoch, known, established, promised, log, role, term, acks, votes, acked>>

OnAccept(n, m) ==
    /\ m.type = "accept"
    /\ n \in Sets[EpochOf(m.term)]
    /\ TLE(promised[n], m.term)
    /\ promised' = [promised EXCEPT ![n] = m.term]
    /\ role' = [role EXCEPT ![n] = IF TLT(term[n], m.term) THEN "follower" ELSE role[n]]
    /\ log' = [log EXCEPT ![n][m.slot] = [term |-> m.term, post |-> m.post]]
    /\ votes' = votes \cup {<<n, m.term, m.slot, m.post>>}
    /\ Send([type |-> "accepted", term |-> m.term, slot |-> m.slot, from |-> n])
    /\ UNCHANGED <<epoch, known, established, term, next, acks, proposed, unsent, acked>>

OnAccepted(n, m) ==
    /\ m.type = "accepted"
    /\ role[n] = "leader"
    /\ m.term = term[n]
    /\ m.from \notin acks[n][m.slot]
    /\ acks' = [acks EXCEPT ![n][m.slot] = acks[n][m.slot] \cup {m.from}]
    /\ UNCHANGED <<epoch, known, established, promised, log, role, term, next,
                   proposed, unsent, msgs, votes, acked>>

Committed(n, i) == \E Q \in Quorums(EpochOf(term[n])) : Q \subseteq acks[n][i]

(* A leader has established its epoch once every entry it recovered or   *)
(* appended is committed in its term (a recovered hole stays empty: it    *)
(* was never chosen, see PartitionLog.tla).                               *)
Establish(n) ==
    /\ role[n] = "leader"
    /\ EpochOf(term[n]) \notin established
    /\ \A i \in Slots : proposed[n][i] # None => Committed(n, i)
    /\ established' = established \cup {EpochOf(term[n])}
    /\ UNCHANGED <<epoch, known>>
    /\ UNCHANGED Frozen

Acknowledge(n, i) ==
    /\ role[n] = "leader"
    /\ i \in Slots
    /\ proposed[n][i] # None
    /\ \A j \in 1..i : proposed[n][j] # None /\ Committed(n, j)
    /\ \A j \in 1..i - 1 : \E b \in acked : b[1] = j
    /\ <<i, proposed[n][i].post>> \notin acked
    /\ acked' = acked \cup {<<i, proposed[n][i].post>>}
    /\ UNCHANGED <<epoch, known, established, promised, log, role, term, next,
                   acks, proposed, unsent, msgs, votes>>

Next ==
    \/ MapAdvance
    \/ \E n \in Node : Learn(n)
    \/ \E n \in Node, r \in 1..MaxRound : Campaign(n, r)
    \/ \E n \in Node, m \in msgs : OnPrepare(n, m)
    \/ \E n \in Node : BecomeLeader(n)
    \/ \E n \in Node, p \in Posts : AppendPost(n, p)
    \/ \E n \in Node, m \in msgs : OnAccept(n, m)
    \/ \E n \in Node, m \in msgs : OnAccepted(n, m)
    \/ \E n \in Node : Establish(n)
    \/ \E n \in Node, i \in Slots : Acknowledge(n, i)

Spec == Init /\ [][Next]_vars

(***************************************************************************)
(* Invariants.                                                             *)
(***************************************************************************)

(* Chosen: stored in one term by a quorum of that term's epoch.           *)
Chosen(i, p) ==
    \E t \in Terms \ {Zero} :
        \E Q \in Quorums(EpochOf(t)) : \A q \in Q : <<q, t, i, p>> \in votes

(* No two posts are ever chosen for one slot, in any epochs.             *)
Agreement == \A i \in Slots, p, q \in Posts : Chosen(i, p) /\ Chosen(i, q) => p = q

(* One slot per post and one post per slot among acknowledged posts.     *)
AckedOnce == \A a, b \in acked : (a[1] = b[1]) <=> (a[2] = b[2])

(* Every acknowledged post was chosen (so, with Agreement, no later      *)
(* epoch puts another post in its slot).                                   *)
AckedChosen == \A a \in acked : Chosen(a[1], a[2])

(* (a sanity check of the model's guard, violated by the broken config). *)
=============================================================================
