--------------------------- MODULE QuorumLeases ---------------------------
(***************************************************************************)
(* Quorum leases on top of the per-room CASPaxos register (consensus/src/ *)
(* lease and paxos, wired together by replica.rs).  Self-contained: the    *)
(* register part is the one of PaxosRegister.tla, with the lease hooks of  *)
(* RoomReplica::step added to it.                                          *)
(*                                                                         *)
(* Time.  Every Tick is one step of TICK units of real time, during which *)
(* every node's clock advances by an integer amount in                     *)
(* TICK-SKEW_REAL .. TICK+SKEW_REAL, chosen independently per node and per *)
(* tick.  Between any two states the clocks' rates are therefore within    *)
(* 1 +- SKEW_REAL/TICK of real time, exactly (events happen only between   *)
(* ticks).  The protocol assumes rho = SKEW_ASSUMED/TICK, so Drift::cover  *)
(* becomes                                                                 *)
(*     Cover(ms) = ceil(ms * (TICK + SKEW_ASSUMED) / (TICK - SKEW_ASSUMED))  *)
(* i.e. ceil(ms * (1 + rho) / (1 - rho)) as in time.rs.  Safe configs have *)
(* SKEW_REAL <= SKEW_ASSUMED.                                              *)
(*                                                                         *)
(* Drift can only matter if a lease outlives a tick: a Tick lowers every   *)
(* time left by at least TICK - SKEW_REAL, so with LEASE <= TICK -         *)
(* SKEW_REAL every grant ends at the next tick whatever the clocks do.     *)
(* The configs that check drift have LEASE > TICK + SKEW_REAL (README).    *)
(*                                                                         *)
(* Every deadline the Rust code keeps as an absolute Millis on its owner's *)
(* clock (`until`, `recovering_until`, a request's send time, a proposer's *)
(* wait) is kept here as the time left on that same clock (for a request:  *)
(* its age), which a Tick decreases (increases) by the owner's clock       *)
(* advance, stopping at 0 (at LEASE).  `until > now` becomes `left > 0`,   *)
(* `now >= until` becomes `left = 0`.  This is the same arithmetic, with   *)
(* the clock origin moved to "now" so that the state space stays finite    *)
(* without bounding time: a model runs for as long as it likes.            *)
(*                                                                         *)
(* The network is a set of messages (duplication and reordering for free, *)
(* Lose removes one); messages to self go through it too.  Restart(n) is a *)
(* crash and restart of node n: acceptor state durable, proposer, grantor  *)
(* and holder state volatile, the holder's `known` restored from storage,  *)
(* the grantor restarted with a recovery window (Grantor::restarted).      *)
(***************************************************************************)
EXTENDS Integers, Sequences, FiniteSets

CONSTANTS
    N,              \* replicas 1..N
    Proposers,      \* nodes that propose in this model
    Holders,        \* ReplicaConfig::holders
    Restarting,     \* nodes that may crash and restart
    Changes,        \* change ids callers submit (see InitQueue)
    MaxRound,       \* bound on ballots: only ballots <= <<MaxRound, TopNode>>
    TopNode,        \*   are used
    MaxSeq,         \* bound on lease requests per holder (seq in 0..MaxSeq-1)
    TICK,           \* real time units per Tick
    SKEW_ASSUMED,   \* rho = SKEW_ASSUMED / TICK, what Drift::cover assumes
    SKEW_REAL,      \* how far clocks actually stray per tick
    DRIFTING,       \* the nodes whose clocks stray (the others run at the nominal rate)
    LEASE,          \* LeaseConfig::lease_ms
    GUARD,          \* LeaseConfig::guard_ms
    \* Guards of the Rust code (TRUE = as in the code):
    WAIT_FOR_HOLDERS,      \* Proposer::try_commit waits for reported holders
    RECOVERY_WINDOW,       \* a restarted grantor reports every holder (Grantor::restarted)
    GRANT_MARKS_PENDING,   \* Holder::on_grant marks pending on a newer accepted revision
    ACCEPT_MARKS_PENDING,  \* Holder::on_accept_seen marks pending before the acceptor answers
    OWN_ACCEPTOR,          \* phase 2 / fast path need the local acceptor (Proposer::on_promise, try_commit)
    RESTART_PENDING,       \* RoomReplica::new: Holder::assume_pending(durable promise)
    \* A fix NOT in the Rust code (FALSE = as in the code; see README):
    DURABLE_LEASE_SEQ,     \* lease request seq numbers are not reused after restart
    \* Scope:
    EARLY_HOLDER_RESTART,  \* a holder restarts only before any Accept was sent
    DUP_LEASE_REQUESTS,    \* a LeaseRequest may be delivered to a grantor more than once
    LOSS,                  \* the Lose action is enabled
    TIMEOUTS               \* the Timeout action is enabled

Node == 1..N
Majority == N \div 2 + 1
Quorums == {Q \in SUBSET Node : Cardinality(Q) >= Majority}
Seqs == 0..(MaxSeq - 1)

Zero == <<0, 0>>
BLT(a, b) == a[1] < b[1] \/ (a[1] = b[1] /\ a[2] < b[2])
BLE(a, b) == a = b \/ BLT(a, b)
BMax(a, b) == IF BLT(a, b) THEN b ELSE a
Succ(b) == <<b[1] + 1, b[2]>>
MaxBallot == <<MaxRound, TopNode>>

Revision(v) == Len(v)
Apply(v, c) == IF \E i \in 1..Len(v) : v[i] = c THEN v ELSE Append(v, c)
IsPrefix(a, b) == Len(a) <= Len(b) /\ SubSeq(b, 1, Len(a)) = a

None == {}
Some(x) == {x}
Get(o) == CHOOSE x \in o : TRUE
Max(a, b) == IF a >= b THEN a ELSE b

(* time.rs and config.rs *)
CeilDiv(a, b) == (a + b - 1) \div b
Cover(ms) == CeilDiv(ms * (TICK + SKEW_ASSUMED), TICK - SKEW_ASSUMED)   \* Drift::cover
PromiseMs == Cover(LEASE) + GUARD                                     \* LeaseConfig::promise_ms
WaitMs(rem) == Cover(rem) + GUARD                                     \* LeaseConfig::wait_ms

(* The state every node starts from: a committed value (the empty room,  *)
(* revision 0) accepted by everyone at ballot 0.P0, learned by every     *)
(* holder, and the fast path <<1, P0>> held by proposer P0.              *)
P0 == CHOOSE p \in Proposers : \A q \in Proposers : p <= q
B0 == <<0, P0>>
Absent == << >>

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
    \* Acceptor (durable)
    promised, accepted,
    \* Proposer (volatile)
    round, prepared, maxSeen, queue,
    \* Grantor (volatile)
    promises,       \* [Node -> [Holders -> Nat]] time left of each promise (0 = none)
    recovering,     \* [Node -> Nat] time left of the recovery window
    \* Holder (volatile, but `known` is restored from storage)
    grants,         \* [Holders -> [Node -> Nat]] time left of each grant (0 = none)
    requests,       \* [Holders -> [Seqs -> Int]] age of each remembered request; -1 = none
    nextSeq,        \* [Holders -> Nat]
    known,          \* [Holders -> [bal, val]]
    pending,        \* [Holders -> option of Ballot]
    \* Network
    msgs,
    granted,        \* <<grantor, holder, seq>> delivered (used when ~DUP_LEASE_REQUESTS)
    \* History
    votes, committed

acceptorVars == <<promised, accepted>>
proposerVars == <<round, prepared, maxSeen, queue>>
grantorVars == <<promises, recovering>>
holderVars == <<grants, requests, nextSeq, known, pending>>
histVars == <<votes, committed>>
vars == <<acceptorVars, proposerVars, grantorVars, holderVars, msgs, granted, histVars>>

-----------------------------------------------------------------------------
PrepareMsg(p, b) == [type |-> "Prepare", from |-> p, bal |-> b]
PromiseMsg(a, b, acc) == [type |-> "Promise", from |-> a, bal |-> b, acc |-> acc]
AcceptMsg(p, b, v) == [type |-> "Accept", from |-> p, bal |-> b, val |-> v, next |-> Succ(b)]
AcceptedMsg(a, b, hs) == [type |-> "Accepted", from |-> a, bal |-> b, holders |-> hs]
NackMsg(a, b, pr, ph) == [type |-> "Nack", from |-> a, bal |-> b, promised |-> pr, phase |-> ph]
CommitMsg(p, b, v) == [type |-> "Commit", from |-> p, bal |-> b, val |-> v]
LeaseRequestMsg(h, s) == [type |-> "LeaseRequest", from |-> h, seq |-> s]
LeaseGrantMsg(g, h, s, acc) == [type |-> "LeaseGrant", from |-> g, to |-> h, seq |-> s, acc |-> acc]

Send(m) == msgs' = msgs \cup {m}

NoRound == None
NewRound(b, c) == [bal |-> b, change |-> c, phase |-> "Prepare",
                   promisers |-> {}, best |-> None,
                   val |-> Absent, acc |-> {}, ref |-> {},
                   answered |-> {}, waitsFor |-> {}, waitLeft |-> [h \in Holders |-> 0]]

-----------------------------------------------------------------------------
Init ==
    /\ promised = [n \in Node |-> Succ(B0)]
    /\ accepted = [n \in Node |-> Some([bal |-> B0, val |-> Absent])]
    /\ round = [p \in Proposers |-> NoRound]
    /\ prepared = [p \in Proposers |-> IF p = P0 THEN Some([bal |-> Succ(B0), val |-> Absent])
                                                  ELSE None]
    /\ maxSeen = [p \in Proposers |-> Succ(B0)]
    /\ queue = [p \in Proposers |-> InitQueue(p)]
    /\ promises = [g \in Node |-> [h \in Holders |-> 0]]
    /\ recovering = [g \in Node |-> 0]
    /\ grants = [h \in Holders |-> [g \in Node |-> 0]]
    /\ requests = [h \in Holders |-> [s \in Seqs |-> -1]]
    /\ nextSeq = [h \in Holders |-> 0]
    /\ known = [h \in Holders |-> [bal |-> B0, val |-> Absent]]
    /\ pending = [h \in Holders |-> None]
    /\ msgs = {}
    /\ granted = {}
    /\ votes = {<<a, B0, Absent>> : a \in Node}
    /\ committed = {[bal |-> B0, val |-> Absent]}

-----------------------------------------------------------------------------
(* Time *)

Down(x, d) == IF x > d THEN x - d ELSE 0

Tick ==
    \E d \in [Node -> (TICK - SKEW_REAL)..(TICK + SKEW_REAL)] :
    /\ \A n \in Node \ DRIFTING : d[n] = TICK
    /\ promises' = [g \in Node |-> [h \in Holders |-> Down(promises[g][h], d[g])]]
    /\ recovering' = [g \in Node |-> Down(recovering[g], d[g])]
    /\ grants' = [h \in Holders |-> [g \in Node |-> Down(grants[h][g], d[h])]]
    /\ requests' = [h \in Holders |-> [s \in Seqs |->
                      IF requests[h][s] < 0 THEN -1
                      ELSE IF requests[h][s] + d[h] >= LEASE THEN LEASE
                      ELSE requests[h][s] + d[h]]]
    /\ round' = [p \in Proposers |->
                    IF round[p] = NoRound THEN NoRound
                    ELSE Some([Get(round[p]) EXCEPT !.waitLeft =
                                 [h \in Holders |-> Down(@[h], d[p])]])]
    /\ UNCHANGED <<acceptorVars, prepared, maxSeen, queue, nextSeq, known, pending, msgs, histVars, granted>>

-----------------------------------------------------------------------------
(* Holder (lease/holder.rs) *)

IsNewer(h, rev) == rev > Revision(known[h].val)            \* Holder::is_newer
MarkPending(h, b) == IF pending[h] = None THEN Some(b) ELSE Some(BMax(Get(pending[h]), b))

(* RoomReplica::tick -> Holder::due_request: broadcast a LeaseRequest,   *)
(* remembering the send time on the holder's clock.  (The renewal period *)
(* is not modelled: a request may be sent at any time.)                  *)
HolderRequest(h) ==
    /\ nextSeq[h] < MaxSeq
    /\ requests' = [requests EXCEPT ![h][nextSeq[h]] = 0]
    /\ nextSeq' = [nextSeq EXCEPT ![h] = @ + 1]
    /\ Send(LeaseRequestMsg(h, nextSeq[h]))
    /\ UNCHANGED <<acceptorVars, proposerVars, grantorVars, grants, known, pending, histVars, granted>>

(* RoomReplica::step(LeaseGrant) -> Holder::on_grant.                    *)
ReceiveGrant(h) ==
    \E m \in msgs :
    /\ m.type = "LeaseGrant"
    /\ m.to = h
    /\ requests[h][m.seq] >= 0                     \* a request it remembers
    /\ pending' = [pending EXCEPT ![h] =
          IF GRANT_MARKS_PENDING /\ m.acc # None /\ IsNewer(h, Get(m.acc)[2])
          THEN MarkPending(h, Get(m.acc)[1]) ELSE @]
    /\ grants' = [grants EXCEPT ![h][m.from] = Max(@, LEASE - requests[h][m.seq])]
    /\ UNCHANGED <<acceptorVars, proposerVars, grantorVars, requests, nextSeq, known,
                   msgs, histVars, granted>>

(* Holder::learn *)
Learn(h, b, v) ==
    /\ pending' = [pending EXCEPT ![h] = IF @ # None /\ BLE(Get(@), b) THEN None ELSE @]
    /\ known' = [known EXCEPT ![h] = IF IsNewer(h, Revision(v)) THEN [bal |-> b, val |-> v] ELSE @]

(* Holder::read / Holder::holds: a local read is allowed.               *)
Holds(h) == Cardinality({g \in Node : grants[h][g] > 0}) >= Majority
CanRead(h) == Holds(h) /\ pending[h] = None

-----------------------------------------------------------------------------
(* Grantor (lease/grantor.rs) *)

(* RoomReplica::step(LeaseRequest) -> Grantor::grant, reply with the     *)
(* acceptor's last accepted (ballot, revision).                          *)
Grant(g) ==
    \E m \in msgs :
    /\ m.type = "LeaseRequest"
    /\ m.from \in Holders
    /\ DUP_LEASE_REQUESTS \/ <<g, m.from, m.seq>> \notin granted
    /\ granted' = granted \cup {<<g, m.from, m.seq>>}
    /\ promises' = [promises EXCEPT ![g][m.from] = Max(@, PromiseMs)]
    /\ Send(LeaseGrantMsg(g, m.from, m.seq,
              IF accepted[g] = None THEN None
              ELSE Some(<<Get(accepted[g]).bal, Revision(Get(accepted[g]).val)>>)))
    /\ UNCHANGED <<acceptorVars, proposerVars, recovering, holderVars, histVars>>

(* Grantor::unexpired: holders with time left on this clock.            *)
Unexpired(g) ==
    LET left(h) == Max(promises[g][h], recovering[g])
    IN {<<h, left(h)>> : h \in {x \in Holders : left(x) > 0}}

-----------------------------------------------------------------------------
(* Proposer and acceptor (paxos/), with the lease hooks of replica.rs.   *)

BeginAccept(p, r, base) ==
    LET v == Apply(base, r.change) IN
    /\ round' = [round EXCEPT ![p] = Some([r EXCEPT !.phase = "Accept", !.val = v,
                                                    !.acc = {}, !.ref = {}])]
    /\ Send(AcceptMsg(p, r.bal, v))

