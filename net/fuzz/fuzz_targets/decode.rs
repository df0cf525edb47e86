//! Feeds arbitrary bytes to every decoder of the peer protocol.
//!
//! A decoder must return a message or an error for any input, never panic,
//! and never allocate beyond the frame it was given. A request or response
//! that decodes must encode again to a frame that decodes to the same value,
//! also when encoded in two parts (head and block) as the stream codec does.
#![no_main]

use fincrypt_net::proto;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = proto::decode_request_frame(data) {
        let again = proto::encode_request(&request).expect("a decoded request encodes");
        assert_eq!(proto::decode_request_frame(&again).as_ref(), Ok(&request));
        let (head, tail) = proto::encode_request_parts(&request).expect("and in two parts");
        assert_eq!([head, tail.to_vec()].concat(), again);
    }
    if let Ok(response) = proto::decode_response_frame(data) {
        let again = proto::encode_response(&response).expect("a decoded response encodes");
        assert_eq!(proto::decode_response_frame(&again).as_ref(), Ok(&response));
        let (head, tail) = proto::encode_response_parts(&response).expect("and in two parts");
        assert_eq!([head, tail.to_vec()].concat(), again);
    }
    // Bodies without a length prefix, as the stream codec hands them over:
    // the slicing decoders it uses must judge them as the general ones do.
    let body = bytes::Bytes::copy_from_slice(data);
    assert_eq!(
        proto::decode_request_bytes(body.clone()),
        proto::decode_request(data)
    );
    assert_eq!(proto::decode_response_bytes(body), proto::decode_response(data));
    if let Some(prefix) = data.first_chunk::<{ proto::LEN_PREFIX }>() {
        let _ = proto::frame_len(*prefix);
    }
});
