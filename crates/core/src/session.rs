//! A training session over a byte link: the loop a device runs (under QEMU through semihosting
//! files, on a board through its UART), and its wire format, shared with the host that writes
//! the session and reads the results.
//!
//! The host streams the samples one at a time, as a sensor would deliver them; the device
//! trains on them in arrival order with the plan's batch size and a cosine learning rate over
//! the session's batches ([`crate::update::cosine_lr`], as the host trainer), evaluates the
//! evaluation samples, and sends back the losses, the predictions, the trained state and the
//! measurements. Little endian throughout:
//!
//! ```text
//! session = header sample[epochs * train_samples] sample[eval_samples]        host -> device
//! header  = "MCTS" version:u16 spare:u16 epochs:u32 train_samples:u32 eval_samples:u32
//!           input_len:u32                                                      (24 bytes)
//! sample  = label:u16 spare:u16 value:f32[input_len]   real values (an int8 plan's device
//!           quantizes them with the plan's input quantization)
//! results = record*  ending with the END record                                device -> host
//! record  = tag:[u8; 4] len:u32 payload[len]
//!   LOSS  f64 per epoch: the sum of its sample losses, summed batch by batch
//!   PRED  u16 per evaluation sample: the predicted class
//!   PARM  the kept arena regions ([`kept_regions`]): trained weights, biases and gradient
//!         statistics, then the training state (trackers, weight quantization)
//!   METR  [`Metrics`]: memory and instruction counts
//!   END   empty
//! ```
//!
//! Within an epoch, samples `k * batch .. (k + 1) * batch` form batch `k` (the last one may be
//! shorter; [`exec::train_sample_ending_batch`] ends it), and batch `k` of epoch `e` trains
//! with `cosine_lr(lr, e * batches + k, epochs * batches)`, `lr` the plan's: the order and the
//! schedule of the host trainer fed the same samples.
//!
//! Int8 and float32 plans run the same loop; only the sample's form differs (codes or
//! values). Every step of every training sample is timed with the caller's [`Clock`] and its count
//! added to that step's total, so the host can split instructions into forward, backward and
//! update and attribute them to layers. Memory: the caller's [`Workspace`] (one sample record,
//! its codes or values, a `u64` per plan step) and a few hundred bytes of stack beyond the executor's.

use crate::plan::exec::{self, ExecError, InputElement, SampleRun};
use crate::plan::{PlanView, Precision, TensorRole};
use crate::update::cosine_lr;

/// First bytes of a session.
pub const SESSION_MAGIC: [u8; 4] = *b"MCTS";
/// Format version of sessions and results.
pub const SESSION_VERSION: u16 = 1;
/// Bytes of the session header.
pub const HEADER_BYTES: usize = 24;
/// Bytes of a record header (tag and length).
pub const RECORD_HEADER_BYTES: usize = 8;

/// Bytes of one sample record with `input_len` values: `4 + 4 * input_len`.
pub const fn sample_record_bytes(input_len: usize) -> usize {
    4 + 4 * input_len
}

/// A record of the results.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tag {
    /// Epoch losses.
    Loss,
    /// Predicted classes of the evaluation samples.
    Predictions,
    /// The kept arena regions.
    Params,
    /// [`Metrics`].
    Metrics,
    /// The end of the results.
    End,
}

impl Tag {
    /// Every tag.
    pub const ALL: [Tag; 5] = [
        Tag::Loss,
        Tag::Predictions,
        Tag::Params,
        Tag::Metrics,
        Tag::End,
    ];

    /// The four bytes on the wire.
    pub const fn bytes(self) -> [u8; 4] {
        match self {
            Tag::Loss => *b"LOSS",
            Tag::Predictions => *b"PRED",
            Tag::Params => *b"PARM",
            Tag::Metrics => *b"METR",
            Tag::End => *b"END ",
        }
    }

    /// The tag of four wire bytes.
    pub fn from_bytes(bytes: [u8; 4]) -> Option<Tag> {
        Tag::ALL.into_iter().find(|t| t.bytes() == bytes)
    }
}

/// Why a link could not move bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LinkError {
    /// The host's data ended before the session did.
    EndOfInput,
    /// Reading failed.
    Read,
    /// Writing failed.
    Write,
}

