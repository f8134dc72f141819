//! Control-message parsing on arbitrary input. Nothing may panic, and the round trips
//! that hold do:
//! - a client message that parses parses to the same message after its JSON is
//!   re-serialized (the parse depends on the JSON value, not its spelling), and after
//!   `ClientMsg::to_json` (what clients send is what the server reads);
//! - a refusal names the message's `id` only when that `id` is an integer;
//! - a text that reads as a server message survives `to_json` and back unchanged (what the
//!   client library decodes is what the server meant).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tickgate_proto::control::{parse_client_msg, ServerMsg};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    match parse_client_msg(s) {
        Ok(m) => {
            let v: serde_json::Value = serde_json::from_str(s).expect("parsed, so it is JSON");
            let again = parse_client_msg(&v.to_string()).expect("re-serialized message parses");
            assert_eq!(again, m);
            assert_eq!(parse_client_msg(&m.to_json()).as_ref(), Ok(&m), "client message changed through to_json");
        }
        Err(e) => {
            if let Some(id) = e.id {
                let v: serde_json::Value = serde_json::from_str(s).expect("an id was read, so it is JSON");
                assert_eq!(v.get("id").and_then(serde_json::Value::as_i64), Some(id));
            }
        }
    }
    if let Ok(m) = serde_json::from_str::<ServerMsg>(s) {
        let json = m.to_json();
        let back: ServerMsg = serde_json::from_str(&json).expect("to_json output reads back");
        assert_eq!(back, m, "server message changed through to_json: {json}");
    }
});
