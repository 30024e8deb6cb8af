//! Kernel self-test: a job format shared by the host and the firmware, and the one runner.
//!
//! A [`SelfTest`] holds the inputs of three cases: the 8-bit convolution (forward, input error,
//! weight and bias gradient), the float fully connected layer (forward, input error, weight and
//! bias gradient) and the fully quantized weight update ([`update::fqt_update_weights`]). The
//! host encodes it with [`SelfTest::encode`] and sends the bytes to the firmware (through
//! semihosting, the stand-in for a sensor); both sides decode the same bytes with
//! [`Store::load`], call [`run`] and write the [`Results`] with [`Results::encode`]. The host
//! twin and the microcontroller thus execute the same code on the same bytes, and their result
//! bytes must be identical. A [`Probe`] wraps every kernel call: the firmware counts
//! instructions there, the host passes [`NoProbe`].
//!
//! Format, little endian without padding. `qparams` is `scale: f32, zero_point: i32`;
//! `channels` is a `u16` count then that many `u16` indices, or the count `0xFFFF` alone for
//! every channel ([`ChannelSet::All`]); tensor lengths follow from the geometry:
//! ```text
//! job     = "MCTJ" version:u16 conv linear update
//! conv    = batch in_c in_h in_w out_c k_h k_w stride_h stride_w pad_h pad_w groups   (u32 each)
//!           input_q  weight_q_count:u16 weight_q*  bias_scale:f32  output_q
//!           activation:u8 (0 none, 1 relu, 2 relu6)  out_err_q  in_err_q  channels
//!           input:i8[input_len] weight:i8[weight_len] bias:i32[out_c] out_err:i8[output_len]
//! linear  = batch in_features out_features (u32 each)  channels
//!           input:f32[input_len] weight:f32[weight_len] bias:f32[out] out_err:f32[output_len]
//! update  = structures:u16 structure_len:u32 channels weights:i8[structures*structure_len]
//!           weight_q range:(min:f32 max:f32 initialized:u8) grads:f32[weights]
//!           stats:(mean:f32 var:f32 initialized:u8)[structures]
//!           lr stats_rate range_rate eps (f32 each)
//! results = "MCTR" version:u16 (tag:u8 byte_len:u32 payload)*   one block per Output, in order
//! ```
//! Decoding validates everything the kernels assume (geometry, quantization parameters,
//! channel indices, accumulator limits), so a decoded job runs without panicking.
//!
//! Memory: a [`Store`] (about 27 KB) holds the decoded inputs and the results; [`run`] needs
//! no scratch and the codec only a few words of stack.

use crate::codec;
use crate::ops::activation::Activation;
use crate::ops::arith::QLayerParams;
use crate::ops::conv2d::{Conv2dGeom, Conv2dLayer};
use crate::ops::linear::{LinearGeom, LinearLayer};
use crate::ops::operator::Parametric;
use crate::ops::weighted::WeightedKernels;
use crate::ops::{ChannelSet, OpError, WeightParts};
use crate::quant::{QParams, QTensor, RangeEma, RealRange, Q_MAX, Q_MIN};
use crate::update::{self, FqtUpdateConfig, GradStats};

/// First bytes of an encoded job.
pub const JOB_MAGIC: [u8; 4] = *b"MCTJ";
/// First bytes of encoded results.
pub const RESULTS_MAGIC: [u8; 4] = *b"MCTR";
/// Format version of jobs and results.
pub const VERSION: u16 = 1;
/// Most output channels of the convolution and most structures of the update.
pub const MAX_CHANNELS: usize = 64;
/// Largest value of one geometry field (keeps every product of four fields in `u64` and every
/// length check exact on a 32-bit target).
pub const MAX_DIM: usize = 65_535;
/// Most products in one 8-bit accumulator sum (`33 025 * 255^2 < 2^31`), the kernels' limit.
pub const MAX_TERMS: usize = crate::ops::arith::MAX_ACCUMULATED_TERMS;
/// Largest encoded job a device accepts (the firmware's input buffer).
pub const MAX_JOB_BYTES: usize = 16 * 1024;
/// Largest encoded results a device writes (the firmware's output buffer).
pub const MAX_RESULTS_BYTES: usize = 16 * 1024;
/// Count that encodes [`ChannelSet::All`].
const ALL_CHANNELS: u16 = u16::MAX;

/// Why a job (or results) could not be encoded or decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SelfTestError {
    /// The bytes end inside a field.
    Truncated,
    /// The bytes do not start with the expected magic.
    BadMagic,
    /// The format version is not [`VERSION`].
    UnsupportedVersion(u16),
    /// Bytes are left after the last field.
    TrailingBytes,
    /// A geometry the kernels cannot run.
    Geometry(OpError),
    /// A field is out of its valid range; the text names it.
    Invalid(&'static str),
    /// The job does not fit the [`Store`].
    OutOfMemory,
    /// The output buffer is too small for the encoding.
    BufferTooSmall,
}

impl From<OpError> for SelfTestError {
    fn from(e: OpError) -> Self {
        SelfTestError::Geometry(e)
    }
}

impl core::fmt::Display for SelfTestError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            SelfTestError::Truncated => f.write_str("the self-test bytes end inside a field"),
            SelfTestError::BadMagic => f.write_str("not a self-test encoding (bad magic)"),
            SelfTestError::UnsupportedVersion(v) => {
                write!(f, "self-test format version {v}, expected {VERSION}")
            }
            SelfTestError::TrailingBytes => f.write_str("bytes left after the self-test job"),
            SelfTestError::Geometry(e) => write!(f, "self-test geometry: {e}"),
            SelfTestError::Invalid(what) => write!(f, "self-test field out of range: {what}"),
            SelfTestError::OutOfMemory => f.write_str("the self-test job does not fit the store"),
            SelfTestError::BufferTooSmall => f.write_str("the output buffer is too small"),
        }
    }
}

impl core::error::Error for SelfTestError {}

/// Inputs of the 8-bit convolution case.
#[derive(Clone, Copy, Debug)]
pub struct ConvCase<'a> {
    /// Geometry.
    pub geom: Conv2dGeom,
    /// Quantization of input, weights (1 or `out_channels` entries), bias and output.
    pub layer: QLayerParams<'a>,
    /// Quantization of the output error.
    pub out_err_q: QParams,
    /// Quantization of the input error.
    pub in_err_q: QParams,
    /// Output channels of the three backward calls.
    pub channels: ChannelSet<'a>,
    /// Input codes, `[batch][in_c][in_h][in_w]`.
    pub input: &'a [i8],
    /// Weight codes, `[out_c][in_c / groups][k_h][k_w]`.
    pub weight: &'a [i8],
    /// Bias in units of `layer.bias_scale`, `[out_c]`.
    pub bias: &'a [i32],
    /// Output error codes, `[batch][out_c][out_h][out_w]`.
    pub out_err: &'a [i8],
}

/// Inputs of the float fully connected case.
#[derive(Clone, Copy, Debug)]
pub struct LinearCase<'a> {
    /// Geometry.
    pub geom: LinearGeom,
    /// Outputs of the three backward calls.
    pub channels: ChannelSet<'a>,
    /// `[batch][in_features]`.
    pub input: &'a [f32],
    /// `[out_features][in_features]`.
    pub weight: &'a [f32],
    /// `[out_features]`.
    pub bias: &'a [f32],
    /// `[batch][out_features]`.
    pub out_err: &'a [f32],
}

