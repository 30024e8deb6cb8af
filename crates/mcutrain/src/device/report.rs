//! The measurements of a training session on a device, as a table and as JSON.
//!
//! Counts come from the firmware's timer around every plan step and every whole sample
//! ([`mcutrain_core::session`]); under QEMU they are exact instruction counts (Timer0 under
//! `-icount`, [`ticks_to_instructions`]), a lower bound on cycles, on a board DWT cycles.
//! Each measured region also counts two timer reads (`overhead`), which is subtracted.
//! Steps are attributed to the forward pass (loading the input, layer forwards), the backward
//! pass (loss gradient, activation masks, input errors, error sums, weight and bias
//! gradients) and the update (weight and bias updates, which run once per batch; their
//! per-sample figure is the mean over all training samples), and to their layer. The rest of
//! a sample (input quantization, batch bookkeeping, range tracker folding) is `other`.
//!
//! SRAM is measured, not planned: static data (`.data + .bss`, the arena sized from the plan
//! included) from the linker's symbols at run time, plus the peak stack found by stack
//! painting. Flash is the image's code, constants (the plan file among them) and `.data`'s
//! initial values, from its ELF section headers.

use serde_json::{json, Value};

use mcutrain_core::plan::{PlanView, StepOp, NONE};
use mcutrain_core::session::CounterUnit;

use super::qemu::ticks_to_instructions;
use super::session::SessionResults;
use super::{Budget, DeviceError, Footprint, PlanSizes};
use crate::compile::plan_file::AlignedBytes;
use crate::model::Architecture;
use crate::report::table;

/// Where a step's cost goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Loading the input and the layer forwards.
    Forward,
    /// The loss gradient and the whole backward pass.
    Backward,
    /// Weight and bias updates.
    Update,
}

impl Phase {
    /// The phase of a step operation.
    pub fn of(op: StepOp) -> Phase {
        match op {
            // A clamp mask packs a forward output to bits as it is computed.
            StepOp::LoadInput | StepOp::Forward | StepOp::StreamedForward | StepOp::ClampMask => {
                Phase::Forward
            }
            StepOp::WeightUpdate | StepOp::BiasUpdate => Phase::Update,
            StepOp::Loss
            | StepOp::ActivationMask
            | StepOp::InputError
            | StepOp::AccumulateError
            | StepOp::WeightGrad
            | StepOp::BiasGrad => Phase::Backward,
        }
    }
}

/// Counts per training sample, split by phase.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Split {
    /// Forward steps.
    pub forward: f64,
    /// Backward steps.
    pub backward: f64,
    /// Update steps.
    pub update: f64,
}

impl Split {
    fn add(&mut self, phase: Phase, count: f64) {
        match phase {
            Phase::Forward => self.forward += count,
            Phase::Backward => self.backward += count,
            Phase::Update => self.update += count,
        }
    }

    /// All three.
    pub fn total(&self) -> f64 {
        self.forward + self.backward + self.update
    }
}

/// The cost of one layer's steps per training sample.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerCost {
    /// Layer name (`input` and `loss` for the steps without a layer).
    pub name: String,
    /// Operator.
    pub op: String,
    /// Its steps' counts by phase.
    pub split: Split,
}

/// SRAM of the running image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sram {
    /// `.data + .bss` (the arena included), from the linker symbols at run time.
    pub static_bytes: u64,
    /// The arena's share of it.
    pub arena_bytes: u64,
    /// Planned tensors of the arena.
    pub tensor_bytes: u64,
    /// Training state of the arena.
    pub state_bytes: u64,
    /// Deepest stack use.
    pub peak_stack_bytes: u64,
    /// SRAM left for the stack.
    pub stack_limit_bytes: u64,
}

impl Sram {
    /// Static data plus peak stack: the SRAM the run used.
    pub fn total(&self) -> u64 {
        self.static_bytes + self.peak_stack_bytes
    }

    /// Static data besides the arena (sample buffers, step counters, the runtime's).
    pub fn other_static(&self) -> u64 {
        self.static_bytes.saturating_sub(self.arena_bytes)
    }
}

