//! The kernel self-test on a device: random jobs, the host twin, the QEMU run, the
//! byte-for-byte comparison of the results, and the measurements.
//!
//! The job format and the runner are [`mcutrain_core::selftest`]: the host and the firmware
//! decode the same bytes and run the same code, so any difference in the result bytes is a
//! difference between the targets (compiler, FPU, integer arithmetic).

use std::fmt::Write as _;
use std::fs;

use mcutrain_core::ops::activation::Activation;
use mcutrain_core::ops::arith::QLayerParams;
use mcutrain_core::ops::conv2d::Conv2dGeom;
use mcutrain_core::ops::linear::LinearGeom;
use mcutrain_core::ops::weighted::WeightedKernels;
use mcutrain_core::ops::ChannelSet;
use mcutrain_core::quant::{QParams, RangeEma};
use mcutrain_core::rng::Rng;
use mcutrain_core::selftest::{
    self, ConvCase, Kernel, LinearCase, NoProbe, SelfTest, Store, UpdateCase,
};
use mcutrain_core::update::{FqtUpdateConfig, GradStats};

use super::qemu::{ticks_to_instructions, WorkDir};
use super::{DeviceError, Footprint, Image, Machine, Qemu};

/// Convolution geometries of the random jobs, one per kernel path: standard 3x3, strided,
/// depthwise 3x3 (fast path), pointwise 1x1 (fast path), grouped 5x5, and 1-D.
pub const CONV_GEOMETRIES: [Conv2dGeom; 6] = [
    Conv2dGeom::square(2, 3, 8, 8, 8, 3, 1, 1, 1),
    Conv2dGeom::square(1, 4, 9, 7, 6, 3, 2, 1, 1),
    Conv2dGeom::square(2, 8, 6, 6, 8, 3, 1, 1, 8),
    Conv2dGeom::square(2, 8, 5, 5, 12, 1, 1, 0, 1),
    Conv2dGeom::square(1, 6, 10, 10, 6, 5, 1, 2, 3),
    Conv2dGeom {
        batch: 2,
        in_channels: 6,
        in_h: 1,
        in_w: 32,
        out_channels: 8,
        kernel_h: 1,
        kernel_w: 5,
        stride_h: 1,
        stride_w: 1,
        pad_h: 0,
        pad_w: 2,
        groups: 1,
    },
];

/// Owned inputs of one self-test job (see [`SelfTestInputs::job`]).
#[derive(Clone, Debug)]
pub struct SelfTestInputs {
    conv: Conv2dGeom,
    conv_q: [QParams; 4],
    weight_q: Vec<QParams>,
    activation: Activation,
    conv_channels: Option<Vec<u16>>,
    conv_input: Vec<i8>,
    conv_weight: Vec<i8>,
    conv_bias: Vec<i32>,
    conv_err: Vec<i8>,
    linear: LinearGeom,
    linear_channels: Option<Vec<u16>>,
    linear_tensors: [Vec<f32>; 4],
    update_weights: Vec<i8>,
    update_q: QParams,
    update_range: RangeEma,
    update_grads: Vec<f32>,
    update_channels: Option<Vec<u16>>,
    update_stats: Vec<GradStats>,
}