impl core::fmt::Display for LinkError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            LinkError::EndOfInput => "the session data ended early",
            LinkError::Read => "reading the session failed",
            LinkError::Write => "writing the results failed",
        })
    }
}

impl core::error::Error for LinkError {}

/// Bytes to and from the host: semihosting files under QEMU, a UART on a board, memory in
/// tests.
pub trait Link {
    /// Fill `buffer` with the next bytes from the host.
    fn read_exact(&mut self, buffer: &mut [u8]) -> Result<(), LinkError>;
    /// Send `bytes` to the host.
    fn write_all(&mut self, bytes: &[u8]) -> Result<(), LinkError>;
}

/// A serial line, one byte at a time (a board's UART).
pub trait SerialPort {
    /// The next byte received (waits for it).
    fn read_byte(&mut self) -> Result<u8, LinkError>;
    /// Send one byte (waits until it can).
    fn write_byte(&mut self, byte: u8) -> Result<(), LinkError>;
}

/// First byte of a request frame: the device asks for the next `len:u32` session bytes.
pub const REQUEST: u8 = b'?';
/// First byte of a data frame: `len:u32` result bytes follow.
pub const DATA: u8 = b'!';

/// A [`Link`] over a serial line with flow control by request: before every read the device
/// sends `'?' len:u32` and the host answers with exactly `len` session bytes; results go out
/// as `'!' len:u32 bytes`. A host that only sends what was asked for never overruns a device
/// that is busy training and has no receive buffer beyond its UART's data register.
pub struct RequestLink<P>(pub P);

impl<P: SerialPort> RequestLink<P> {
    fn frame(&mut self, kind: u8, len: usize) -> Result<(), LinkError> {
        let len = u32::try_from(len).map_err(|_| LinkError::Write)?;
        self.0.write_byte(kind)?;
        len.to_le_bytes()
            .iter()
            .try_for_each(|&b| self.0.write_byte(b))
    }
}

impl<P: SerialPort> Link for RequestLink<P> {
    fn read_exact(&mut self, buffer: &mut [u8]) -> Result<(), LinkError> {
        self.frame(REQUEST, buffer.len())?;
        for byte in buffer.iter_mut() {
            *byte = self.0.read_byte()?;
        }
        Ok(())
    }

    fn write_all(&mut self, bytes: &[u8]) -> Result<(), LinkError> {
        self.frame(DATA, bytes.len())?;
        bytes.iter().try_for_each(|&b| self.0.write_byte(b))
    }
}

/// A free-running counter that measures code (timer ticks or cycles; wraps around `u32`).
pub trait Clock {
    /// The current count.
    fn now(&self) -> u32;
}

/// Why a session stopped. Small and non-exhaustive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SessionError {
    /// The link failed.
    Link(LinkError),
    /// The stream does not start with a session header of this version.
    BadHeader,
    /// The session's samples do not have the plan's input length.
    InputLength {
        /// The plan's input length.
        plan: u32,
        /// The session's.
        session: u32,
    },
    /// The workspace buffers are smaller than the plan needs ([`Workspace::fits`]).
    Workspace,
    /// The executor refused (for example a label beyond the classes).
    Exec(ExecError),
}

impl From<LinkError> for SessionError {
    fn from(e: LinkError) -> Self {
        SessionError::Link(e)
    }
}

impl From<ExecError> for SessionError {
    fn from(e: ExecError) -> Self {
        SessionError::Exec(e)
    }
}

impl core::fmt::Display for SessionError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            SessionError::Link(e) => write!(f, "{e}"),
            SessionError::BadHeader => f.write_str("not a session of this format version"),
            SessionError::InputLength { plan, session } => write!(
                f,
                "the session's samples have {session} values, the plan's input {plan}"
            ),
            SessionError::Workspace => f.write_str("the workspace is smaller than the plan needs"),
            SessionError::Exec(e) => write!(f, "{e}"),
        }
    }
}

impl core::error::Error for SessionError {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            SessionError::Link(e) => Some(e),
            SessionError::Exec(e) => Some(e),
            _ => None,
        }
    }
}

/// The session header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionHeader {
    /// Passes over the training samples (each streamed again).
    pub epochs: u32,
    /// Training samples per epoch.
    pub train_samples: u32,
    /// Evaluation samples after training.
    pub eval_samples: u32,
    /// Values per sample.
    pub input_len: u32,
}

