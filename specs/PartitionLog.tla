---------------------------- MODULE PartitionLog ----------------------------
(***************************************************************************)
(* The replicated timeline of one partition (designed for the cluster      *)
(* work; the sans-I/O core lands in consensus/src/log/ after this spec).   *)
(*                                                                         *)
(* A partition's replicas keep a log of posts: slot i holds the i-th post  *)
(* of the partition (its per-room sequence numbers are derived from it).  *)
(* One replica at a time leads and assigns slots; a post is acknowledged   *)
(* to its sender once a quorum of replicas has it durably in its slot and  *)
(* every earlier slot is committed too.                                    *)
(*                                                                         *)
(* Leadership is Multi-Paxos with terms:                                   *)
(*  - Elect: a candidate picks a term above everything it has seen and     *)
(*    asks every replica to promise it (Prepare).  A replica promises a    *)
(*    term above its promise and answers with its whole log (Promise):     *)
(*    from then on it refuses every write of an older term (FENCING).      *)
(*  - Recover: with promises from a quorum, the new leader takes, for each *)
(*    slot, the entry of the highest term among the promised logs          *)
(*    (TAIL_READ), and writes those again in its own term before it is     *)
(*    allowed to acknowledge anything.                                     *)
(*  - Append: the leader writes new posts at the next free slot (Accept);  *)
(*    a replica stores the entry durably, then answers (Accepted); the     *)
(*    leader commits a slot once a quorum answered in its term and         *)
(*    acknowledges posts in slot order.                                    *)
(*                                                                         *)
(* A replica's promise and log are durable (stored and fdatasync'ed        *)
(* before the answer leaves, as Ready orders it in the Rust core), so a    *)
(* crash (Restart) loses only a leader's volatile state.  The network is a *)
(* set of messages: delivery may repeat, reorder or never happen.          *)
(***************************************************************************)
EXTENDS Naturals, FiniteSets

CONSTANTS
    N,          \* replicas of the partition: nodes 1..N
    Leaders,    \* nodes that may become leader in this model
    Posts,      \* post ids clients submit (each once)
    MaxRound,   \* terms are <<round, node>> with round <= MaxRound
    MaxSlot,    \* slots are 1..MaxSlot
    FENCING,    \* TRUE: a replica refuses writes of a term below its promise
    TAIL_READ,  \* TRUE: a new leader adopts the quorum's highest-term entries
    RESTARTS    \* TRUE: the Restart action is enabled

Node == 1..N
Quorums == {Q \in SUBSET Node : 2 * Cardinality(Q) > N}
Slots == 1..MaxSlot

(* Terms, ordered by round then node (as Ballot in ids.rs).               *)
Zero == <<0, 0>>
TLT(a, b) == a[1] < b[1] \/ (a[1] = b[1] /\ a[2] < b[2])
TLE(a, b) == a = b \/ TLT(a, b)
Terms == {Zero} \cup ((1..MaxRound) \X Leaders)

None == [term |-> Zero, post |-> 0]            \* an empty slot (posts are 1, 2, ...)
Entries == {None} \cup [term : Terms, post : Posts]
EmptyLog == [i \in Slots |-> None]

VARIABLES
    promised,   \* [Node -> Term]: durable
    log,        \* [Node -> [Slots -> Entries]]: durable
    role,       \* [Node -> {"follower", "candidate", "leader"}]: volatile
    term,       \* [Node -> Term]: the term it leads or runs for
    next,       \* [Node -> Nat]: the leader's next free slot
    acks,       \* [Node -> [Slots -> SUBSET Node]]: Accepted heard this term
    proposed,   \* [Node -> [Slots -> Entries]]: what the leader wrote this term
    unsent,     \* posts no leader has taken yet
    msgs,       \* every message ever sent
    votes,      \* history: <<node, term, slot, post>> ever stored
    acked       \* history: <<slot, post>> ever acknowledged to a sender

vars == <<promised, log, role, term, next, acks, proposed, unsent, msgs, votes, acked>>

Send(m) == msgs' = msgs \cup {m}
SendAll(ms) == msgs' = msgs \cup ms

TypeOK ==
    /\ promised \in [Node -> Terms]
    /\ log \in [Node -> [Slots -> Entries]]
    /\ role \in [Node -> {"follower", "candidate", "leader"}]
    /\ term \in [Node -> Terms]
    /\ next \in [Node -> 1..MaxSlot + 1]
    /\ acks \in [Node -> [Slots -> SUBSET Node]]
    /\ proposed \in [Node -> [Slots -> Entries]]
    /\ unsent \subseteq Posts

Init ==
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

(* A node runs for a term above its promise and above any term it led.   *)
Campaign(n, r) ==
    /\ n \in Leaders
    /\ LET t == <<r, n>> IN
       /\ TLT(promised[n], t)
       /\ TLT(term[n], t)
       /\ role' = [role EXCEPT ![n] = "candidate"]
       /\ term' = [term EXCEPT ![n] = t]
       /\ acks' = [acks EXCEPT ![n] = [i \in Slots |-> {}]]
       /\ proposed' = [proposed EXCEPT ![n] = EmptyLog]
       /\ Send([type |-> "prepare", term |-> t])
    /\ UNCHANGED <<promised, log, next, unsent, votes, acked>>

(* A replica promises a higher term and sends its log.                   *)
OnPrepare(n, m) ==
    /\ m.type = "prepare"
    /\ TLT(promised[n], m.term)
    /\ promised' = [promised EXCEPT ![n] = m.term]
    \* A leader or candidate of an older term steps down.
    /\ role' = [role EXCEPT ![n] = IF TLT(term[n], m.term) THEN "follower" ELSE role[n]]
    /\ Send([type |-> "promise", term |-> m.term, from |-> n, log |-> log[n]])
    /\ UNCHANGED <<log, term, next, acks, proposed, unsent, votes, acked>>

Promises(n) == {m \in msgs : m.type = "promise" /\ m.term = term[n]}

(* The entry of the highest term at slot i among the promised logs.       *)
Highest(ps, i) ==
    LET filled == {p \in ps : p.log[i] # None} IN
    IF filled = {} THEN None
    ELSE (CHOOSE p \in filled : \A q \in filled : TLE(q.log[i].term, p.log[i].term)).log[i]

(* With a quorum of promises the candidate leads: it writes the recovered *)
(* entries again in its own term, and continues after the last of them.  *)
(* Without TAIL_READ (broken) it starts from its own log.                 *)
BecomeLeader(n) ==
    /\ role[n] = "candidate"
    /\ \E Q \in Quorums :
        /\ \A q \in Q : \E p \in Promises(n) : p.from = q
        /\ LET ps == {p \in Promises(n) : p.from \in Q}
               recovered == IF TAIL_READ
                            THEN [i \in Slots |-> Highest(ps, i)]
                            ELSE log[n]
               filled == {i \in Slots : recovered[i] # None}
               last == IF filled = {} THEN 0
                       ELSE CHOOSE i \in filled : \A j \in filled : j <= i
               \* A slot no promiser has, below the last recovered one,
               \* cannot have been acknowledged (acknowledging it needed
               \* a quorum, which overlaps Q).  It stays empty here, so
               \* this leader acknowledges nothing past it; an
               \* implementation fills it with a no-op entry first, which
               \* is safe for the same reason.
           IN /\ role' = [role EXCEPT ![n] = "leader"]
              /\ next' = [next EXCEPT ![n] = last + 1]
              /\ proposed' = [proposed EXCEPT ![n] =
                     [i \in Slots |-> IF recovered[i] = None THEN None
                                      ELSE [term |-> term[n], post |-> recovered[i].post]]]
              /\ SendAll({[type |-> "accept", term |-> term[n], slot |-> i,
                           post |-> recovered[i].post] : i \in filled})
    /\ UNCHANGED <<promised, log, term, acks, unsent, votes, acked>>

(* The leader puts a new post in the next free slot.                     *)
Append(n, p) ==
    /\ role[n] = "leader"
    /\ p \in unsent
    /\ next[n] <= MaxSlot
    /\ unsent' = unsent \ {p}
    /\ next' = [next EXCEPT ![n] = next[n] + 1]
    /\ proposed' = [proposed EXCEPT ![n][next[n]] = [term |-> term[n], post |-> p]]
    /\ Send([type |-> "accept", term |-> term[n], slot |-> next[n], post |-> p])
    /\ UNCHANGED <<promised, log, role, term, acks, votes, acked>>

(* A replica stores a write of its promised term or newer (durably, then *)
(* answers).  Without FENCING (broken) it stores writes of any term.     *)
OnAccept(n, m) ==
    /\ m.type = "accept"
    /\ FENCING => TLE(promised[n], m.term)
    /\ promised' = [promised EXCEPT ![n] = IF TLT(promised[n], m.term) THEN m.term ELSE promised[n]]
    /\ role' = [role EXCEPT ![n] = IF TLT(term[n], m.term) THEN "follower" ELSE role[n]]
    /\ log' = [log EXCEPT ![n][m.slot] = [term |-> m.term, post |-> m.post]]
    /\ votes' = votes \cup {<<n, m.term, m.slot, m.post>>}
    /\ Send([type |-> "accepted", term |-> m.term, slot |-> m.slot, from |-> n])
    /\ UNCHANGED <<term, next, acks, proposed, unsent, acked>>

OnAccepted(n, m) ==
    /\ m.type = "accepted"
    /\ role[n] = "leader"
    /\ m.term = term[n]
    /\ m.from \notin acks[n][m.slot]
    /\ acks' = [acks EXCEPT ![n][m.slot] = acks[n][m.slot] \cup {m.from}]
    /\ UNCHANGED <<promised, log, role, term, next, proposed, unsent, msgs, votes, acked>>

Committed(n, i) == \E Q \in Quorums : Q \subseteq acks[n][i]

(* The leader acknowledges slot i once slots 1..i are committed in its   *)
(* term (a recovered hole is never committed, so nothing after it is     *)
(* acknowledged; see BecomeLeader).                                       *)
Acknowledge(n, i) ==
    /\ role[n] = "leader"
    /\ i \in Slots
    /\ proposed[n][i] # None
    /\ \A j \in 1..i : proposed[n][j] # None /\ Committed(n, j)
    \* in slot order: every earlier slot is acknowledged already
    /\ \A j \in 1..i - 1 : \E b \in acked : b[1] = j
    /\ <<i, proposed[n][i].post>> \notin acked
    /\ acked' = acked \cup {<<i, proposed[n][i].post>>}
    /\ UNCHANGED <<promised, log, role, term, next, acks, proposed, unsent, msgs, votes>>

(* A crash: the durable promise and log survive, leadership does not.    *)
(* The term a node last ran for survives too (term is left unchanged): a *)
(* restarted node must never run for a term it used before, so the       *)
(* implementation persists it (the ballot-reuse lesson of the register). *)
Restart(n) ==
    /\ role' = [role EXCEPT ![n] = "follower"]
    /\ acks' = [acks EXCEPT ![n] = [i \in Slots |-> {}]]
    /\ proposed' = [proposed EXCEPT ![n] = EmptyLog]
    /\ next' = [next EXCEPT ![n] = 1]
    /\ UNCHANGED <<promised, log, term, unsent, msgs, votes, acked>>

Next ==
    \/ \E n \in Node, r \in 1..MaxRound : Campaign(n, r)
    \/ \E n \in Node, m \in msgs : OnPrepare(n, m)
    \/ \E n \in Node : BecomeLeader(n)
    \/ \E n \in Node, p \in Posts : Append(n, p)
    \/ \E n \in Node, m \in msgs : OnAccept(n, m)
    \/ \E n \in Node, m \in msgs : OnAccepted(n, m)
    \/ \E n \in Node, i \in Slots : Acknowledge(n, i)
    \/ RESTARTS /\ \E n \in Leaders : Restart(n)

Spec == Init /\ [][Next]_vars

(***************************************************************************)
(* Invariants.                                                             *)
(***************************************************************************)

Chosen(i, p) == \E t \in Terms, Q \in Quorums : \A q \in Q : <<q, t, i, p>> \in votes

(* No two posts are ever chosen for one slot.                             *)
Agreement == \A i \in Slots, p, q \in Posts : Chosen(i, p) /\ Chosen(i, q) => p = q

(* An acknowledged post stays in its slot on a quorum: killing any        *)
(* minority loses no acknowledged post.                                   *)
AckedDurable ==
    \A a \in acked : \E Q \in Quorums : \A q \in Q : log[q][a[1]].post = a[2]

(* One slot per post and one post per slot among acknowledged posts.     *)
AckedOnce ==
    \A a, b \in acked : (a[1] = b[1]) <=> (a[2] = b[2])

(* Acknowledged slots form a prefix 1..k: no gap a reader could see.      *)
AckedGapless ==
    \A a \in acked : \A j \in 1..a[1] : \E b \in acked : b[1] = j

(* A promise never goes back (checked as an action property).             *)
PromiseMonotonic == [][\A n \in Node : TLE(promised[n], promised'[n])]_vars

=============================================================================
