//! The memory report of a [`TrainingPlan`]: the arena's peak, the lower bound and the step
//! where it is reached, the bytes live at that step per category and per layer (both sum to
//! the lower bound), the biggest contributors, the flash bytes of the parameters, and what the
//! memory-saving steps save (row-streamed chains, clamp masks).
//!
//! All figures are analytic: computed from tensor sizes and lifetimes, not measured on a
//! device. KB are 1024 bytes.

use super::liveness::{lifetimes, live_bytes};
use super::{aligned, Category, PlanTensor, StepOp, TensorRole, TrainingPlan};
use crate::model::Architecture;
use crate::report::table;
use serde_json::{json, Value};

/// One layer's share of the bytes live at the peak step.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerRow {
    /// Layer name (`input` for the model input).
    pub name: String,
    /// Operator name.
    pub op: String,
    /// What the layer trains, e.g. `w 1/4 + b`, `b`, or `-`.
    pub trains: String,
    /// Aligned bytes of all the layer's SRAM tensors over the whole plan (not all live at
    /// once), per [`Category::SRAM`].
    pub tensors: [usize; 6],
    /// Aligned bytes of the layer's tensors live at the peak step, per [`Category::SRAM`].
    pub at_peak: [usize; 6],
}

impl LayerRow {
    /// Sum over the categories.
    pub fn total(&self) -> usize {
        self.at_peak.iter().sum()
    }
}

/// A chain of layers computed by one row-streamed forward step.
#[derive(Clone, Debug, PartialEq)]
pub struct StreamedChain {
    /// `first..last` layer names.
    pub layers: String,
    /// Number of layers.
    pub count: usize,
    /// Bytes of its row windows (the step's scratch).
    pub window_bytes: usize,
    /// Bytes of the intermediate activations it never stores.
    pub activation_bytes: usize,
}

/// The memory report.
#[derive(Clone, Debug, PartialEq)]
pub struct MemoryReport {
    /// Arena bytes the plan needs (its exact SRAM peak).
    pub peak_bytes: usize,
    /// Most aligned bytes live at one step; no arena can be smaller.
    pub lower_bound_bytes: usize,
    /// The step where the lower bound is reached.
    pub peak_step: usize,
    /// Steps in the plan.
    pub step_count: usize,
    /// What runs at the peak step, e.g. `weight gradient of block16.expand`.
    pub peak_step_name: String,
    /// Most aligned bytes live during the forward pass (trained parameters included): the
    /// floor that no backward pruning or reordering can lower.
    pub forward_bytes: usize,
    /// Aligned bytes live at the peak step per [`Category::SRAM`] (sums to the lower bound).
    pub categories: [usize; 6],
    /// Per layer, in model order (sums to the lower bound).
    pub layers: Vec<LayerRow>,
    /// The largest tensors live at the peak step: (description, aligned bytes), largest first.
    pub contributors: Vec<(String, usize)>,
    /// The row-streamed chains, in step order.
    pub streamed: Vec<StreamedChain>,
    /// Activations kept for the backward pass as clamp masks: `(count, mask bytes, bytes of
    /// the activations they replace)`.
    pub clamp_masks: (usize, usize, usize),
    /// Frozen weights and biases, read in place from flash.
    pub flash_frozen_bytes: usize,
    /// Initial values of the trained weights and biases, copied from flash to SRAM at start.
    pub flash_trained_bytes: usize,
    /// Summary of the plan's settings: precision, batch, reordering.
    pub precision: &'static str,
    /// Samples per update.
    pub batch: usize,
    /// Operator reordering on.
    pub reorder: bool,
}

impl MemoryReport {
    /// Flash bytes of weights and constants (code size is not included).
    pub fn flash_bytes(&self) -> usize {
        self.flash_frozen_bytes + self.flash_trained_bytes
    }

    /// Relative distance of the peak from the lower bound, `peak / bound - 1`.
    pub fn distance(&self) -> f64 {
        if self.lower_bound_bytes == 0 {
            0.0
        } else {
            self.peak_bytes as f64 / self.lower_bound_bytes as f64 - 1.0
        }
    }