impl SessionHeader {
    /// The header bytes.
    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut out = [0u8; HEADER_BYTES];
        out[..4].copy_from_slice(&SESSION_MAGIC);
        out[4..6].copy_from_slice(&SESSION_VERSION.to_le_bytes());
        let fields = [
            self.epochs,
            self.train_samples,
            self.eval_samples,
            self.input_len,
        ];
        for (chunk, value) in out[8..].chunks_exact_mut(4).zip(fields) {
            chunk.copy_from_slice(&value.to_le_bytes());
        }
        out
    }

    /// Decode a header (`None`: another magic or version).
    pub fn decode(bytes: &[u8; HEADER_BYTES]) -> Option<SessionHeader> {
        if bytes[..4] != SESSION_MAGIC || bytes[4..6] != SESSION_VERSION.to_le_bytes() {
            return None;
        }
        let field = |i: usize| u32_at(bytes, 8 + 4 * i);
        Some(SessionHeader {
            epochs: field(0)?,
            train_samples: field(1)?,
            eval_samples: field(2)?,
            input_len: field(3)?,
        })
    }
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    let word = bytes.get(at..at + 4)?;
    Some(u32::from_le_bytes([word[0], word[1], word[2], word[3]]))
}

fn u64_at(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u32_at(bytes, at)? as u64 | (u32_at(bytes, at + 4)? as u64) << 32)
}

/// Encode one sample record into `out` (`sample_record_bytes(values.len())` long).
pub fn encode_sample(label: u16, values: &[f32], out: &mut [u8]) -> Option<()> {
    let out = out.get_mut(..sample_record_bytes(values.len()))?;
    out[..2].copy_from_slice(&label.to_le_bytes());
    out[2..4].fill(0);
    for (chunk, v) in out[4..].chunks_exact_mut(4).zip(values) {
        chunk.copy_from_slice(&v.to_le_bytes());
    }
    Some(())
}

/// The arena regions `(start, len)` a device sends back and a host needs to rebuild the
/// trained model: every arena tensor that holds weights, biases or gradient statistics, in
/// tensor order, then the training-state region.
pub fn kept_regions<'a>(view: &'a PlanView<'a>) -> impl Iterator<Item = (usize, usize)> + 'a {
    let tensors = (0..view.tensor_count() as u16).filter_map(move |id| {
        let tensor = view.tensor(id)?;
        let kept = matches!(
            tensor.role,
            TensorRole::Weight | TensorRole::Bias | TensorRole::OptimizerState
        );
        let offset = tensor.arena_offset.filter(|_| kept)?;
        Some((offset as usize, tensor.bytes as usize))
    });
    let state = (view.state_offset(), view.header().state_bytes as usize);
    tensors.chain(core::iter::once(state))
}

/// Bytes of the `PARM` payload.
pub fn kept_bytes(view: &PlanView) -> usize {
    kept_regions(view).map(|(_, len)| len).sum()
}

/// What [`run`] measured, in [`Clock`] counts (ticks or cycles).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Timing {
    /// Count of an empty measured region (two clock reads).
    pub overhead: u32,
    /// Training samples run.
    pub train_samples: u32,
    /// Counts of whole training samples (decoding and quantizing the input, the steps, batch
    /// bookkeeping; not receiving it), summed.
    pub train_count: u64,
    /// Evaluation samples run.
    pub eval_samples: u32,
    /// Evaluation samples whose prediction equals their label.
    pub eval_correct: u32,
    /// Counts of whole evaluation samples (decoding and quantizing the input, inference),
    /// summed.
    pub eval_count: u64,
}

/// Memory of the device, measured by the firmware.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Memory {
    /// SRAM taken before the stack (`.data + .bss + .uninit`, the arena included).
    pub static_ram_bytes: u32,
    /// The static arena (planned tensors and training state).
    pub arena_bytes: u32,
    /// SRAM left for the stack.
    pub stack_limit_bytes: u32,
    /// Deepest stack use (stack painting).
    pub peak_stack_bytes: u32,
}

