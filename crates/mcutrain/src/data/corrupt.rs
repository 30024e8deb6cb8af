//! CIFAR-10-C style image corruptions for domain-shift experiments (the `fashion-shift`
//! workload).
//!
//! Each corruption works on samples with values in `[0, 1]`, of any channel count and size:
//! the spatial ones (blur, pixelate, rotation) and contrast act on each `height x width`
//! channel plane separately. Every result is clipped to `[0, 1]` (NaN becomes 0). The
//! constants for severities 1 to 5 are those of the fashion-shift workload (after Hendrycks and
//! Dietterich's CIFAR-10-C, scaled to pixel values in `[0, 1]`):
//!
//! | name | formula | severity 1..5 |
//! |---|---|---|
//! | `gaussian_noise` | `x + sigma * N(0, 1)` | sigma 0.08, 0.12, 0.18, 0.26, 0.38 |
//! | `shot_noise` | `Poisson(x * lambda) / lambda` | lambda 60, 25, 12, 5, 3 |
//! | `impulse_noise` | with probability `amount`, 0 or 1 (even odds) | 0.03, 0.06, 0.09, 0.17, 0.27 |
//! | `contrast` | `(x - m) * c + m`, `m` the plane mean | c 0.75, 0.5, 0.4, 0.3, 0.15 |
//! | `brightness` | `x + b` | b 0.1, 0.2, 0.3, 0.4, 0.5 |
//! | `defocus_blur` | mean over a disk of radius `r` px | r 0.5, 0.75, 1, 1.5, 2 |
//! | `pixelate` | box-downsample to `s x s` px, nearest back up | s 20, 16, 12, 10, 8 (at 28 px) |
//! | `rotation` | rotate counter-clockwise by `a` degrees | a 12, 24, 36, 48, 60 |
//! | `inversion` | `(1 - t) * x + t * (1 - x)` | t 0.2, 0.4, 0.6, 0.8, 1.0 |
//!
//! Random draws come from [`Rng`] seeded from `(seed, sample index)`, so a corrupted data set
//! does not depend on thread count or scheduling. Transcendental functions come from `libm`,
//! so results are the same on every host.

use std::fmt;
use std::str::FromStr;

use mcutrain_core::rng::Rng;
use rayon::prelude::*;

use super::{DataError, Dataset};

/// A corruption type; combine with a severity in a [`CorruptionSpec`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Corruption {
    /// Additive Gaussian noise.
    GaussianNoise,
    /// Poisson (photon) noise.
    ShotNoise,
    /// Salt-and-pepper noise.
    ImpulseNoise,
    /// Contrast reduced towards the image mean.
    Contrast,
    /// A brightness offset.
    Brightness,
    /// Blur by a disk (out-of-focus lens).
    DefocusBlur,
    /// Box-downsampling and nearest-neighbour upsampling.
    Pixelate,
    /// Rotation about the image centre, bilinear, zero fill.
    Rotation,
    /// A blend towards the negative image `1 - x`.
    Inversion,
}

impl Corruption {
    /// Every corruption, in the order of the module table.
    pub const ALL: [Corruption; 9] = [
        Corruption::GaussianNoise,
        Corruption::ShotNoise,
        Corruption::ImpulseNoise,
        Corruption::Contrast,
        Corruption::Brightness,
        Corruption::DefocusBlur,
        Corruption::Pixelate,
        Corruption::Rotation,
        Corruption::Inversion,
    ];

    /// The snake_case name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Corruption::GaussianNoise => "gaussian_noise",
            Corruption::ShotNoise => "shot_noise",
            Corruption::ImpulseNoise => "impulse_noise",
            Corruption::Contrast => "contrast",
            Corruption::Brightness => "brightness",
            Corruption::DefocusBlur => "defocus_blur",
            Corruption::Pixelate => "pixelate",
            Corruption::Rotation => "rotation",
            Corruption::Inversion => "inversion",
        }
    }

    /// The parameter at `severity` (`1..=5`, else `None`), in the units of the module table:
    /// sigma, lambda, amount, c, b, radius in px, side in px at 28 px, degrees, t.
    pub fn parameter(self, severity: u8) -> Option<f32> {
        let table: [f32; 5] = match self {
            Corruption::GaussianNoise => [0.08, 0.12, 0.18, 0.26, 0.38],
            Corruption::ShotNoise => [60.0, 25.0, 12.0, 5.0, 3.0],
            Corruption::ImpulseNoise => [0.03, 0.06, 0.09, 0.17, 0.27],
            Corruption::Contrast => [0.75, 0.5, 0.4, 0.3, 0.15],
            Corruption::Brightness => [0.1, 0.2, 0.3, 0.4, 0.5],
            Corruption::DefocusBlur => [0.5, 0.75, 1.0, 1.5, 2.0],
            Corruption::Pixelate => [20.0, 16.0, 12.0, 10.0, 8.0],
            Corruption::Rotation => [12.0, 24.0, 36.0, 48.0, 60.0],
            Corruption::Inversion => [0.2, 0.4, 0.6, 0.8, 1.0],
        };
        table.get(usize::from(severity).checked_sub(1)?).copied()
    }
}

