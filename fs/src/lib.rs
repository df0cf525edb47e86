//! Fossil: the live filesystem. The mount over the block store arrives with its issue.