impl SelfTestInputs {
    /// A random job. `seed` picks the convolution geometry (`seed % 6` in
    /// [`CONV_GEOMETRIES`]), per-tensor or per-channel weight scales, the activation, channel
    /// subsets or all channels, the fully connected shape, and every value. The float inputs
    /// include subnormal numbers and signed zeros.
    pub fn random(seed: u64) -> SelfTestInputs {
        let mut rng = Rng::new(seed);
        let conv = CONV_GEOMETRIES[(seed % CONV_GEOMETRIES.len() as u64) as usize];
        let structures = conv.out_channels;
        let structure_len = conv.weight_len() / structures;
        let per_channel = rng.next_u32() & 1 == 1;
        let weight_q = (0..if per_channel { structures } else { 1 })
            .map(|_| qparams(&mut rng, 0.005, 0.05, 8))
            .collect::<Vec<_>>();
        let input_q = qparams(&mut rng, 0.01, 0.1, 60);
        let linear = LinearGeom {
            batch: 1 + rng.below(3) as usize,
            in_features: 8 + rng.below(40) as usize,
            out_features: 2 + rng.below(14) as usize,
        };
        let mut linear_input = normals(&mut rng, linear.input_len(), 1.0);
        for (x, special) in linear_input.iter_mut().zip([1e-39, -3e-42, -0.0, 1e-45]) {
            *x = special;
        }
        let mut linear_weight = normals(&mut rng, linear.weight_len(), 0.3);
        linear_weight[0] = -0.0;
        SelfTestInputs {
            conv,
            conv_q: [
                input_q,
                qparams(&mut rng, 0.05, 0.5, 60),
                qparams(&mut rng, 0.001, 0.01, 20),
                qparams(&mut rng, 0.001, 0.02, 20),
            ],
            weight_q,
            activation: [Activation::None, Activation::Relu, Activation::Relu6]
                [rng.below(3) as usize],
            conv_channels: channel_subset(&mut rng, structures),
            conv_input: codes(&mut rng, conv.input_len()),
            conv_weight: codes(&mut rng, conv.weight_len()),
            conv_bias: (0..structures)
                .map(|_| rng.below(4001) as i32 - 2000)
                .collect(),
            conv_err: codes(&mut rng, conv.output_len()),
            linear,
            linear_channels: channel_subset(&mut rng, linear.out_features),
            linear_tensors: [
                linear_input,
                linear_weight,
                normals(&mut rng, linear.out_features, 0.1),
                normals(&mut rng, linear.output_len(), 0.5),
            ],
            update_weights: codes(&mut rng, structures * structure_len),
            update_q: qparams(&mut rng, 0.005, 0.02, 0),
            update_range: RangeEma::from_range(-1.5, 1.3),
            update_grads: normals(&mut rng, structures * structure_len, 0.1),
            update_channels: channel_subset(&mut rng, structures),
            update_stats: (0..structures)
                .map(|_| GradStats {
                    mean: 0.01 * rng.normal(),
                    var: 0.01 + 0.1 * rng.next_f32(),
                    initialized: rng.next_u32() & 1 == 1,
                })
                .collect(),
        }
    }

    /// The job, borrowing these inputs.
    pub fn job(&self) -> SelfTest<'_> {
        let [input_q, output_q, out_err_q, in_err_q] = self.conv_q;
        SelfTest {
            conv: ConvCase {
                geom: self.conv,
                layer: QLayerParams {
                    input: input_q,
                    weight: &self.weight_q,
                    bias_scale: input_q.scale * self.weight_q[0].scale,
                    output: output_q,
                    activation: self.activation,
                },
                out_err_q,
                in_err_q,
                channels: channels(&self.conv_channels),
                input: &self.conv_input,
                weight: &self.conv_weight,
                bias: &self.conv_bias,
                out_err: &self.conv_err,
            },
            linear: LinearCase {
                geom: self.linear,
                channels: channels(&self.linear_channels),
                input: &self.linear_tensors[0],
                weight: &self.linear_tensors[1],
                bias: &self.linear_tensors[2],
                out_err: &self.linear_tensors[3],
            },
            update: UpdateCase {
                weights: &self.update_weights,
                weight_q: self.update_q,
                range: self.update_range,
                grads: &self.update_grads,
                structure_len: self.update_weights.len() / self.update_stats.len(),
                channels: channels(&self.update_channels),
                stats: &self.update_stats,
                config: FqtUpdateConfig {
                    lr: 0.05,
                    stats_rate: 0.8,
                    range_rate: 0.01,
                    eps: 1e-6,
                },
            },
        }
    }

    /// The encoded job, checked to fit the firmware's input buffer.
    pub fn encode(&self) -> Result<Vec<u8>, DeviceError> {
        let job = self.job();
        let mut bytes = vec![0; job.encoded_len()?];
        job.encode(&mut bytes)?;
        if bytes.len() > selftest::MAX_JOB_BYTES {
            return Err(DeviceError::Usage(format!(
                "the self-test job has {} bytes, the firmware accepts {}",
                bytes.len(),
                selftest::MAX_JOB_BYTES
            )));
        }
        Ok(bytes)
    }
}

