-------------------------- MODULE Reconfiguration --------------------------
(***************************************************************************)
(* Changing the acceptor set of one room's CASPaxos register, as a         *)
(* partition moves from the replicas Old to the replicas New (the elastic  *)
(* cluster: a node joins, leaves or drains, and the cluster map's epoch    *)
(* goes from 1 to 2).  The protocol, "seal, wait, transfer":               *)
(*                                                                         *)
(*  - Ballots carry the map epoch as their most significant part:          *)
(*    <<epoch, round, node>>.  The register of epoch 1 is run by Old, that *)
(*    of epoch 2 by New; quorums are majorities of the epoch's set.        *)
(*  - Seal.  The mover (the node that moves the partition, a member of     *)
(*    both sets here) sends Seal with the ballot B2 = <<2, 0, mover>> to   *)
(*    Old.  An Old acceptor whose promise is not above B2 promises B2 (so  *)
(*    it refuses every epoch-1 ballot from then on) and answers with what  *)
(*    it accepted and the leases it grants.  A sealed grantor grants no    *)
(*    more epoch-1 leases (GRANT_FENCE).                                   *)
(*  - When a quorum of Old has answered, the mover takes the value of the  *)
(*    highest accepted ballot among them (SEAL_QUORUM), and waits until    *)
(*    every lease they reported has run out (WAIT_LEASES).                 *)
(*  - Transfer.  It then writes that value to New at B2 (phase 2 only: the *)
(*    seal was its phase 1).  A New acceptor that accepted B2 is           *)
(*    installed; only installed acceptors answer epoch-2 Prepares          *)
(*    (WAIT_INSTALL), so every epoch-2 round builds on the transferred     *)
(*    value.                                                               *)
(*                                                                         *)
(* Leases (QuorumLeases.tla checks them with clocks and drift; here time   *)
(* is abstract): a holder reads under a lease while a quorum of Old        *)
(* grants to it and it has no acknowledged value it has not learned yet.   *)
(* An Old acceptor that grants to a holder accepts a value only once the   *)
(* holder has acknowledged it (the proposer's wait for reported holders).  *)
(* A grant runs out at any moment (Expire); in the real protocol the       *)
(* holder's lease ends before the grantor's promise does (the drift        *)
(* cover), so a grant present here is what both sides still count on.      *)
(* Epoch 2 has no leases of its own in this model: the question is         *)
(* whether epoch-1 leases survive into epoch 2.                            *)
(*                                                                         *)
(* Network: a set of messages, never removed, so every message can be     *)
(* delivered any number of times, in any order, or never.  Acceptor state  *)
(* change and reply are one step (persist before replying).                *)
(***************************************************************************)
EXTENDS Naturals, Sequences, FiniteSets

CONSTANTS
    Old,            \* the acceptors of epoch 1
    New,            \* the acceptors of epoch 2
    Mover,          \* the node that seals Old and transfers to New
    Proposers1,     \* nodes proposing in epoch 1 (subset of Old)
    Proposers2,     \* nodes proposing in epoch 2 (subset of New)
    Holders,        \* nodes holding epoch-1 leases
    MaxRound,       \* rounds per epoch are 1..MaxRound
    SEAL_QUORUM,    \* TRUE: the transferred value is read from a quorum of Old
    WAIT_LEASES,    \* TRUE: the transfer waits for the reported leases to end
    WAIT_INSTALL,   \* TRUE: New acceptors answer epoch-2 Prepares only once installed
    GRANT_FENCE     \* TRUE: a sealed grantor grants no more epoch-1 leases

Node == Old \cup New \cup {Mover} \cup Holders
Set(e) == IF e = 1 THEN Old ELSE New
Quorums(S) == {Q \in SUBSET S : 2 * Cardinality(Q) > Cardinality(S)}

(* Ballots <<epoch, round, node>>, compared in that order.                 *)
Zero == <<0, 0, 0>>
BLT(a, b) == \/ a[1] < b[1]
             \/ a[1] = b[1] /\ a[2] < b[2]
             \/ a[1] = b[1] /\ a[2] = b[2] /\ a[3] < b[3]
BLE(a, b) == a = b \/ BLT(a, b)
B2 == <<2, 0, Mover>>

(* Values: the sequence of change ids applied so far.  Proposer p's one   *)
(* change is p itself (distinct per proposer).                           *)
Absent == << >>
Apply(v, c) == IF \E i \in 1..Len(v) : v[i] = c THEN v ELSE Append(v, c)
IsPrefix(a, b) == Len(a) <= Len(b) /\ SubSeq(b, 1, Len(a)) = a

None == {}
Some(x) == {x}
Get(o) == CHOOSE x \in o : TRUE

Proposers == Proposers1 \cup Proposers2
EpochOf(p) == IF p \in Proposers1 THEN 1 ELSE 2

VARIABLES
    promised,   \* [Node -> ballot]
    accepted,   \* [Node -> option of [bal, val]]
    grants,     \* [Old -> SUBSET Holders]: holders each grantor grants to
    acked,      \* [Holders -> set of values the holder acknowledged]
    known,      \* [Holders -> the newest chosen value the holder learned]
    prop,       \* [Proposers -> [rnd, phase]]
    mover,      \* [phase, val, leases]
    msgs,       \* every message ever sent
    votes       \* every <<acceptor, ballot, value>> ever accepted

vars == <<promised, accepted, grants, acked, known, prop, mover, msgs, votes>>

Send(m) == msgs' = msgs \cup {m}

Chosen(b, v) == \E Q \in Quorums(Set(b[1])) : \A a \in Q : <<a, b, v>> \in votes
ChosenPairs == {<<vt[2], vt[3]>> : vt \in {vt \in votes : Chosen(vt[2], vt[3])}}

Installed(a) == accepted[a] # None /\ Get(accepted[a]).bal[1] = 2

ValidLease(h) == \E Q \in Quorums(Old) : \A g \in Q : h \in grants[g]
NothingPending(h) == \A v \in acked[h] : IsPrefix(v, known[h])
CanRead(h) == ValidLease(h) /\ NothingPending(h)

-----------------------------------------------------------------------------
Init ==
    /\ promised = [n \in Node |-> Zero]
    /\ accepted = [n \in Node |-> None]
    /\ grants = [g \in Old |-> {}]
    /\ acked = [h \in Holders |-> {}]
    /\ known = [h \in Holders |-> Absent]
    /\ prop = [p \in Proposers |-> [rnd |-> 0, phase |-> "idle"]]
    /\ mover = [phase |-> "idle", val |-> Absent, leases |-> {}]
    /\ msgs = {}
    /\ votes = {}

(* A proposer starts a round: phase 1 at its next ballot of its epoch.    *)
Prepare(p) ==
    /\ prop[p].phase \in {"idle", "p1", "p2"}
    /\ prop[p].rnd < MaxRound
    /\ LET b == <<EpochOf(p), prop[p].rnd + 1, p>> IN
       /\ prop' = [prop EXCEPT ![p] = [rnd |-> b[2], phase |-> "p1"]]
       /\ Send([type |-> "Prepare", bal |-> b])
    /\ UNCHANGED <<promised, accepted, grants, acked, known, mover, votes>>

(* An acceptor of the ballot's epoch promises it.  Epoch-2 Prepares are   *)
(* answered only by installed acceptors (WAIT_INSTALL).                   *)
ReceivePrepare(a) ==
    \E m \in msgs :
    /\ m.type = "Prepare"
    /\ a \in Set(m.bal[1])
    /\ BLT(promised[a], m.bal)
    /\ m.bal[1] = 2 /\ WAIT_INSTALL => Installed(a)
    /\ promised' = [promised EXCEPT ![a] = m.bal]
    /\ Send([type |-> "Promise", from |-> a, bal |-> m.bal, acc |-> accepted[a]])
    /\ UNCHANGED <<accepted, grants, acked, known, prop, mover, votes>>

Highest(accs) ==
    IF accs = {} THEN Absent
    ELSE (CHOOSE x \in accs : \A y \in accs : BLE(y.bal, x.bal)).val

(* At a quorum of promises, the proposer applies its change to the value *)
(* of the highest accepted ballot and sends Accept.                      *)
BeginAccept(p) ==
    /\ prop[p].phase = "p1"
    /\ LET b == <<EpochOf(p), prop[p].rnd, p>>
           ps == {m \in msgs : m.type = "Promise" /\ m.bal = b}
       IN \E Q \in Quorums(Set(b[1])) :
          /\ \A a \in Q : \E m \in ps : m.from = a
          /\ LET accs == UNION {m.acc : m \in {m \in ps : m.from \in Q}}
             IN Send([type |-> "Accept", bal |-> b, val |-> Apply(Highest(accs), p)])
    /\ prop' = [prop EXCEPT ![p].phase = "p2"]
    /\ UNCHANGED <<promised, accepted, grants, acked, known, mover, votes>>

(* An acceptor of the ballot's epoch accepts.  An epoch-1 acceptor that   *)
(* grants to a holder waits for the holder to acknowledge the value.     *)
ReceiveAccept(a) ==
    \E m \in msgs :
    /\ m.type \in {"Accept", "Transfer"}
    /\ a \in Set(m.bal[1])
    /\ BLE(promised[a], m.bal)
    /\ m.bal[1] = 1 => \A h \in grants[a] : m.val \in acked[h]
    /\ promised' = [promised EXCEPT ![a] = m.bal]
    /\ accepted' = [accepted EXCEPT ![a] = Some([bal |-> m.bal, val |-> m.val])]
    /\ votes' = votes \cup {<<a, m.bal, m.val>>}
    /\ UNCHANGED <<grants, acked, known, prop, mover, msgs>>

(* A holder acknowledges a value an epoch-1 round proposes: it reads     *)
(* nothing under its lease until it learns a chosen value that far.      *)
Acknowledge(h) ==
    \E m \in msgs :
    /\ m.type = "Accept"
    /\ m.bal[1] = 1
    /\ m.val \notin acked[h]
    /\ acked' = [acked EXCEPT ![h] = @ \cup {m.val}]
    /\ UNCHANGED <<promised, accepted, grants, known, prop, mover, msgs, votes>>

(* A holder learns a chosen value (the commit reaching it).              *)
Learn(h) ==
    \E pair \in ChosenPairs :
    /\ IsPrefix(known[h], pair[2])
    /\ known[h] # pair[2]
    /\ known' = [known EXCEPT ![h] = pair[2]]
    /\ UNCHANGED <<promised, accepted, grants, acked, prop, mover, msgs, votes>>

(* An Old grantor grants a lease to a holder that has the value it       *)
(* accepted (learned or acknowledged).                                   *)
Grant(g, h) ==
    /\ h \notin grants[g]
    /\ GRANT_FENCE => promised[g][1] < 2
    /\ accepted[g] # None =>
         LET v == Get(accepted[g]).val IN IsPrefix(v, known[h]) \/ v \in acked[h]
    /\ grants' = [grants EXCEPT ![g] = @ \cup {h}]
    /\ UNCHANGED <<promised, accepted, acked, known, prop, mover, msgs, votes>>

(* A grant runs out.                                                     *)
Expire(g, h) ==
    /\ h \in grants[g]
    /\ grants' = [grants EXCEPT ![g] = @ \ {h}]
    /\ UNCHANGED <<promised, accepted, acked, known, prop, mover, msgs, votes>>

(* The mover seals Old.                                                  *)
Seal ==
    /\ mover.phase = "idle"
    /\ mover' = [mover EXCEPT !.phase = "seal"]
    /\ Send([type |-> "Seal", bal |-> B2])
    /\ UNCHANGED <<promised, accepted, grants, acked, known, prop, votes>>

ReceiveSeal(a) ==
    \E m \in msgs :
    /\ m.type = "Seal"
    /\ a \in Old
    /\ BLT(promised[a], m.bal)
    /\ promised' = [promised EXCEPT ![a] = m.bal]
    /\ Send([type |-> "Sealed", from |-> a, acc |-> accepted[a],
             leases |-> {<<a, h>> : h \in grants[a]}])
    /\ UNCHANGED <<accepted, grants, acked, known, prop, mover, votes>>

(* With a quorum of Old sealed (or, broken, only its own acceptor), the   *)
(* mover knows the value to transfer and the leases to wait for.         *)
Collect ==
    /\ mover.phase = "seal"
    /\ LET ss == {m \in msgs : m.type = "Sealed"}
           Qs == IF SEAL_QUORUM THEN Quorums(Old) ELSE {{Mover}}
       IN \E Q \in Qs :
          /\ \A a \in Q : \E m \in ss : m.from = a
          /\ LET got == {m \in ss : m.from \in Q} IN
             mover' = [phase |-> "wait",
                       val |-> Highest(UNION {m.acc : m \in got}),
                       leases |-> UNION {m.leases : m \in got}]
    /\ UNCHANGED <<promised, accepted, grants, acked, known, prop, msgs, votes>>

(* Once the reported leases ran out (WAIT_LEASES), write the value to New. *)
Transfer ==
    /\ mover.phase = "wait"
    /\ WAIT_LEASES => \A l \in mover.leases : l[2] \notin grants[l[1]]
    /\ mover' = [mover EXCEPT !.phase = "done"]
    /\ Send([type |-> "Transfer", bal |-> B2, val |-> mover.val])
    /\ UNCHANGED <<promised, accepted, grants, acked, known, prop, votes>>

Next ==
    \/ \E p \in Proposers : Prepare(p) \/ BeginAccept(p)
    \/ \E a \in Node : ReceivePrepare(a) \/ ReceiveAccept(a) \/ ReceiveSeal(a)
    \/ \E h \in Holders : Acknowledge(h) \/ Learn(h)
    \/ \E g \in Old, h \in Holders : Grant(g, h) \/ Expire(g, h)
    \/ Seal \/ Collect \/ Transfer

Spec == Init /\ [][Next]_vars

-----------------------------------------------------------------------------
(* A value chosen at a ballot is extended by every value chosen at a     *)
(* higher one, whichever epoch: nothing chosen under Old is lost under   *)
(* New.                                                                   *)
ChosenNeverLost ==
    \A x, y \in ChosenPairs : BLT(x[1], y[1]) => IsPrefix(x[2], y[2])

(* A holder that may read under its epoch-1 lease knows every chosen     *)
(* value, also those chosen under New.                                   *)
LeaseReadSafety ==
    \A h \in Holders : CanRead(h) => \A pair \in ChosenPairs : IsPrefix(pair[2], known[h])

TypeOK ==
    /\ \A n \in Node : Cardinality(accepted[n]) <= 1
    /\ mover.phase \in {"idle", "seal", "wait", "done"}

(* For the state graph to be finite: every change is one proposer's id.  *)
=============================================================================
