//! One forward pass: concatenating the items' inputs, padding,
//! running the model, checking and splitting its outputs; and, when a pass of several
//! requests fails, running each of them again alone (poison isolation).

use std::any::Any;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Instant;

use aspire_core::{Signature, TensorSpec};
use bytes::Bytes;

use super::BatchError;
use super::queue::{Counters, Item, Shared};
use crate::model::Servable;
use crate::tensor::{HostTensor, numel};

/// Runs the batch a pool thread took from `shared` and answers its items; leaves `batch`
/// empty. `model.run` has its own guard; this one only keeps the thread serving if the
/// batcher itself has a bug. The replies of a batch that panics here are dropped, which
/// callers see as a failed request rather than a hang.
pub(super) fn run_taken(shared: &Shared, model: &dyn Servable, batch: &mut Vec<Item>) {
    if batch.is_empty() {
        return;
    }
    if let Err(panic) = panic::catch_unwind(AssertUnwindSafe(|| run_batch(shared, model, batch))) {
        tracing::error!(
            "batch thread recovered from a panic: {}",
            panic_message(panic.as_ref())
        );
        batch.clear();
    }
}

/// Runs `items` as one forward pass and answers each of them; leaves `items` empty.
///
/// Poison isolation: when a pass of several requests fails, each of them runs again
/// alone (once), so that only a request that fails on its own gets the model's error and
/// the others get their outputs; one bad input cannot fail its neighbours.
fn run_batch(shared: &Shared, model: &dyn Servable, items: &mut Vec<Item>) {
    let started = Instant::now();
    for item in items.iter() {
        shared
            .metrics
            .observe_queue_wait(started.saturating_duration_since(item.enqueued));
    }
    let signature = Arc::clone(&items[0].signature);
    match forward(shared, model, &signature, items) {
        Ok(outputs) => answer(items, outputs),
        Err(msg) if items.len() > 1 => {
            tracing::warn!(
                requests = items.len(),
                "batch failed ({msg}); running its requests one by one"
            );
            isolate(shared, model, &signature, items);
        }
        Err(msg) => {
            tracing::warn!("forward pass failed: {msg}");
            for item in items.drain(..) {
                let _ = item.reply.send(Err(BatchError::Model(msg.clone())));
            }
        }
    }
}

/// Runs each of `items` alone, after their shared pass failed; answers each with its own
/// outcome. A request whose caller left or whose deadline passed meanwhile is not run.
fn isolate(shared: &Shared, model: &dyn Servable, signature: &Signature, items: &mut Vec<Item>) {
    let mut alone = Vec::with_capacity(1);
    for item in std::mem::take(items) {
        if item.abandoned() {
            Counters::add(&shared.stats.abandoned, 1);
            continue;
        }
        if item.expired(Instant::now()) {
            Counters::add(&shared.stats.expired, 1);
            let _ = item.reply.send(Err(BatchError::DeadlineExceeded));
            continue;
        }
        alone.push(item);
        match forward(shared, model, signature, &alone) {
            Ok(outputs) => answer(&mut alone, outputs),
            Err(msg) => {
                tracing::warn!("request failed on its own: {msg}");
                for item in alone.drain(..) {
                    let _ = item.reply.send(Err(BatchError::Model(msg.clone())));
                }
            }
        }
    }
}

/// Runs one forward pass over `items` (padded to an allowed batch size when batching),
/// timing and counting it, and checks its outputs.
fn forward(
    shared: &Shared,
    model: &dyn Servable,
    signature: &Signature,
    items: &[Item],
) -> Result<Vec<HostTensor>, String> {
    let config = &shared.config;
    let rows: usize = items.iter().map(|i| i.rows).sum();
    let padded = if config.enabled {
        padded_rows(rows, &config.allowed_batch_sizes)
    } else {
        rows
    };
    let started = Instant::now();
    let pass = shared.passes.begin(started);
    // A lone unpadded request is handed to the model as it came: no copy.
    let result = if items.len() == 1 && padded == rows {
        invoke(model, signature, &items[0].inputs)
    } else {
        let inputs = concat_inputs(items, padded);
        invoke(model, signature, &inputs)
    }
    .and_then(|outputs| check_outputs(signature, outputs, padded));
    shared.passes.end(pass);
    shared
        .metrics
        .observe_batch(started.elapsed(), rows, padded - rows);
    let stats = &shared.stats;
    Counters::add(&stats.batches, 1);
    Counters::add(&stats.requests, items.len());
    Counters::add(&stats.rows, rows);
    Counters::add(&stats.padding_rows, padded - rows);
    if result.is_err() {
        Counters::add(&stats.failed_batches, 1);
    }
    result
}

/// Gives each of `items` its rows of `outputs` (all of them, uncopied, to a lone request
/// that was not padded); leaves `items` empty.
fn answer(items: &mut Vec<Item>, outputs: Vec<HostTensor>) {
    if let [item] = items.as_slice()
        && outputs.iter().all(|o| o.rows() == item.rows)
    {
        if let Some(item) = items.pop() {
            let _ = item.reply.send(Ok(outputs));
        }
        return;
    }
    let mut start = 0;
    for item in items.drain(..) {
        let mine = outputs
            .iter()
            .map(|o| o.slice_rows(start, item.rows))
            .collect();
        start += item.rows;
        let _ = item.reply.send(Ok(mine));
    }
}