Drive(p) ==
    /\ round[p] = NoRound
    /\ queue[p] # << >>
    /\ queue' = [queue EXCEPT ![p] = Tail(@)]
    /\ LET c == Head(queue[p]) IN
       IF prepared[p] # None
       THEN LET pr == Get(prepared[p]) IN
            /\ BLE(pr.bal, MaxBallot)
            /\ BeginAccept(p, NewRound(pr.bal, c), pr.val)
            /\ prepared' = [prepared EXCEPT ![p] = None]
            /\ UNCHANGED maxSeen
       ELSE LET rnd == Max(maxSeen[p][1], promised[p][1]) + 1
                b == <<rnd, p>>
            IN
            /\ BLE(b, MaxBallot)
            /\ maxSeen' = [maxSeen EXCEPT ![p] = BMax(@, b)]
            /\ round' = [round EXCEPT ![p] = Some(NewRound(b, c))]
            /\ Send(PrepareMsg(p, b))
            /\ UNCHANGED prepared
    /\ UNCHANGED <<acceptorVars, grantorVars, holderVars, histVars, granted>>

ReceivePrepare(a) ==
    \E m \in msgs :
    /\ m.type = "Prepare"
    /\ IF BLT(m.bal, promised[a])
       THEN /\ Send(NackMsg(a, m.bal, promised[a], "Prepare"))
            /\ UNCHANGED promised
       ELSE /\ promised' = [promised EXCEPT ![a] = m.bal]
            /\ Send(PromiseMsg(a, m.bal, accepted[a]))
    /\ UNCHANGED <<accepted, proposerVars, grantorVars, holderVars, histVars, granted>>

