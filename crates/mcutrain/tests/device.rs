//! The firmware on emulated Cortex-M4 and M7: the kernels give byte-identical results there
//! and in the host twin, the measurements are sane, and an image over its memory budget is
//! refused at link time.
//!
//! These tests need `qemu-system-arm` and the thumbv7em-none-eabihf target, which
//! `scripts/setup.sh` installs (`scripts/test.sh` runs it first): without them they fail
//! with an error that says so, they do not skip.

use mcutrain::device::selftest::{
    compare_results, run_on_device, run_on_host, Measurements, SelfTestInputs, CONV_GEOMETRIES,
};
use mcutrain::device::{Budget, DeviceError, Firmware, Image, Machine, Program, Qemu};
use mcutrain_core::ops::weighted::WeightedKernels;
use mcutrain_core::selftest::Kernel;

fn image(budget: &Budget) -> Image {
    Firmware::in_repository()
        .build(budget, Program::SelfTest)
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Runs random jobs covering every convolution geometry on `machine` and in the host twin
/// and compares the result bytes; returns the measurements of the first job.
fn bit_identical_on(machine: Machine) -> Measurements {
    let image = image(&Budget::default());
    let qemu = Qemu::default();
    let mut first = None;
    for seed in 0..CONV_GEOMETRIES.len() as u64 * 2 {
        let job = SelfTestInputs::random(seed).encode().unwrap();
        let host = run_on_host(&job).unwrap();
        let device = run_on_device(machine, &image, &qemu, &job).unwrap_or_else(|e| panic!("{e}"));
        if let Err(difference) = compare_results(&host, &device.results) {
            panic!("seed {seed} on {machine}: {difference}");
        }
        let geom = CONV_GEOMETRIES[seed as usize % CONV_GEOMETRIES.len()];
        let count = |k: usize| device.measurements.kernels[k].instructions;
        println!(
            "{machine} seed {seed}: conv {}x{}x{} -> {} k{}x{} stride {} groups {}: forward_q \
             {:.1} instructions per MAC; input_backward_q {}, weight_backward_q {} \
             instructions (over the job's channels)",
            geom.in_channels,
            geom.in_h,
            geom.in_w,
            geom.out_channels,
            geom.kernel_h,
            geom.kernel_w,
            geom.stride_w,
            geom.groups,
            count(0) as f64 / geom.macs() as f64,
            count(1),
            count(2),
        );
        first.get_or_insert(device.measurements);
    }
    let measurements = first.unwrap();
    println!("{}", measurements.table());
    measurements
}

#[test]
fn kernels_are_bit_identical_on_qemu_m4_and_the_host() {
    bit_identical_on(Machine::QemuM4);
}

#[test]
fn kernels_are_bit_identical_on_qemu_m7_and_the_host() {
    bit_identical_on(Machine::QemuM7);
}

#[test]
fn measurements_are_exact_repeatable_and_within_budget() {
    let budget = Budget::default();
    let image = image(&budget);
    let job = SelfTestInputs::random(0).encode().unwrap();
    let qemu = Qemu::default();
    let run = || {
        run_on_device(Machine::QemuM4, &image, &qemu, &job)
            .unwrap_or_else(|e| panic!("{e}"))
            .measurements
    };
    let m = run();
    assert_eq!(
        m,
        run(),
        "instruction counts or stack differ between two runs"
    );

    // Every multiply-accumulate costs at least half an instruction (two per SMLAD at best).
    let macs = CONV_GEOMETRIES[0].macs() as u64;
    let count = |k: Kernel| {
        m.kernels
            .iter()
            .find(|c| c.kernel == k)
            .unwrap()
            .instructions
    };
    assert!(count(Kernel::Conv2dForwardQ) >= macs / 2, "{}", m.table());
    assert!(
        m.kernels.iter().all(|k| k.instructions > 0),
        "{}",
        m.table()
    );

    // The firmware's linker symbols and the ELF's section headers agree on static RAM.
    assert_eq!(m.static_ram_bytes, m.footprint.static_ram_bytes());
    assert_eq!(m.static_ram_bytes + m.stack_limit_bytes, budget.sram_bytes);
    assert!(m.stack_limit_bytes >= budget.min_stack_bytes);
    assert!(
        m.peak_stack_bytes > 256 && m.peak_stack_bytes < budget.min_stack_bytes,
        "{}",
        m.table()
    );
    assert!(m.footprint.flash_bytes() > 10_000 && m.footprint.flash_bytes() <= budget.flash_bytes);
}

#[test]
fn an_image_over_the_sram_budget_is_refused_at_link_time() {
    let tight = Budget {
        sram_bytes: 8 << 10,
        ..Budget::default()
    };
    match Firmware::in_repository().build(&tight, Program::SelfTest) {
        Err(DeviceError::OverBudget { linker, breakdown }) => {
            assert!(linker.contains("RAM"), "{linker}");
            assert!(breakdown.contains("> budget 8192 bytes"), "{breakdown}");
            assert!(breakdown.contains("< budget 1048576 bytes"), "{breakdown}");
        }
        other => panic!("expected an over-budget error, got {other:?}"),
    }
    // Static data fits, but not with the minimum stack: the budget's own assertion.
    let no_stack = Budget {
        sram_bytes: 64 << 10,
        min_stack_bytes: 32 << 10,
        ..Budget::default()
    };
    match Firmware::in_repository().build(&no_stack, Program::SelfTest) {
        Err(e @ DeviceError::OverBudget { .. }) => {
            let text = e.to_string();
            assert!(text.contains("mcutrain budget"), "{text}");
            assert!(text.contains("minimum stack"), "{text}");
            assert!(text.contains("nothing ran"), "{text}");
        }
        other => panic!("expected an over-budget error, got {other:?}"),
    }
}

#[test]
fn a_missing_emulator_says_to_run_setup() {
    let image = image(&Budget::default());
    let qemu = Qemu {
        binary: "/nonexistent/qemu-system-arm".into(),
        ..Qemu::default()
    };
    let job = SelfTestInputs::random(1).encode().unwrap();
    let error = run_on_device(Machine::QemuM7, &image, &qemu, &job).unwrap_err();
    assert!(
        matches!(error, DeviceError::MissingTool { .. }),
        "{error:?}"
    );
    assert!(
        error.to_string().contains("run scripts/setup.sh"),
        "{error}"
    );
}
