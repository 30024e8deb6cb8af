//! Tensor lifetimes over a step list, and the lower bound of any arena for them.
//!
//! A step's inputs, outputs and scratch are live together during the step, so a tensor is
//! live from the first step that touches it to the last (inclusive). Persistent tensors
//! (trained parameters, optimizer state, gradient accumulators at batch > 1) are live over the
//! whole plan, and flash tensors take no arena space.

use super::{aligned, Placement, PlanTensor, Step, TensorId};

/// Steps `first..=last` during which a tensor must keep its bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lifetime {
    /// First step that writes or reads it.
    pub first: usize,
    /// Last step that reads or writes it.
    pub last: usize,
}

impl Lifetime {
    /// True when the tensor is live during `step`.
    pub fn contains(&self, step: usize) -> bool {
        self.first <= step && step <= self.last
    }

    /// True when both are live during some step.
    pub fn overlaps(&self, other: &Lifetime) -> bool {
        self.first <= other.last && other.first <= self.last
    }
}

/// The tensors a step touches: reads, writes and scratch.
pub fn touched(step: &Step) -> impl Iterator<Item = TensorId> + '_ {
    step.reads
        .iter()
        .chain(&step.writes)
        .copied()
        .chain(step.scratch)
}

/// Lifetime of every arena tensor (`None` for flash tensors and for tensors no step touches).
pub fn lifetimes(tensors: &[PlanTensor], steps: &[Step]) -> Vec<Option<Lifetime>> {
    let mut lives: Vec<Option<Lifetime>> = vec![None; tensors.len()];
    for (index, step) in steps.iter().enumerate() {
        for id in touched(step) {
            let life = lives[id].get_or_insert(Lifetime {
                first: index,
                last: index,
            });
            life.last = index;
        }
    }
    for (life, tensor) in lives.iter_mut().zip(tensors) {
        if tensor.placement == Placement::Flash {
            *life = None;
        } else if tensor.persistent && !steps.is_empty() {
            *life = Some(Lifetime {
                first: 0,
                last: steps.len() - 1,
            });
        }
    }
    lives
}

/// Aligned bytes live during each of `step_count` steps.
pub fn live_bytes(
    tensors: &[PlanTensor],
    lifetimes: &[Option<Lifetime>],
    step_count: usize,
) -> Vec<usize> {
    let mut live = vec![0usize; step_count];
    for (tensor, life) in tensors.iter().zip(lifetimes) {
        if let Some(life) = life {
            for bytes in &mut live[life.first..=life.last] {
                *bytes += aligned(tensor.bytes);
            }
        }
    }
    live
}

/// `(bytes, step)`: the most aligned bytes live during one step, and the first step where it
/// happens. No arena holding these tensors can be smaller.
pub fn lower_bound(
    tensors: &[PlanTensor],
    lifetimes: &[Option<Lifetime>],
    step_count: usize,
) -> (usize, usize) {
    live_bytes(tensors, lifetimes, step_count)
        .into_iter()
        .enumerate()
        .fold(
            (0, 0),
            |best, (step, bytes)| {
                if bytes > best.0 {
                    (bytes, step)
                } else {
                    best
                }
            },
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::{Category, StepOp, TensorRole};

    fn tensor(bytes: usize, persistent: bool) -> PlanTensor {
        PlanTensor {
            role: TensorRole::Activation,
            index: 0,
            category: Category::ForwardActivation,
            layer: None,
            bytes,
            flash_bytes: 0,
            persistent,
            placement: Placement::Arena { offset: 0 },
        }
    }

    fn step(reads: Vec<TensorId>, writes: Vec<TensorId>) -> Step {
        Step {
            op: StepOp::Forward,
            layer: Some(0),
            reads,
            writes,
            scratch: None,
        }
    }

    #[test]
    fn lifetimes_span_first_to_last_touch() {
        // t0 -> t1 -> t2, t0 read again at step 2; t3 persistent; t4 never touched.
        let tensors = vec![
            tensor(10, false),
            tensor(4, false),
            tensor(8, false),
            tensor(3, true),
            tensor(5, false),
        ];
        let steps = vec![
            step(vec![], vec![0]),
            step(vec![0], vec![1]),
            step(vec![1, 0], vec![2]),
        ];
        let lives = lifetimes(&tensors, &steps);
        assert_eq!(lives[0], Some(Lifetime { first: 0, last: 2 }));
        assert_eq!(lives[1], Some(Lifetime { first: 1, last: 2 }));
        assert_eq!(lives[2], Some(Lifetime { first: 2, last: 2 }));
        assert_eq!(lives[3], Some(Lifetime { first: 0, last: 2 }));
        assert_eq!(lives[4], None);
        // Aligned: 12 + 4 + 8 + 4 at step 2.
        assert_eq!(live_bytes(&tensors, &lives, 3), vec![16, 20, 28]);
        assert_eq!(lower_bound(&tensors, &lives, 3), (28, 2));
    }
}