/// The unit of the counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CounterUnit {
    /// QEMU's CMSDK APB Timer0 ticks (40 ns of virtual time; 3.2 per instruction under
    /// `-icount shift=7`).
    QemuTimer0Ticks,
    /// The DWT cycle counter of a real core.
    DwtCycles,
}

impl CounterUnit {
    /// The unit's name in reports: `qemu-timer0-ticks` or `dwt-cycles`.
    pub fn name(self) -> &'static str {
        match self {
            CounterUnit::QemuTimer0Ticks => "qemu-timer0-ticks",
            CounterUnit::DwtCycles => "dwt-cycles",
        }
    }
}

/// The `METR` payload: [`CounterUnit`] `u32` (0 ticks, 1 cycles), the [`Timing`] and
/// [`Memory`] fields in declaration order (`u32`, counts `u64`), the step count `u32`, then
/// the summed count of every plan step (`u64` each, over all training samples).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Metrics {
    /// Unit of the counts.
    pub unit: CounterUnit,
    /// The session's timing.
    pub timing: Timing,
    /// The device's memory.
    pub memory: Memory,
}

/// Bytes of the fixed part of the `METR` payload.
pub const METRICS_FIXED_BYTES: usize = 4 + 4 * 4 + 2 * 8 + 4 * 4 + 4;

impl Metrics {
    /// Bytes of the payload with `steps` step counts.
    pub const fn payload_bytes(steps: usize) -> usize {
        METRICS_FIXED_BYTES + 8 * steps
    }

    /// The fixed part of the payload (the step count follows it).
    pub fn encode_fixed(&self, steps: u32) -> [u8; METRICS_FIXED_BYTES] {
        let t = &self.timing;
        let m = &self.memory;
        let mut out = [0u8; METRICS_FIXED_BYTES];
        let mut at = 0;
        let mut put = |bytes: &[u8]| {
            out[at..at + bytes.len()].copy_from_slice(bytes);
            at += bytes.len();
        };
        put(&(self.unit as u32).to_le_bytes());
        for v in [t.overhead, t.train_samples, t.eval_samples, t.eval_correct] {
            put(&v.to_le_bytes());
        }
        put(&t.train_count.to_le_bytes());
        put(&t.eval_count.to_le_bytes());
        let memory = [
            m.static_ram_bytes,
            m.arena_bytes,
            m.stack_limit_bytes,
            m.peak_stack_bytes,
        ];
        for v in memory {
            put(&v.to_le_bytes());
        }
        put(&steps.to_le_bytes());
        out
    }

    /// Decode a payload: the metrics and the step counts' bytes (`8 * steps`; see
    /// [`Metrics::step_counts`]). `None` when malformed.
    pub fn decode(payload: &[u8]) -> Option<(Metrics, &[u8])> {
        let word = |i: usize| u32_at(payload, 4 * i);
        let unit = match word(0)? {
            0 => CounterUnit::QemuTimer0Ticks,
            1 => CounterUnit::DwtCycles,
            _ => return None,
        };
        let timing = Timing {
            overhead: word(1)?,
            train_samples: word(2)?,
            eval_samples: word(3)?,
            eval_correct: word(4)?,
            train_count: u64_at(payload, 20)?,
            eval_count: u64_at(payload, 28)?,
        };
        let memory = Memory {
            static_ram_bytes: word(9)?,
            arena_bytes: word(10)?,
            stack_limit_bytes: word(11)?,
            peak_stack_bytes: word(12)?,
        };
        let steps = word(13)? as usize;
        let counts = payload.get(METRICS_FIXED_BYTES..)?;
        if counts.len() != steps.checked_mul(8)? {
            return None;
        }
        Some((
            Metrics {
                unit,
                timing,
                memory,
            },
            counts,
        ))
    }

    /// The step counts of a decoded payload's step bytes.
    pub fn step_counts(bytes: &[u8]) -> impl Iterator<Item = u64> + '_ {
        bytes
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
    }
}

/// Write a record header.
pub fn write_record_header(link: &mut impl Link, tag: Tag, len: usize) -> Result<(), LinkError> {
    let len = u32::try_from(len).map_err(|_| LinkError::Write)?;
    let mut header = [0u8; RECORD_HEADER_BYTES];
    header[..4].copy_from_slice(&tag.bytes());
    header[4..].copy_from_slice(&len.to_le_bytes());
    link.write_all(&header)
}