(* RoomReplica::step(Accept): as a holder first (Holder::on_accept_seen), *)
(* then Acceptor::on_accept; an Accepted lists Grantor::unexpired.        *)
ReceiveAccept(a) ==
    \E m \in msgs :
    /\ m.type = "Accept"
    /\ IF a \in Holders /\ ACCEPT_MARKS_PENDING /\ IsNewer(a, Revision(m.val))
       THEN pending' = [pending EXCEPT ![a] = MarkPending(a, m.bal)]
       ELSE UNCHANGED pending
    /\ IF BLT(m.bal, promised[a])
       THEN /\ Send(NackMsg(a, m.bal, promised[a], "Accept"))
            /\ UNCHANGED <<promised, accepted, votes>>
       ELSE /\ promised' = [promised EXCEPT ![a] = BMax(m.next, m.bal)]
            /\ accepted' = [accepted EXCEPT ![a] = Some([bal |-> m.bal, val |-> m.val])]
            /\ votes' = votes \cup {<<a, m.bal, m.val>>}
            /\ Send(AcceptedMsg(a, m.bal, Unexpired(a)))
    /\ UNCHANGED <<proposerVars, grantorVars, grants, requests, nextSeq, known,
                   committed, granted>>

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
       /\ LET r == [r0 EXCEPT !.best = BestOf(@, m.acc), !.promisers = @ \cup {m.from}] IN
          IF Cardinality(r.promisers) < Majority \/ (OWN_ACCEPTOR /\ p \notin r.promisers)
          THEN /\ round' = [round EXCEPT ![p] = Some(r)]
               /\ UNCHANGED msgs
          ELSE BeginAccept(p, r, HighestAccepted(r))
    /\ UNCHANGED <<acceptorVars, prepared, maxSeen, queue, grantorVars, holderVars,
                   histVars, granted>>