/// Inputs (the initial state) of the fully quantized update case.
#[derive(Clone, Copy, Debug)]
pub struct UpdateCase<'a> {
    /// Weight codes, `[structures][structure_len]`.
    pub weights: &'a [i8],
    /// Per-tensor quantization of `weights`.
    pub weight_q: QParams,
    /// Moving weight range.
    pub range: RangeEma,
    /// Weight gradient, like `weights`.
    pub grads: &'a [f32],
    /// Weights per structure.
    pub structure_len: usize,
    /// Structures to update.
    pub channels: ChannelSet<'a>,
    /// Gradient statistics, one per structure.
    pub stats: &'a [GradStats],
    /// Hyper-parameters.
    pub config: FqtUpdateConfig,
}

/// One self-test job: the inputs of every case.
#[derive(Clone, Copy, Debug)]
pub struct SelfTest<'a> {
    /// 8-bit convolution.
    pub conv: ConvCase<'a>,
    /// Float fully connected layer.
    pub linear: LinearCase<'a>,
    /// Fully quantized weight update.
    pub update: UpdateCase<'a>,
}

/// Everything a self-test computes. Gradients start at zero, the update state at the job's.
#[derive(Debug)]
pub struct Results<'a> {
    /// `Conv2dGeom::forward_q` output codes.
    pub conv_output: &'a mut [i8],
    /// `Conv2dGeom::forward_q` real output range.
    pub conv_output_range: RealRange,
    /// `Conv2dGeom::input_backward_q` input error codes.
    pub conv_in_err: &'a mut [i8],
    /// `Conv2dGeom::input_backward_q` real range.
    pub conv_in_err_range: RealRange,
    /// `Conv2dGeom::weight_backward_q` gradient.
    pub conv_weight_grad: &'a mut [f32],
    /// `Conv2dLayer::bias_backward_q` gradient.
    pub conv_bias_grad: &'a mut [f32],
    /// `LinearGeom::forward` output.
    pub linear_output: &'a mut [f32],
    /// `LinearGeom::input_backward` input error.
    pub linear_in_err: &'a mut [f32],
    /// `LinearGeom::weight_backward` gradient.
    pub linear_weight_grad: &'a mut [f32],
    /// `LinearLayer::bias_backward` gradient.
    pub linear_bias_grad: &'a mut [f32],
    /// Weight codes after `update::fqt_update_weights`.
    pub update_weights: &'a mut [i8],
    /// Weight quantization after the update.
    pub update_weight_q: QParams,
    /// Weight range after the update.
    pub update_range: RangeEma,
    /// Gradient statistics after the update.
    pub update_stats: &'a mut [GradStats],
}

/// The blocks of encoded [`Results`], in order; the tag of a block is its index plus one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// [`Results::conv_output`].
    ConvOutput,
    /// [`Results::conv_output_range`].
    ConvOutputRange,
    /// [`Results::conv_in_err`].
    ConvInErr,
    /// [`Results::conv_in_err_range`].
    ConvInErrRange,
    /// [`Results::conv_weight_grad`].
    ConvWeightGrad,
    /// [`Results::conv_bias_grad`].
    ConvBiasGrad,
    /// [`Results::linear_output`].
    LinearOutput,
    /// [`Results::linear_in_err`].
    LinearInErr,
    /// [`Results::linear_weight_grad`].
    LinearWeightGrad,
    /// [`Results::linear_bias_grad`].
    LinearBiasGrad,
    /// [`Results::update_weights`].
    UpdateWeights,
    /// [`Results::update_weight_q`].
    UpdateWeightQ,
    /// [`Results::update_range`].
    UpdateRange,
    /// [`Results::update_stats`].
    UpdateStats,
}

impl Output {
    /// Every block, in encoding order.
    pub const ALL: [Output; 14] = [
        Output::ConvOutput,
        Output::ConvOutputRange,
        Output::ConvInErr,
        Output::ConvInErrRange,
        Output::ConvWeightGrad,
        Output::ConvBiasGrad,
        Output::LinearOutput,
        Output::LinearInErr,
        Output::LinearWeightGrad,
        Output::LinearBiasGrad,
        Output::UpdateWeights,
        Output::UpdateWeightQ,
        Output::UpdateRange,
        Output::UpdateStats,
    ];

    /// Kernel and value, e.g. `"Conv2dGeom::forward_q output"`.
    pub const fn name(self) -> &'static str {
        match self {
            Output::ConvOutput => "Conv2dGeom::forward_q output",
            Output::ConvOutputRange => "Conv2dGeom::forward_q range",
            Output::ConvInErr => "Conv2dGeom::input_backward_q input error",
            Output::ConvInErrRange => "Conv2dGeom::input_backward_q range",
            Output::ConvWeightGrad => "Conv2dGeom::weight_backward_q gradient",
            Output::ConvBiasGrad => "Conv2dLayer::bias_backward_q gradient",
            Output::LinearOutput => "LinearGeom::forward output",
            Output::LinearInErr => "LinearGeom::input_backward input error",
            Output::LinearWeightGrad => "LinearGeom::weight_backward gradient",
            Output::LinearBiasGrad => "LinearLayer::bias_backward gradient",
            Output::UpdateWeights => "update::fqt_update_weights weights",
            Output::UpdateWeightQ => "update::fqt_update_weights qparams",
            Output::UpdateRange => "update::fqt_update_weights range",
            Output::UpdateStats => "update::fqt_update_weights statistics",
        }
    }

    fn tag(self) -> u8 {
        self as u8 + 1
    }
}

/// The kernel calls of [`run`], in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// `Conv2dGeom::forward_q`.
    Conv2dForwardQ,
    /// `Conv2dGeom::input_backward_q`.
    Conv2dInputBackwardQ,
    /// `Conv2dGeom::weight_backward_q`.
    Conv2dWeightBackwardQ,
    /// `Conv2dLayer::bias_backward_q`.
    Conv2dBiasBackwardQ,
    /// `LinearGeom::forward`.
    LinearForward,
    /// `LinearGeom::input_backward`.
    LinearInputBackward,
    /// `LinearGeom::weight_backward`.
    LinearWeightBackward,
    /// `LinearLayer::bias_backward`.
    LinearBiasBackward,
    /// `update::fqt_update_weights`.
    FqtUpdateWeights,
}

impl Kernel {
    /// Every kernel call, in the order [`run`] makes them.
    pub const ALL: [Kernel; 9] = [
        Kernel::Conv2dForwardQ,
        Kernel::Conv2dInputBackwardQ,
        Kernel::Conv2dWeightBackwardQ,
        Kernel::Conv2dBiasBackwardQ,
        Kernel::LinearForward,
        Kernel::LinearInputBackward,
        Kernel::LinearWeightBackward,
        Kernel::LinearBiasBackward,
        Kernel::FqtUpdateWeights,
    ];

