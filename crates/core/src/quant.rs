//! Affine 8-bit quantization, fixed-point requantization and range tracking.
//!
//! A real value `r` is stored as `q: i8` with `r = scale * (q - zero_point)`.
//! Requantizing an `i32` accumulator by a real multiplier `m` uses the gemmlowp/TFLite
//! fixed-point form `m = multiplier * 2^(shift - 31)` with `multiplier` in `[2^30, 2^31)`,
//! evaluated with one 64-bit product and a round-half-up shift, so host and MCU agree exactly.

/// Smallest value of the 8-bit storage type.
pub const Q_MIN: i32 = -128;
/// Largest value of the 8-bit storage type.
pub const Q_MAX: i32 = 127;

/// Affine quantization parameters of one tensor (or one output channel of a weight tensor):
/// `real = scale * (q - zero_point)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QParams {
    /// Real value of one quantization step; always finite and > 0.
    pub scale: f32,
    /// Integer that represents real 0.0 exactly; in `[Q_MIN, Q_MAX]`.
    pub zero_point: i32,
}

impl QParams {
    /// Parameters that cover `[min, max]` with 256 steps.
    ///
    /// The range is first widened to contain 0 (so that padding and ReLU are exact), then
    /// `scale = (max - min) / 255` and `zero_point = Q_MIN + round(-min / scale)`, clamped to
    /// the storage range. A degenerate range (`max - min` below `1e-8` or not finite) gives
    /// `scale = 1e-8` so that the parameters stay usable.
    pub fn from_range(min: f32, max: f32) -> Self {
        let min = if min.is_finite() { min.min(0.0) } else { 0.0 };
        let max = if max.is_finite() { max.max(0.0) } else { 0.0 };
        let span = max - min;
        let scale = if span > 1e-8 { span / 255.0 } else { 1e-8 };
        let zero_point = Q_MIN + round_half_up(-min / scale);
        QParams {
            scale,
            zero_point: zero_point.clamp(Q_MIN, Q_MAX),
        }
    }

    /// Symmetric parameters (`zero_point = 0`) covering `[-max_abs, max_abs]` with 127 steps
    /// each side: the usual choice for pretrained weights.
    pub fn symmetric(max_abs: f32) -> Self {
        let max_abs = if max_abs.is_finite() {
            max_abs.abs()
        } else {
            0.0
        };
        QParams {
            scale: if max_abs > 1e-8 {
                max_abs / 127.0
            } else {
                1e-8
            },
            zero_point: 0,
        }
    }

    /// `clamp(round(r / scale) + zero_point, Q_MIN, Q_MAX)`.
    #[inline]
    pub fn quantize(&self, real: f32) -> i8 {
        let q = round_half_up(real / self.scale).saturating_add(self.zero_point);
        q.clamp(Q_MIN, Q_MAX) as i8
    }

    /// `scale * (q - zero_point)`.
    #[inline]
    pub fn dequantize(&self, q: i8) -> f32 {
        self.scale * (q as i32 - self.zero_point) as f32
    }

    /// The real interval that the 8-bit codes can represent.
    pub fn representable_range(&self) -> (f32, f32) {
        (self.dequantize(Q_MIN as i8), self.dequantize(Q_MAX as i8))
    }
}

/// `floor(x + 0.5)` as `i32`, saturating; NaN maps to 0. The one rounding rule of the crate.
#[inline]
pub fn round_half_up(x: f32) -> i32 {
    if x.is_nan() {
        return 0;
    }
    let r = libm::floorf(x + 0.5);
    if r >= i32::MAX as f32 {
        i32::MAX
    } else if r <= i32::MIN as f32 {
        i32::MIN
    } else {
        r as i32
    }
}

/// A real multiplier in fixed point: `real ≈ multiplier * 2^(shift - 31)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Requant {
    /// Mantissa in `[2^30, 2^31)`, or 0 for a zero multiplier.
    pub multiplier: i32,
    /// Binary exponent; `shift > 0` multiplies, `shift < 0` divides.
    pub shift: i32,
}