(* Proposer::on_accepted: count the vote and the answer, and turn each   *)
(* reported holder's remaining time into a deadline on this clock.       *)
ReceiveAccepted(p) ==
    \E m \in msgs :
    /\ m.type = "Accepted"
    /\ m.bal[2] = p
    /\ round[p] # NoRound
    /\ LET r0 == Get(round[p]) IN
       /\ r0.bal = m.bal
       /\ r0.phase = "Accept"
       /\ round' = [round EXCEPT ![p] = Some(
             [r0 EXCEPT !.acc = @ \cup {m.from},
                        !.answered = @ \cup {m.from},
                        !.waitsFor = @ \cup {hr[1] : hr \in m.holders},
                        !.waitLeft = [h \in Holders |->
                            IF \E hr \in m.holders : hr[1] = h
                            THEN Max(@[h], WaitMs((CHOOSE hr \in m.holders : hr[1] = h)[2]))
                            ELSE @[h]]])]
    /\ UNCHANGED <<acceptorVars, prepared, maxSeen, queue, grantorVars, holderVars,
                   msgs, histVars, granted>>

Abort(p, r) ==
    /\ round' = [round EXCEPT ![p] = NoRound]
    /\ prepared' = [prepared EXCEPT ![p] = None]
    /\ queue' = [queue EXCEPT ![p] = <<r.change>> \o @]