    /// Path of the kernel function, e.g. `"Conv2dGeom::forward_q"`.
    pub const fn name(self) -> &'static str {
        match self {
            Kernel::Conv2dForwardQ => "Conv2dGeom::forward_q",
            Kernel::Conv2dInputBackwardQ => "Conv2dGeom::input_backward_q",
            Kernel::Conv2dWeightBackwardQ => "Conv2dGeom::weight_backward_q",
            Kernel::Conv2dBiasBackwardQ => "Conv2dLayer::bias_backward_q",
            Kernel::LinearForward => "LinearGeom::forward",
            Kernel::LinearInputBackward => "LinearGeom::input_backward",
            Kernel::LinearWeightBackward => "LinearGeom::weight_backward",
            Kernel::LinearBiasBackward => "LinearLayer::bias_backward",
            Kernel::FqtUpdateWeights => "update::fqt_update_weights",
        }
    }
}

/// Wraps each kernel call of [`run`] (for example to count its instructions).
pub trait Probe {
    /// Calls `call` once and returns its result.
    fn measure<R>(&mut self, kernel: Kernel, call: impl FnOnce() -> R) -> R;
}

/// A [`Probe`] that only calls.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoProbe;

impl Probe for NoProbe {
    fn measure<R>(&mut self, _kernel: Kernel, call: impl FnOnce() -> R) -> R {
        call()
    }
}

/// Runs every kernel call of the job in [`Kernel::ALL`] order, each through `probe`:
/// the convolution's `forward_q`, `input_backward_q`, `weight_backward_q`, `bias_backward_q`;
/// the fully connected `forward`, `input_backward`, `weight_backward`, `bias_backward`; then
/// `fqt_update_weights` on the update state in `results`. Scratch: none.
pub fn run(job: &SelfTest<'_>, results: &mut Results<'_>, probe: &mut impl Probe) {
    let c = &job.conv;
    let r = results;
    r.conv_output_range = probe.measure(Kernel::Conv2dForwardQ, || {
        let weight = WeightParts::whole(c.weight);
        c.geom
            .forward_q(c.input, weight, c.bias, &c.layer, r.conv_output)
    });
    r.conv_in_err_range = probe.measure(Kernel::Conv2dInputBackwardQ, || {
        let (weight_q, err_q) = (c.layer.weight, c.out_err_q);
        let in_err = &mut *r.conv_in_err;
        let weight = WeightParts::whole(c.weight);
        c.geom.input_backward_q(
            weight, weight_q, c.out_err, err_q, c.channels, c.in_err_q, in_err,
        )
    });
    probe.measure(Kernel::Conv2dWeightBackwardQ, || {
        let (input_q, err_q, grad) = (c.layer.input, c.out_err_q, &mut *r.conv_weight_grad);
        c.geom
            .weight_backward_q(c.input, input_q, c.out_err, err_q, c.channels, grad)
    });
    probe.measure(Kernel::Conv2dBiasBackwardQ, || {
        let layer = Conv2dLayer {
            geom: c.geom,
            activation: c.layer.activation,
        };
        let err = QTensor {
            codes: c.out_err,
            q: c.out_err_q,
        };
        layer.bias_backward_q(err, c.channels, r.conv_bias_grad)
    });

    let l = &job.linear;
    probe.measure(Kernel::LinearForward, || {
        l.geom.forward(l.input, l.weight, l.bias, r.linear_output)
    });
    probe.measure(Kernel::LinearInputBackward, || {
        l.geom
            .input_backward(l.weight, l.out_err, l.channels, r.linear_in_err)
    });
    probe.measure(Kernel::LinearWeightBackward, || {
        let grad = &mut *r.linear_weight_grad;
        l.geom.weight_backward(l.input, l.out_err, l.channels, grad)
    });
    probe.measure(Kernel::LinearBiasBackward, || {
        let layer = LinearLayer {
            geom: l.geom,
            activation: Activation::None,
        };
        layer.bias_backward(l.out_err, l.channels, r.linear_bias_grad)
    });

    let u = &job.update;
    probe.measure(Kernel::FqtUpdateWeights, || {
        update::fqt_update_weights(
            r.update_weights,
            &mut r.update_weight_q,
            &mut r.update_range,
            u.grads,
            u.structure_len,
            u.channels,
            r.update_stats,
            &u.config,
        )
    });
}

impl SelfTest<'_> {
    /// Bytes of [`SelfTest::encode`]'s output.
    pub fn encoded_len(&self) -> Result<usize, SelfTestError> {
        let mut counter = Counter(0);
        self.write(&mut counter)?;
        Ok(counter.0)
    }

    /// Writes the job to the front of `out` in the format of the module documentation and
    /// returns the number of bytes. Fails when a tensor's length does not match its geometry,
    /// a list is too long for its `u16` count, or `out` is too small. Scratch: none.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, SelfTestError> {
        let len = self.encoded_len()?;
        let out = out.get_mut(..len).ok_or(SelfTestError::BufferTooSmall)?;
        self.write(&mut SliceWriter { out, at: 0 })?;
        Ok(len)
    }

    fn write(&self, s: &mut impl Sink) -> Result<(), SelfTestError> {
        s.put(&JOB_MAGIC);
        VERSION.put(s);

        let c = &self.conv;
        let g = c.geom;
        put_dims(s, &conv_dims(&g))?;
        c.layer.input.put(s);
        put_counted(s, c.layer.weight)?;
        c.layer.bias_scale.put(s);
        c.layer.output.put(s);
        activation_code(c.layer.activation).put(s);
        c.out_err_q.put(s);
        c.in_err_q.put(s);
        put_channels(s, c.channels)?;
        let lens = conv_lens(&g)?;
        put_tensor(s, c.input, lens.input)?;
        put_tensor(s, c.weight, lens.weight)?;
        put_tensor(s, c.bias, g.out_channels)?;
        put_tensor(s, c.out_err, lens.output)?;

        let l = &self.linear;
        let g = l.geom;
        put_dims(s, &[g.batch, g.in_features, g.out_features])?;
        put_channels(s, l.channels)?;
        let lens = linear_lens(&g)?;
        put_tensor(s, l.input, lens.input)?;
        put_tensor(s, l.weight, lens.weight)?;
        put_tensor(s, l.bias, g.out_features)?;
        put_tensor(s, l.out_err, lens.output)?;

        let u = &self.update;
        let structures = u16::try_from(u.stats.len())
            .ok()
            .filter(|&n| n != ALL_CHANNELS)
            .ok_or(SelfTestError::Invalid("update structures"))?;
        structures.put(s);
        put_dims(s, &[u.structure_len])?;
        put_channels(s, u.channels)?;
        let weights = u.stats.len() * u.structure_len;
        put_tensor(s, u.weights, weights)?;
        u.weight_q.put(s);
        u.range.put(s);
        put_tensor(s, u.grads, weights)?;
        put_slice(s, u.stats);
        u.config.put(s);
        Ok(())
    }
}