fn qparams(rng: &mut Rng, min_scale: f32, max_scale: f32, max_zero: u32) -> QParams {
    QParams {
        scale: min_scale + (max_scale - min_scale) * rng.next_f32(),
        zero_point: rng.below(2 * max_zero + 1) as i32 - max_zero as i32,
    }
}

fn codes(rng: &mut Rng, n: usize) -> Vec<i8> {
    (0..n)
        .map(|_| (rng.below(256) as i32 - 128) as i8)
        .collect()
}

fn normals(rng: &mut Rng, n: usize, std: f32) -> Vec<f32> {
    (0..n).map(|_| std * rng.normal()).collect()
}

fn channels(list: &Option<Vec<u16>>) -> ChannelSet<'_> {
    match list {
        Some(list) => ChannelSet::Subset(list),
        None => ChannelSet::All,
    }
}

/// `None` (all channels) or a random non-empty subset of `count` channels, in random order.
fn channel_subset(rng: &mut Rng, count: usize) -> Option<Vec<u16>> {
    if rng.next_u32() & 1 == 0 {
        return None;
    }
    let mut all: Vec<u16> = (0..count as u16).collect();
    for i in (1..all.len()).rev() {
        all.swap(i, rng.below(i as u32 + 1) as usize);
    }
    all.truncate(1 + rng.below(count as u32) as usize);
    Some(all)
}

/// Runs an encoded job in the host twin and returns the encoded results.
pub fn run_on_host(job: &[u8]) -> Result<Vec<u8>, DeviceError> {
    let mut store = Box::new(Store::new());
    let (job, mut results) = store.load(job)?;
    selftest::run(&job, &mut results, &mut NoProbe);
    let mut bytes = vec![0; results.encoded_len()];
    results.encode(&mut bytes)?;
    Ok(bytes)
}

/// Instructions of one kernel call on the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelCount {
    /// The call.
    pub kernel: Kernel,
    /// Instructions executed in it (the measurement's own cost subtracted).
    pub instructions: u64,
}

/// What a device run measured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Measurements {
    /// The machine.
    pub machine: Machine,
    /// Instructions per kernel call, in [`Kernel::ALL`] order.
    pub kernels: Vec<KernelCount>,
    /// Instructions of an empty measured region (two timer reads), subtracted from each call.
    pub overhead_instructions: u64,
    /// `.data + .bss + .uninit`, as the firmware's linker symbols give it.
    pub static_ram_bytes: u64,
    /// SRAM left for the stack.
    pub stack_limit_bytes: u64,
    /// Deepest stack use (stack painting).
    pub peak_stack_bytes: u64,
    /// Sizes of the image.
    pub footprint: Footprint,
}

impl Measurements {
    /// SRAM used: static data plus the peak stack.
    pub fn sram_bytes(&self) -> u64 {
        self.static_ram_bytes + self.peak_stack_bytes
    }

