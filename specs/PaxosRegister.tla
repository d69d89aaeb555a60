--------------------------- MODULE PaxosRegister ---------------------------
(***************************************************************************)
(* The per-room CASPaxos register of saferchat (consensus/src/paxos).      *)
(*                                                                         *)
(* Every node is an acceptor (durable state: promised ballot, accepted     *)
(* (ballot, value)) and may be a proposer (volatile state: the round in    *)
(* flight, the prepared fast path, the highest ballot seen, the queued     *)
(* change).  A value is the sequence of change ids applied so far, so the  *)
(* revision of a value is its length and "one linear history" is prefix   *)
(* order.  Applying a change that is already in the value changes nothing  *)
(* (room::apply deduplicates retried change ids through `recent`).         *)
(*                                                                         *)
(* The network is a set of messages: receiving never removes a message,    *)
(* so every message can be delivered any number of times and in any order; *)
(* Lose removes one.  Restart(n) is a node crash + restart: the acceptor   *)
(* keeps its durable state, the proposer loses everything.  Messages a     *)
(* node sends to itself go through the same network (RoomReplica::step is  *)
(* how the node feeds them back), so they too can be delayed or lost.      *)
(*                                                                         *)
(* Names follow the Rust code: see specs/README.md for the action table.   *)
(***************************************************************************)
EXTENDS Naturals, Sequences, FiniteSets

CONSTANTS
    N,              \* number of replicas; nodes are 1..N (NodeId order)
    Proposers,      \* the nodes that propose in this model (subset of 1..N)
    Restarting,     \* the proposers that may crash and restart (subset of Proposers)
    Changes,        \* change ids callers submit (see InitQueue)
    MaxRound,       \* bound on ballots: only ballots <= <<MaxRound, TopNode>>
    TopNode,        \*   are used (ballots are <<round, node>>, see ids.rs)
    CHECK_PROMISE,  \* TRUE: Acceptor::on_accept refuses ballots below its promise
    USE_HIGHEST,    \* TRUE: Proposer::on_promise applies the change to the
                    \*       value of the highest accepted ballot among the promises
    OWN_ACCEPTOR,   \* TRUE (as the code): phase 2 waits for the local acceptor's
                    \*       promise, and the fast path is kept only if the local
                    \*       acceptor accepted (Proposer::on_promise, try_commit)
    LOSS,           \* TRUE: the Lose action is enabled
    TIMEOUTS,       \* TRUE: the Timeout action is enabled
    WARM_START      \* TRUE: start after a first round committed (see Init)

Node == 1..N
Majority == N \div 2 + 1                       \* ReplicaConfig::majority
Quorums == {Q \in SUBSET Node : Cardinality(Q) >= Majority}

(* Ballots: <<round, node>>, ordered by round then node (ids.rs).          *)
Zero == <<0, 0>>                               \* Ballot::ZERO
BLT(a, b) == a[1] < b[1] \/ (a[1] = b[1] /\ a[2] < b[2])
BLE(a, b) == a = b \/ BLT(a, b)
BMax(a, b) == IF BLT(a, b) THEN b ELSE a
Succ(b) == <<b[1] + 1, b[2]>>                  \* Ballot::successor
MaxBallot == <<MaxRound, TopNode>>
Ballots == ({0} \X {0}) \cup ((0..MaxBallot[1] + 1) \X Node)

(* Values: the sequence of applied change ids; revision = length.         *)
Revision(v) == Len(v)
Apply(v, c) == IF \E i \in 1..Len(v) : v[i] = c THEN v ELSE Append(v, c)
Absent == << >>                                \* RoomState::absent
IsPrefix(a, b) == Len(a) <= Len(b) /\ SubSeq(b, 1, Len(a)) = a

(* Options are sets: {} is None, {x} is Some(x).                          *)
None == {}
Some(x) == {x}
Get(o) == CHOOSE x \in o : TRUE