/// Write the `METR` record: `metrics` and the step counts.
pub fn write_metrics(
    link: &mut impl Link,
    metrics: &Metrics,
    step_counts: &[u64],
) -> Result<(), LinkError> {
    write_record_header(
        link,
        Tag::Metrics,
        Metrics::payload_bytes(step_counts.len()),
    )?;
    let steps = u32::try_from(step_counts.len()).map_err(|_| LinkError::Write)?;
    link.write_all(&metrics.encode_fixed(steps))?;
    for count in step_counts {
        link.write_all(&count.to_le_bytes())?;
    }
    Ok(())
}

/// Write the `END` record.
pub fn write_end(link: &mut impl Link) -> Result<(), LinkError> {
    write_record_header(link, Tag::End, 0)
}

/// The caller's buffers for [`run`].
pub struct Workspace<'a> {
    /// One sample record: [`sample_record_bytes`] of the plan's input length.
    pub record: &'a mut [u8],
    /// The sample's input codes (int8 plans): the plan's input length; may be empty for a
    /// float32 plan.
    pub codes: &'a mut [i8],
    /// The sample's values (float32 plans): the plan's input length; may be empty for an
    /// int8 plan.
    pub values: &'a mut [f32],
    /// One count per plan step; [`run`] adds each training sample's counts.
    pub step_counts: &'a mut [u64],
}

impl Workspace<'_> {
    /// True when the buffers have the sizes `view` needs.
    pub fn fits(&self, view: &PlanView) -> bool {
        let input = match view.precision() {
            Precision::Int8 => self.codes.len(),
            Precision::Float32 => self.values.len(),
        };
        self.record.len() >= sample_record_bytes(view.input_len())
            && input >= view.input_len()
            && self.step_counts.len() >= view.step_count()
    }

    /// Lengths of the input buffers a plan of `precision` with `input_len` values needs:
    /// `(codes, values)` lengths, the other one 0.
    pub const fn input_lens(precision: Precision, input_len: usize) -> (usize, usize) {
        match precision {
            Precision::Int8 => (input_len, 0),
            Precision::Float32 => (0, input_len),
        }
    }
}

/// The sample a session hands to the executor, in the plan's input form.
enum Sample<'a> {
    /// Input codes (int8 plans).
    Codes(&'a [i8]),
    /// Real values (float32 plans).
    Values(&'a [f32]),
}

/// Decode a sample record into the input buffer of the plan's precision (int8: quantized
/// with the plan's input quantization); returns the label and the sample.
fn decode_sample<'a>(
    view: &PlanView,
    record: &[u8],
    codes: &'a mut [i8],
    values: &'a mut [f32],
) -> (u16, Sample<'a>) {
    let label = u16::from_le_bytes([record[0], record[1]]);
    let reals = record[4..]
        .chunks_exact(4)
        .map(|v| f32::from_le_bytes([v[0], v[1], v[2], v[3]]));
    let sample = match view.precision() {
        Precision::Int8 => {
            let q = view.input_qparams();
            codes
                .iter_mut()
                .zip(reals)
                .for_each(|(c, v)| *c = q.quantize(v));
            Sample::Codes(codes)
        }
        Precision::Float32 => {
            values.iter_mut().zip(reals).for_each(|(x, v)| *x = v);
            Sample::Values(values)
        }
    };
    (label, sample)
}

