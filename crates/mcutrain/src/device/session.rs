//! Training sessions on a device: the host side of [`mcutrain_core::session`].
//!
//! The host writes the session (`session.bin`: the header, every training sample of every
//! epoch in the order the host trainer would visit them, then the evaluation samples), runs
//! the firmware built with the plan in QEMU, and reads back `results.bin`: epoch losses,
//! predictions, the trained arena regions and the measurements. The trained model is rebuilt
//! from the plan, the base model and those regions with the same reader as the host
//! executor ([`plan_file::trained_model`]), so `train --out` writes the same bytes for both.

use std::fs;
use std::io::{BufWriter, Write};
use std::path::Path;

use mcutrain_core::plan::PlanView;
use mcutrain_core::session::{
    encode_sample, kept_regions, sample_record_bytes, Metrics, SessionHeader, Tag,
    RECORD_HEADER_BYTES,
};

use super::qemu::WorkDir;
use super::{Budget, Device, DeviceError, Firmware, Image, Program};
use crate::compile::plan_file::{self, AlignedBytes};
use crate::data::Dataset;
use crate::engine::float::epoch_orders;
use crate::model::Model;

/// What a session trains and evaluates.
#[derive(Clone, Copy, Debug)]
pub struct Session<'a> {
    /// The plan file (embedded in the image).
    pub plan: &'a [u8],
    /// Passes over `train`.
    pub epochs: usize,
    /// Seed of the sample order ([`epoch_orders`]).
    pub seed: u64,
    /// Training samples (none: evaluation only).
    pub train: Option<&'a Dataset>,
    /// Evaluation samples after training.
    pub eval: Option<&'a Dataset>,
}

/// Where a running session is, from the results it has written so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Epochs finished.
    pub epochs: usize,
    /// Evaluation samples finished.
    pub eval_samples: usize,
}

/// What the device sent back.
#[derive(Clone, Debug)]
pub struct SessionResults {
    /// Mean training loss of each epoch.
    pub epoch_losses: Vec<f64>,
    /// Predicted class of each evaluation sample.
    pub predictions: Vec<usize>,
    /// The kept arena regions (`PARM`).
    pub kept: Vec<u8>,
    /// The measurements.
    pub metrics: Metrics,
    /// Summed count of each plan step over the training samples.
    pub step_counts: Vec<u64>,
    /// The image that ran.
    pub image: Image,
    /// What the firmware and QEMU printed.
    pub console: String,
}

impl SessionResults {
    /// The trained model: `base` with the parameters and range trackers of the device's
    /// arena (rebuilt from the kept regions).
    pub fn trained_model(&self, plan: &[u8], base: &Model) -> Result<Model, DeviceError> {
        let plan = AlignedBytes::copy_of(plan);
        let view = parse_plan(&plan)?;
        let mut arena = AlignedBytes::zeroed(view.arena_required());
        let mut at = 0;
        for (start, len) in kept_regions(&view) {
            let bytes = self
                .kept
                .get(at..at + len)
                .ok_or_else(|| DeviceError::BadOutput("PARM is shorter than the plan's".into()))?;
            arena.as_mut_slice()[start..start + len].copy_from_slice(bytes);
            at += len;
        }
        plan_file::trained_model(&view, arena.as_slice(), base)
            .map_err(|e| DeviceError::BadOutput(format!("the trained state: {e}")))
    }

    /// Accuracy the device counted on the evaluation samples (`None` without any).
    pub fn device_accuracy(&self) -> Option<f64> {
        let t = &self.metrics.timing;
        (t.eval_samples > 0).then(|| t.eval_correct as f64 / t.eval_samples as f64)
    }
}

fn parse_plan(plan: &AlignedBytes) -> Result<PlanView<'_>, DeviceError> {
    Ok(PlanView::parse(plan.as_slice())?)
}