    /// A report table: instructions per kernel call, then memory.
    pub fn table(&self) -> String {
        let mut out = format!("{:<30} {:>12}\n", self.machine.name(), "instructions");
        for k in &self.kernels {
            let _ = writeln!(out, "{:<30} {:>12}", k.kernel.name(), k.instructions);
        }
        let _ = writeln!(
            out,
            "(timer read overhead of {} instructions subtracted from each call)",
            self.overhead_instructions
        );
        let f = &self.footprint;
        let _ = writeln!(
            out,
            "SRAM {} bytes = static {} (.data {} + .bss {}) + peak stack {} (of {} left)\n\
             flash {} bytes = code {} + constants {} + .data {}",
            self.sram_bytes(),
            self.static_ram_bytes,
            f.data_bytes,
            f.bss_bytes,
            self.peak_stack_bytes,
            self.stack_limit_bytes,
            f.flash_bytes(),
            f.code_bytes,
            f.const_bytes,
            f.data_bytes
        );
        out
    }
}

/// The outcome of a job on a device.
#[derive(Clone, Debug)]
pub struct DeviceRun {
    /// Encoded results, comparable with [`run_on_host`]'s.
    pub results: Vec<u8>,
    /// What was measured.
    pub measurements: Measurements,
    /// What the firmware printed.
    pub console: String,
}

/// Runs an encoded job on `machine` with the firmware `image`: writes `job.bin` into a fresh
/// working directory, runs QEMU there, reads `results.bin` and `metrics.txt`.
pub fn run_on_device(
    machine: Machine,
    image: &Image,
    qemu: &Qemu,
    job: &[u8],
) -> Result<DeviceRun, DeviceError> {
    let workdir = WorkDir::new()?;
    fs::write(workdir.path().join("job.bin"), job).map_err(DeviceError::io("write job.bin"))?;
    let console = qemu.run(machine, &image.elf, workdir.path())?;
    let read = |name: &str| {
        fs::read(workdir.path().join(name))
            .map_err(|e| DeviceError::BadOutput(format!("the firmware left no {name}: {e}")))
    };
    let results = read("results.bin")?;
    let metrics = String::from_utf8(read("metrics.txt")?)
        .map_err(|_| DeviceError::BadOutput("metrics.txt is not UTF-8".into()))?;
    let measurements = parse_metrics(machine, &metrics, image.footprint)?;
    Ok(DeviceRun {
        results,
        measurements,
        console,
    })
}

/// Parses the firmware's `metrics.txt` (format in `firmware/src/main.rs`).
fn parse_metrics(
    machine: Machine,
    text: &str,
    footprint: Footprint,
) -> Result<Measurements, DeviceError> {
    let bad = |what: String| DeviceError::BadOutput(format!("metrics.txt: {what}"));
    let mut overhead = None;
    let mut ticks = vec![None; Kernel::ALL.len()];
    let mut sizes = [None; 3];
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let number = |s: &str| s.parse::<u64>().map_err(|_| bad(format!("`{line}`")));
        match fields[..] {
            ["counter", "qemu-timer0-ticks"] => {}
            ["counter", unit] => return Err(bad(format!("unit `{unit}` is not QEMU's timer"))),
            ["overhead", n] => overhead = Some(number(n)?),
            ["kernel", name, n] => {
                let i = Kernel::ALL
                    .iter()
                    .position(|k| k.name() == name)
                    .ok_or_else(|| bad(format!("unknown kernel `{name}`")))?;
                ticks[i] = Some(number(n)?);
            }
            ["static_ram_bytes", n] => sizes[0] = Some(number(n)?),
            ["stack_limit_bytes", n] => sizes[1] = Some(number(n)?),
            ["peak_stack_bytes", n] => sizes[2] = Some(number(n)?),
            _ => return Err(bad(format!("unexpected line `{line}`"))),
        }
    }
    let overhead = ticks_to_instructions(overhead.ok_or_else(|| bad("no overhead".into()))?);
    let kernels = Kernel::ALL
        .iter()
        .zip(ticks)
        .map(|(&kernel, t)| {
            let t = t.ok_or_else(|| bad(format!("no count for {}", kernel.name())))?;
            Ok(KernelCount {
                kernel,
                instructions: ticks_to_instructions(t).saturating_sub(overhead),
            })
        })
        .collect::<Result<Vec<_>, DeviceError>>()?;
    let [Some(static_ram_bytes), Some(stack_limit_bytes), Some(peak_stack_bytes)] = sizes else {
        return Err(bad("memory figures missing".into()));
    };
    Ok(Measurements {
        machine,
        kernels,
        overhead_instructions: overhead,
        static_ram_bytes,
        stack_limit_bytes,
        peak_stack_bytes,
        footprint,
    })
}