    /// Build the report of `plan` compiled from `arch`.
    pub fn new(arch: &Architecture, plan: &TrainingPlan) -> Self {
        let lives = lifetimes(&plan.tensors, &plan.steps);
        let live = live_bytes(&plan.tensors, &lives, plan.steps.len());
        let peak_step = live
            .iter()
            .enumerate()
            .max_by_key(|&(step, bytes)| (*bytes, usize::MAX - step))
            .map_or(0, |(step, _)| step);
        let at_peak: Vec<&PlanTensor> = plan
            .tensors
            .iter()
            .zip(&lives)
            .filter(|(_, life)| life.is_some_and(|l| l.contains(peak_step)))
            .map(|(t, _)| t)
            .collect();
        let category_index = |c: Category| {
            Category::SRAM
                .iter()
                .position(|&s| s == c)
                .expect("arena tensors have an SRAM category")
        };
        let mut categories = [0usize; 6];
        let resolved = arch.resolved(1).unwrap_or_default();
        let mut layers: Vec<LayerRow> = std::iter::once(LayerRow {
            name: "input".into(),
            op: "input".into(),
            trains: "-".into(),
            tensors: [0; 6],
            at_peak: [0; 6],
        })
        .chain(
            arch.layers
                .iter()
                .zip(&plan.updates)
                .enumerate()
                .map(|(i, (l, u))| {
                    let channels = resolved
                        .get(i)
                        .and_then(|r| r.params())
                        .map_or(0, |p| p.channels);
                    LayerRow {
                        name: l.name.clone(),
                        op: l.kind.name().into(),
                        trains: trains_label(u.weight_channels, u.bias, channels),
                        tensors: [0; 6],
                        at_peak: [0; 6],
                    }
                }),
        )
        .collect();
        for (t, life) in plan.tensors.iter().zip(&lives) {
            if let Some(life) = life {
                let (c, row) = (category_index(t.category), t.layer.map_or(0, |l| l + 1));
                layers[row].tensors[c] += aligned(t.bytes);
                if life.contains(peak_step) {
                    categories[c] += aligned(t.bytes);
                    layers[row].at_peak[c] += aligned(t.bytes);
                }
            }
        }
        let mut contributors: Vec<(String, usize)> = at_peak
            .iter()
            .map(|t| (describe(arch, plan, t), aligned(t.bytes)))
            .collect();
        contributors.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        // Flash bytes of trained parameters beyond their SRAM copy are frozen channels.
        let trained_bytes: usize = plan
            .tensors
            .iter()
            .filter(|t| t.category == Category::TrainedWeight)
            .map(|t| t.bytes)
            .sum();
        let flash_frozen_bytes = plan.flash_bytes() - trained_bytes;
        let peak_step_name = step_name(arch, plan, peak_step);
        let element = plan.precision.element_bytes();
        let shapes = arch.shapes().unwrap_or_default();
        let activation_bytes =
            |t: usize| shapes.get(t).map_or(0, |s| crate::model::numel(*s)) * element;
        let streamed = plan
            .steps
            .iter()
            .enumerate()
            .filter(|(_, s)| s.op == StepOp::StreamedForward)
            .map(|(index, s)| {
                let (first, last) = chain_layers(plan, index);
                StreamedChain {
                    layers: format!("{}..{}", arch.layers[first].name, arch.layers[last].name),
                    count: last - first + 1,
                    window_bytes: s.scratch.map_or(0, |id| plan.tensors[id].bytes),
                    activation_bytes: (first + 1..=last).map(activation_bytes).sum(),
                }
            })
            .collect();
        let clamp_masks = plan
            .tensors
            .iter()
            .filter(|t| t.role == TensorRole::ClampMask)
            .map(|t| (t.bytes, activation_bytes(t.index)))
            .fold((0, 0, 0), |(n, bits, whole), (b, w)| {
                (n + 1, bits + b, whole + w)
            });
        let forward_bytes = live
            .iter()
            .zip(&plan.steps)
            .filter(|(_, s)| !s.op.is_backward())
            .map(|(bytes, _)| *bytes)
            .max()
            .unwrap_or(0);
        MemoryReport {
            peak_bytes: plan.arena_bytes,
            lower_bound_bytes: plan.lower_bound_bytes,
            peak_step,
            step_count: plan.steps.len(),
            peak_step_name,
            forward_bytes,
            categories,
            layers,
            contributors,
            streamed,
            clamp_masks,
            flash_frozen_bytes,
            flash_trained_bytes: trained_bytes,
            precision: plan.precision.name(),
            batch: plan.batch,
            reorder: plan.reorder,
        }
    }