/// Builds the image of `session.plan` for `device`'s board and `budget` (cached; a plan or
/// image over budget is refused before anything runs), runs the session on `device` and reads
/// the results. `progress` is called while it runs (under QEMU).
pub fn run(
    device: &Device,
    budget: &Budget,
    session: &Session,
    mut progress: impl FnMut(Progress),
) -> Result<SessionResults, DeviceError> {
    let image =
        Firmware::for_board(device.board()).build(budget, Program::Train { plan: session.plan })?;
    let plan = AlignedBytes::copy_of(session.plan);
    let view = parse_plan(&plan)?;
    let workdir = WorkDir::new()?;
    let session_path = workdir.path().join("session.bin");
    write_session(&session_path, &view, session)?;
    let (bytes, console) = match device {
        Device::Qemu { machine, qemu } => {
            let results_path = workdir.path().join("results.bin");
            let epochs = session.epochs;
            let console = qemu.run_watching(*machine, &image.elf, workdir.path(), || {
                if let Ok(meta) = fs::metadata(&results_path) {
                    progress(progress_of(meta.len(), epochs));
                }
            })?;
            let bytes = fs::read(&results_path).map_err(|e| {
                DeviceError::BadOutput(format!("the firmware left no results.bin: {e}"))
            })?;
            (bytes, console)
        }
        Device::NucleoF746zg(board) => board.run(&image.elf, &session_path)?,
    };
    parse_results(&bytes, &view, session, image, console)
}

/// The progress of a run whose `results.bin` has `len` bytes: the `LOSS` record grows by one
/// `f64` per epoch, then the `PRED` record by one `u16` per evaluation sample.
fn progress_of(len: u64, epochs: usize) -> Progress {
    let header = RECORD_HEADER_BYTES as u64;
    let loss_end = header + 8 * epochs as u64;
    Progress {
        epochs: (len.saturating_sub(header) / 8).min(epochs as u64) as usize,
        eval_samples: (len.saturating_sub(loss_end + header) / 2) as usize,
    }
}

/// Samples of a session in streaming order: every epoch's training order, then the
/// evaluation samples.
fn streamed<'a>(session: &Session<'a>) -> impl Iterator<Item = (&'a Dataset, usize)> {
    let (epochs, seed) = (session.epochs, session.seed);
    let train = session.train.into_iter().flat_map(move |data| {
        epoch_orders(data.len(), epochs, seed)
            .into_iter()
            .flatten()
            .map(move |i| (data, i))
    });
    let eval = session
        .eval
        .into_iter()
        .flat_map(|data| (0..data.len()).map(move |i| (data, i)));
    train.chain(eval)
}

/// Writes `session.bin`.
fn write_session(path: &Path, view: &PlanView, session: &Session) -> Result<(), DeviceError> {
    let input_len = view.input_len();
    let count = |data: Option<&Dataset>| -> Result<u32, DeviceError> {
        let Some(data) = data else { return Ok(0) };
        if data.sample_len() != input_len {
            return Err(DeviceError::Usage(format!(
                "the samples have {} values, the plan's input {input_len}",
                data.sample_len()
            )));
        }
        u32::try_from(data.len()).map_err(|_| DeviceError::Usage("too many samples".into()))
    };
    let train_samples = count(session.train)?;
    let header = SessionHeader {
        epochs: if train_samples == 0 {
            0
        } else {
            u32::try_from(session.epochs).map_err(|_| DeviceError::Usage("epochs".into()))?
        },
        train_samples,
        eval_samples: count(session.eval)?,
        input_len: input_len as u32,
    };
    let file = fs::File::create(path).map_err(DeviceError::io("create session.bin"))?;
    let mut out = BufWriter::new(file);
    let io = DeviceError::io("write session.bin");
    let mut record = vec![0u8; sample_record_bytes(input_len)];
    let mut write = || -> std::io::Result<()> {
        out.write_all(&header.encode())?;
        for (data, i) in streamed(session) {
            encode_sample(data.labels[i], data.sample(i), &mut record)
                .expect("the record has the sample's size");
            out.write_all(&record)?;
        }
        out.flush()
    };
    write().map_err(io)
}

