//! Feeds arbitrary bytes to the tunnel frame decoder: it must never panic, never claim more
//! bytes than it was given, and whatever it decodes must encode back to a frame it decodes the
//! same way.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tunnel_proto::wire::{MAX_FRAME, decode, encode};

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    // Bounded: each successful decode consumes at least the 4-byte header.
    while let Ok(Some((msg, used))) = decode(rest) {
        assert!(used >= 4 && used <= rest.len() && used <= MAX_FRAME + 4);
        let mut again = Vec::new();
        encode(&msg, &mut again).expect("a decoded message encodes");
        let (back, n) = decode(&again).expect("re-decodes").expect("whole frame");
        assert_eq!(back, msg);
        assert_eq!(n, again.len());
        rest = &rest[used..];
    }
});