impl Requant {
    /// Fixed-point form of `real` (non-finite or non-positive values give the zero multiplier).
    /// Precision: relative error below `2^-31` of the `f64` value of `real`.
    pub fn from_real(real: f64) -> Self {
        if !(real.is_finite() && real > 0.0) {
            return Requant {
                multiplier: 0,
                shift: 0,
            };
        }
        let (mantissa, exponent) = libm::frexp(real);
        let mut q = libm::round(mantissa * (1u64 << 31) as f64) as i64;
        let mut shift = exponent;
        if q == 1i64 << 31 {
            q /= 2;
            shift += 1;
        }
        if shift < -31 {
            // Smaller than 2^-62: every accumulator rounds to 0.
            return Requant {
                multiplier: 0,
                shift: 0,
            };
        }
        Requant {
            multiplier: q as i32,
            shift: shift.min(30),
        }
    }

    /// `round_half_up(acc * multiplier * 2^(shift - 31))`, saturated to `i32`.
    #[inline]
    pub fn apply(&self, acc: i32) -> i32 {
        let product = acc as i64 * self.multiplier as i64;
        let right = 31 - self.shift; // in 1..=62
        let rounded = (product + (1i64 << (right - 1))) >> right;
        rounded.clamp(i32::MIN as i64, i32::MAX as i64) as i32
    }

    /// The real value this fixed-point multiplier represents.
    pub fn to_real(&self) -> f64 {
        self.multiplier as f64 * libm::exp2((self.shift - 31) as f64)
    }
}

/// The real extremes of a tensor just computed, before it was saturated to 8 bits.
/// Range adaptation feeds them to a [`RangeEma`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RealRange {
    /// Smallest real value seen.
    pub min: f32,
    /// Largest real value seen.
    pub max: f32,
}

impl RealRange {
    /// The empty range (`min = +inf`, `max = -inf`), identity of [`RealRange::merge`].
    pub const EMPTY: RealRange = RealRange {
        min: f32::INFINITY,
        max: f32::NEG_INFINITY,
    };

    /// Widen to include `value`.
    #[inline]
    pub fn include(&mut self, value: f32) {
        if value < self.min {
            self.min = value;
        }
        if value > self.max {
            self.max = value;
        }
    }

    /// Union of two ranges.
    pub fn merge(self, other: RealRange) -> RealRange {
        RealRange {
            min: self.min.min(other.min),
            max: self.max.max(other.max),
        }
    }

    /// True when nothing was included.
    pub fn is_empty(&self) -> bool {
        self.min > self.max
    }

    /// Range of a float slice.
    pub fn of(values: &[f32]) -> RealRange {
        let mut r = RealRange::EMPTY;
        for &v in values {
            r.include(v);
        }
        r
    }
}

/// Moving average of a tensor's real range, the "adaptive range" of fully quantized training:
/// `min <- (1 - rate) * min + rate * new_min` (likewise `max`); the first observation is taken
/// as it is.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RangeEma {
    /// Smoothed minimum.
    pub min: f32,
    /// Smoothed maximum.
    pub max: f32,
    /// False until the first observation.
    pub initialized: bool,
}

impl RangeEma {
    /// A tracker with no observation yet.
    pub const fn new() -> Self {
        RangeEma {
            min: 0.0,
            max: 0.0,
            initialized: false,
        }
    }

    /// A tracker that starts from a known range (for example a calibrated one).
    pub const fn from_range(min: f32, max: f32) -> Self {
        RangeEma {
            min,
            max,
            initialized: true,
        }
    }

    /// Fold in one observation with smoothing `rate` in `(0, 1]`; an empty range is ignored.
    pub fn observe(&mut self, range: RealRange, rate: f32) {
        if range.is_empty() {
            return;
        }
        if !self.initialized {
            self.min = range.min;
            self.max = range.max;
            self.initialized = true;
        } else {
            self.min = (1.0 - rate) * self.min + rate * range.min;
            self.max = (1.0 - rate) * self.max + rate * range.max;
        }
    }

