//! What a gRPC server of Aspire checks while a request's bytes arrive, before tonic has
//! buffered the message:
//!
//! - [`budget`]: a budget of bytes in flight per process, and the reservation each
//!   request holds until it is answered;
//! - [`layer`]: the tower layer that reads the gRPC message header (refusing a message
//!   over the size limit with INVALID_ARGUMENT before its body is read) and charges each
//!   arriving chunk to the budget (shedding with RESOURCE_EXHAUSTED once it is full).
//!
//! Both errors name the flag that sets the limit, so an operator reading a client's error
//! knows which knob it was.

pub mod budget;
pub mod layer;

pub use budget::{InflightBudget, RequestBudget};
pub use layer::{IngressLayer, IngressService};

/// Default of `--max-message-size-bytes`: the largest gRPC message a server takes or
/// sends. Twice the default per-request limit, so that a request at that limit still fits
/// when its values are varint-encoded typed fields rather than raw `tensor_content`.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 512 << 20;

/// Default of `--max-request-bytes`: the most bytes one request's inputs may take once
/// decoded (a broadcast value counts at its decoded size).
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 256 << 20;

/// Default of `--max-inflight-bytes`: request bytes (as received, plus decoded copies on a
/// worker) a process holds at once before it sheds new requests.
pub const DEFAULT_MAX_INFLIGHT_BYTES: usize = 1 << 30;

/// Default of `--max-concurrent-streams`: requests one HTTP/2 connection may have open at
/// once; a client past it waits for a stream to finish.
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 256;

/// The gRPC path of TensorFlow Serving's Predict, the method charged to the budget.
pub const PREDICT_PATH: &str = "/tensorflow.serving.PredictionService/Predict";

/// Checks `--max-message-size-bytes`, `--max-inflight-bytes` and `--max-concurrent-streams`
/// against each other, for every server that takes them; the error names the flags.
pub fn check_limits(
    max_message_bytes: usize,
    max_inflight_bytes: usize,
    max_concurrent_streams: u32,
) -> Result<(), String> {
    for (flag, value) in [
        ("--max-message-size-bytes", max_message_bytes),
        ("--max-inflight-bytes", max_inflight_bytes),
        ("--max-concurrent-streams", max_concurrent_streams as usize),
    ] {
        if value == 0 {
            return Err(format!("{flag} must be positive"));
        }
    }
    if max_inflight_bytes < max_message_bytes {
        return Err(format!(
            "--max-inflight-bytes ({max_inflight_bytes}) is smaller than --max-message-size-bytes ({max_message_bytes}): a request at the size limit could never be served; raise the first or lower the second"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_checked_against_each_other() {
        assert!(check_limits(DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_MAX_INFLIGHT_BYTES, 1).is_ok());
        assert_eq!(
            check_limits(10, 10, 0).unwrap_err(),
            "--max-concurrent-streams must be positive"
        );
        let err = check_limits(11, 10, 1).unwrap_err();
        assert!(
            err.starts_with(
                "--max-inflight-bytes (10) is smaller than --max-message-size-bytes (11)"
            ),
            "{err}"
        );
    }
}