impl fmt::Display for Corruption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Corruption {
    type Err = DataError;

    /// Parses a [`Corruption::name`].
    fn from_str(s: &str) -> Result<Self, DataError> {
        Corruption::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| DataError::UnknownCorruption {
                name: s.to_owned(),
                valid: Corruption::ALL.map(Corruption::name).join(", "),
            })
    }
}

/// A corruption at a severity from 1 to 5; written `name:severity`, e.g. `gaussian_noise:5`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CorruptionSpec {
    /// Which corruption.
    pub corruption: Corruption,
    /// Severity, 1 (mildest) to 5.
    pub severity: u8,
}

impl fmt::Display for CorruptionSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.corruption, self.severity)
    }
}

impl FromStr for CorruptionSpec {
    type Err = DataError;

    /// Parses `name:severity`; unknown names and severities outside `1..=5` are errors.
    fn from_str(s: &str) -> Result<Self, DataError> {
        let bad_severity = || DataError::BadSeverity { spec: s.to_owned() };
        let (name, severity) = s.split_once(':').ok_or_else(bad_severity)?;
        let corruption = name.trim().parse()?;
        let severity = severity
            .trim()
            .parse()
            .ok()
            .filter(|s| (1..=5).contains(s))
            .ok_or_else(bad_severity)?;
        Ok(CorruptionSpec {
            corruption,
            severity,
        })
    }
}

/// A copy of `ds` with `spec` applied to every sample, named `"{ds.name} ({spec})"`.
///
/// Deterministic: sample `i` draws from an [`Rng`] seeded with a hash of `(seed, i)`, so the
/// result does not depend on how rayon spreads samples over threads. Memory: the output data
/// set plus, per sample in flight, one channel plane of scratch (blur, pixelate, rotation).
///
/// # Panics
/// If `spec.severity` is not in `1..=5` (parsing a [`CorruptionSpec`] rules that out).
pub fn corrupt_dataset(ds: &Dataset, spec: CorruptionSpec, seed: u64) -> Dataset {
    let parameter = spec
        .corruption
        .parameter(spec.severity)
        .unwrap_or_else(|| panic!("corruption severity {} is not in 1..=5", spec.severity));
    let operation = Operation::new(spec.corruption, parameter, ds.height, ds.width);
    let mut samples = vec![0.0f32; ds.samples.len()];
    let n = ds.sample_len();
    if n > 0 {
        let plane = ds.height * ds.width;
        samples
            .par_chunks_mut(n)
            .zip(ds.samples.par_chunks(n))
            .enumerate()
            .for_each(|(index, (out, input))| {
                let mut rng = Rng::new(sample_seed(seed, index as u64));
                for (out, input) in out.chunks_exact_mut(plane).zip(input.chunks_exact(plane)) {
                    operation.apply(input, ds.height, ds.width, &mut rng, out);
                }
            });
    }
    Dataset {
        samples,
        labels: ds.labels.clone(),
        name: format!("{} ({spec})", ds.name),
        ..*ds
    }
}