    /// Quantization parameters for the current smoothed range.
    pub fn qparams(&self) -> QParams {
        QParams::from_range(self.min, self.max)
    }
}

impl Default for RangeEma {
    fn default() -> Self {
        Self::new()
    }
}

/// A quantized tensor: codes and their quantization.
#[derive(Clone, Copy, Debug)]
pub struct QTensor<'a> {
    /// The codes.
    pub codes: &'a [i8],
    /// Their quantization.
    pub q: QParams,
}

impl QTensor<'_> {
    /// No codes (an operand a kernel does not have).
    pub const EMPTY: QTensor<'static> = QTensor {
        codes: &[],
        q: QParams {
            scale: 1.0,
            zero_point: 0,
        },
    };
}

// ---------------------------------------------------------------------------------------------
// The error quantization rule of fully quantized training (host twin and executor alike).

/// How the error tensors of fully quantized training get their quantization, per sample.
///
/// Each error tensor is first computed with `(s_tracked * unit, z_tracked)`: its moving-average
/// range (in error units, see [`error_unit`]) scaled by the sample's error
/// unit. [`ErrorRanges::Exact`] then checks the tensor's real range (known exactly from the
/// kernel's accumulators) and recomputes the tensor once with that range when the tracked
/// quantization clipped it or left more than half of the codes unused
/// ([`exact_error_q`]). The trackers adapt the same way in both modes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ErrorRanges {
    /// The tracked quantization only: the moving-average rule of the paper.
    Tracked,
    /// The tracked quantization as a first guess, recomputed with the exact range where it
    /// fits badly (the default: every error follows its own sample's range).
    #[default]
    Exact,
}

impl ErrorRanges {
    /// The option's name: `tracked` or `exact`.
    pub fn name(self) -> &'static str {
        match self {
            ErrorRanges::Tracked => "tracked",
            ErrorRanges::Exact => "exact",
        }
    }
}

impl core::fmt::Display for ErrorRanges {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

impl core::str::FromStr for ErrorRanges {
    type Err = &'static str;
    /// `tracked` or `exact`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tracked" => Ok(ErrorRanges::Tracked),
            "exact" => Ok(ErrorRanges::Exact),
            _ => Err("error ranges are 'tracked' (the moving averages alone) or 'exact' (recomputed with each sample's range where the tracked one fits badly)"),
        }
    }
}

/// The error unit of one sample: the largest magnitude of its loss gradient `dL/d logits`
/// (1 when that is below [`MIN_ERROR_UNIT`], 0 included, or not finite).
///
/// Back-propagation is linear in the loss gradient, so error range trackers hold ranges in
/// this unit and the error tensor of model tensor `t` is quantized with
/// `(s_tracked(t) * unit, z_tracked(t))`: the 8-bit codes follow each sample's magnitude
/// instead of a fixed range that would round the errors of well-classified samples to zero.
/// Where the paper leaves the error scale to the moving average alone, this keeps the moving
/// average (over normalized ranges) and adds one multiplication per tensor.
pub fn error_unit(loss_gradient: RealRange) -> f32 {
    let magnitude = loss_gradient.min.abs().max(loss_gradient.max.abs());
    if magnitude >= MIN_ERROR_UNIT && magnitude.is_finite() {
        magnitude
    } else {
        1.0
    }
}

/// The smallest error unit: a loss gradient below it counts as 0 (its codes round to 0 in
/// unit 1, so the sample changes nothing). It keeps the products of a tracker's scale (at
/// least `1e-8`, [`QParams::from_range`]) and the unit normal floats, and ranges divided by the
/// unit finite; a denormal unit would give error scales of 0 and infinite ranges.
pub const MIN_ERROR_UNIT: f32 = 1e-24;