/// Everything a session measured.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceReport {
    /// Where it ran (`qemu-m4`, `qemu-m7`, `nucleo-f746zg`).
    pub device: &'static str,
    /// What the counts count: `instructions` (QEMU) or `cycles` (a board).
    pub unit: &'static str,
    /// Training samples run (over all epochs).
    pub train_samples: u64,
    /// Mean count of a whole training sample.
    pub per_sample: f64,
    /// Its steps by phase.
    pub split: Split,
    /// Per layer (model order; `input` first, `loss` last).
    pub layers: Vec<LayerCost>,
    /// Evaluation samples run.
    pub eval_samples: u64,
    /// Mean count of one inference (quantization and forward).
    pub per_inference: f64,
    /// Measured SRAM.
    pub sram: Sram,
    /// The image's sizes.
    pub footprint: Footprint,
    /// The plan file's bytes (part of the constants).
    pub plan_file_bytes: u64,
    /// The budgets the image was linked with.
    pub budget: Budget,
}

impl DeviceReport {
    /// The report of `results`, a session of `plan` for a model of `arch` on `device`.
    pub fn new(
        device: &'static str,
        results: &SessionResults,
        plan: &[u8],
        arch: &Architecture,
    ) -> Result<DeviceReport, DeviceError> {
        let sizes = PlanSizes::of(plan)?;
        let plan = AlignedBytes::copy_of(plan);
        let view = PlanView::parse(plan.as_slice())?;
        let metrics = &results.metrics;
        let timing = &metrics.timing;
        let (unit, count): (&'static str, fn(u64) -> u64) = match metrics.unit {
            CounterUnit::QemuTimer0Ticks => ("instructions", ticks_to_instructions),
            CounterUnit::DwtCycles => ("cycles", |cycles| cycles),
        };
        let overhead = timing.overhead as u64;
        let samples = timing.train_samples as u64;
        let mean = |ticks: u64, regions: u64| {
            let counted = count(ticks.saturating_sub(regions * overhead));
            if regions == 0 {
                0.0
            } else {
                counted as f64 / regions as f64
            }
        };
        let mut split = Split::default();
        let mut layers: Vec<LayerCost> = std::iter::once(("input", "load"))
            .chain(arch.layers.iter().map(|l| (l.name.as_str(), l.kind.name())))
            .chain(std::iter::once(("loss", "softmax cross-entropy")))
            .map(|(name, op)| LayerCost {
                name: name.into(),
                op: op.into(),
                split: Split::default(),
            })
            .collect();
        for (s, &ticks) in results.step_counts.iter().enumerate() {
            let step = view
                .step(s)
                .ok_or_else(|| DeviceError::BadOutput(format!("no step {s} in the plan")))?;
            let phase = Phase::of(step.op);
            let per_sample = if samples == 0 {
                0.0
            } else {
                mean(ticks, samples)
            };
            split.add(phase, per_sample);
            let row = match (step.op, step.layer) {
                (StepOp::Loss, _) => layers.len() - 1,
                (_, NONE) => 0,
                (_, layer) => layer as usize + 1,
            };
            // A row-streamed chain is one step: its cost is its first layer's row, which
            // names the chain.
            let chain_end = match step.op {
                StepOp::StreamedForward => view.streamed_chain(&step).map(|(last, _)| last),
                _ => None,
            };
            let chain_end_name = chain_end.and_then(|last| arch.layers.get(last));
            let cost = layers
                .get_mut(row)
                .ok_or_else(|| DeviceError::BadOutput(format!("step {s} names no layer")))?;
            if let Some(last) = chain_end_name {
                cost.op = format!("streamed to {}", last.name);
            }
            cost.split.add(phase, per_sample);
        }
        let memory = &metrics.memory;
        Ok(DeviceReport {
            device,
            unit,
            train_samples: samples,
            per_sample: mean(timing.train_count, samples),
            split,
            layers,
            eval_samples: timing.eval_samples as u64,
            per_inference: mean(timing.eval_count, timing.eval_samples as u64),
            sram: Sram {
                static_bytes: memory.static_ram_bytes as u64,
                arena_bytes: memory.arena_bytes as u64,
                tensor_bytes: sizes.tensor_bytes,
                state_bytes: sizes.state_bytes,
                peak_stack_bytes: memory.peak_stack_bytes as u64,
                stack_limit_bytes: memory.stack_limit_bytes as u64,
            },
            footprint: results.image.footprint,
            plan_file_bytes: sizes.file_bytes,
            budget: results.image.budget,
        })
    }