    /// The readable report.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let push = |out: &mut String, line: String| {
            out.push_str(&line);
            out.push('\n');
        };
        push(
            &mut out,
            format!(
                "{} training plan, batch {}, operator reordering {}",
                self.precision,
                self.batch,
                if self.reorder { "on" } else { "off" }
            ),
        );
        push(
            &mut out,
            "analytic figures: planned from tensor sizes and lifetimes, not measured on a device (KB = 1024 B)".into(),
        );
        push(
            &mut out,
            format!(
                "peak SRAM (arena): {} ; lower bound {} ; planner distance {:+.2}%",
                kb(self.peak_bytes),
                kb(self.lower_bound_bytes),
                100.0 * self.distance()
            ),
        );
        push(
            &mut out,
            format!(
                "most bytes live at step {} of {}: {} ; the forward pass alone needs {}",
                self.peak_step + 1,
                self.step_count,
                self.peak_step_name,
                kb(self.forward_bytes)
            ),
        );
        let rows: Vec<Vec<String>> = Category::SRAM
            .iter()
            .zip(self.categories)
            .map(|(c, bytes)| vec![c.name().replace('_', " "), kb(bytes)])
            .chain(std::iter::once(vec![
                "total (lower bound)".to_string(),
                kb(self.categories.iter().sum()),
            ]))
            .collect();
        push(&mut out, table(&["live at that step", "bytes"], &rows));
        push(
            &mut out,
            format!(
                "flash: {} frozen weights and biases + {} initial values of the trained ones = {} (weights and constants only; code size not known yet)",
                kb(self.flash_frozen_bytes),
                kb(self.flash_trained_bytes),
                kb(self.flash_bytes())
            ),
        );
        push(
            &mut out,
            format!("biggest contributors: {}", self.contributors_text(5)),
        );
        if !self.streamed.is_empty() {
            let chains: Vec<String> = self
                .streamed
                .iter()
                .map(|c| {
                    format!(
                        "{} ({} layers, {} of row windows for {} of activations)",
                        c.layers,
                        c.count,
                        kb(c.window_bytes),
                        kb(c.activation_bytes)
                    )
                })
                .collect();
            push(
                &mut out,
                format!(
                    "row-streamed forward, intermediate activations never stored: {}",
                    chains.join(", ")
                ),
            );
        }
        let (masks, mask_bytes, replaced) = self.clamp_masks;
        if masks > 0 {
            push(
                &mut out,
                format!(
                    "clamp masks: {masks} activations kept for the backward pass as 1-bit masks, {} instead of {}",
                    kb(mask_bytes),
                    kb(replaced)
                ),
            );
        }
        let rows: Vec<Vec<String>> = self
            .layers
            .iter()
            .map(|r| {
                let mut row = vec![r.name.clone(), r.op.clone(), r.trains.clone()];
                row.extend(r.tensors.iter().map(|&b| bytes_or_dash(b)));
                row.push(bytes_or_dash(r.total()));
                row
            })
            .collect();
        push(
            &mut out,
            "per layer: bytes of its SRAM tensors over the whole plan (not all live at once), and its share of the peak step".into(),
        );
        push(
            &mut out,
            table(
                &[
                    "layer",
                    "op",
                    "trains",
                    "saved act",
                    "fwd act",
                    "errors",
                    "weights",
                    "grad+state",
                    "scratch",
                    "at peak",
                ],
                &rows,
            ),
        );
        out
    }

    /// The `count` biggest contributors as one line.
    pub fn contributors_text(&self, count: usize) -> String {
        self.contributors
            .iter()
            .take(count)
            .map(|(what, bytes)| format!("{what} {}", kb(*bytes)))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The report as JSON (`peak_bytes`, `lower_bound_bytes`, `flash_bytes` and the rest).
    pub fn json(&self) -> Value {
        let layers: Vec<Value> = self
            .layers
            .iter()
            .map(|r| {
                json!({"name": r.name, "op": r.op, "trains": r.trains, "tensors": by_category(r.tensors), "at_peak": by_category(r.at_peak), "at_peak_total": r.total()})
            })
            .collect();
        json!({
            "analytic": true,
            "note": "planned from tensor sizes and lifetimes, not measured on a device; flash counts weights and constants only, not code",
            "precision": self.precision,
            "batch": self.batch,
            "reorder": self.reorder,
            "peak_bytes": self.peak_bytes,
            "lower_bound_bytes": self.lower_bound_bytes,
            "distance": self.distance(),
            "peak_step": {"index": self.peak_step, "of": self.step_count, "what": self.peak_step_name},
            "forward_bytes": self.forward_bytes,
            "categories_at_peak": by_category(self.categories),
            "flash_bytes": self.flash_bytes(),
            "flash_frozen_bytes": self.flash_frozen_bytes,
            "flash_trained_initial_bytes": self.flash_trained_bytes,
            "contributors": self.contributors.iter().take(10).map(|(w, b)| json!({"tensor": w, "bytes": b})).collect::<Vec<_>>(),
            "streamed_chains": self.streamed.iter().map(|c| json!({"layers": c.layers, "count": c.count, "window_bytes": c.window_bytes, "activation_bytes": c.activation_bytes})).collect::<Vec<_>>(),
            "clamp_masks": {"count": self.clamp_masks.0, "bytes": self.clamp_masks.1, "activation_bytes": self.clamp_masks.2},
            "layers": layers,
        })
    }
}