/// `range * factor` (empty stays empty).
pub fn scale_range(range: RealRange, factor: f32) -> RealRange {
    if range.is_empty() {
        range
    } else {
        RealRange {
            min: range.min * factor,
            max: range.max * factor,
        }
    }
}

/// An error tensor as written: the quantization of its codes, its real range before
/// saturation, and whether it was computed a second time ([`quantize_error`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WrittenError {
    /// Quantization of the codes.
    pub q: QParams,
    /// Real range of the values before saturation (the same in both computations).
    pub range: RealRange,
    /// True when the tensor was recomputed with its exact range.
    pub recomputed: bool,
}

/// Write an error tensor under `mode`. `write(q)` computes the tensor into its buffer in the
/// quantization `q` and returns its real range before saturation (from the accumulators, so
/// independent of `q`). It runs with `tracked` (the tracker's quantization times the error
/// unit) and, under [`ErrorRanges::Exact`], a second time when [`exact_error_q`] asks for it.
/// Shared by the host reference and this executor so that both decide alike. Scratch: none
/// (the second call overwrites the first result).
pub fn quantize_error(
    mode: ErrorRanges,
    tracked: QParams,
    mut write: impl FnMut(QParams) -> RealRange,
) -> WrittenError {
    let range = write(tracked);
    let exact = match mode {
        ErrorRanges::Exact => exact_error_q(tracked, range),
        ErrorRanges::Tracked => None,
    };
    match exact {
        Some(q) => {
            write(q);
            WrittenError {
                q,
                range,
                recomputed: true,
            }
        }
        None => WrittenError {
            q: tracked,
            range,
            recomputed: false,
        },
    }
}

/// Under [`ErrorRanges::Exact`], the fraction of the tracked scale below which an error tensor
/// is recomputed: its exact range would use fewer than about `255 * MIN_CODE_USE` codes of
/// the tracked quantization.
pub const MIN_CODE_USE: f32 = 0.5;

/// The quantization to recompute an error tensor with, or `None` to keep `tracked`:
/// `q = QParams::from_range(exact)` when the tensor's real range `exact` leaves `tracked`'s
/// representable range (codes were saturated) or when `s_q < MIN_CODE_USE * s_tracked` (most
/// codes unused, so rounding noise is large against the values). An empty range or one of
/// only zeros keeps `tracked`, which represents 0 exactly.
pub fn exact_error_q(tracked: QParams, exact: RealRange) -> Option<QParams> {
    if exact.is_empty() || (exact.min == 0.0 && exact.max == 0.0) {
        return None;
    }
    let (lo, hi) = tracked.representable_range();
    let q = QParams::from_range(exact.min, exact.max);
    let clipped = exact.min < lo || exact.max > hi;
    (clipped || q.scale < MIN_CODE_USE * tracked.scale).then_some(q)
}

/// Quantize a float slice into `out` (same length).
pub fn quantize_slice(values: &[f32], q: QParams, out: &mut [i8]) {
    for (o, &v) in out.iter_mut().zip(values) {
        *o = q.quantize(v);
    }
}