impl Results<'_> {
    /// Bytes of [`Results::encode`]'s output.
    pub fn encoded_len(&self) -> usize {
        let mut counter = Counter(0);
        self.write(&mut counter);
        counter.0
    }

    /// Writes `"MCTR" version` and one `tag byte_len payload` block per [`Output`] to the
    /// front of `out`; returns the number of bytes. Scratch: none.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, SelfTestError> {
        let len = self.encoded_len();
        let out = out.get_mut(..len).ok_or(SelfTestError::BufferTooSmall)?;
        self.write(&mut SliceWriter { out, at: 0 });
        Ok(len)
    }

    fn write(&self, s: &mut impl Sink) {
        s.put(&RESULTS_MAGIC);
        VERSION.put(s);
        for output in Output::ALL {
            match output {
                Output::ConvOutput => put_block(s, output, self.conv_output),
                Output::ConvOutputRange => put_one(s, output, self.conv_output_range),
                Output::ConvInErr => put_block(s, output, self.conv_in_err),
                Output::ConvInErrRange => put_one(s, output, self.conv_in_err_range),
                Output::ConvWeightGrad => put_block(s, output, self.conv_weight_grad),
                Output::ConvBiasGrad => put_block(s, output, self.conv_bias_grad),
                Output::LinearOutput => put_block(s, output, self.linear_output),
                Output::LinearInErr => put_block(s, output, self.linear_in_err),
                Output::LinearWeightGrad => put_block(s, output, self.linear_weight_grad),
                Output::LinearBiasGrad => put_block(s, output, self.linear_bias_grad),
                Output::UpdateWeights => put_block(s, output, self.update_weights),
                Output::UpdateWeightQ => put_one(s, output, self.update_weight_q),
                Output::UpdateRange => put_one(s, output, self.update_range),
                Output::UpdateStats => put_block(s, output, self.update_stats),
            }
        }
    }
}

/// Iterator over the blocks of encoded results: `(output, payload bytes)`.
#[derive(Clone, Debug)]
pub struct ResultBlocks<'a> {
    reader: Reader<'a>,
    next: usize,
}

/// Splits encoded [`Results`] into their blocks, checking magic, version, tags and lengths;
/// after the last block, bytes left over are reported as [`SelfTestError::TrailingBytes`].
pub fn result_blocks(bytes: &[u8]) -> Result<ResultBlocks<'_>, SelfTestError> {
    let mut reader = Reader::new(bytes);
    read_header(&mut reader, RESULTS_MAGIC)?;
    Ok(ResultBlocks { reader, next: 0 })
}

impl<'a> Iterator for ResultBlocks<'a> {
    type Item = Result<(Output, &'a [u8]), SelfTestError>;

    fn next(&mut self) -> Option<Self::Item> {
        let Some(&output) = Output::ALL.get(self.next) else {
            let trailing = !self.reader.is_done();
            self.reader.skip_rest();
            return trailing.then_some(Err(SelfTestError::TrailingBytes));
        };
        self.next += 1;
        let block = (|| {
            if u8::take(&mut self.reader)? != output.tag() {
                return Err(SelfTestError::Invalid("result block tag"));
            }
            let len = u32::take(&mut self.reader)? as usize;
            Ok((output, self.reader.bytes(len)?))
        })();
        if block.is_err() {
            self.next = Output::ALL.len();
            self.reader.skip_rest();
        }
        Some(block)
    }
}

/// Memory for one decoded job and its results.
#[derive(Debug)]
pub struct Store {
    i8s: [i8; Store::I8_CAPACITY],
    f32s: [f32; Store::F32_CAPACITY],
    i32s: [i32; MAX_CHANNELS],
    qparams: [QParams; MAX_CHANNELS],
    channels: [u16; 3 * MAX_CHANNELS],
    stats: [GradStats; 2 * MAX_CHANNELS],
}

impl Store {
    /// `i8` values a job may hold: conv input, weight, output error, output and input error,
    /// and twice the update's weights.
    pub const I8_CAPACITY: usize = 8192;
    /// `f32` values a job may hold: conv gradients, every fully connected tensor and gradient,
    /// and the update's gradient.
    pub const F32_CAPACITY: usize = 4096;

    /// An empty store. `const` and all zero bits, so that a `static` store lands in `.bss`
    /// (no initializer in flash); [`Store::load`] overwrites what it uses.
    pub const fn new() -> Self {
        const Q: QParams = QParams {
            scale: 0.0,
            zero_point: 0,
        };
        Store {
            i8s: [0; Store::I8_CAPACITY],
            f32s: [0.0; Store::F32_CAPACITY],
            i32s: [0; MAX_CHANNELS],
            qparams: [Q; MAX_CHANNELS],
            channels: [0; 3 * MAX_CHANNELS],
            stats: [GradStats::new(); 2 * MAX_CHANNELS],
        }
    }