(* The callers: change c is submitted to the (c-1 mod |Proposers|)-th    *)
(* proposer, and each proposer's changes are queued in id order from the *)
(* start (RoomReplica::propose -> Proposer::enqueue).  A change whose    *)
(* round is lost in a crash is either resubmitted to the restarted node  *)
(* with the same ChangeId (a caller retrying after an unknown outcome),  *)
(* or given up.                                                          *)
PIndex(p) == Cardinality({q \in Proposers : q < p})
Owned(p) == {c \in Changes : (c - 1) % Cardinality(Proposers) = PIndex(p)}
InitQueue(p) == [i \in 1..Cardinality(Owned(p)) |->
                   CHOOSE c \in Owned(p) : Cardinality({d \in Owned(p) : d < c}) = i - 1]

VARIABLES
    \* Acceptor (durable): AcceptorState
    promised,       \* [Node -> Ballot]
    accepted,       \* [Node -> option of [bal, val]]
    \* Proposer (volatile)
    round,          \* [Proposers -> option of round record]
    prepared,       \* [Proposers -> option of [bal, val]]   (fast path)
    maxSeen,        \* [Proposers -> Ballot]                 (max_seen)
    queue,          \* [Proposers -> Seq(Changes)]           (queue)
    \* Network
    msgs,
    \* History (not implemented in Rust; for the invariants only)
    votes,          \* every <<acceptor, ballot, value>> ever accepted
    committed       \* every [bal, val] a proposer reported to its caller

acceptorVars == <<promised, accepted>>
proposerVars == <<round, prepared, maxSeen, queue>>
vars == <<promised, accepted, round, prepared, maxSeen, queue, msgs, votes, committed>>

-----------------------------------------------------------------------------
(* Messages (message.rs).  Replies go to the owner of the ballot, which is *)
(* the node that sent the Prepare/Accept they answer.                      *)
PrepareMsg(p, b) == [type |-> "Prepare", from |-> p, bal |-> b]
PromiseMsg(a, b, acc) == [type |-> "Promise", from |-> a, bal |-> b, acc |-> acc]
AcceptMsg(p, b, v) == [type |-> "Accept", from |-> p, bal |-> b, val |-> v, next |-> Succ(b)]
AcceptedMsg(a, b) == [type |-> "Accepted", from |-> a, bal |-> b]
NackMsg(a, b, pr, ph) == [type |-> "Nack", from |-> a, bal |-> b, promised |-> pr, phase |-> ph]
CommitMsg(p, b, v) == [type |-> "Commit", from |-> p, bal |-> b, val |-> v]

Send(m) == msgs' = msgs \cup {m}

NoRound == None
(* A round: ballot, the (single-change) batch, the phase, and the phase-1 *)
(* promises (a map from node to what it reported) or the phase-2 tallies. *)
NewRound(b, c) == [bal |-> b, change |-> c, phase |-> "Prepare",
                   promisers |-> {}, best |-> None,
                   val |-> Absent, acc |-> {}, ref |-> {}]
Promisers(r) == r.promisers

-----------------------------------------------------------------------------
(* Cold start: nothing accepted anywhere.  Warm start: the proposer P0   *)
(* has committed the empty room at ballot <<0, P0>> (every acceptor       *)
(* accepted it and promised <<1, P0>>), so P0 holds the fast path at      *)
(* <<1, P0>> and any other proposer must preempt it with a higher ballot. *)
P0 == CHOOSE p \in Proposers : \A q \in Proposers : p <= q
B0 == <<0, P0>>

Init ==
    /\ promised = [n \in Node |-> IF WARM_START THEN Succ(B0) ELSE Zero]
    /\ accepted = [n \in Node |-> IF WARM_START THEN Some([bal |-> B0, val |-> Absent])
                                                ELSE None]
    /\ round = [p \in Proposers |-> NoRound]
    /\ prepared = [p \in Proposers |->
                     IF WARM_START /\ p = P0 THEN Some([bal |-> Succ(B0), val |-> Absent])
                     ELSE None]
    /\ maxSeen = [p \in Proposers |-> IF WARM_START THEN Succ(B0) ELSE Zero]
    /\ queue = [p \in Proposers |-> InitQueue(p)]
    /\ msgs = {}
    /\ votes = IF WARM_START THEN {<<a, B0, Absent>> : a \in Node} ELSE {}
    /\ committed = IF WARM_START THEN {[bal |-> B0, val |-> Absent]} ELSE {}

(* Proposer::begin_accept: apply the batch to base, send Accept with the   *)
(* piggybacked promise request next = successor ballot.                    *)
BeginAccept(p, r, base) ==
    LET v == Apply(base, r.change) IN
    /\ round' = [round EXCEPT ![p] = Some([r EXCEPT !.phase = "Accept", !.val = v,
                                                    !.acc = {}, !.ref = {}])]
    /\ Send(AcceptMsg(p, r.bal, v))