/// `Ok` when two encoded results are identical; else the first difference, named by output.
pub fn compare_results(host: &[u8], device: &[u8]) -> Result<(), String> {
    let blocks = |bytes| {
        selftest::result_blocks(bytes)
            .and_then(|blocks| blocks.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("malformed results: {e}"))
    };
    let (host_blocks, device_blocks) = (blocks(host)?, blocks(device)?);
    for ((output, h), (_, d)) in host_blocks.iter().zip(&device_blocks) {
        if h.len() != d.len() {
            return Err(format!(
                "{}: {} bytes on the host, {} on the device",
                output.name(),
                h.len(),
                d.len()
            ));
        }
        if let Some(at) = h.iter().zip(d.iter()).position(|(a, b)| a != b) {
            return Err(format!(
                "{} differs first at byte {at} of {} (host {:#04x}, device {:#04x})",
                output.name(),
                h.len(),
                h[at],
                d[at]
            ));
        }
    }
    if host != device {
        return Err("the results differ outside their blocks".into());
    }
    Ok(())
}

/// A fresh directory under the system's temporary directory, removed on drop.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_jobs_cover_every_geometry_and_fit_the_firmware() {
        for seed in 0..CONV_GEOMETRIES.len() as u64 {
            let inputs = SelfTestInputs::random(seed);
            assert_eq!(inputs.conv, CONV_GEOMETRIES[seed as usize]);
            let job = inputs.encode().unwrap();
            assert!(job.len() <= selftest::MAX_JOB_BYTES);
            let results = run_on_host(&job).unwrap();
            assert!(results.len() <= selftest::MAX_RESULTS_BYTES);
            assert_eq!(results, run_on_host(&job).unwrap());
        }
        assert_ne!(
            SelfTestInputs::random(0).encode().unwrap(),
            SelfTestInputs::random(6).encode().unwrap()
        );
    }

    #[test]
    fn a_difference_is_named_by_its_output() {
        let host = run_on_host(&SelfTestInputs::random(2).encode().unwrap()).unwrap();
        assert_eq!(compare_results(&host, &host), Ok(()));
        let mut device = host.clone();
        let last = device.len() - 1; // inside the last block, the update statistics
        device[last] ^= 1;
        let error = compare_results(&host, &device).unwrap_err();
        assert!(
            error.starts_with("update::fqt_update_weights statistics differs"),
            "{error}"
        );
    }

    #[test]
    fn metrics_convert_ticks_and_check_completeness() {
        let mut text = String::from("counter qemu-timer0-ticks\noverhead 32\n");
        for (i, k) in Kernel::ALL.iter().enumerate() {
            text += &format!("kernel {} {}\n", k.name(), 3200 * (i + 1));
        }
        text += "static_ram_bytes 100\nstack_limit_bytes 900\npeak_stack_bytes 50\n";
        let m = parse_metrics(Machine::QemuM4, &text, Footprint::default()).unwrap();
        assert_eq!(m.overhead_instructions, 10);
        assert_eq!(m.kernels[0].instructions, 990);
        assert_eq!(m.kernels[8].instructions, 8990);
        assert_eq!(m.sram_bytes(), 150);

        let partial = text.replace("peak_stack_bytes 50\n", "");
        assert!(parse_metrics(Machine::QemuM4, &partial, Footprint::default()).is_err());
        let cycles = text.replace("qemu-timer0-ticks", "dwt-cycles");
        assert!(parse_metrics(Machine::QemuM4, &cycles, Footprint::default()).is_err());
    }
}
