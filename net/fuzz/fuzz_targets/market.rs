//! Feeds arbitrary bytes to every decoder of the storage market: signed
//! offers, contract proposals, contracts, paid notices, and the messages
//! between a client and its mediator.
//!
//! A decoder must return a value or an error for any input, never panic.
//! A value that decodes must encode again (its canonical bytes are never
//! longer than the input, so never over the size limit the decoder already
//! applied) to bytes that decode to the same value, and that encoding is
//! stable. The bytes themselves need not come back: postcard ignores bytes
//! after the value and reads over-long varints, and the signatures of offers
//! and contracts are over the canonical encoding of the terms, not over the
//! bytes received, so a value that verified once verifies again.
//!
//! Offers and contracts that decode need a valid signature, which random
//! bytes almost never carry: their round trip is reached only from a seed
//! that holds one. Paid notices carry no signature.
#![no_main]

use fincrypt_market::contract::{Contract, Proposal};
use fincrypt_market::mediator::{decode_ask, decode_reply};
use fincrypt_market::notice::PaidNotice;
use fincrypt_market::offer::SignedOffer;
use libfuzzer_sys::fuzz_target;

/// Checks the round trip of one decoded value.
macro_rules! round_trip {
    ($data:expr, $ty:ty) => {
        if let Ok(value) = <$ty>::decode($data) {
            let again = value
                .encode()
                .expect(concat!("a decoded ", stringify!($ty), " encodes"));
            assert!(again.len() <= $data.len(), "canonical bytes are no longer");
            let back = <$ty>::decode(&again)
                .expect(concat!("a re-encoded ", stringify!($ty), " decodes"));
            assert_eq!(back, value);
            assert_eq!(back.encode().expect("and encodes again"), again);
        }
    };
}

fuzz_target!(|data: &[u8]| {
    round_trip!(data, SignedOffer);
    round_trip!(data, Proposal);
    round_trip!(data, Contract);
    round_trip!(data, PaidNotice);
    let _ = decode_ask(data);
    let _ = decode_reply(data);
});
