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
(*  - Seal.  A mover (a node that moves the partition, a member of both   *)
(*    sets here) sends Seal with its ballot B(m) = <<2, 0, m>> to Old and  *)
(*    New.  An acceptor whose promise is not above B(m) promises it (so    *)
(*    it refuses every lower ballot from then on); one whose promise is    *)
(*    above keeps it (REPORT_ALL).  Either answers with what it accepted   *)
(*    and the leases it grants.  A sealed grantor grants no more epoch-1   *)
(*    leases (GRANT_FENCE).                                                *)
(*  - When a quorum of Old and one of New (SEAL_NEW) have answered, the    *)
(*    mover takes the value of the highest accepted ballot below B(m)     *)
(*    among them (SEAL_QUORUM), and waits until every lease they reported  *)
(*    has run out (WAIT_LEASES).  If an answer shows the room accepted at  *)
(*    or above B(m) (an epoch-2 round, or a higher mover, after an         *)
(*    install), that acceptor's earlier values are gone from its answer,   *)
(*    and the mover transfers nothing (SKIP_MOVED_ON).                     *)
(*  - Transfer.  It then writes that value to New at B(m) (phase 2 only:   *)
(*    the seal was its phase 1).  A New acceptor that accepted a transfer  *)
(*    is installed; only installed acceptors answer epoch-2 Prepares       *)
(*    (WAIT_INSTALL), so every epoch-2 round builds on the transferred     *)
(*    value.                                                               *)
(*  - Takeover.  Several movers may run, in any interleaving: the map      *)
(*    hands a step whose mover died to the next node of both sets, whose   *)
(*    ballot is higher, while the first may have installed part or a       *)
(*    quorum of New, and epoch-2 proposers (rounds from 1, above every     *)
(*    mover's round 0) may have moved acceptors on since.                  *)
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
    Movers,         \* the nodes that may seal and transfer (each in Old and New)
    Proposers1,     \* nodes proposing in epoch 1 (subset of Old)
    Proposers2,     \* nodes proposing in epoch 2 (subset of New)
    Holders,        \* nodes holding epoch-1 leases
    MaxRound,       \* rounds per epoch are 1..MaxRound
    SEAL_QUORUM,    \* TRUE: the transferred value is read from a quorum of Old
    WAIT_LEASES,    \* TRUE: the transfer waits for the reported leases to end
    WAIT_INSTALL,   \* TRUE: New acceptors answer epoch-2 Prepares only once installed
    GRANT_FENCE,    \* TRUE: a sealed grantor grants no more epoch-1 leases
    SEAL_NEW,       \* TRUE: a mover also reads a quorum of New
    REPORT_ALL,     \* TRUE: an acceptor promised above a seal still reports what it accepted
    SKIP_MOVED_ON   \* TRUE: a mover leaves out a room some answer shows accepted at or above its ballot

Node == Old \cup New \cup Movers \cup Holders
Set(e) == IF e = 1 THEN Old ELSE New
Quorums(S) == {Q \in SUBSET S : 2 * Cardinality(Q) > Cardinality(S)}

(* Ballots <<epoch, round, node>>, compared in that order.                 *)
Zero == <<0, 0, 0>>
BLT(a, b) == \/ a[1] < b[1]
             \/ a[1] = b[1] /\ a[2] < b[2]
             \/ a[1] = b[1] /\ a[2] = b[2] /\ a[3] < b[3]
BLE(a, b) == a = b \/ BLT(a, b)
B(m) == <<2, 0, m>>

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
    mover,      \* [Movers -> [phase, val, leases]]
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
    /\ mover = [m \in Movers |-> [phase |-> "idle", val |-> Absent, leases |-> {}]]
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

(* A mover seals Old and New.                                            *)
Seal(m) ==
    /\ mover[m].phase = "idle"
    /\ mover' = [mover EXCEPT ![m].phase = "seal"]
    /\ Send([type |-> "Seal", bal |-> B(m)])
    /\ UNCHANGED <<promised, accepted, grants, acked, known, prop, votes>>

(* An acceptor answers a seal.  One whose promise is above the seal (a    *)
(* higher mover's, or an epoch-2 proposer's after an install) keeps it    *)
(* and, with REPORT_ALL, still reports what it accepted: it accepts       *)
(* nothing below its promise, so nothing below the seal either.  Without  *)
(* REPORT_ALL it answers as if it held nothing (what the node did before  *)
(* takeovers).                                                             *)
ReceiveSeal(a) ==
    \E m \in msgs :
    /\ m.type = "Seal"
    /\ a \in Old \cup New
    /\ ~\E r \in msgs : r.type = "Sealed" /\ r.from = a /\ r.bal = m.bal
    /\ IF BLT(promised[a], m.bal)
       THEN /\ promised' = [promised EXCEPT ![a] = m.bal]
            /\ Send([type |-> "Sealed", from |-> a, bal |-> m.bal, acc |-> accepted[a],
                     leases |-> IF a \in Old THEN {<<a, h>> : h \in grants[a]} ELSE {}])
       ELSE /\ UNCHANGED promised
            /\ Send([type |-> "Sealed", from |-> a, bal |-> m.bal,
                     acc |-> IF REPORT_ALL THEN accepted[a] ELSE None,
                     leases |-> IF a \in Old THEN {<<a, h>> : h \in grants[a]} ELSE {}])
    /\ UNCHANGED <<accepted, grants, acked, known, prop, mover, votes>>

(* With a quorum of Old and one of New sealed (or, broken, only its own   *)
(* acceptor, or Old only), the mover knows the value to transfer and the  *)
(* leases to wait for.                                                    *)
Collect(m) ==
    /\ mover[m].phase = "seal"
    /\ LET ss == {r \in msgs : r.type = "Sealed" /\ r.bal = B(m)}
           Qs == IF SEAL_QUORUM THEN Quorums(Old) ELSE {{m}}
           Ns == IF SEAL_QUORUM /\ SEAL_NEW THEN Quorums(New) ELSE {{}}
       IN \E Q \in Qs, N \in Ns :
          /\ \A a \in Q \cup N : \E r \in ss : r.from = a
          /\ LET got == {r \in ss : r.from \in Q \cup N}
                 accs == UNION {r.acc : r \in got}
                 below == {x \in accs : BLT(x.bal, B(m))}
                 movedOn == \E x \in accs : BLE(B(m), x.bal)
             IN mover' = [mover EXCEPT ![m] =
                            [phase |-> IF SKIP_MOVED_ON /\ movedOn THEN "done" ELSE "wait",
                             val |-> Highest(below),
                             leases |-> UNION {r.leases : r \in got}]]
    /\ UNCHANGED <<promised, accepted, grants, acked, known, prop, msgs, votes>>

(* Once the reported leases ran out (WAIT_LEASES), write the value to New. *)
Transfer(m) ==
    /\ mover[m].phase = "wait"
    /\ WAIT_LEASES => \A l \in mover[m].leases : l[2] \notin grants[l[1]]
    /\ mover' = [mover EXCEPT ![m].phase = "done"]
    /\ Send([type |-> "Transfer", bal |-> B(m), val |-> mover[m].val])
    /\ UNCHANGED <<promised, accepted, grants, acked, known, prop, votes>>

Next ==
    \/ \E p \in Proposers : Prepare(p) \/ BeginAccept(p)
    \/ \E a \in Node : ReceivePrepare(a) \/ ReceiveAccept(a) \/ ReceiveSeal(a)
    \/ \E h \in Holders : Acknowledge(h) \/ Learn(h)
    \/ \E g \in Old, h \in Holders : Grant(g, h) \/ Expire(g, h)
    \/ \E m \in Movers : Seal(m) \/ Collect(m) \/ Transfer(m)

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
    /\ \A m \in Movers : mover[m].phase \in {"idle", "seal", "wait", "done"}

(* For the state graph to be finite: every change is one proposer's id.  *)
=============================================================================