(* Proposer::on_nack.  A refused accept still counts as the holder's     *)
(* answer.                                                               *)
ReceiveNack(p) ==
    \E m \in msgs :
    /\ m.type = "Nack"
    /\ m.bal[2] = p
    /\ LET ms == BMax(maxSeen[p], m.promised)
           prep == IF prepared[p] # None /\ BLT(Get(prepared[p]).bal, m.promised)
                   THEN None ELSE prepared[p]
       IN
       /\ maxSeen' = [maxSeen EXCEPT ![p] = ms]
       /\ IF round[p] # NoRound /\ Get(round[p]).bal = m.bal /\ Get(round[p]).phase = m.phase
          THEN LET r == [Get(round[p]) EXCEPT !.ref = @ \cup {m.from},
                             !.answered = IF m.phase = "Accept" THEN @ \cup {m.from} ELSE @]
               IN
               IF Cardinality(r.ref) > N - Majority
               THEN Abort(p, r)
               ELSE /\ round' = [round EXCEPT ![p] = Some(r)]
                    /\ prepared' = [prepared EXCEPT ![p] = prep]
                    /\ UNCHANGED queue
          ELSE /\ prepared' = [prepared EXCEPT ![p] = prep]
               /\ UNCHANGED <<round, queue>>
    /\ UNCHANGED <<acceptorVars, grantorVars, holderVars, msgs, histVars, granted>>

(* Proposer::try_commit (called from on_accepted, on_nack and tick): a   *)
(* majority accepted and every reported holder answered or timed out.    *)
(* Reply to the caller, send Commit, learn locally (RoomReplica::absorb), *)
(* keep the successor ballot as the fast path.                           *)
HoldersDone(p, r) ==
    \/ ~WAIT_FOR_HOLDERS
    \/ \A h \in r.waitsFor : h \in r.answered \/ r.waitLeft[h] = 0

TryCommit(p) ==
    /\ round[p] # NoRound
    /\ LET r == Get(round[p]) IN
       /\ r.phase = "Accept"
       /\ Cardinality(r.acc) >= Majority
       /\ HoldersDone(p, r)
       /\ committed' = committed \cup {[bal |-> r.bal, val |-> r.val]}
       /\ Send(CommitMsg(p, r.bal, r.val))
       /\ round' = [round EXCEPT ![p] = NoRound]
       /\ prepared' = [prepared EXCEPT ![p] =
             IF ~OWN_ACCEPTOR \/ p \in r.acc THEN Some([bal |-> Succ(r.bal), val |-> r.val])
             ELSE None]
       /\ maxSeen' = [maxSeen EXCEPT ![p] = BMax(@, Succ(r.bal))]
       /\ IF p \in Holders THEN Learn(p, r.bal, r.val) ELSE UNCHANGED <<known, pending>>
    /\ UNCHANGED <<acceptorVars, queue, grantorVars, grants, requests, nextSeq,
                   votes, granted>>

