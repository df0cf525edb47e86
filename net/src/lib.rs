//! Peers: libp2p discovery, block exchange, placement and proofs. Arrives with its issue.