/// Run a session: read its header from `link`, prepare `arena` ([`exec::init`]), train and
/// evaluate as the module documentation says, and write the `LOSS`, `PRED` and `PARM`
/// records. The caller then adds `METR` ([`write_metrics`]) and `END` ([`write_end`]).
pub fn run(
    view: &PlanView,
    arena: &mut [u8],
    link: &mut impl Link,
    clock: &impl Clock,
    workspace: Workspace,
) -> Result<Timing, SessionError> {
    if !workspace.fits(view) {
        return Err(SessionError::Workspace);
    }
    let input_len = view.input_len();
    let record = &mut workspace.record[..sample_record_bytes(input_len)];
    let (codes_len, values_len) = Workspace::input_lens(view.precision(), input_len);
    let codes = &mut workspace.codes[..codes_len];
    let values = &mut workspace.values[..values_len];
    let step_counts = &mut workspace.step_counts[..view.step_count()];
    let mut header = [0u8; HEADER_BYTES];
    link.read_exact(&mut header)?;
    let session = SessionHeader::decode(&header).ok_or(SessionError::BadHeader)?;
    if session.input_len as usize != input_len {
        return Err(SessionError::InputLength {
            plan: input_len as u32,
            session: session.input_len,
        });
    }
    exec::init(view, arena)?;
    let mut timing = Timing {
        overhead: {
            let start = clock.now();
            clock.now().wrapping_sub(start)
        },
        ..Timing::default()
    };

    let batch = view.header().batch as usize;
    let samples = session.train_samples as usize;
    let batches = samples.div_ceil(batch);
    let total_batches = batches * session.epochs as usize;
    let peak_lr = view.header().config.lr;
    write_record_header(link, Tag::Loss, 8 * session.epochs as usize)?;
    for epoch in 0..session.epochs as usize {
        let mut epoch_loss = 0.0f64;
        for k in 0..batches {
            let lr = cosine_lr(peak_lr, epoch * batches + k, total_batches);
            exec::set_learning_rate(view, arena, lr)?;
            let in_batch = batch.min(samples - k * batch);
            let mut batch_loss = 0.0f64;
            for j in 0..in_batch {
                link.read_exact(record)?;
                let last = j + 1 == in_batch;
                let start = clock.now();
                let (label, sample) = decode_sample(view, record, codes, values);
                let loss = match sample {
                    Sample::Codes(x) => {
                        train_timed(view, arena, x, label, last, clock, step_counts)
                    }
                    Sample::Values(x) => {
                        train_timed(view, arena, x, label, last, clock, step_counts)
                    }
                }?;
                batch_loss += loss as f64;
                timing.train_count += clock.now().wrapping_sub(start) as u64;
                timing.train_samples += 1;
            }
            epoch_loss += batch_loss;
        }
        link.write_all(&epoch_loss.to_le_bytes())?;
    }

    write_record_header(link, Tag::Predictions, 2 * session.eval_samples as usize)?;
    for _ in 0..session.eval_samples {
        link.read_exact(record)?;
        let start = clock.now();
        let (label, sample) = decode_sample(view, record, codes, values);
        let class = match sample {
            Sample::Codes(x) => exec::infer_sample(view, arena, x),
            Sample::Values(x) => exec::infer_sample(view, arena, x),
        }?;
        timing.eval_count += clock.now().wrapping_sub(start) as u64;
        timing.eval_samples += 1;
        timing.eval_correct += (class == label as usize) as u32;
        link.write_all(&(class as u16).to_le_bytes())?;
    }

    write_record_header(link, Tag::Params, kept_bytes(view))?;
    for (start, len) in kept_regions(view) {
        let region = arena
            .get(start..start + len)
            .ok_or(ExecError::ArenaTooSmall)?;
        link.write_all(region)?;
    }
    Ok(timing)
}

