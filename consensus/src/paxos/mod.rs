//! The per-room Paxos register: acceptor and proposer.

pub mod acceptor;
pub mod proposer;
