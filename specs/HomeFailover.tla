----------------------------- MODULE HomeFailover -----------------------------
(***************************************************************************)
(* Moving a partition's home when its home datacenter is lost (designed   *)
(* before the node builds it; specs/README.md, "Failing over a partition's *)
(* home").                                                                 *)
(*                                                                         *)
(* A partition's log is voted on by its replicas in its home datacenter    *)
(* (H1 here) and followed by its replicas in the others (H2, H3): they     *)
(* store every slot the leader sends them durably and answer Accepted, but *)
(* count in no quorum (PartitionLog.tla, "learners").  A post of the       *)
(* cross-datacenter level is acknowledged once it was released at home and *)
(* a majority of some other datacenter's replicas stored every slot up to  *)
(* it in the leader's term.                                                *)
(*                                                                         *)
(* When H1 is lost, the cluster map moves the home to H2 in a new epoch    *)
(* (Move): H2's replicas vote from then on and everyone else follows.  H1  *)
(* may not be dead, only cut off, so two things must hold although H1's    *)
(* voters take no part in the move:                                        *)
(*                                                                         *)
(*  FENCE: once the new home released anything, the old home releases      *)
(*    (acknowledges, delivers) nothing more.  A leader of the old epoch    *)
(*    releases only while it holds a HOME LEASE: unexpired promises from a *)
(*    majority of ALL the partition's replicas, renewed in the background  *)
(*    (one round trip across datacenters per renewal, none per post).  A   *)
(*    candidate of the new epoch needs promises from a majority of all the *)
(*    replicas too, and a replica answers it only once the home-lease      *)
(*    promises it gave have run out (LEASE_WAIT), and grants no lease of   *)
(*    the old epoch after it (it knows the new epoch; epochs are in terms, *)
(*    so it also refuses the old epoch's writes).  Both sets are           *)
(*    majorities of one set, so they meet.                                 *)
(*                                                                         *)
(*  CROSS: every post acknowledged at the cross-datacenter level is in the *)
(*    new home's log at its slot.  The first elections of the new epoch    *)
(*    read, besides a majority of all the replicas, a majority of every    *)
(*    datacenter other than the lost home (WIDE_RECOVERY), which meets the *)
(*    majority that stored the post; the recovered log is the highest-term *)
(*    entry of each slot, cut at the first slot no promiser has.  Only     *)
(*    once the map recorded that a leader of the new epoch committed, in   *)
(*    its own term, everything it recovered (Establish) may an election    *)
(*    read the new home's voters alone (ESTABLISH_RULE).                   *)
(*                                                                         *)
(* Posts of the default (local) level released by the old home but stored *)
(* by no promiser of the new epoch are lost: that is the level's          *)
(* documented loss window, what replication lag allowed.  The invariants  *)
(* below say what is kept.                                                 *)
(*                                                                         *)
(* Time.  The lease is abstracted the way the node's clocks make it        *)
(* behave: a grant adds the holder to the grantor's promises and the       *)
(* grantor to the holder's lease at once; the holder's view of a grant     *)
(* ends (HolderExpire) at any moment, and a grantor's promise ends         *)
(* (GrantorExpire) only after the holder's view of it ended.  That order   *)
(* is what Drift::cover and the guards give (the holder times its lease    *)
(* from when it sent the request, the grantor from when it answered, and   *)
(* covers the drift bound); QuorumLeases.tla checks that arithmetic with   *)
(* real clocks and drift, and is not repeated here.                        *)
(***************************************************************************)
EXTENDS Naturals, FiniteSets

CONSTANTS
    H1,             \* the old home's replicas (epoch 1 voters)
    H2,             \* the new home's replicas (epoch 2 voters)
    H3,             \* a third datacenter's replicas (learners throughout)
    Leaders1,       \* nodes of H1 that may lead in epoch 1
    Leaders2,       \* nodes of H2 that may lead in epoch 2
    Posts,          \* post ids clients submit (each once)
    MaxRound,       \* terms are <<epoch, round, node>> with round <= MaxRound
    MaxSlot,        \* slots are 1..MaxSlot
    LEASE,          \* TRUE: an epoch-1 leader releases only under a home lease
    LEASE_WAIT,     \* TRUE: a replica answers an epoch-2 Prepare only once its promises ran out
    WIDE_RECOVERY,  \* TRUE: unestablished epoch-2 elections read a majority of all and of H2 and H3
    ESTABLISH_RULE  \* TRUE: narrow (H2-only) elections only after Establish; FALSE: after the first leader

Node == H1 \cup H2 \cup H3
Slots == 1..MaxSlot
Majority(S) == {Q \in SUBSET S : 2 * Cardinality(Q) > Cardinality(S)}
Voters(e) == IF e = 1 THEN H1 ELSE H2

(* Terms <<epoch, round, node>>, ordered in that order (partition_log::Term). *)
Zero == <<0, 0, 0>>
TLT(a, b) ==
    \/ a[1] < b[1]
    \/ (a[1] = b[1] /\ a[2] < b[2])
    \/ (a[1] = b[1] /\ a[2] = b[2] /\ a[3] < b[3])
TLE(a, b) == a = b \/ TLT(a, b)
Terms == {Zero} \cup ({1} \X (1..MaxRound) \X Leaders1)
                \cup ({2} \X (1..MaxRound) \X Leaders2)

None == [term |-> Zero, post |-> 0]
Entries == {None} \cup [term : Terms, post : Posts]
EmptyLog == [i \in Slots |-> None]

VARIABLES
    moved,       \* the map moved the home to H2 (epoch 2)
    established, \* the map recorded that epoch 2 was established
    firstLed,    \* some node led epoch 2 (history, for the broken ESTABLISH_RULE)
    known,       \* [Node -> {1, 2}]: the epoch a node knows
    promised,    \* [Node -> Term]: durable
    log,         \* [Node -> [Slots -> Entries]]: durable
    role,        \* [Node -> {"follower", "candidate", "leader"}]: volatile
    term,        \* [Node -> Term]: the term it leads or runs for (kept across restarts)
    next,        \* [Node -> Nat]: the leader's next free slot
    recovered,   \* [Node -> Nat]: the last slot the leader recovered
    released,    \* [Node -> Nat]: the leader released slots 1..released in its term
    acks,        \* [Node -> [Slots -> SUBSET Node]]: Accepted heard this term
    proposed,    \* [Node -> [Slots -> Entries]]: what the leader wrote this term
    grants,      \* [Node -> SUBSET Node]: holders this node promised a home lease to
    lease,       \* [Node -> SUBSET Node]: grantors whose promise this holder counts
    unsent,      \* posts no leader has taken yet
    msgs,        \* every message ever sent
    shown,       \* history: <<epoch, slot, post>> released by a leader of that epoch
    crossAcked   \* history: <<slot, post>> acknowledged at the cross-datacenter level

vars == <<moved, established, firstLed, known, promised, log, role, term, next, recovered,
          released, acks, proposed, grants, lease, unsent, msgs, shown, crossAcked>>

Send(m) == msgs' = msgs \cup {m}
SendAll(ms) == msgs' = msgs \cup ms

TypeOK ==
    /\ moved \in BOOLEAN /\ established \in BOOLEAN /\ firstLed \in BOOLEAN
    /\ known \in [Node -> {1, 2}]
    /\ promised \in [Node -> Terms]
    /\ log \in [Node -> [Slots -> Entries]]
    /\ role \in [Node -> {"follower", "candidate", "leader"}]
    /\ term \in [Node -> Terms]
    /\ next \in [Node -> 1..MaxSlot + 1]
    /\ recovered \in [Node -> 0..MaxSlot]
    /\ released \in [Node -> 0..MaxSlot]
    /\ acks \in [Node -> [Slots -> SUBSET Node]]
    /\ proposed \in [Node -> [Slots -> Entries]]
    /\ grants \in [Node -> SUBSET Node]
    /\ lease \in [Node -> SUBSET Node]
    /\ unsent \subseteq Posts

Init ==
    /\ moved = FALSE /\ established = FALSE /\ firstLed = FALSE
    /\ known = [n \in Node |-> 1]
    /\ promised = [n \in Node |-> Zero]
    /\ log = [n \in Node |-> EmptyLog]
    /\ role = [n \in Node |-> "follower"]
    /\ term = [n \in Node |-> Zero]
    /\ next = [n \in Node |-> 1]
    /\ recovered = [n \in Node |-> 0]
    /\ released = [n \in Node |-> 0]
    /\ acks = [n \in Node |-> [i \in Slots |-> {}]]
    /\ proposed = [n \in Node |-> EmptyLog]
    /\ grants = [n \in Node |-> {}]
    /\ lease = [n \in Node |-> {}]
    /\ unsent = Posts
    /\ msgs = {}
    /\ shown = {}
    /\ crossAcked = {}

Leading(n) == role[n] = "leader"
Epoch(t) == t[1]

(* Volatile leadership state, cleared on a new candidacy and a restart.   *)
Forget(n) ==
    /\ acks' = [acks EXCEPT ![n] = [i \in Slots |-> {}]]
    /\ proposed' = [proposed EXCEPT ![n] = EmptyLog]
    /\ released' = [released EXCEPT ![n] = 0]
    /\ lease' = [lease EXCEPT ![n] = {}]

(* A node runs only in the epoch it knows, and only if it votes there.    *)
Campaign(n, r) ==
    /\ LET e == known[n]
           t == <<e, r, n>>
       IN /\ n \in (IF e = 1 THEN Leaders1 ELSE Leaders2)
          /\ TLT(promised[n], t)
          /\ TLT(term[n], t)
          /\ role' = [role EXCEPT ![n] = "candidate"]
          /\ term' = [term EXCEPT ![n] = t]
          /\ Forget(n)
          /\ Send([type |-> "prepare", term |-> t])
    /\ UNCHANGED <<moved, established, firstLed, known, promised, log, next, recovered,
                   grants, unsent, shown, crossAcked>>

(* A replica answers a Prepare of the epoch it knows: in epoch 1 the      *)
(* voters, in epoch 2 everyone (a failover reads learners too).  For     *)
(* epoch 2 it first lets the home-lease promises it gave run out.         *)
OnPrepare(n, m) ==
    /\ m.type = "prepare"
    /\ Epoch(m.term) = known[n]
    /\ Epoch(m.term) = 1 => n \in H1
    /\ (LEASE_WAIT /\ Epoch(m.term) = 2) => grants[n] = {}
    /\ TLT(promised[n], m.term)
    /\ promised' = [promised EXCEPT ![n] = m.term]
    /\ role' = [role EXCEPT ![n] = IF TLT(term[n], m.term) THEN "follower" ELSE role[n]]
    /\ Send([type |-> "promise", term |-> m.term, from |-> n, log |-> log[n]])
    /\ UNCHANGED <<moved, established, firstLed, known, log, term, next, recovered, released,
                   acks, proposed, grants, lease, unsent, shown, crossAcked>>

Promises(n) == {m \in msgs : m.type = "promise" /\ m.term = term[n]}

Highest(ps, i) ==
    LET filled == {p \in ps : p.log[i] # None} IN
    IF filled = {} THEN None
    ELSE (CHOOSE p \in filled : \A q \in filled : TLE(q.log[i].term, p.log[i].term)).log[i]

(* The promisers an election needs.  Epoch 1: a majority of H1.  Epoch 2 *)
(* before Establish: a majority of all the replicas, of H2 and of H3.    *)
Narrow == IF ESTABLISH_RULE THEN established ELSE firstLed
ElectedBy(e, Q) ==
    IF e = 1 THEN Q \in Majority(H1)
    ELSE IF WIDE_RECOVERY /\ ~Narrow
         THEN /\ Q \in Majority(Node)
              /\ (Q \cap H2) \in Majority(H2)
              /\ (Q \cap H3) \in Majority(H3)
         ELSE (Q \cap H2) \in Majority(H2)

(* With the promises it needs the candidate leads: it takes the highest-  *)
(* term entry of each slot, up to the first slot no promiser has, and     *)
(* writes them again in its own term before it releases anything.        *)
BecomeLeader(n) ==
    /\ role[n] = "candidate"
    /\ \E Q \in SUBSET Node :
        /\ \A q \in Q : \E p \in Promises(n) : p.from = q
        /\ ElectedBy(Epoch(term[n]), Q)
        /\ LET ps == {p \in Promises(n) : p.from \in Q}
               high == [i \in Slots |-> Highest(ps, i)]
               holes == {i \in Slots : high[i] = None}
               last == IF holes = {} THEN MaxSlot
                       ELSE (CHOOSE i \in holes : \A j \in holes : i <= j) - 1
           IN /\ role' = [role EXCEPT ![n] = "leader"]
              /\ next' = [next EXCEPT ![n] = last + 1]
              /\ recovered' = [recovered EXCEPT ![n] = last]
              /\ proposed' = [proposed EXCEPT ![n] =
                     [i \in Slots |-> IF i <= last THEN [term |-> term[n], post |-> high[i].post]
                                      ELSE None]]
              /\ SendAll({[type |-> "accept", term |-> term[n], slot |-> i,
                           post |-> high[i].post] : i \in 1..last})
    /\ firstLed' = (firstLed \/ Epoch(term[n]) = 2)
    /\ UNCHANGED <<moved, established, known, promised, log, term, released, acks, grants,
                   lease, unsent, shown, crossAcked>>

Append(n, p) ==
    /\ Leading(n)
    /\ p \in unsent
    /\ next[n] <= MaxSlot
    /\ unsent' = unsent \ {p}
    /\ next' = [next EXCEPT ![n] = next[n] + 1]
    /\ proposed' = [proposed EXCEPT ![n][next[n]] = [term |-> term[n], post |-> p]]
    /\ Send([type |-> "accept", term |-> term[n], slot |-> next[n], post |-> p])
    /\ UNCHANGED <<moved, established, firstLed, known, promised, log, role, term, recovered,
                   released, acks, grants, lease, shown, crossAcked>>

(* Voters and learners store a write of the epoch they know, of their     *)
(* promised term or newer, durably, then answer.                          *)
OnAccept(n, m) ==
    /\ m.type = "accept"
    /\ Epoch(m.term) = known[n]
    /\ TLE(promised[n], m.term)
    /\ promised' = [promised EXCEPT ![n] = m.term]
    /\ role' = [role EXCEPT ![n] = IF TLT(term[n], m.term) THEN "follower" ELSE role[n]]
    /\ log' = [log EXCEPT ![n][m.slot] = [term |-> m.term, post |-> m.post]]
    /\ Send([type |-> "accepted", term |-> m.term, slot |-> m.slot, from |-> n])
    /\ UNCHANGED <<moved, established, firstLed, known, term, next, recovered, released, acks,
                   proposed, grants, lease, unsent, shown, crossAcked>>

OnAccepted(n, m) ==
    /\ m.type = "accepted"
    /\ Leading(n)
    /\ m.term = term[n]
    /\ m.from \notin acks[n][m.slot]
    /\ acks' = [acks EXCEPT ![n][m.slot] = acks[n][m.slot] \cup {m.from}]
    /\ UNCHANGED <<moved, established, firstLed, known, promised, log, role, term, next,
                   recovered, released, proposed, grants, lease, unsent, msgs, shown, crossAcked>>

Committed(n, i) == (acks[n][i] \cap Voters(Epoch(term[n]))) \in Majority(Voters(Epoch(term[n])))

HoldsLease(n) == lease[n] \in Majority(Node)

(* The leader releases (acknowledges at the local level, delivers) its    *)
(* next slot once every slot up to it committed; in epoch 1 only under a  *)
(* home lease.                                                            *)
Release(n) ==
    /\ Leading(n)
    /\ released[n] < MaxSlot
    /\ LET i == released[n] + 1 IN
       /\ proposed[n][i] # None
       /\ Committed(n, i)
       /\ (LEASE /\ Epoch(term[n]) = 1) => HoldsLease(n)
       /\ released' = [released EXCEPT ![n] = i]
       /\ shown' = shown \cup {<<Epoch(term[n]), i, proposed[n][i].post>>}
    /\ UNCHANGED <<moved, established, firstLed, known, promised, log, role, term, next,
                   recovered, acks, proposed, grants, lease, unsent, msgs, crossAcked>>

(* A released post of epoch 1 is acknowledged at the cross-datacenter     *)
(* level once a majority of H2's or H3's replicas stored every slot up to *)
(* it in this term (LogReplica::stored_by).                               *)
CrossAck(n, i) ==
    /\ Leading(n)
    /\ Epoch(term[n]) = 1
    /\ i \in 1..released[n]
    /\ \E D \in {H2, H3} : \E M \in Majority(D) : \A q \in M, j \in 1..i : q \in acks[n][j]
    /\ <<i, proposed[n][i].post>> \notin crossAcked
    /\ crossAcked' = crossAcked \cup {<<i, proposed[n][i].post>>}
    /\ UNCHANGED <<moved, established, firstLed, known, promised, log, role, term, next,
                   recovered, released, acks, proposed, grants, lease, unsent, msgs, shown>>

(* A replica that still knows epoch 1 promises a home lease to a leader  *)
(* of epoch 1.                                                            *)
Grant(g, l) ==
    /\ Leading(l)
    /\ Epoch(term[l]) = 1
    /\ known[g] = 1
    /\ g \notin lease[l]
    /\ grants' = [grants EXCEPT ![g] = grants[g] \cup {l}]
    /\ lease' = [lease EXCEPT ![l] = lease[l] \cup {g}]
    /\ UNCHANGED <<moved, established, firstLed, known, promised, log, role, term, next,
                   recovered, released, acks, proposed, unsent, msgs, shown, crossAcked>>

HolderExpire(l, g) ==
    /\ g \in lease[l]
    /\ lease' = [lease EXCEPT ![l] = lease[l] \ {g}]
    /\ UNCHANGED <<moved, established, firstLed, known, promised, log, role, term, next,
                   recovered, released, acks, proposed, grants, unsent, msgs, shown, crossAcked>>

GrantorExpire(g, l) ==
    /\ l \in grants[g]
    /\ g \notin lease[l]
    /\ grants' = [grants EXCEPT ![g] = grants[g] \ {l}]
    /\ UNCHANGED <<moved, established, firstLed, known, promised, log, role, term, next,
                   recovered, released, acks, proposed, lease, unsent, msgs, shown, crossAcked>>

(* The operator's failover: the map moves the home to H2 in epoch 2.     *)
Move ==
    /\ ~moved
    /\ moved' = TRUE
    /\ UNCHANGED <<established, firstLed, known, promised, log, role, term, next, recovered,
                   released, acks, proposed, grants, lease, unsent, msgs, shown, crossAcked>>

(* A node learns the new epoch (H1's nodes maybe never: cut off).  A      *)
(* leader or candidate of epoch 1 steps down.                             *)
Learn(n) ==
    /\ moved
    /\ known[n] = 1
    /\ known' = [known EXCEPT ![n] = 2]
    /\ role' = [role EXCEPT ![n] = "follower"]
    /\ Forget(n)
    /\ UNCHANGED <<moved, established, firstLed, promised, log, term, next, recovered, grants,
                   unsent, msgs, shown, crossAcked>>

(* The map records Establish once a leader of epoch 2 committed, in its  *)
(* own term, every slot it recovered.                                     *)
Establish(n) ==
    /\ ~established
    /\ Leading(n)
    /\ Epoch(term[n]) = 2
    /\ \A i \in 1..recovered[n] : Committed(n, i)
    /\ established' = TRUE
    /\ UNCHANGED <<moved, firstLed, known, promised, log, role, term, next, recovered, released,
                   acks, proposed, grants, lease, unsent, msgs, shown, crossAcked>>

(* A crash loses leadership and the lease (volatile).  The promises a    *)
(* grantor gave outlive it: a restarted grantor acts, for one promise     *)
(* period, as if it had promised every replica (Grantor::restarted, and   *)
(* QuorumLeases.tla's Restart), so they are unchanged here.               *)
Restart(n) ==
    /\ role' = [role EXCEPT ![n] = "follower"]
    /\ next' = [next EXCEPT ![n] = 1]
    /\ Forget(n)
    /\ UNCHANGED <<moved, established, firstLed, known, promised, log, term, recovered, grants,
                   unsent, msgs, shown, crossAcked>>

Next ==
    \/ \E n \in Node, r \in 1..MaxRound : Campaign(n, r)
    \/ \E n \in Node, m \in msgs : OnPrepare(n, m)
    \/ \E n \in Node : BecomeLeader(n)
    \/ \E n \in Node, p \in Posts : Append(n, p)
    \/ \E n \in Node, m \in msgs : OnAccept(n, m)
    \/ \E n \in Node, m \in msgs : OnAccepted(n, m)
    \/ \E n \in Node : Release(n)
    \/ \E n \in Node, i \in Slots : CrossAck(n, i)
    \/ \E g, l \in Node : Grant(g, l) \/ HolderExpire(l, g) \/ GrantorExpire(g, l)
    \/ Move
    \/ \E n \in Node : Learn(n) \/ Establish(n)
    \/ \E n \in Leaders1 \cup Leaders2 : Restart(n)

Spec == Init /\ [][Next]_vars

(***************************************************************************)
(* Invariants.                                                             *)
(***************************************************************************)

(* Within an epoch, no two posts are released for one slot, and released  *)
(* slots form a prefix.                                                    *)
EpochAgreement ==
    \A a, b \in shown : (a[1] = b[1] /\ a[2] = b[2]) => a[3] = b[3]
EpochGapless ==
    \A a \in shown : \A j \in 1..a[2] : \E b \in shown : b[1] = a[1] /\ b[2] = j

(* CROSS: a post acknowledged at the cross-datacenter level is in every   *)
(* log an epoch-2 leader leads, at its slot, and nothing else is released *)
(* there in epoch 2.                                                       *)
CrossKept ==
    \A c \in crossAcked :
        /\ \A n \in Node : (Leading(n) /\ Epoch(term[n]) = 2) =>
               proposed[n][c[1]] # None /\ proposed[n][c[1]].post = c[2]
        /\ \A s \in shown : (s[1] = 2 /\ s[2] = c[1]) => s[3] = c[2]

(* No post is released in two slots of epoch 2.                           *)
ReleasedOnce ==
    \A a, b \in shown : (a[1] = 2 /\ b[1] = 2 /\ a[3] = b[3]) => a[2] = b[2]

(* FENCE (an action property): once epoch 2 released anything, epoch 1   *)
(* releases nothing more.                                                  *)
NewReleased == \E s \in shown : s[1] = 2
OldShown == {s \in shown : s[1] = 1}
Fence == [][NewReleased => {s \in shown' : s[1] = 1} = OldShown]_vars

(* The same as a state invariant, over what epoch 1 released before      *)
(* epoch 2's first release: not checkable without a history variable, so *)
(* Fence is the property; this one says no epoch-1 leader still holds a   *)
(* lease once epoch 2 released, which is what Fence rests on.             *)
NoOldLeaseAfterNew ==
    LEASE /\ LEASE_WAIT /\ WIDE_RECOVERY =>
        (NewReleased => \A n \in Node : (Leading(n) /\ Epoch(term[n]) = 1) => ~HoldsLease(n))
=============================================================================