/// Decodes `results.bin` of a session of `view` that `image` ran, printing `console`.
fn parse_results(
    bytes: &[u8],
    view: &PlanView,
    session: &Session,
    image: Image,
    console: String,
) -> Result<SessionResults, DeviceError> {
    let bad = |what: String| DeviceError::BadOutput(format!("results.bin: {what}"));
    let mut records: Vec<(Tag, &[u8])> = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let header = bytes
            .get(at..at + RECORD_HEADER_BYTES)
            .ok_or_else(|| bad(format!("a record header is cut at byte {at}")))?;
        let tag = Tag::from_bytes(header[..4].try_into().expect("four bytes"))
            .ok_or_else(|| bad(format!("unknown record {:?}", &header[..4])))?;
        let len = u32::from_le_bytes(header[4..].try_into().expect("four bytes")) as usize;
        let payload = bytes
            .get(at + RECORD_HEADER_BYTES..at + RECORD_HEADER_BYTES + len)
            .ok_or_else(|| bad(format!("record {tag:?} is cut")))?;
        records.push((tag, payload));
        at += RECORD_HEADER_BYTES + len;
    }
    let tags: Vec<Tag> = records.iter().map(|(t, _)| *t).collect();
    let expected = [
        Tag::Loss,
        Tag::Predictions,
        Tag::Params,
        Tag::Metrics,
        Tag::End,
    ];
    if tags != expected {
        return Err(bad(format!("records {tags:?}, expected {expected:?}")));
    }
    let payload = |i: usize| records[i].1;
    let train_samples = session.train.map_or(0, Dataset::len);
    let epoch_losses = payload(0)
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().expect("eight bytes")) / train_samples as f64)
        .collect::<Vec<_>>();
    let predictions = payload(1)
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]) as usize)
        .collect::<Vec<_>>();
    let kept = payload(2).to_vec();
    let (metrics, steps) =
        Metrics::decode(payload(3)).ok_or_else(|| bad("malformed METR record".into()))?;
    let step_counts: Vec<u64> = Metrics::step_counts(steps).collect();
    let eval_samples = session.eval.map_or(0, Dataset::len);
    let epochs = if train_samples == 0 {
        0
    } else {
        session.epochs
    };
    let t = &metrics.timing;
    let consistent = epoch_losses.len() == epochs
        && predictions.len() == eval_samples
        && t.eval_samples as usize == eval_samples
        && t.train_samples as usize == epochs * train_samples
        && kept.len() == mcutrain_core::session::kept_bytes(view)
        && step_counts.len() == view.step_count();
    if !consistent {
        return Err(bad(format!(
            "{} epoch losses, {} predictions, {} training samples, {} kept bytes and {} step \
             counts do not match the session",
            epoch_losses.len(),
            predictions.len(),
            t.train_samples,
            kept.len(),
            step_counts.len()
        )));
    }
    if let Some(eval) = session.eval {
        let correct = predictions
            .iter()
            .zip(&eval.labels)
            .filter(|(p, l)| **p == **l as usize)
            .count();
        if correct != t.eval_correct as usize {
            return Err(bad(format!(
                "the device counted {} correct predictions, its predictions say {correct}",
                t.eval_correct
            )));
        }
    }
    Ok(SessionResults {
        epoch_losses,
        predictions,
        kept,
        metrics,
        step_counts,
        image,
        console,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_follows_the_loss_and_prediction_records() {
        assert_eq!(progress_of(0, 3), Progress::default());
        assert_eq!(progress_of(8 + 16, 3).epochs, 2);
        let after_training = 8 + 24 + 8;
        assert_eq!(
            progress_of(after_training + 10, 3),
            Progress {
                epochs: 3,
                eval_samples: 5
            }
        );
    }
}