/// The smallest allowed size that holds `rows`; `rows` itself when none does (or none
/// is configured).
pub(super) fn padded_rows(rows: usize, allowed: &[usize]) -> usize {
    allowed
        .iter()
        .copied()
        .filter(|&s| s >= rows)
        .min()
        .unwrap_or(rows)
}

/// Each input of `items` stacked along dimension 0 into one exact-size buffer, followed
/// by zero rows up to `padded` rows. The items agree on dtype and inner dimensions (the
/// queue only batches such items) and their data lengths were checked on submit.
pub(super) fn concat_inputs(items: &[Item], padded: usize) -> Vec<HostTensor> {
    let first = &items[0].inputs;
    (0..first.len())
        .map(|j| {
            let like = &first[j];
            let total = padded * like.row_bytes();
            let mut data = Vec::with_capacity(total);
            for item in items {
                data.extend_from_slice(&item.inputs[j].data);
            }
            data.resize(total, 0);
            let mut shape = like.shape.clone();
            shape[0] = i64::try_from(padded).unwrap_or(i64::MAX);
            HostTensor {
                dtype: like.dtype,
                shape,
                data: Bytes::from(data),
            }
        })
        .collect()
}

fn invoke(
    model: &dyn Servable,
    signature: &Signature,
    inputs: &[HostTensor],
) -> Result<Vec<HostTensor>, String> {
    panic::catch_unwind(AssertUnwindSafe(|| model.run(signature, inputs))).unwrap_or_else(|panic| {
        Err(format!(
            "the model panicked: {}",
            panic_message(panic.as_ref())
        ))
    })
}

/// Checks the model kept its contract, so that splitting cannot go out of bounds and
/// every caller gets rows that are really theirs.
pub(super) fn check_outputs(
    signature: &Signature,
    outputs: Vec<HostTensor>,
    padded: usize,
) -> Result<Vec<HostTensor>, String> {
    if outputs.len() != signature.outputs.len() {
        return Err(format!(
            "the model returned {} outputs; the signature has {} ({})",
            outputs.len(),
            signature.outputs.len(),
            names(&signature.outputs)
        ));
    }
    for (out, spec) in outputs.iter().zip(&signature.outputs) {
        let name = &spec.name;
        if out.shape.is_empty() {
            return Err(format!(
                "output '{name}' is a scalar; it needs a batch dimension of {padded}"
            ));
        }
        if out.shape[0] < 0 || out.rows() != padded {
            return Err(format!(
                "output '{name}' has {} rows for a batch of {padded}",
                out.shape[0]
            ));
        }
        let expected = numel(&out.shape) * out.dtype.size();
        if out.shape.iter().any(|d| *d < 0) || out.data.len() != expected {
            return Err(format!(
                "output '{name}' has {} bytes; shape {:?} of {} needs {expected}",
                out.data.len(),
                out.shape,
                out.dtype
            ));
        }
    }
    Ok(outputs)
}

fn names(specs: &[TensorSpec]) -> String {
    specs
        .iter()
        .map(|s| s.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn panic_message(panic: &(dyn Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a non-string panic payload")
}

#[cfg(test)]
mod tests {
    use super::*;
    use aspire_core::DType;

    fn spec(name: &str) -> TensorSpec {
        TensorSpec {
            name: name.to_string(),
            dtype: DType::F32,
            shape: None,
        }
    }

    #[test]
    fn pads_to_the_smallest_allowed_size_that_fits() {
        assert_eq!(padded_rows(3, &[2, 4, 8]), 4);
        assert_eq!(padded_rows(4, &[2, 4, 8]), 4);
        assert_eq!(padded_rows(1, &[2, 4, 8]), 2);
        assert_eq!(padded_rows(9, &[2, 4, 8]), 9);
        assert_eq!(padded_rows(3, &[]), 3);
    }

    #[test]
    fn output_checks_name_the_output() {
        let sig = Signature {
            method: "forward".into(),
            inputs: vec![spec("x")],
            outputs: vec![spec("scores"), spec("ids")],
        };
        let ok = || HostTensor::from_f32(vec![8, 1], &[0.; 8]);
        assert!(check_outputs(&sig, vec![ok(), ok()], 8).is_ok());
        let short = HostTensor::from_f32(vec![5, 1], &[0.; 5]);
        assert_eq!(
            check_outputs(&sig, vec![short, ok()], 8).unwrap_err(),
            "output 'scores' has 5 rows for a batch of 8"
        );
        let err = check_outputs(&sig, vec![ok()], 8).unwrap_err();
        assert!(
            err.contains("returned 1 outputs") && err.contains("scores, ids"),
            "{err}"
        );
        let scalar = HostTensor::from_f32(vec![], &[0.]);
        assert!(
            check_outputs(&sig, vec![ok(), scalar], 8)
                .unwrap_err()
                .contains("'ids' is a scalar")
        );
        let mut torn = ok();
        torn.data = torn.data.slice(..4);
        assert!(
            check_outputs(&sig, vec![ok(), torn], 8)
                .unwrap_err()
                .contains("bytes")
        );
    }
}