/// SplitMix64's finaliser: a bijective 64-bit mix.
fn mix64(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The RNG seed of sample `index` under data-set seed `seed`.
fn sample_seed(seed: u64, index: u64) -> u64 {
    mix64(mix64(seed) ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// `x` clipped to `[0, 1]`, with NaN mapped to 0.
fn clip01(x: f32) -> f32 {
    if x > 0.0 {
        if x < 1.0 {
            x
        } else {
            1.0
        }
    } else {
        0.0
    }
}

/// A corruption with its parameter resolved for one image size (kernels built once per call).
enum Operation {
    GaussianNoise { sigma: f32 },
    ShotNoise { lambda: f32 },
    ImpulseNoise { amount: f32 },
    Contrast { factor: f32 },
    Brightness { offset: f32 },
    DefocusBlur { kernel: DiskKernel },
    Pixelate { height: usize, width: usize },
    Rotation { degrees: f32 },
    Inversion { blend: f32 },
}

impl Operation {
    fn new(corruption: Corruption, p: f32, height: usize, width: usize) -> Operation {
        match corruption {
            Corruption::GaussianNoise => Operation::GaussianNoise { sigma: p },
            Corruption::ShotNoise => Operation::ShotNoise { lambda: p },
            Corruption::ImpulseNoise => Operation::ImpulseNoise { amount: p },
            Corruption::Contrast => Operation::Contrast { factor: p },
            Corruption::Brightness => Operation::Brightness { offset: p },
            Corruption::DefocusBlur => Operation::DefocusBlur {
                kernel: DiskKernel::new(p),
            },
            Corruption::Pixelate => Operation::Pixelate {
                height: pixelated_size(height, p as usize),
                width: pixelated_size(width, p as usize),
            },
            Corruption::Rotation => Operation::Rotation { degrees: p },
            Corruption::Inversion => Operation::Inversion { blend: p },
        }
    }

    /// Corrupts one `height x width` channel plane into `out`, clipped to `[0, 1]`.
    fn apply(&self, plane: &[f32], height: usize, width: usize, rng: &mut Rng, out: &mut [f32]) {
        match *self {
            Operation::GaussianNoise { sigma } => map(plane, out, |x| x + sigma * rng.normal()),
            Operation::ShotNoise { lambda } => map(plane, out, |x| {
                poisson(clip01(x) * lambda, rng.next_f32()) / lambda
            }),
            Operation::ImpulseNoise { amount } => map(plane, out, |x| {
                // Always two draws per value, so that severities share the noise pattern.
                let replace = rng.next_f32() < amount;
                let salt = rng.next_f32() < 0.5;
                match (replace, salt) {
                    (false, _) => x,
                    (true, true) => 1.0,
                    (true, false) => 0.0,
                }
            }),
            Operation::Contrast { factor } => {
                let sum: f64 = plane.iter().map(|&x| x as f64).sum();
                let mean = (sum / plane.len() as f64) as f32;
                map(plane, out, |x| (x - mean) * factor + mean)
            }
            Operation::Brightness { offset } => map(plane, out, |x| x + offset),
            Operation::DefocusBlur { ref kernel } => kernel.convolve(plane, height, width, out),
            Operation::Pixelate {
                height: small_h,
                width: small_w,
            } => pixelate(plane, height, width, small_h, small_w, out),
            Operation::Rotation { degrees } => rotate(plane, height, width, degrees, out),
            Operation::Inversion { blend } => {
                map(plane, out, |x| (1.0 - blend) * x + blend * (1.0 - x))
            }
        }
        out.iter_mut().for_each(|v| *v = clip01(*v));
    }
}

/// `out[i] = f(plane[i])`, in order (random draws follow the element order).
fn map(plane: &[f32], out: &mut [f32], mut f: impl FnMut(f32) -> f32) {
    for (o, &x) in out.iter_mut().zip(plane) {
        *o = f(x);
    }
}

/// Poisson sample of mean `mean` (at most 60 here) by inversion of the CDF at `u` in `[0, 1)`,
/// in f64; one uniform per sample keeps the draw count fixed.
fn poisson(mean: f32, u: f32) -> f32 {
    const MAX_COUNT: u32 = 1000;
    let (mean, u) = (mean as f64, u as f64);
    let mut term = libm::exp(-mean);
    let mut cdf = term;
    let mut k = 0;
    while u > cdf && k < MAX_COUNT {
        k += 1;
        term *= mean / k as f64;
        cdf += term;
    }
    k as f32
}

/// A normalised disk kernel of radius `r` px on a `(2 * ceil(r) + 1)^2` grid.
///
/// Rasterisation: the disk's bounding square is covered by point samples on a grid of pitch
/// `1 / 32` px (at most that pitch, centred in their cells); each sample inside the disk
/// (`x^2 + y^2 <= r^2`) spreads unit weight over the four pixels around it bilinearly, and
/// the weights are divided by their sum. The kernel is thus the disk average of the image's
/// bilinear interpolation: even radii below 1 px mix in the neighbours (an aliased disk of
/// radius 0.5 or 0.75 would be the identity).
struct DiskKernel {
    /// `ceil(r)`: the kernel spans `-half..=half` in both directions.
    half: usize,
    /// Row-major `(2 * half + 1)^2` weights summing to 1.
    weights: Vec<f32>,
}

impl DiskKernel {
    const SAMPLES_PER_PX: f32 = 32.0;

    fn new(radius: f32) -> DiskKernel {
        let half = radius.ceil() as usize;
        let side = 2 * half + 1;
        let count = (2.0 * radius * Self::SAMPLES_PER_PX).ceil().max(1.0) as usize;
        let pitch = 2.0 * radius as f64 / count as f64;
        let mut sums = vec![0.0f64; side * side];
        for i in 0..count {
            let y = -radius as f64 + (i as f64 + 0.5) * pitch;
            for j in 0..count {
                let x = -radius as f64 + (j as f64 + 0.5) * pitch;
                if x * x + y * y > (radius as f64) * (radius as f64) {
                    continue;
                }
                let (x0, y0) = (x.floor(), y.floor());
                let (fx, fy) = (x - x0, y - y0);
                // x0, y0 >= -half and x0 + 1, y0 + 1 <= half because |x|, |y| < radius.
                let col = (x0 as isize + half as isize) as usize;
                let row = (y0 as isize + half as isize) as usize;
                sums[row * side + col] += (1.0 - fy) * (1.0 - fx);
                sums[row * side + col + 1] += (1.0 - fy) * fx;
                sums[(row + 1) * side + col] += fy * (1.0 - fx);
                sums[(row + 1) * side + col + 1] += fy * fx;
            }
        }
        let total: f64 = sums.iter().sum();
        DiskKernel {
            half,
            weights: sums.iter().map(|&s| (s / total) as f32).collect(),
        }
    }

    /// `out[y][x] = sum_{dy,dx} w[dy][dx] * plane[clamp(y + dy)][clamp(x + dx)]`: borders
    /// repeat the edge pixel, so a constant image stays constant.
    fn convolve(&self, plane: &[f32], height: usize, width: usize, out: &mut [f32]) {
        let side = 2 * self.half + 1;
        for y in 0..height {
            for x in 0..width {
                let mut acc = 0.0f32;
                for (ky, row) in self.weights.chunks_exact(side).enumerate() {
                    let sy = (y + ky).saturating_sub(self.half).min(height - 1);
                    for (kx, &w) in row.iter().enumerate() {
                        let sx = (x + kx).saturating_sub(self.half).min(width - 1);
                        acc += w * plane[sy * width + sx];
                    }
                }
                out[y * width + x] = acc;
            }
        }
    }
}

/// The reduced size of a `size`-px side for a pixelate side of `side_at_28` px at 28 px:
/// `round(side_at_28 * size / 28)`, at least 1 and at most `size` (proportional scaling, so
/// a 32-px image at severity 5 becomes 9 px).
fn pixelated_size(size: usize, side_at_28: usize) -> usize {
    ((side_at_28 * size + 14) / 28).clamp(1, size.max(1))
}

/// Box-downsamples `plane` (`height x width`) to `small_h x small_w` by area averaging
/// (each reduced pixel is the overlap-weighted mean of the input pixels its area covers),
/// then scales back up by nearest neighbour: output `(y, x)` takes reduced pixel
/// `(floor((y + 0.5) * small_h / height), floor((x + 0.5) * small_w / width))`.
fn pixelate(
    plane: &[f32],
    height: usize,
    width: usize,
    small_h: usize,
    small_w: usize,
    out: &mut [f32],
) {
    // Rows first (height x small_w), then columns (small_h x small_w).
    let mut narrow = vec![0.0f32; height * small_w];
    for (row, narrow_row) in plane
        .chunks_exact(width)
        .zip(narrow.chunks_exact_mut(small_w))
    {
        box_average(row, 1, narrow_row, 1);
    }
    let mut small = vec![0.0f32; small_h * small_w];
    for x in 0..small_w {
        box_average(&narrow[x..], small_w, &mut small[x..], small_w);
    }
    for y in 0..height {
        let sy = (2 * y + 1) * small_h / (2 * height);
        for x in 0..width {
            let sx = (2 * x + 1) * small_w / (2 * width);
            out[y * width + x] = small[sy * small_w + sx];
        }
    }
}

/// Area-average resampling of a strided line: `src` has `n` values at stride `src_stride`
/// (`n = ceil(src.len() / src_stride)`), `dst` receives `m` values at stride `dst_stride`.
///
/// On a common grid of `n * m` units, input `i` covers `[i * m, (i + 1) * m)` and output `j`
/// covers `[j * n, (j + 1) * n)`; `dst[j] = sum_i overlap(i, j) * src[i] / n`. The overlaps
/// are integers, so a constant line whose value times small integers is exact stays exact.
fn box_average(src: &[f32], src_stride: usize, dst: &mut [f32], dst_stride: usize) {
    let n = src.len().div_ceil(src_stride);
    let m = dst.len().div_ceil(dst_stride);
    for j in 0..m {
        let (lo, hi) = (j * n, (j + 1) * n);
        let mut acc = 0.0f32;
        for i in lo / m..hi.div_ceil(m) {
            let overlap = hi.min((i + 1) * m) - lo.max(i * m);
            acc += overlap as f32 * src[i * src_stride];
        }
        dst[j * dst_stride] = acc / n as f32;
    }
}

/// Rotates a `height x width` plane counter-clockwise (as displayed, rows going down) by
/// `degrees` about its centre `((width - 1) / 2, (height - 1) / 2)`, into `out`.
///
/// Output pixel `(x, y)` with `dx = x - cx`, `dy = y - cy` samples the input at
/// `(cx + dx cos a - dy sin a, cy + dx sin a + dy cos a)` bilinearly; pixels outside the input
/// count as 0. Rotation by 0 returns the input exactly. Not clipped. Scratch: none.
pub fn rotate(plane: &[f32], height: usize, width: usize, degrees: f32, out: &mut [f32]) {
    let radians = degrees * (std::f32::consts::PI / 180.0);
    let (sin, cos) = (libm::sinf(radians), libm::cosf(radians));
    let cx = (width as f32 - 1.0) / 2.0;
    let cy = (height as f32 - 1.0) / 2.0;
    let at = |x: f32, y: f32| -> f32 {
        if x >= 0.0 && y >= 0.0 && x < width as f32 && y < height as f32 {
            plane[y as usize * width + x as usize]
        } else {
            0.0
        }
    };
    for y in 0..height {
        let dy = y as f32 - cy;
        for x in 0..width {
            let dx = x as f32 - cx;
            let sx = cx + dx * cos - dy * sin;
            let sy = cy + dx * sin + dy * cos;
            let (x0, y0) = (sx.floor(), sy.floor());
            let (fx, fy) = (sx - x0, sy - y0);
            let top = (1.0 - fx) * at(x0, y0) + fx * at(x0 + 1.0, y0);
            let bottom = (1.0 - fx) * at(x0, y0 + 1.0) + fx * at(x0 + 1.0, y0 + 1.0);
            out[y * width + x] = (1.0 - fy) * top + fy * bottom;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_kernels_are_normalised_symmetric_and_widen_with_radius() {
        let mut previous_centre = 1.0;
        for severity in 1..=5 {
            let r = Corruption::DefocusBlur.parameter(severity).unwrap();
            let k = DiskKernel::new(r);
            let side = 2 * k.half + 1;
            let sum: f32 = k.weights.iter().sum();
            assert!((sum - 1.0).abs() < 1e-5, "r {r}: sum {sum}");
            for i in 0..side * side {
                let (row, col) = (i / side, i % side);
                let mirrored = k.weights[(side - 1 - row) * side + (side - 1 - col)];
                let transposed = k.weights[col * side + row];
                assert!((k.weights[i] - mirrored).abs() < 1e-6);
                assert!((k.weights[i] - transposed).abs() < 1e-6);
            }
            let centre = k.weights[k.half * side + k.half];
            assert!(centre < previous_centre, "r {r}: centre {centre}");
            previous_centre = centre;
        }
    }

    #[test]
    fn poisson_inversion_has_the_right_mean() {
        let mut rng = Rng::new(3);
        let n = 20_000;
        for mean in [0.0f32, 0.5, 3.0, 60.0] {
            let total: f32 = (0..n).map(|_| poisson(mean, rng.next_f32())).sum();
            let estimate = total / n as f32;
            assert!(
                (estimate - mean).abs() < 0.03 * mean + 0.02,
                "{mean}: {estimate}"
            );
        }
    }

    #[test]
    fn box_average_matches_hand_computed_overlaps() {
        // 3 -> 2: output 0 covers input 0 and half of input 1.
        let mut dst = [0.0f32; 2];
        box_average(&[0.0, 3.0, 6.0], 1, &mut dst, 1);
        assert_eq!(dst, [1.0, 5.0]);
        // Strided column of a 2-wide plane.
        let mut dst = [0.0f32; 1];
        box_average(&[1.0, 9.0, 3.0, 9.0], 2, &mut dst, 1);
        assert_eq!(dst, [2.0]);
    }

    #[test]
    fn pixelated_sizes_scale_with_the_image() {
        assert_eq!(pixelated_size(28, 20), 20);
        assert_eq!(pixelated_size(32, 8), 9);
        assert_eq!(pixelated_size(1, 8), 1);
        assert_eq!(pixelated_size(128, 20), 91);
    }

    #[test]
    fn sample_seeds_differ_by_seed_and_index() {
        assert_ne!(sample_seed(0, 1), sample_seed(1, 0));
        assert_ne!(sample_seed(0, 0), sample_seed(0, 1));
        assert_eq!(sample_seed(5, 9), sample_seed(5, 9));
    }
}