(* RoomReplica::step(Commit): Proposer::on_commit_seen, then Holder::learn. *)
ReceiveCommit(n) ==
    \E m \in msgs :
    /\ m.type = "Commit"
    /\ m.from # n
    /\ n \in Proposers \cup Holders
    /\ IF n \in Proposers
       THEN /\ maxSeen' = [maxSeen EXCEPT ![n] = BMax(@, m.bal)]
            /\ prepared' = [prepared EXCEPT ![n] =
                              IF @ # None /\ BLE(Get(@).bal, m.bal) THEN None ELSE @]
       ELSE UNCHANGED <<maxSeen, prepared>>
    /\ IF n \in Holders THEN Learn(n, m.bal, m.val) ELSE UNCHANGED <<known, pending>>
    /\ UNCHANGED <<acceptorVars, round, queue, grantorVars, grants, requests, nextSeq,
                   msgs, histVars, granted>>

(* Proposer::tick: a round below a quorum times out (at any moment here). *)
Timeout(p) ==
    /\ TIMEOUTS
    /\ round[p] # NoRound
    /\ LET r == Get(round[p]) IN
       /\ ~(r.phase = "Accept" /\ Cardinality(r.acc) >= Majority)
       /\ Abort(p, r)
    /\ UNCHANGED <<acceptorVars, maxSeen, grantorVars, holderVars, msgs, histVars, granted>>