    /// Decodes a job into this store and lays out its results: gradients zeroed, update state
    /// copied from the job. Validates everything [`run`] relies on. Scratch: none.
    pub fn load(&mut self, bytes: &[u8]) -> Result<(SelfTest<'_>, Results<'_>), SelfTestError> {
        let mut pools = Pools {
            i8s: Pool(&mut self.i8s),
            f32s: Pool(&mut self.f32s),
            i32s: Pool(&mut self.i32s),
            qparams: Pool(&mut self.qparams),
            channels: Pool(&mut self.channels),
            stats: Pool(&mut self.stats),
        };
        let mut r = Reader::new(bytes);
        read_header(&mut r, JOB_MAGIC)?;
        let conv = read_conv(&mut r, &mut pools)?;
        let linear = read_linear(&mut r, &mut pools)?;
        let update = read_update(&mut r, &mut pools)?;
        if !r.is_done() {
            return Err(SelfTestError::TrailingBytes);
        }

        let conv_lens = conv_lens(&conv.geom)?;
        let linear_lens = linear_lens(&linear.geom)?;
        let results = Results {
            conv_output: pools.i8s.zeroed(conv_lens.output)?,
            conv_output_range: RealRange::EMPTY,
            conv_in_err: pools.i8s.zeroed(conv_lens.input)?,
            conv_in_err_range: RealRange::EMPTY,
            conv_weight_grad: pools.f32s.zeroed(conv_lens.weight)?,
            conv_bias_grad: pools.f32s.zeroed(conv.geom.out_channels)?,
            linear_output: pools.f32s.zeroed(linear_lens.output)?,
            linear_in_err: pools.f32s.zeroed(linear_lens.input)?,
            linear_weight_grad: pools.f32s.zeroed(linear_lens.weight)?,
            linear_bias_grad: pools.f32s.zeroed(linear.geom.out_features)?,
            update_weights: pools.i8s.copied(update.weights)?,
            update_weight_q: update.weight_q,
            update_range: update.range,
            update_stats: pools.stats.copied(update.stats)?,
        };
        Ok((
            SelfTest {
                conv,
                linear,
                update,
            },
            results,
        ))
    }
}

impl Default for Store {
    fn default() -> Self {
        Self::new()
    }
}

// ---------------------------------------------------------------------------------------------
// Decoding of the three cases.

fn read_conv<'a>(r: &mut Reader<'_>, pools: &mut Pools<'a>) -> Result<ConvCase<'a>, SelfTestError> {
    let geom = conv_from_dims(r.dims()?);
    let Conv2dGeom {
        in_channels,
        out_channels,
        kernel_h,
        kernel_w,
        groups,
        ..
    } = geom;
    geom.validate()?;
    if out_channels > MAX_CHANNELS {
        return Err(SelfTestError::Invalid(
            "conv output channels above MAX_CHANNELS",
        ));
    }
    let taps = kernel_h * kernel_w;
    if (in_channels / groups) * taps > MAX_TERMS || (out_channels / groups) * taps > MAX_TERMS {
        return Err(SelfTestError::Invalid(
            "conv accumulator terms above MAX_TERMS",
        ));
    }
    let lens = conv_lens(&geom)?;

    let input_q = QParams::take(r)?;
    let count = u16::take(r)? as usize;
    if count != 1 && count != out_channels {
        return Err(SelfTestError::Invalid("conv weight qparams count"));
    }
    let weight_q = pools.qparams.read(r, count)?;
    let bias_scale = f32::take(r)?;
    if !(bias_scale.is_finite() && bias_scale > 0.0) {
        return Err(SelfTestError::Invalid("conv bias scale"));
    }
    let output_q = QParams::take(r)?;
    let activation = match u8::take(r)? {
        0 => Activation::None,
        1 => Activation::Relu,
        2 => Activation::Relu6,
        _ => return Err(SelfTestError::Invalid("conv activation")),
    };
    let out_err_q = QParams::take(r)?;
    let in_err_q = QParams::take(r)?;
    let channels = read_channels(r, &mut pools.channels, out_channels)?;
    Ok(ConvCase {
        geom,
        layer: QLayerParams {
            input: input_q,
            weight: weight_q,
            bias_scale,
            output: output_q,
            activation,
        },
        out_err_q,
        in_err_q,
        channels,
        input: pools.i8s.read(r, lens.input)?,
        weight: pools.i8s.read(r, lens.weight)?,
        bias: pools.i32s.read(r, out_channels)?,
        out_err: pools.i8s.read(r, lens.output)?,
    })
}

/// The convolution's geometry fields in encoding order.
fn conv_dims(g: &Conv2dGeom) -> [usize; 12] {
    [
        g.batch,
        g.in_channels,
        g.in_h,
        g.in_w,
        g.out_channels,
        g.kernel_h,
        g.kernel_w,
        g.stride_h,
        g.stride_w,
        g.pad_h,
        g.pad_w,
        g.groups,
    ]
}

/// Inverse of [`conv_dims`].
fn conv_from_dims(d: [usize; 12]) -> Conv2dGeom {
    Conv2dGeom {
        batch: d[0],
        in_channels: d[1],
        in_h: d[2],
        in_w: d[3],
        out_channels: d[4],
        kernel_h: d[5],
        kernel_w: d[6],
        stride_h: d[7],
        stride_w: d[8],
        pad_h: d[9],
        pad_w: d[10],
        groups: d[11],
    }
}

fn read_linear<'a>(
    r: &mut Reader<'_>,
    pools: &mut Pools<'a>,
) -> Result<LinearCase<'a>, SelfTestError> {
    let [batch, in_features, out_features] = r.dims()?;
    let geom = LinearGeom {
        batch,
        in_features,
        out_features,
    };
    geom.validate()?;
    let lens = linear_lens(&geom)?;
    let channels = read_channels(r, &mut pools.channels, out_features)?;
    Ok(LinearCase {
        geom,
        channels,
        input: pools.f32s.read(r, lens.input)?,
        weight: pools.f32s.read(r, lens.weight)?,
        bias: pools.f32s.read(r, out_features)?,
        out_err: pools.f32s.read(r, lens.output)?,
    })
}

fn read_update<'a>(
    r: &mut Reader<'_>,
    pools: &mut Pools<'a>,
) -> Result<UpdateCase<'a>, SelfTestError> {
    let structures = u16::take(r)? as usize;
    let [structure_len] = r.dims()?;
    if structures == 0 || structure_len == 0 {
        return Err(SelfTestError::Geometry(OpError::ZeroSize));
    }
    if structures > MAX_CHANNELS {
        return Err(SelfTestError::Invalid(
            "update structures above MAX_CHANNELS",
        ));
    }
    let channels = read_channels(r, &mut pools.channels, structures)?;
    let weights = pools.i8s.read(r, structures * structure_len)?;
    let weight_q = QParams::take(r)?;
    let range = RangeEma::take(r)?;
    let grads = pools.f32s.read(r, weights.len())?;
    let stats = pools.stats.read(r, structures)?;
    let config = FqtUpdateConfig::take(r)?;
    Ok(UpdateCase {
        weights,
        weight_q,
        range,
        grads,
        structure_len,
        channels,
        stats,
        config,
    })
}

fn read_header(r: &mut Reader<'_>, magic: [u8; 4]) -> Result<(), SelfTestError> {
    if r.bytes(4)? != magic {
        return Err(SelfTestError::BadMagic);
    }
    match u16::take(r)? {
        VERSION => Ok(()),
        other => Err(SelfTestError::UnsupportedVersion(other)),
    }
}

/// A channel set over `count` channels: indices below `count`, without repeats.
fn read_channels<'a>(
    r: &mut Reader<'_>,
    pool: &mut Pool<'a, u16>,
    count: usize,
) -> Result<ChannelSet<'a>, SelfTestError> {
    let len = u16::take(r)?;
    if len == ALL_CHANNELS {
        return Ok(ChannelSet::All);
    }
    let list = pool.read(r, len as usize)?;
    for (i, &c) in list.iter().enumerate() {
        if c as usize >= count || list[..i].contains(&c) {
            return Err(SelfTestError::Invalid(
                "channel index out of range or repeated",
            ));
        }
    }
    Ok(ChannelSet::Subset(list))
}

// ---------------------------------------------------------------------------------------------
// Lengths, checked so that hostile geometry cannot overflow.

/// Element counts of a layer's input, weight and output.
struct Lens {
    input: usize,
    weight: usize,
    output: usize,
}

fn conv_lens(g: &Conv2dGeom) -> Result<Lens, SelfTestError> {
    g.validate()?;
    let per_group = g.in_channels / g.groups;
    Ok(Lens {
        input: product(&[g.batch, g.in_channels, g.in_h, g.in_w])?,
        weight: product(&[g.out_channels, per_group, g.kernel_h, g.kernel_w])?,
        output: product(&[g.batch, g.out_channels, g.out_h(), g.out_w()])?,
    })
}

fn linear_lens(g: &LinearGeom) -> Result<Lens, SelfTestError> {
    Ok(Lens {
        input: product(&[g.batch, g.in_features])?,
        weight: product(&[g.out_features, g.in_features])?,
        output: product(&[g.batch, g.out_features])?,
    })
}

fn product(factors: &[usize]) -> Result<usize, SelfTestError> {
    factors
        .iter()
        .try_fold(1usize, |p, &f| p.checked_mul(f))
        .ok_or(SelfTestError::OutOfMemory)
}

// ---------------------------------------------------------------------------------------------
// Byte-level codec.

/// Where encoded bytes go: a counter (for the length) or a slice.
trait Sink {
    fn put(&mut self, bytes: &[u8]);
}

struct Counter(usize);

impl Sink for Counter {
    fn put(&mut self, bytes: &[u8]) {
        self.0 += bytes.len();
    }
}