/// Train one sample step by step, adding each step's count to `step_counts`; the sample ends
/// its batch when `last_of_batch`. Returns its loss.
fn train_timed<T: InputElement>(
    view: &PlanView,
    arena: &mut [u8],
    sample: &[T],
    label: u16,
    last_of_batch: bool,
    clock: &impl Clock,
    step_counts: &mut [u64],
) -> Result<f32, ExecError> {
    let mut run = if last_of_batch {
        SampleRun::begin_ending_batch(view, arena, sample, label)?
    } else {
        SampleRun::begin(view, arena, sample, label)?
    };
    loop {
        let s = run.next_step();
        let start = clock.now();
        let more = run.step(arena)?;
        let count = clock.now().wrapping_sub(start) as u64;
        if let Some(total) = step_counts.get_mut(s) {
            *total += count;
        }
        if !more {
            break;
        }
    }
    run.finish(arena)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::tests::{tiny_plan, Aligned};

    /// The session bytes in memory, and the results into a fixed buffer.
    struct MemoryLink<'a> {
        input: &'a [u8],
        output: [u8; 1024],
        written: usize,
    }

    impl Link for MemoryLink<'_> {
        fn read_exact(&mut self, buffer: &mut [u8]) -> Result<(), LinkError> {
            if buffer.len() > self.input.len() {
                return Err(LinkError::EndOfInput);
            }
            let (head, rest) = self.input.split_at(buffer.len());
            buffer.copy_from_slice(head);
            self.input = rest;
            Ok(())
        }

        fn write_all(&mut self, bytes: &[u8]) -> Result<(), LinkError> {
            let end = self.written + bytes.len();
            self.output
                .get_mut(self.written..end)
                .ok_or(LinkError::Write)?
                .copy_from_slice(bytes);
            self.written = end;
            Ok(())
        }
    }

    /// Counts its reads: every measured region costs one.
    struct Ticker(core::cell::Cell<u32>);

    impl Clock for Ticker {
        fn now(&self) -> u32 {
            self.0.set(self.0.get() + 1);
            self.0.get()
        }
    }

    const SAMPLES: [(u16, [f32; 2]); 3] = [(0, [0.5, -0.25]), (1, [0.25, 0.5]), (0, [1.0, 0.0])];

    /// A session of the tiny plan (batch 1, input 2): `epochs` over [`SAMPLES`], then the
    /// first two samples for evaluation.
    fn session(epochs: u32, input_len: u32, out: &mut [u8; 512]) -> usize {
        let header = SessionHeader {
            epochs,
            train_samples: SAMPLES.len() as u32,
            eval_samples: 2,
            input_len,
        };
        out[..HEADER_BYTES].copy_from_slice(&header.encode());
        let mut at = HEADER_BYTES;
        let record = sample_record_bytes(2);
        let eval = SAMPLES.iter().take(2);
        for (label, values) in (0..epochs).flat_map(|_| SAMPLES.iter()).chain(eval) {
            encode_sample(*label, values, &mut out[at..at + record]).unwrap();
            at += record;
        }
        at
    }

    /// The records of a results stream, by tag.
    fn record(results: &[u8], tag: Tag) -> Option<&[u8]> {
        let mut at = 0;
        while at + RECORD_HEADER_BYTES <= results.len() {
            let found = Tag::from_bytes(results[at..at + 4].try_into().unwrap())?;
            let len = u32_at(results, at + 4)? as usize;
            let payload = results.get(at + 8..at + 8 + len)?;
            if found == tag {
                return Some(payload);
            }
            at += 8 + len;
        }
        None
    }

    #[test]
    fn a_session_trains_like_direct_executor_calls() {
        let (file, len) = tiny_plan();
        let view = PlanView::parse(&file.0[..len]).unwrap();
        let mut input = [0u8; 512];
        let input_len = session(2, 2, &mut input);
        let mut arena = Aligned([0u8; 256]);
        let arena = &mut arena.0[..view.arena_required()];
        let mut link = MemoryLink {
            input: &input[..input_len],
            output: [0; 1024],
            written: 0,
        };
        let (mut record_buf, mut codes, mut counts) = ([0u8; 12], [0i8; 2], [0u64; 6]);
        let workspace = Workspace {
            record: &mut record_buf,
            codes: &mut codes,
            values: &mut [],
            step_counts: &mut counts,
        };
        let clock = Ticker(core::cell::Cell::new(0));
        let timing = run(&view, arena, &mut link, &clock, workspace).unwrap();
        write_end(&mut link).unwrap();
        assert!(link.input.is_empty(), "the whole session was read");
        assert_eq!((timing.train_samples, timing.eval_samples), (6, 2));
        assert_eq!(timing.overhead, 1);
        // Every step of every training sample was measured once (one tick each).
        assert_eq!(counts, [6; 6]);

        // The same samples through the executor directly, with the same schedule.
        let mut direct = Aligned([0u8; 256]);
        let direct = &mut direct.0[..view.arena_required()];
        exec::init(&view, direct).unwrap();
        let q = view.input_qparams();
        let mut losses = [0.0f64; 2];
        for (epoch, loss) in losses.iter_mut().enumerate() {
            for (k, (label, values)) in SAMPLES.iter().enumerate() {
                let lr = cosine_lr(0.1, epoch * 3 + k, 6);
                exec::set_learning_rate(&view, direct, lr).unwrap();
                let codes = values.map(|v| q.quantize(v));
                *loss += exec::train_sample(&view, direct, &codes, *label).unwrap() as f64;
            }
        }
        let results = &link.output[..link.written];
        let loss_bytes: [u8; 16] = record(results, Tag::Loss).unwrap().try_into().unwrap();
        assert_eq!(loss_bytes[..8], losses[0].to_le_bytes());
        assert_eq!(loss_bytes[8..], losses[1].to_le_bytes());
        let mut expected_params = [0u8; 256];
        let mut at = 0;
        for (start, len) in kept_regions(&view) {
            expected_params[at..at + len].copy_from_slice(&direct[start..start + len]);
            at += len;
        }
        assert_eq!(at, kept_bytes(&view));
        assert_eq!(record(results, Tag::Params), Some(&expected_params[..at]));
        let predictions = record(results, Tag::Predictions).unwrap();
        let mut correct = 0;
        for (p, (label, values)) in predictions.chunks_exact(2).zip(&SAMPLES) {
            let class = exec::infer_sample(&view, direct, &values.map(|v| q.quantize(v)));
            assert_eq!(u16::from_le_bytes([p[0], p[1]]) as usize, class.unwrap());
            correct += (class.unwrap() == *label as usize) as u32;
        }
        assert_eq!(timing.eval_correct, correct);
        assert_eq!(record(results, Tag::End), Some(&[][..]));
    }

    #[test]
    fn malformed_sessions_are_errors() {
        let (file, len) = tiny_plan();
        let view = PlanView::parse(&file.0[..len]).unwrap();
        let mut storage = Aligned([0u8; 256]);
        let arena = &mut storage.0[..view.arena_required()];
        let mut try_run = |input: &[u8], record_len: usize| {
            let mut link = MemoryLink {
                input,
                output: [0; 1024],
                written: 0,
            };
            let (mut record_buf, mut codes, mut counts) = ([0u8; 12], [0i8; 2], [0u64; 6]);
            let workspace = Workspace {
                record: &mut record_buf[..record_len],
                codes: &mut codes,
                values: &mut [],
                step_counts: &mut counts,
            };
            run(
                &view,
                arena,
                &mut link,
                &Ticker(Default::default()),
                workspace,
            )
        };
        let mut input = [0u8; 512];
        let full = session(1, 2, &mut input);
        assert_eq!(try_run(&input[..full], 11), Err(SessionError::Workspace));
        assert_eq!(
            try_run(&input[..full - 1], 12),
            Err(SessionError::Link(LinkError::EndOfInput))
        );
        let mut other_version = input;
        other_version[4] = 9;
        assert_eq!(
            try_run(&other_version[..full], 12),
            Err(SessionError::BadHeader)
        );
        let wrong_len = session(1, 3, &mut input);
        assert_eq!(
            try_run(&input[..wrong_len], 12),
            Err(SessionError::InputLength {
                plan: 2,
                session: 3
            })
        );
        let full = session(1, 2, &mut input);
        input[HEADER_BYTES] = 7; // a label beyond the two classes
        assert_eq!(
            try_run(&input[..full], 12),
            Err(SessionError::Exec(ExecError::BadLabel))
        );
    }

    #[test]
    fn metrics_round_trip() {
        let metrics = Metrics {
            unit: CounterUnit::DwtCycles,
            timing: Timing {
                overhead: 2,
                train_samples: 3,
                train_count: 1 << 40,
                eval_samples: 4,
                eval_correct: 3,
                eval_count: 5,
            },
            memory: Memory {
                static_ram_bytes: 6,
                arena_bytes: 7,
                stack_limit_bytes: 8,
                peak_stack_bytes: 9,
            },
        };
        let mut link = MemoryLink {
            input: &[],
            output: [0; 1024],
            written: 0,
        };
        write_metrics(&mut link, &metrics, &[10, u64::MAX]).unwrap();
        let payload = record(&link.output[..link.written], Tag::Metrics).unwrap();
        assert_eq!(payload.len(), Metrics::payload_bytes(2));
        let (decoded, steps) = Metrics::decode(payload).unwrap();
        assert_eq!(decoded, metrics);
        assert!(Metrics::step_counts(steps).eq([10, u64::MAX]));
        assert!(Metrics::decode(&payload[..payload.len() - 1]).is_none());
    }
}