-----------------------------------------------------------------------------
(* Crash and restart of node n: RoomReplica::new(config, durable, known, *)
(* recovering_until = start + promise_ms).                               *)
Restart(n) ==
    /\ (EARLY_HOLDER_RESTART /\ n \in Holders) => ~\E m \in msgs : m.type = "Accept"
    /\ round' = [p \in Proposers |-> IF p = n THEN NoRound ELSE round[p]]
    /\ prepared' = [p \in Proposers |-> IF p = n THEN None ELSE prepared[p]]
    /\ \E retry \in BOOLEAN :   \* the caller of the lost round retries, or gives up
          queue' = [p \in Proposers |->
                     IF p = n /\ retry /\ round[p] # NoRound
                     THEN <<Get(round[p]).change>> \o queue[p]
                     ELSE queue[p]]
    /\ maxSeen' = [p \in Proposers |-> IF p = n THEN Zero ELSE maxSeen[p]]
    /\ promises' = [promises EXCEPT ![n] = [h \in Holders |-> 0]]
    /\ recovering' = [recovering EXCEPT ![n] = IF RECOVERY_WINDOW THEN PromiseMs ELSE 0]
    /\ grants' = [h \in Holders |-> IF h = n THEN [g \in Node |-> 0] ELSE grants[h]]
    /\ requests' = [h \in Holders |-> IF h = n THEN [s \in Seqs |-> -1] ELSE requests[h]]
    /\ nextSeq' = [h \in Holders |-> IF h = n /\ ~DURABLE_LEASE_SEQ THEN 0 ELSE nextSeq[h]]
    /\ pending' = [h \in Holders |->
                     IF h # n THEN pending[h]
                     ELSE IF RESTART_PENDING /\ promised[n] # Zero THEN Some(promised[n])
                     ELSE None]
    /\ UNCHANGED <<acceptorVars, known, msgs, histVars, granted>>

Lose ==
    /\ LOSS
    /\ \E m \in msgs :
       /\ msgs' = msgs \ {m}
       /\ UNCHANGED <<acceptorVars, proposerVars, grantorVars, holderVars, histVars, granted>>

Next ==
    \/ Tick
    \/ \E p \in Proposers :
          Drive(p) \/ ReceivePromise(p) \/ ReceiveAccepted(p) \/ ReceiveNack(p)
          \/ TryCommit(p) \/ Timeout(p)
    \/ \E a \in Node : ReceivePrepare(a) \/ ReceiveAccept(a) \/ Grant(a) \/ ReceiveCommit(a)
    \/ \E h \in Holders : HolderRequest(h) \/ ReceiveGrant(h)
    \/ \E n \in Restarting : Restart(n)
    \/ Lose

Spec == Init /\ [][Next]_vars

-----------------------------------------------------------------------------
(* Invariants *)

Chosen(b, v) == \E Q \in Quorums : \A a \in Q : <<a, b, v>> \in votes
ChosenValues == {x[3] : x \in {y \in votes : Chosen(y[2], y[3])}}
CommittedValues == {c.val : c \in committed}

(* A holder allowed to read locally returns a value that contains every  *)
(* value committed (reported to a caller) so far: its revision is >= the  *)
(* highest committed revision, on the same linear history.               *)
LeaseReadSafety ==
    \A h \in Holders : CanRead(h) => \A v \in CommittedValues : IsPrefix(v, known[h].val)

OneValuePerBallot == \A x, y \in votes : x[2] = y[2] => x[3] = y[3]
LinearHistory ==
    \A v, w \in ChosenValues \cup CommittedValues : IsPrefix(v, w) \/ IsPrefix(w, v)
CommittedChosen == \A c \in committed : Chosen(c.bal, c.val)

(* Sanity of the time discretisation: the promise outlasts the lease.    *)
PromiseCoversLease ==
    PromiseMs * (TICK - SKEW_ASSUMED) >= LEASE * (TICK + SKEW_ASSUMED)