/// Writes into a slice sized beforehand with a [`Counter`] pass.
struct SliceWriter<'a> {
    out: &'a mut [u8],
    at: usize,
}

impl Sink for SliceWriter<'_> {
    fn put(&mut self, bytes: &[u8]) {
        self.out[self.at..][..bytes.len()].copy_from_slice(bytes);
        self.at += bytes.len();
    }
}

/// The core's little-endian reader ([`codec::Reader`]) with this format's error for bytes
/// that end inside a field.
#[derive(Clone, Debug)]
struct Reader<'a>(codec::Reader<'a>);

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Reader(codec::Reader::new(bytes))
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8], SelfTestError> {
        self.0.take(n).ok_or(SelfTestError::Truncated)
    }

    /// True when every byte was read.
    fn is_done(&self) -> bool {
        self.0.remaining() == 0
    }

    /// Skip the bytes left.
    fn skip_rest(&mut self) {
        let left = self.0.remaining();
        self.0.skip(left);
    }

    /// `N` geometry fields (`u32`), each at most [`MAX_DIM`].
    fn dims<const N: usize>(&mut self) -> Result<[usize; N], SelfTestError> {
        let mut dims = [0; N];
        for d in &mut dims {
            *d = u32::take(self)? as usize;
            if *d > MAX_DIM {
                return Err(SelfTestError::Invalid("geometry field above MAX_DIM"));
            }
        }
        Ok(dims)
    }
}

/// A value with a fixed little-endian encoding.
trait Field: Copy {
    fn put(self, s: &mut impl Sink);
    fn take(r: &mut Reader<'_>) -> Result<Self, SelfTestError>;
}

macro_rules! le_field {
    ($($t:ty),*) => {$(
        impl Field for $t {
            fn put(self, s: &mut impl Sink) {
                s.put(&self.to_le_bytes());
            }
            fn take(r: &mut Reader<'_>) -> Result<Self, SelfTestError> {
                const SIZE: usize = core::mem::size_of::<$t>();
                let mut raw = [0u8; SIZE];
                raw.copy_from_slice(r.bytes(SIZE)?);
                Ok(<$t>::from_le_bytes(raw))
            }
        }
    )*};
}
le_field!(u8, i8, u16, u32, i32, f32);

impl Field for bool {
    fn put(self, s: &mut impl Sink) {
        (self as u8).put(s);
    }
    fn take(r: &mut Reader<'_>) -> Result<Self, SelfTestError> {
        match u8::take(r)? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(SelfTestError::Invalid("flag")),
        }
    }
}

impl Field for QParams {
    fn put(self, s: &mut impl Sink) {
        self.scale.put(s);
        self.zero_point.put(s);
    }
    fn take(r: &mut Reader<'_>) -> Result<Self, SelfTestError> {
        let q = QParams {
            scale: f32::take(r)?,
            zero_point: i32::take(r)?,
        };
        let valid = q.scale.is_finite() && q.scale > 0.0;
        if !valid || !(Q_MIN..=Q_MAX).contains(&q.zero_point) {
            return Err(SelfTestError::Invalid("quantization parameters"));
        }
        Ok(q)
    }
}

impl Field for RealRange {
    fn put(self, s: &mut impl Sink) {
        self.min.put(s);
        self.max.put(s);
    }
    fn take(r: &mut Reader<'_>) -> Result<Self, SelfTestError> {
        Ok(RealRange {
            min: f32::take(r)?,
            max: f32::take(r)?,
        })
    }
}

impl Field for RangeEma {
    fn put(self, s: &mut impl Sink) {
        self.min.put(s);
        self.max.put(s);
        self.initialized.put(s);
    }
    fn take(r: &mut Reader<'_>) -> Result<Self, SelfTestError> {
        Ok(RangeEma {
            min: f32::take(r)?,
            max: f32::take(r)?,
            initialized: bool::take(r)?,
        })
    }
}

impl Field for GradStats {
    fn put(self, s: &mut impl Sink) {
        self.mean.put(s);
        self.var.put(s);
        self.initialized.put(s);
    }
    fn take(r: &mut Reader<'_>) -> Result<Self, SelfTestError> {
        Ok(GradStats {
            mean: f32::take(r)?,
            var: f32::take(r)?,
            initialized: bool::take(r)?,
        })
    }
}

impl Field for FqtUpdateConfig {
    fn put(self, s: &mut impl Sink) {
        for v in [self.lr, self.stats_rate, self.range_rate, self.eps] {
            v.put(s);
        }
    }
    fn take(r: &mut Reader<'_>) -> Result<Self, SelfTestError> {
        Ok(FqtUpdateConfig {
            lr: f32::take(r)?,
            stats_rate: f32::take(r)?,
            range_rate: f32::take(r)?,
            eps: f32::take(r)?,
        })
    }
}

fn activation_code(a: Activation) -> u8 {
    match a {
        Activation::None => 0,
        Activation::Relu => 1,
        Activation::Relu6 => 2,
    }
}

fn put_dims(s: &mut impl Sink, dims: &[usize]) -> Result<(), SelfTestError> {
    for &d in dims {
        let d = u32::try_from(d)
            .ok()
            .filter(|&d| d as usize <= MAX_DIM)
            .ok_or(SelfTestError::Invalid("geometry field above MAX_DIM"))?;
        d.put(s);
    }
    Ok(())
}

fn put_slice<T: Field>(s: &mut impl Sink, items: &[T]) {
    for &item in items {
        item.put(s);
    }
}

/// A tensor whose length the geometry fixes.
fn put_tensor<T: Field>(s: &mut impl Sink, items: &[T], len: usize) -> Result<(), SelfTestError> {
    if items.len() != len {
        return Err(SelfTestError::Invalid(
            "tensor length does not match the geometry",
        ));
    }
    put_slice(s, items);
    Ok(())
}

/// A `u16` count, then the items.
fn put_counted<T: Field>(s: &mut impl Sink, items: &[T]) -> Result<(), SelfTestError> {
    let count = u16::try_from(items.len())
        .ok()
        .filter(|&n| n != ALL_CHANNELS)
        .ok_or(SelfTestError::Invalid("list longer than 65534"))?;
    count.put(s);
    put_slice(s, items);
    Ok(())
}

fn put_channels(s: &mut impl Sink, channels: ChannelSet<'_>) -> Result<(), SelfTestError> {
    match channels {
        ChannelSet::All => {
            ALL_CHANNELS.put(s);
            Ok(())
        }
        ChannelSet::Subset(list) => put_counted(s, list),
    }
}

/// A result block: tag, payload length in bytes, payload.
fn put_block<T: Field>(s: &mut impl Sink, output: Output, items: &[T]) {
    let mut counter = Counter(0);
    put_slice(&mut counter, items);
    output.tag().put(s);
    (counter.0 as u32).put(s);
    put_slice(s, items);
}

fn put_one<T: Field>(s: &mut impl Sink, output: Output, item: T) {
    put_block(s, output, core::slice::from_ref(&item));
}

/// A bump allocator over one array of a [`Store`].
struct Pool<'a, T>(&'a mut [T]);

