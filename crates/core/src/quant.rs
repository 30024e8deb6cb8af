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
}