/// `12.3 KB (12 595 B)`.
pub fn kb(bytes: usize) -> String {
    format!("{:.1} KB ({bytes} B)", bytes as f64 / 1024.0)
}

/// `{"saved_activations": bytes, ...}` in [`Category::SRAM`] order.
fn by_category(bytes: [usize; 6]) -> Value {
    Category::SRAM
        .iter()
        .zip(bytes)
        .map(|(c, b)| (c.name().to_string(), json!(b)))
        .collect::<serde_json::Map<String, Value>>()
        .into()
}

fn bytes_or_dash(bytes: usize) -> String {
    if bytes == 0 {
        "-".into()
    } else {
        bytes.to_string()
    }
}

/// `w 1/4 + b`, `w + b`, `b`, `w 3/40` or `-`, for a layer of `out_channels` channels.
fn trains_label(weight_channels: usize, bias: bool, out_channels: usize) -> String {
    let weight = match weight_channels {
        0 => None,
        c if c == out_channels => Some("w".to_string()),
        c => Some(format!("w {c}/{out_channels}")),
    };
    match (weight, bias) {
        (None, false) => "-".into(),
        (None, true) => "b".into(),
        (Some(w), false) => w,
        (Some(w), true) => format!("{w} + b"),
    }
}

/// The first and last layer of the row-streamed forward step `step`.
fn chain_layers(plan: &TrainingPlan, step: usize) -> (usize, usize) {
    let s = &plan.steps[step];
    let first = s.layer.unwrap_or(0);
    let last = match s.writes.first().map(|&id| &plan.tensors[id]) {
        Some(t) if t.role == TensorRole::Activation && t.index > first => t.index - 1,
        _ => first,
    };
    (first, last)
}

/// What a tensor holds, in words.
fn describe(arch: &Architecture, plan: &TrainingPlan, t: &PlanTensor) -> String {
    let layer = |l: usize| arch.layers[l].name.as_str();
    let tensor = |i: usize| match i {
        0 => "the input".to_string(),
        i => format!("output of {}", layer(i - 1)),
    };
    let i = t.index;
    match t.role {
        TensorRole::Activation => match t.category {
            Category::SavedActivation => format!("saved activation ({})", tensor(i)),
            _ => format!("activation ({})", tensor(i)),
        },
        TensorRole::Error => format!("error of {}", tensor(i)),
        TensorRole::ErrorPart => format!("error part of {}", tensor(i)),
        TensorRole::Weight => format!("weights of {}", layer(i)),
        TensorRole::Bias => format!("bias of {}", layer(i)),
        TensorRole::WeightGrad => format!("weight gradient of {}", layer(i)),
        TensorRole::BiasGrad => format!("bias gradient of {}", layer(i)),
        TensorRole::OptimizerState => format!("optimizer state of {}", layer(i)),
        TensorRole::BiasOptimizerState => format!("bias velocity of {}", layer(i)),
        TensorRole::Scratch => match plan.steps[i].op {
            StepOp::StreamedForward => {
                let (first, last) = chain_layers(plan, i);
                format!("row windows of {}..{}", layer(first), layer(last))
            }
            _ => format!("scratch of step {i}"),
        },
        TensorRole::ClampMask => format!("clamp mask ({})", tensor(i)),
    }
}

/// What step `step` of `plan` runs, e.g. `weight gradient of block16.expand` or
/// `row-streamed forward of stem..block2.project`.
pub fn step_name(arch: &Architecture, plan: &TrainingPlan, step: usize) -> String {
    let s = &plan.steps[step];
    if s.op == StepOp::StreamedForward {
        let (first, last) = chain_layers(plan, step);
        return format!(
            "{} of {}..{}",
            s.op.name(),
            arch.layers[first].name,
            arch.layers[last].name
        );
    }
    match s.layer {
        Some(l) => format!("{} of {}", s.op.name(), arch.layers[l].name),
        None => s.op.name().to_string(),
    }
}
