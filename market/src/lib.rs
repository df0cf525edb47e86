//! The storage market: offers, contracts and payments. Arrives with its issue.