(* Proposer::drive: start a round.  With a prepared fast path, skip phase *)
(* 1 and accept at the prepared (successor) ballot; otherwise pick a new  *)
(* ballot above max_seen and the local acceptor's promise (`floor`).      *)
Drive(p) ==
    /\ round[p] = NoRound
    /\ queue[p] # << >>
    /\ LET c == Head(queue[p]) IN
       IF prepared[p] # None
       THEN LET pr == Get(prepared[p]) IN
            /\ BLE(pr.bal, MaxBallot)
            /\ BeginAccept(p, NewRound(pr.bal, c), pr.val)
            /\ prepared' = [prepared EXCEPT ![p] = None]
            /\ queue' = [queue EXCEPT ![p] = Tail(@)]
            /\ UNCHANGED <<acceptorVars, maxSeen, votes, committed>>
       ELSE LET rnd == IF maxSeen[p][1] >= promised[p][1] THEN maxSeen[p][1] + 1
                                                          ELSE promised[p][1] + 1
                b == <<rnd, p>>
            IN
            /\ BLE(b, MaxBallot)
            /\ maxSeen' = [maxSeen EXCEPT ![p] = BMax(@, b)]
            /\ round' = [round EXCEPT ![p] = Some(NewRound(b, c))]
            /\ queue' = [queue EXCEPT ![p] = Tail(@)]
            /\ Send(PrepareMsg(p, b))
            /\ UNCHANGED <<acceptorVars, prepared, votes, committed>>

(* Acceptor::on_prepare, via RoomReplica::step.  State change and reply  *)
(* are one step: the node persists before the reply leaves.              *)
ReceivePrepare(a) ==
    \E m \in msgs :
    /\ m.type = "Prepare"
    /\ IF BLT(m.bal, promised[a])
       THEN /\ Send(NackMsg(a, m.bal, promised[a], "Prepare"))
            /\ UNCHANGED promised
       ELSE /\ promised' = [promised EXCEPT ![a] = m.bal]
            /\ Send(PromiseMsg(a, m.bal, accepted[a]))
    /\ UNCHANGED <<accepted, proposerVars, votes, committed>>

(* Acceptor::on_accept, via RoomReplica::step.                           *)
ReceiveAccept(a) ==
    \E m \in msgs :
    /\ m.type = "Accept"
    /\ IF CHECK_PROMISE /\ BLT(m.bal, promised[a])
       THEN /\ Send(NackMsg(a, m.bal, promised[a], "Accept"))
            /\ UNCHANGED <<promised, accepted, votes>>
       ELSE /\ promised' = [promised EXCEPT ![a] = BMax(m.next, m.bal)]
            /\ accepted' = [accepted EXCEPT ![a] = Some([bal |-> m.bal, val |-> m.val])]
            /\ votes' = votes \cup {<<a, m.bal, m.val>>}
            /\ Send(AcceptedMsg(a, m.bal))
    /\ UNCHANGED <<proposerVars, committed>>

(* Proposer::on_promise: record the promise; at a majority, apply the     *)
(* change to the value of the highest accepted ballot and begin_accept.   *)
(* Rust keeps every promise and takes the max by ballot when a majority *)
(* has answered; an acceptor's accepted ballot only grows, so keeping the *)
(* highest accepted (ballot, value) seen so far is the same thing.        *)
BestOf(best, acc) ==
    IF acc = None THEN best
    ELSE IF best = None THEN acc
    ELSE IF BLT(Get(best).bal, Get(acc).bal) THEN acc ELSE best
HighestAccepted(r) == IF r.best = None THEN Absent ELSE Get(r.best).val

ReceivePromise(p) ==
    \E m \in msgs :
    /\ m.type = "Promise"
    /\ m.bal[2] = p
    /\ round[p] # NoRound
    /\ LET r0 == Get(round[p]) IN
       /\ r0.bal = m.bal
       /\ r0.phase = "Prepare"
       /\ LET r == [r0 EXCEPT !.best = BestOf(@, m.acc),
                             !.promisers = @ \cup {m.from}] IN
          IF Cardinality(Promisers(r)) < Majority \/ (OWN_ACCEPTOR /\ p \notin Promisers(r))
          THEN /\ round' = [round EXCEPT ![p] = Some(r)]
               /\ UNCHANGED msgs
          ELSE IF USE_HIGHEST
               THEN BeginAccept(p, r, HighestAccepted(r))
               ELSE BeginAccept(p, r, Absent)   \* ignores what was accepted
    /\ UNCHANGED <<acceptorVars, prepared, maxSeen, queue, votes, committed>>

(* Proposer::try_commit, reached from on_accepted with a majority: reply *)
(* to the caller, send Commit, and keep the successor ballot as the fast *)
(* path (every acceptor that accepted also promised it).                 *)
CommitRound(p, r) ==
    /\ committed' = committed \cup {[bal |-> r.bal, val |-> r.val]}
    /\ Send(CommitMsg(p, r.bal, r.val))
    /\ round' = [round EXCEPT ![p] = NoRound]
    /\ prepared' = [prepared EXCEPT ![p] =
          IF ~OWN_ACCEPTOR \/ p \in r.acc THEN Some([bal |-> Succ(r.bal), val |-> r.val])
          ELSE None]
    /\ maxSeen' = [maxSeen EXCEPT ![p] = BMax(@, Succ(r.bal))]

(* Proposer::on_accepted.                                                 *)
ReceiveAccepted(p) ==
    \E m \in msgs :
    /\ m.type = "Accepted"
    /\ m.bal[2] = p
    /\ round[p] # NoRound
    /\ LET r0 == Get(round[p]) IN
       /\ r0.bal = m.bal
       /\ r0.phase = "Accept"
       /\ LET r == [r0 EXCEPT !.acc = @ \cup {m.from}] IN
          IF Cardinality(r.acc) >= Majority
          THEN CommitRound(p, r)
          ELSE /\ round' = [round EXCEPT ![p] = Some(r)]
               /\ UNCHANGED <<msgs, committed, prepared, maxSeen>>
    /\ UNCHANGED <<acceptorVars, queue, votes>>

(* Proposer::abort: drop the round and the fast path, requeue the batch. *)
Abort(p, r) ==
    /\ round' = [round EXCEPT ![p] = NoRound]
    /\ prepared' = [prepared EXCEPT ![p] = None]
    /\ queue' = [queue EXCEPT ![p] = <<r.change>> \o @]

(* Proposer::on_nack.                                                     *)
ReceiveNack(p) ==
    \E m \in msgs :
    /\ m.type = "Nack"
    /\ m.bal[2] = p
    /\ LET ms == BMax(maxSeen[p], m.promised)
           prep == IF prepared[p] # None /\ BLT(Get(prepared[p]).bal, m.promised)
                   THEN None ELSE prepared[p]
       IN
       IF round[p] # NoRound /\ Get(round[p]).bal = m.bal
          /\ Get(round[p]).phase = m.phase
       THEN LET r == [Get(round[p]) EXCEPT !.ref = @ \cup {m.from}] IN
            /\ maxSeen' = [maxSeen EXCEPT ![p] = ms]
            /\ IF Cardinality(r.ref) > N - Majority
               THEN Abort(p, r)
               ELSE /\ round' = [round EXCEPT ![p] = Some(r)]
                    /\ prepared' = [prepared EXCEPT ![p] = prep]
                    /\ UNCHANGED queue
                    \* try_commit: a majority would already have committed
       ELSE /\ maxSeen' = [maxSeen EXCEPT ![p] = ms]
            /\ prepared' = [prepared EXCEPT ![p] = prep]
            /\ UNCHANGED <<round, queue>>
    /\ UNCHANGED <<acceptorVars, msgs, votes, committed>>

(* Proposer::on_commit_seen, via RoomReplica::step (Message::Commit).    *)
ReceiveCommit(p) ==
    \E m \in msgs :
    /\ m.type = "Commit"
    /\ m.from # p
    /\ maxSeen' = [maxSeen EXCEPT ![p] = BMax(@, m.bal)]
    /\ prepared' = [prepared EXCEPT ![p] =
                      IF @ # None /\ BLE(Get(@).bal, m.bal) THEN None ELSE @]
    /\ UNCHANGED <<acceptorVars, round, queue, msgs, votes, committed>>

(* Proposer::tick: a round below a quorum past round_timeout_ms aborts.  *)
(* Time is not modelled here, so the timeout may fire at any moment.     *)
Timeout(p) ==
    /\ TIMEOUTS
    /\ round[p] # NoRound
    /\ LET r == Get(round[p]) IN
       /\ ~(r.phase = "Accept" /\ Cardinality(r.acc) >= Majority)
       /\ Abort(p, r)
    /\ UNCHANGED <<acceptorVars, maxSeen, msgs, votes, committed>>

(* A node crashes and restarts (RoomReplica::new): the acceptor state is *)
(* read back from storage, the proposer starts empty.                    *)
Restart(n) ==
    /\ round' = [p \in Proposers |-> IF p = n THEN NoRound ELSE round[p]]
    /\ prepared' = [p \in Proposers |-> IF p = n THEN None ELSE prepared[p]]
    /\ \E retry \in BOOLEAN :   \* the caller of the lost round retries, or gives up
          queue' = [p \in Proposers |->
                     IF p = n /\ retry /\ round[p] # NoRound
                     THEN <<Get(round[p]).change>> \o queue[p]
                     ELSE queue[p]]
    /\ maxSeen' = [p \in Proposers |-> IF p = n THEN Zero ELSE maxSeen[p]]
    /\ UNCHANGED <<acceptorVars, msgs, votes, committed>>

