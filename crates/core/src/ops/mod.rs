//! Operators: one module per operator, with the float and the 8-bit form of `forward` and of
//! every backward side by side.
//!
//! Conventions shared by all operators:
//! - `forward` and `input_backward` overwrite their output slice;
//! - `weight_backward` and `bias_backward` *add* into the gradient slice, so that a
//!   mini-batch accumulates (the caller zeroes it at the start of a batch);
//! - a backward that takes a [`ChannelSet`] only touches the listed output channels
//!   (structures): skipped channels cost no arithmetic, which is what makes dynamic partial
//!   updates and sparse updates fast; input errors are computed from the listed channels only;
//! - slices are checked with `debug_assert!`; shapes are validated once, when a model or plan
//!   is built, with each geometry's `validate`.

pub mod activation;
pub mod add;
pub mod arith;
#[cfg(test)]
pub(crate) mod contract;
pub mod conv2d;
pub mod conv_transpose2d;
pub mod flatten;
pub mod linear;
pub mod loss;
pub mod operator;
pub mod pool;
pub mod stream;
pub mod weighted;

/// Which output channels (structures) of a layer a backward step works on.
#[derive(Clone, Copy, Debug)]
pub enum ChannelSet<'a> {
    /// Every output channel.
    All,
    /// Only these output channels, each `< out_channels`, without repeats.
    Subset(&'a [u16]),
}

impl<'a> ChannelSet<'a> {
    /// Iterate the selected channel indices of a layer with `count` output channels.
    pub fn iter(&self, count: usize) -> ChannelIter<'a> {
        match *self {
            ChannelSet::All => ChannelIter::All(0..count),
            ChannelSet::Subset(list) => ChannelIter::Subset(list.iter()),
        }
    }

    /// Number of selected channels out of `count`.
    pub fn len(&self, count: usize) -> usize {
        match *self {
            ChannelSet::All => count,
            ChannelSet::Subset(list) => list.len(),
        }
    }

    /// True when no channel is selected.
    pub fn is_empty(&self, count: usize) -> bool {
        self.len(count) == 0
    }

    /// The selected channels inside `group` (a channel group of a grouped convolution), in
    /// ascending order for `All` and in list order for a subset.
    pub fn within(
        self,
        group: core::ops::Range<usize>,
    ) -> impl Iterator<Item = usize> + Clone + 'a {
        let (all, list): (core::ops::Range<usize>, &[u16]) = match self {
            ChannelSet::All => (group.clone(), &[]),
            ChannelSet::Subset(list) => (0..0, list),
        };
        let selected = list.iter().map(|&c| c as usize);
        all.chain(selected.filter(move |c| group.contains(c)))
    }
}

/// Iterator over the channels of a [`ChannelSet`].
pub enum ChannelIter<'a> {
    /// `0..count`.
    All(core::ops::Range<usize>),
    /// An explicit list.
    Subset(core::slice::Iter<'a, u16>),
}

impl Iterator for ChannelIter<'_> {
    type Item = usize;
    fn next(&mut self) -> Option<usize> {
        match self {
            ChannelIter::All(r) => r.next(),
            ChannelIter::Subset(it) => it.next().map(|&c| c as usize),
        }
    }
}

/// A weight tensor `[structures][structure_len]` held in two parts: the first structures in
/// `head`, the others in `tail`. When only some output channels of a layer train, the trained
/// ones live in SRAM and the frozen ones stay in flash; a whole tensor is `head` alone.
#[derive(Clone, Copy, Debug)]
pub struct WeightParts<'a, X> {
    /// The first structures.
    pub head: &'a [X],
    /// The remaining structures.
    pub tail: &'a [X],
}

impl<'a, X> WeightParts<'a, X> {
    /// One slice holding every structure.
    pub fn whole(weight: &'a [X]) -> Self {
        WeightParts {
            head: weight,
            tail: &[],
        }
    }

    /// Weights in both parts.
    pub fn len(&self) -> usize {
        self.head.len() + self.tail.len()
    }

    /// True without weights.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Structure `s` of `structure_len` weights (a structure lies in one part, since `head`
    /// holds whole structures).
    #[inline(always)]
    pub fn structure(&self, s: usize, structure_len: usize) -> &'a [X] {
        let start = s * structure_len;
        match start.checked_sub(self.head.len()) {
            None => &self.head[start..start + structure_len],
            Some(at) => &self.tail[at..at + structure_len],
        }
    }
}

/// Why an operator geometry is unusable. Small and non-exhaustive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum OpError {
    /// A size is zero where it must be positive.
    ZeroSize,
    /// Channels are not divisible by the number of groups.
    BadGroups,
    /// The kernel (after padding) is larger than the input.
    KernelTooLarge,
    /// A slice has the wrong length for the geometry.
    LengthMismatch,
    /// Layers do not form a streamed chain (count, batch, or a stage's input shape).
    BadChain,
    /// A size derived from the geometry (elements, weights, multiply-accumulates) does not
    /// fit a `usize`.
    Overflow,
}

/// The product of `dims`, or [`OpError::Overflow`] when it does not fit a `usize`.
pub fn checked_product(dims: &[usize]) -> Result<usize, OpError> {
    dims.iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or(OpError::Overflow)
}

impl core::fmt::Display for OpError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            OpError::ZeroSize => "a dimension is zero",
            OpError::BadGroups => "channels are not divisible by the number of groups",
            OpError::KernelTooLarge => "the kernel is larger than the padded input",
            OpError::LengthMismatch => "a buffer length does not match the shape",
            OpError::BadChain => "the layers do not form a streamed chain",
            OpError::Overflow => "a size derived from the geometry overflows",
        })
    }
}

impl core::error::Error for OpError {}