impl<'a, T: Field> Pool<'a, T> {
    fn take(&mut self, n: usize) -> Result<&'a mut [T], SelfTestError> {
        if n > self.0.len() {
            return Err(SelfTestError::OutOfMemory);
        }
        let (head, tail) = core::mem::take(&mut self.0).split_at_mut(n);
        self.0 = tail;
        Ok(head)
    }

    fn read(&mut self, r: &mut Reader<'_>, n: usize) -> Result<&'a [T], SelfTestError> {
        let items = self.take(n)?;
        for item in items.iter_mut() {
            *item = T::take(r)?;
        }
        Ok(items)
    }

    fn copied(&mut self, from: &[T]) -> Result<&'a mut [T], SelfTestError> {
        let items = self.take(from.len())?;
        items.copy_from_slice(from);
        Ok(items)
    }
}

impl<'a, T: Field + Default> Pool<'a, T> {
    fn zeroed(&mut self, n: usize) -> Result<&'a mut [T], SelfTestError> {
        let items = self.take(n)?;
        items.fill(T::default());
        Ok(items)
    }
}

struct Pools<'a> {
    i8s: Pool<'a, i8>,
    f32s: Pool<'a, f32>,
    i32s: Pool<'a, i32>,
    qparams: Pool<'a, QParams>,
    channels: Pool<'a, u16>,
    stats: Pool<'a, GradStats>,
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use crate::rng::Rng;
    use proptest::prelude::*;
    use std::vec::Vec;

    /// Owned inputs of a job with random tensors.
    struct Owned {
        conv: Conv2dGeom,
        weight_q: Vec<QParams>,
        conv_input: Vec<i8>,
        conv_weight: Vec<i8>,
        conv_bias: Vec<i32>,
        conv_err: Vec<i8>,
        channels: Vec<u16>,
        linear: LinearGeom,
        linear_tensors: [Vec<f32>; 4],
        update_weights: Vec<i8>,
        update_grads: Vec<f32>,
        update_stats: Vec<GradStats>,
    }

    fn codes(rng: &mut Rng, n: usize) -> Vec<i8> {
        (0..n).map(|_| rng.below(256) as i32 as u8 as i8).collect()
    }

    fn normals(rng: &mut Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.normal()).collect()
    }

    impl Owned {
        fn new(seed: u64, conv: Conv2dGeom, linear: LinearGeom, per_channel: bool) -> Self {
            let mut rng = Rng::new(seed);
            let weight_q = (0..if per_channel { conv.out_channels } else { 1 })
                .map(|_| QParams {
                    scale: 0.01 + 0.02 * rng.next_f32(),
                    zero_point: rng.below(11) as i32 - 5,
                })
                .collect();
            let structures = conv.out_channels;
            let structure_len = conv.weight_len() / structures;
            Owned {
                conv,
                weight_q,
                conv_input: codes(&mut rng, conv.input_len()),
                conv_weight: codes(&mut rng, conv.weight_len()),
                conv_bias: (0..conv.out_channels)
                    .map(|_| rng.below(2001) as i32 - 1000)
                    .collect(),
                conv_err: codes(&mut rng, conv.output_len()),
                channels: (0..conv.out_channels as u16).step_by(2).collect(),
                linear,
                linear_tensors: [
                    normals(&mut rng, linear.input_len()),
                    normals(&mut rng, linear.weight_len()),
                    normals(&mut rng, linear.out_features),
                    normals(&mut rng, linear.output_len()),
                ],
                update_weights: codes(&mut rng, structures * structure_len),
                update_grads: normals(&mut rng, structures * structure_len),
                update_stats: (0..structures)
                    .map(|c| GradStats {
                        mean: 0.01 * c as f32,
                        var: 0.5,
                        initialized: c % 2 == 0,
                    })
                    .collect(),
            }
        }

        fn job(&self) -> SelfTest<'_> {
            let q = |scale, zero_point| QParams { scale, zero_point };
            SelfTest {
                conv: ConvCase {
                    geom: self.conv,
                    layer: QLayerParams {
                        input: q(0.05, -3),
                        weight: &self.weight_q,
                        bias_scale: 0.05 * 0.02,
                        output: q(0.2, 4),
                        activation: Activation::Relu,
                    },
                    out_err_q: q(0.01, 1),
                    in_err_q: q(0.03, -2),
                    channels: ChannelSet::Subset(&self.channels),
                    input: &self.conv_input,
                    weight: &self.conv_weight,
                    bias: &self.conv_bias,
                    out_err: &self.conv_err,
                },
                linear: LinearCase {
                    geom: self.linear,
                    channels: ChannelSet::All,
                    input: &self.linear_tensors[0],
                    weight: &self.linear_tensors[1],
                    bias: &self.linear_tensors[2],
                    out_err: &self.linear_tensors[3],
                },
                update: UpdateCase {
                    weights: &self.update_weights,
                    weight_q: q(0.02, 0),
                    range: RangeEma::from_range(-2.5, 2.5),
                    grads: &self.update_grads,
                    structure_len: self.update_weights.len() / self.update_stats.len(),
                    channels: ChannelSet::Subset(&self.channels),
                    stats: &self.update_stats,
                    config: FqtUpdateConfig {
                        lr: 0.01,
                        stats_rate: 0.8,
                        range_rate: 0.001,
                        eps: 1e-6,
                    },
                },
            }
        }
    }

    fn conv_geom(in_channels: usize, out_channels: usize, groups: usize, pad: usize) -> Conv2dGeom {
        Conv2dGeom {
            batch: 2,
            in_channels,
            in_h: 6,
            in_w: 5,
            out_channels,
            kernel_h: 3,
            kernel_w: 3,
            stride_h: 1,
            stride_w: 2,
            pad_h: pad,
            pad_w: pad,
            groups,
        }
    }

    const LINEAR: LinearGeom = LinearGeom {
        batch: 3,
        in_features: 7,
        out_features: 5,
    };

    fn sample(per_channel: bool) -> Owned {
        Owned::new(7, conv_geom(4, 6, 2, 1), LINEAR, per_channel)
    }

    fn encode(job: &SelfTest<'_>) -> Vec<u8> {
        let mut bytes = std::vec![0u8; job.encoded_len().unwrap()];
        assert_eq!(job.encode(&mut bytes), Ok(bytes.len()));
        bytes
    }

    fn run_bytes(bytes: &[u8]) -> Result<Vec<u8>, SelfTestError> {
        let mut store = std::boxed::Box::new(Store::new());
        let (job, mut results) = store.load(bytes)?;
        run(&job, &mut results, &mut NoProbe);
        let mut out = std::vec![0u8; results.encoded_len()];
        results.encode(&mut out)?;
        Ok(out)
    }

    #[test]
    fn decoding_an_encoded_job_gives_the_same_job() {
        for per_channel in [false, true] {
            let owned = sample(per_channel);
            let bytes = encode(&owned.job());
            let mut store = std::boxed::Box::new(Store::new());
            let (decoded, results) = store.load(&bytes).unwrap();
            assert_eq!(encode(&decoded), bytes);
            assert_eq!(decoded.conv.input, &owned.conv_input[..]);
            assert_eq!(decoded.linear.out_err, &owned.linear_tensors[3][..]);
            assert_eq!(results.update_weights, &owned.update_weights[..]);
            assert!(results.conv_weight_grad.iter().all(|&g| g == 0.0));
        }
    }

    /// The runner passes each kernel the job's tensors and qparams: its results equal direct
    /// calls of the kernels.
    #[test]
    fn run_matches_direct_kernel_calls() {
        let owned = sample(true);
        let job = owned.job();
        let out = run_bytes(&encode(&job)).unwrap();
        let blocks: Vec<_> = result_blocks(&out).unwrap().map(Result::unwrap).collect();
        assert_eq!(blocks.len(), Output::ALL.len());
        let block = |o: Output| blocks.iter().find(|b| b.0 == o).unwrap().1;
        let as_i8 = |v: &[i8]| v.iter().map(|&c| c as u8).collect::<Vec<u8>>();
        let as_f32 = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();

        let c = &job.conv;
        let mut y = std::vec![0i8; c.geom.output_len()];
        let weight = WeightParts::whole(c.weight);
        c.geom.forward_q(c.input, weight, c.bias, &c.layer, &mut y);
        assert_eq!(block(Output::ConvOutput), as_i8(&y));
        let mut e = std::vec![0i8; c.geom.input_len()];
        let (wq, eq) = (c.layer.weight, c.out_err_q);
        c.geom.input_backward_q(
            WeightParts::whole(c.weight),
            wq,
            c.out_err,
            eq,
            c.channels,
            c.in_err_q,
            &mut e,
        );
        assert_eq!(block(Output::ConvInErr), as_i8(&e));
        let mut dw = std::vec![0f32; c.geom.weight_len()];
        let xq = c.layer.input;
        Conv2dGeom::weight_backward_q(&c.geom, c.input, xq, c.out_err, eq, c.channels, &mut dw);
        assert_eq!(block(Output::ConvWeightGrad), as_f32(&dw));
        assert!(dw.iter().any(|&g| g != 0.0));

        let l = &job.linear;
        let mut y = std::vec![0f32; l.geom.output_len()];
        LinearGeom::forward(&l.geom, l.input, l.weight, l.bias, &mut y);
        assert_eq!(block(Output::LinearOutput), as_f32(&y));

        let u = &job.update;
        let mut w = u.weights.to_vec();
        let (mut wq, mut range, mut stats) = (u.weight_q, u.range, u.stats.to_vec());
        let (g, len, ch, cfg) = (u.grads, u.structure_len, u.channels, &u.config);
        update::fqt_update_weights(&mut w, &mut wq, &mut range, g, len, ch, &mut stats, cfg);
        assert_eq!(block(Output::UpdateWeights), as_i8(&w));
        assert_ne!(w, u.weights, "the update changed nothing");
    }

    #[test]
    fn probe_sees_every_kernel_once_in_order() {
        struct Recorder(Vec<Kernel>);
        impl Probe for Recorder {
            fn measure<R>(&mut self, kernel: Kernel, call: impl FnOnce() -> R) -> R {
                self.0.push(kernel);
                call()
            }
        }
        let owned = sample(false);
        let bytes = encode(&owned.job());
        let mut store = std::boxed::Box::new(Store::new());
        let (job, mut results) = store.load(&bytes).unwrap();
        let mut recorder = Recorder(Vec::new());
        run(&job, &mut results, &mut recorder);
        assert_eq!(recorder.0, Kernel::ALL);
    }

    #[test]
    fn every_truncation_and_extension_is_refused() {
        let bytes = encode(&sample(true).job());
        for len in 0..bytes.len() {
            assert!(
                run_bytes(&bytes[..len]).is_err(),
                "prefix of {len} bytes accepted"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(run_bytes(&longer), Err(SelfTestError::TrailingBytes));
        let mut wrong = bytes.clone();
        wrong[0] = b'X';
        assert_eq!(run_bytes(&wrong), Err(SelfTestError::BadMagic));
        wrong = bytes;
        wrong[4] = 9;
        assert_eq!(run_bytes(&wrong), Err(SelfTestError::UnsupportedVersion(9)));
    }

    #[test]
    fn invalid_fields_are_named() {
        let mut owned = sample(false);
        owned.channels = std::vec![0, 0];
        let bytes = encode(&owned.job());
        assert_eq!(
            run_bytes(&bytes),
            Err(SelfTestError::Invalid(
                "channel index out of range or repeated"
            ))
        );
        owned.channels = std::vec![6];
        assert!(matches!(
            run_bytes(&encode(&owned.job())),
            Err(SelfTestError::Invalid(_))
        ));

        let mut owned = sample(false);
        owned.weight_q[0].scale = f32::NAN;
        let bytes = encode(&owned.job());
        assert_eq!(
            run_bytes(&bytes),
            Err(SelfTestError::Invalid("quantization parameters"))
        );

        let owned = sample(false);
        let mut job = owned.job();
        job.conv.input = &job.conv.input[1..];
        assert!(matches!(job.encoded_len(), Err(SelfTestError::Invalid(_))));
        job.conv.geom.groups = 4;
        assert_eq!(
            job.encoded_len(),
            Err(SelfTestError::Geometry(OpError::BadGroups))
        );
    }

    #[test]
    fn a_job_larger_than_the_store_is_refused() {
        let big = LinearGeom {
            batch: 1,
            in_features: 100,
            out_features: Store::F32_CAPACITY / 100,
        };
        let owned = Owned::new(1, conv_geom(2, 2, 1, 0), big, false);
        assert_eq!(
            run_bytes(&encode(&owned.job())),
            Err(SelfTestError::OutOfMemory)
        );
    }

    #[test]
    fn result_blocks_check_their_framing() {
        let out = run_bytes(&encode(&sample(false).job())).unwrap();
        let mut bad = out.clone();
        bad[6] = 99; // the first block's tag
        let first = result_blocks(&bad).unwrap().next().unwrap();
        assert_eq!(first, Err(SelfTestError::Invalid("result block tag")));
        let mut longer = out.clone();
        longer.push(1);
        let last = result_blocks(&longer).unwrap().last().unwrap();
        assert_eq!(last, Err(SelfTestError::TrailingBytes));
        let cut = &out[..out.len() - 1];
        assert_eq!(
            result_blocks(cut).unwrap().last().unwrap(),
            Err(SelfTestError::Truncated)
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Any small valid geometry round-trips, and running it twice gives the same bytes.
        #[test]
        fn random_geometries_round_trip_and_run(
            seed in any::<u64>(),
            groups in 1usize..3,
            in_per_group in 1usize..4,
            out_per_group in 1usize..4,
            pad in 0usize..2,
            per_channel in any::<bool>(),
            batch in 1usize..4,
            in_features in 1usize..20,
            out_features in 1usize..12,
        ) {
            let conv = conv_geom(in_per_group * groups, out_per_group * groups, groups, pad);
            let linear = LinearGeom { batch, in_features, out_features };
            let owned = Owned::new(seed, conv, linear, per_channel);
            let bytes = encode(&owned.job());
            let first = run_bytes(&bytes).unwrap();
            prop_assert_eq!(&first, &run_bytes(&bytes).unwrap());
            prop_assert_eq!(result_blocks(&first).unwrap().count(), Output::ALL.len());
        }
    }
}