-----------------------------------------------------------------------------
(* State constraint for model checking: CONSTRAINT Unsettled, in the     *)
(* configs that name it.  TLC still checks the invariants of a state     *)
(* that fails it, but does not explore that state's successors.  It cuts *)
(* a behaviour only once no holder can ever read a stale value again, so *)
(* it cannot hide a LeaseReadSafety violation, whatever guard is off or  *)
(* however far clocks drift.  It applies only with one change id (every  *)
(* config here); with more it is TRUE.  With one change every committed  *)
(* value is << >> or <<c>>, and each holder is settled when              *)
(*  - Learned: it knows <<c>>, which every committed value is a prefix   *)
(*    of; `known` only grows (Learn, kept across Restart);               *)
(*  - LeaseOver: it has no request left to send (nor will have after a   *)
(*    restart), every request it remembers is LEASE old (so a grant      *)
(*    answering it adds no time: Max(@, 0)) and fewer than a majority of *)
(*    its grants have time left: grants only run down from here, so      *)
(*    Holds(h) stays FALSE; or                                           *)
(*  - Blocked: it is pending, and pending again after any restart (with  *)
(*    RESTART_PENDING a restart sets it to the durable promise, never    *)
(*    Zero: Init promises Succ(B0) and promises only grow).  Pending is  *)
(*    cleared only by Learn, and every Learn is of a committed value,    *)
(*    which here is <<c>> (Init commits << >> without a Commit message), *)
(*    so it cannot read before it is Learned.                            *)
(* The price: OneValuePerBallot, LinearHistory and CommittedChosen are   *)
(* not checked in what follows a settled state.  With one proposer and   *)
(* one round they concern that round only, and PaxosRegister checks them *)
(* in full.                                                              *)
Learned(h) == Len(known[h].val) = Cardinality(Changes)
LeaseOver(h) ==
    /\ nextSeq[h] = MaxSeq
    /\ h \in Restarting => DURABLE_LEASE_SEQ
    /\ \A s \in Seqs : requests[h][s] \in {-1, LEASE}
    /\ Cardinality({g \in Node : grants[h][g] > 0}) < Majority
Blocked(h) == pending[h] # None /\ (h \in Restarting => RESTART_PENDING)
Settled ==
    /\ Cardinality(Changes) = 1
    /\ \A h \in Holders : Learned(h) \/ LeaseOver(h) \/ Blocked(h)
Unsettled == ~Settled

(* View for model checking: VIEW View, in the configs that name it.  TLC *)
(* then counts two states as one when they agree on View.  View forgets  *)
(* only what no action or invariant can tell apart:                      *)
(*  - a grantor's promise to a holder and its recovery window are read   *)
(*    only as their maximum (Unexpired), and every action keeps that     *)
(*    maximum a function of the previous one: Tick lowers both by the    *)
(*    same advance (Down(Max(a, b), d) = Max(Down(a, d), Down(b, d))),   *)
(*    Grant raises the promise to PromiseMs, Restart sets the promise to *)
(*    0 and the window to PromiseMs (or 0);                              *)
(*  - a round's wait for a holder that has answered is never read again: *)
(*    HoldersDone accepts an answered holder whatever its wait, and      *)
(*    `answered` only grows while the round lasts;                       *)
(*  - a proposer with no round and an empty queue never starts a round   *)
(*    again (the queue grows only by Abort, or by Restart with a round,  *)
(*    both needing a round), so its `prepared` and `maxSeen` (read only  *)
(*    by Drive and to compute their own next values) and the Promise,    *)
(*    Accepted and Nack messages for its ballots (read only by that      *)
(*    proposer) no longer matter;                                        *)
(*  - without DUP_LEASE_REQUESTS, a LeaseRequest every grantor has       *)
(*    answered is never read again (only Grant reads it).                *)
GrantorLeft == [g \in Node |-> [h \in Holders |-> Max(promises[g][h], recovering[g])]]
RoundView == [p \in Proposers |->
                IF round[p] = NoRound THEN NoRound
                ELSE LET r == Get(round[p]) IN
                     Some([r EXCEPT !.waitLeft = [h \in Holders |->
                              IF h \in r.answered THEN 0 ELSE @[h]]])]
Done(p) == round[p] = NoRound /\ queue[p] = << >>
Dead(m) ==
    \/ m.type \in {"Promise", "Accepted", "Nack"} /\ m.bal[2] \in Proposers /\ Done(m.bal[2])
    \/ /\ m.type = "LeaseRequest"
       /\ ~DUP_LEASE_REQUESTS
       /\ \A g \in Node : <<g, m.from, m.seq>> \in granted
ProposerView == [p \in Proposers |->
                   IF Done(p) THEN <<"done">> ELSE <<RoundView[p], prepared[p], maxSeen[p], queue[p]>>]
View == <<acceptorVars, ProposerView, GrantorLeft, holderVars,
          {m \in msgs : ~Dead(m)}, granted, histVars>>

=============================================================================