(* The network loses a message.                                          *)
Lose ==
    /\ LOSS
    /\ \E m \in msgs :
       /\ msgs' = msgs \ {m}
       /\ UNCHANGED <<acceptorVars, proposerVars, votes, committed>>

Next ==
    \/ \E p \in Proposers :
          Drive(p) \/ ReceivePromise(p) \/ ReceiveAccepted(p)
          \/ ReceiveNack(p) \/ ReceiveCommit(p) \/ Timeout(p)
    \/ \E a \in Node : ReceivePrepare(a) \/ ReceiveAccept(a)
    \/ \E n \in Restarting : Restart(n)  \* an acceptor-only restart changes nothing
    \/ Lose

Spec == Init /\ [][Next]_vars

-----------------------------------------------------------------------------
(* Invariants.                                                             *)

Chosen(b, v) == \E Q \in Quorums : \A a \in Q : <<a, b, v>> \in votes
ChosenValues == {x[3] : x \in {y \in votes : Chosen(y[2], y[3])}}
CommittedValues == {c.val : c \in committed}

(* The assumption behind the Rust assert "two values accepted under      *)
(* ballot": one ballot never carries two values.                         *)
OneValuePerBallot ==
    \A x, y \in votes : x[2] = y[2] => x[3] = y[3]

(* At most one value is chosen per revision.                             *)
Agreement ==
    \A v, w \in ChosenValues : Revision(v) = Revision(w) => v = w

(* Chosen and committed values form one chain.                           *)
LinearHistory ==
    \A v, w \in ChosenValues \cup CommittedValues : IsPrefix(v, w) \/ IsPrefix(w, v)

(* What a caller is told was committed was chosen at that ballot.        *)
CommittedChosen ==
    \A c \in committed : Chosen(c.bal, c.val)

(* Once a value is chosen at revision r, no other value is ever chosen at *)
(* revision r (checked across steps, as an action property).            *)
ChosenStable ==
    [][\A v \in ChosenValues, w \in ChosenValues' :
         Revision(v) = Revision(w) => v = w]_vars

TypeOK ==
    /\ promised \in [Node -> Ballots]
    /\ \A n \in Node : accepted[n] = None \/ Get(accepted[n]).bal \in Ballots
    /\ maxSeen \in [Proposers -> Ballots]
    /\ queue \in [Proposers -> Seq(Changes)]

=============================================================================