/// Dequantize an 8-bit slice into `out` (same length).
pub fn dequantize_slice(values: &[i8], q: QParams, out: &mut [f32]) {
    for (o, &v) in out.iter_mut().zip(values) {
        *o = q.dequantize(v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_is_exact_and_range_is_covered() {
        let q = QParams::from_range(-1.3, 4.1);
        assert_eq!(q.dequantize(q.quantize(0.0)), 0.0);
        let (lo, hi) = q.representable_range();
        assert!(lo <= -1.3 + q.scale && hi >= 4.1 - q.scale, "{lo} {hi}");
    }

    #[test]
    fn requant_matches_real_multiplication() {
        for &m in &[1.0f64, 0.5, 0.0003, 3.7, 1e-6, 123.0] {
            let r = Requant::from_real(m);
            assert!((r.to_real() - m).abs() <= m * 1e-9, "{m} {:?}", r);
            for &acc in &[0i32, 1, -1, 1000, -1000, 123_456, -9_876_543] {
                let expect = (acc as f64 * m + 0.5).floor();
                let expect = expect.clamp(i32::MIN as f64, i32::MAX as f64) as i32;
                assert!((r.apply(acc) - expect).abs() <= 1, "{m} {acc}");
            }
        }
        assert_eq!(Requant::from_real(1.0).apply(-77), -77);
        assert_eq!(Requant::from_real(0.0).apply(12345), 0);
    }

    #[test]
    fn ema_first_observation_then_smooths() {
        let mut e = RangeEma::new();
        e.observe(
            RealRange {
                min: -1.0,
                max: 1.0,
            },
            0.1,
        );
        assert_eq!((e.min, e.max), (-1.0, 1.0));
        e.observe(
            RealRange {
                min: -3.0,
                max: 2.0,
            },
            0.5,
        );
        assert_eq!((e.min, e.max), (-2.0, 1.5));
    }

    #[test]
    fn exact_ranges_recompute_clipped_and_underused_errors() {
        let tracked = QParams::from_range(-1.0, 1.0); // s = 2/255, codes cover [-1, 1]
        let range = |min, max| RealRange { min, max };
        // 85% of the codes used, nothing clipped: kept.
        assert_eq!(exact_error_q(tracked, range(-0.9, 0.8)), None);
        // Exactly half of the codes: kept; less: recomputed with the exact range.
        assert_eq!(exact_error_q(tracked, range(-0.5, 0.5)), None);
        let narrow = range(-0.3, 0.4);
        assert_eq!(
            exact_error_q(tracked, narrow),
            Some(QParams::from_range(-0.3, 0.4))
        );
        // Saturated on one side even though the span fits: recomputed.
        assert_eq!(
            exact_error_q(tracked, range(-0.2, 1.2)),
            Some(QParams::from_range(-0.2, 1.2))
        );
        // Nothing, or only zeros, which every quantization represents exactly: kept.
        assert_eq!(exact_error_q(tracked, RealRange::EMPTY), None);
        assert_eq!(exact_error_q(tracked, range(0.0, 0.0)), None);
        // The kernel runs once with the tracked quantization, a second time with the exact
        // one when that is needed, and never again under tracked ranges.
        for (mode, exact, calls) in [
            (ErrorRanges::Exact, narrow, 2),
            (ErrorRanges::Exact, range(-0.9, 0.8), 1),
            (ErrorRanges::Tracked, narrow, 1),
        ] {
            let mut seen = [None; 2];
            let mut count = 0;
            let written = quantize_error(mode, tracked, |q| {
                seen[count] = Some(q);
                count += 1;
                exact
            });
            assert_eq!(count, calls);
            assert_eq!(seen[0], Some(tracked));
            assert_eq!(written.recomputed, calls == 2);
            assert_eq!(written.q, seen[calls - 1].unwrap());
            assert_eq!(written.range, exact);
        }
    }

    #[test]
    fn error_unit_is_the_largest_loss_gradient() {
        let unit = |min, max| error_unit(RealRange { min, max });
        assert_eq!(unit(-0.25, 0.5), 0.5);
        assert_eq!(unit(-0.75, 0.5), 0.75);
        assert_eq!(unit(0.0, 0.0), 1.0);
        assert_eq!(unit(f32::NAN, f32::NAN), 1.0);
        assert_eq!(error_unit(RealRange::EMPTY), 1.0);
        // A vanishing (here denormal) loss gradient counts as 0: the unit keeps error scales
        // positive and unit-relative ranges finite.
        assert_eq!(unit(-4e-45, 0.0), 1.0);
        assert_eq!(unit(0.0, MIN_ERROR_UNIT), MIN_ERROR_UNIT);
        let smallest_scale = QParams::from_range(0.0, 0.0).scale;
        assert!((smallest_scale * MIN_ERROR_UNIT).is_normal());
        assert!((1.0 / MIN_ERROR_UNIT).is_finite());
    }
}