    /// Count of a sample outside its steps: input quantization and batch bookkeeping.
    pub fn other(&self) -> f64 {
        (self.per_sample - self.split.total()).max(0.0)
    }

    /// The readable report.
    pub fn text(&self) -> String {
        let u = self.unit;
        let n = |x: f64| format!("{:.0}", x);
        let mut out = format!("measured on {}", self.device);
        if self.unit == "instructions" {
            out += " (instruction counts: a lower bound on cycles)";
        }
        out += "\n";
        if self.train_samples > 0 {
            let s = &self.split;
            out += &format!(
                "{u} per training sample: {} = forward {} + backward {} + update {} + other {} \
                 (mean over {} samples; updates once per batch)\n",
                n(self.per_sample),
                n(s.forward),
                n(s.backward),
                n(s.update),
                n(self.other()),
                self.train_samples
            );
            let rows: Vec<Vec<String>> = self
                .layers
                .iter()
                .filter(|l| l.split.total() > 0.0)
                .map(|l| {
                    vec![
                        l.name.clone(),
                        l.op.clone(),
                        n(l.split.forward),
                        n(l.split.backward),
                        n(l.split.update),
                    ]
                })
                .collect();
            out += &table(&["layer", "op", "forward", "backward", "update"], &rows);
            out += "\n";
        }
        if self.eval_samples > 0 {
            out += &format!(
                "{u} per inference: {} (mean over {} samples)\n",
                n(self.per_inference),
                self.eval_samples
            );
        }
        let m = &self.sram;
        let f = &self.footprint;
        out += &format!(
            "SRAM {} B = static {} (arena {} = planned tensors {} + training state {}; other {}) \
             + peak stack {} (of {} left); budget {}\n\
             flash {} B = code {} + constants {} (plan file {}) + .data {}; budget {}",
            m.total(),
            m.static_bytes,
            m.arena_bytes,
            m.tensor_bytes,
            m.state_bytes,
            m.other_static(),
            m.peak_stack_bytes,
            m.stack_limit_bytes,
            self.budget.sram_bytes,
            f.flash_bytes(),
            f.code_bytes,
            f.const_bytes,
            self.plan_file_bytes,
            f.data_bytes,
            self.budget.flash_bytes,
        );
        out
    }

    /// The JSON object (`instructions_per_sample`, `sram_bytes`, `flash_bytes`,
    /// `peak_stack_bytes` and the rest; counts are rounded means).
    pub fn json(&self) -> Value {
        let r = |x: f64| x.round() as u64;
        let f = &self.footprint;
        let m = &self.sram;
        let per = if self.unit == "instructions" {
            "instructions"
        } else {
            "cycles"
        };
        json!({
            "device": self.device,
            "unit": self.unit,
            "train_samples": self.train_samples,
            format!("{per}_per_sample"): r(self.per_sample),
            format!("{per}_per_sample_split"): {
                "forward": r(self.split.forward),
                "backward": r(self.split.backward),
                "update": r(self.split.update),
                "other": r(self.other()),
            },
            format!("{per}_per_layer"): self.layers.iter().filter(|l| l.split.total() > 0.0).map(|l| json!({
                "layer": l.name, "op": l.op,
                "forward": r(l.split.forward), "backward": r(l.split.backward), "update": r(l.split.update),
            })).collect::<Vec<_>>(),
            "eval_samples": self.eval_samples,
            format!("{per}_per_inference"): r(self.per_inference),
            "sram_bytes": m.total(),
            "static_ram_bytes": m.static_bytes,
            "arena_bytes": m.arena_bytes,
            "arena_tensor_bytes": m.tensor_bytes,
            "arena_state_bytes": m.state_bytes,
            "other_static_bytes": m.other_static(),
            "peak_stack_bytes": m.peak_stack_bytes,
            "flash_bytes": f.flash_bytes(),
            "code_bytes": f.code_bytes,
            "constant_bytes": f.const_bytes,
            "plan_file_bytes": self.plan_file_bytes,
            "data_bytes": f.data_bytes,
            "sram_budget_bytes": self.budget.sram_bytes,
            "flash_budget_bytes": self.budget.flash_bytes,
        })
    }
}
