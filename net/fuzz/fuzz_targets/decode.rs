//! Feeds arbitrary bytes to every decoder of the peer protocol.
//!
//! A decoder must return a message or an error for any input, never panic,
//! and never allocate beyond the frame it was given. A request or response
//! that decodes must encode again to a frame that decodes to the same value.
#![no_main]

use fincrypt_net::proto;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = proto::decode_request_frame(data) {
        let again = proto::encode_request(&request).expect("a decoded request encodes");
        assert_eq!(proto::decode_request_frame(&again).as_ref(), Ok(&request));
    }
    if let Ok(response) = proto::decode_response_frame(data) {
        let again = proto::encode_response(&response).expect("a decoded response encodes");
        assert_eq!(proto::decode_response_frame(&again).as_ref(), Ok(&response));
    }
    // Bodies without a length prefix, as the stream codec hands them over.
    let _ = proto::decode_request(data);
    let _ = proto::decode_response(data);
    if let Some(prefix) = data.first_chunk::<{ proto::LEN_PREFIX }>() {
        let _ = proto::frame_len(*prefix);
    }
});
