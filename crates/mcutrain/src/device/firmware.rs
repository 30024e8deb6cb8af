//! The firmware build: `cargo build --release` of `firmware/` for thumbv7em-none-eabihf with
//! the memory budgets in the environment (its `build.rs` writes them into `memory.x`, so an
//! image over budget fails to link) and, for a training image, the plan file (`MCUTRAIN_PLAN`:
//! embedded in flash, the arena sized from it in SRAM), cached by a hash of the sources, the
//! budgets, the plan and the compiler, under `target/firmware/`.
//!
//! Two toolchains are recognised: the pinned rustup toolchain with the target installed
//! (`rustup target add thumbv7em-none-eabihf`), or, where rustup cannot download it, Debian's
//! `rustc-web` with its library source, building `core` itself (`-Zbuild-std=core`) and
//! linking with `arm-none-eabi-ld`. `scripts/setup.sh` installs one of them.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::{Budget, DeviceError, Footprint};
use crate::compile::plan_file::PlanSizes;
use crate::fsutil::write_atomically;

/// The Rust target of the Cortex-M4F/M7F.
pub const TARGET: &str = "thumbv7em-none-eabihf";
/// A board the firmware is built for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Board {
    /// QEMU's MPS2-AN386 (Cortex-M4) and MPS2-AN500 (Cortex-M7): one image for both.
    Qemu,
    /// The STM32 Nucleo-F746ZG (Cortex-M7), flashed with `probe-rs`; untested on hardware.
    NucleoF746zg,
}

impl Board {
    /// The cargo features that select it.
    fn features(self) -> &'static [&'static str] {
        match self {
            Board::Qemu => &[],
            Board::NucleoF746zg => &["--no-default-features", "--features", "board-nucleo-f746zg"],
        }
    }

    /// `(SRAM, flash)` bytes of the board: the budget used to measure an image that does not
    /// fit its own.
    fn memory_bytes(self) -> (u64, u64) {
        match self {
            Board::Qemu => (4 << 20, 4 << 20),
            Board::NucleoF746zg => (320 << 10, 1 << 20),
        }
    }

    /// Name of its build directory under `target/`.
    fn target_dir_name(self) -> &'static str {
        match self {
            Board::Qemu => "firmware",
            Board::NucleoF746zg => "firmware-nucleo-f746zg",
        }
    }
}

/// Environment that a surrounding cargo or shell may set and that must not reach the
/// firmware's tools: host flags, another target or target directory, or a toolchain other
/// than the one `rust-toolchain.toml` pins.
const FOREIGN_ENV: [&str; 6] = [
    "RUSTFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_BUILD_RUSTFLAGS",
    "CARGO_BUILD_TARGET",
    "CARGO_TARGET_DIR",
    "RUSTUP_TOOLCHAIN",
];

/// `program` run in the firmware project without [`FOREIGN_ENV`].
fn tool(program: &str, project: &Path) -> Command {
    let mut command = Command::new(program);
    command.current_dir(project);
    for var in FOREIGN_ENV {
        command.env_remove(var);
    }
    command
}

/// The firmware project and where its builds go.
#[derive(Clone, Debug)]
pub struct Firmware {
    repository: PathBuf,
    target_dir: PathBuf,
    board: Board,
}

/// A built firmware image.
#[derive(Clone, Debug)]
pub struct Image {
    /// The ELF file (in the cache; stays valid while the cache is kept).
    pub elf: PathBuf,
    /// Its sizes.
    pub footprint: Footprint,
    /// The budgets it was linked with.
    pub budget: Budget,
    /// True when it came from the cache without running cargo.
    pub cached: bool,
}

/// What an image runs: the kernel self-test, or training with an embedded plan.
#[derive(Clone, Copy, Debug)]
pub enum Program<'a> {
    /// The kernel self-test (`job.bin` in, `results.bin` and `metrics.txt` out).
    SelfTest,
    /// A training session with this plan file embedded (`session.bin` in, `results.bin`
    /// out; see `mcutrain_core::session`).
    Train {
        /// The plan file's bytes.
        plan: &'a [u8],
    },
}

impl Program<'_> {
    fn plan(&self) -> Option<&[u8]> {
        match self {
            Program::SelfTest => None,
            Program::Train { plan } => Some(plan),
        }
    }
}

/// How to compile for the target.
#[derive(Clone, Debug)]
enum Toolchain {
    /// The toolchain that `cargo` selects in `firmware/` has the target.
    Rustup,
    /// Debian's `/usr/bin/rustc` and `/usr/bin/cargo` with the library source.
    DebianBuildStd,
}

impl Firmware {
    /// The firmware of this repository (`firmware/` beside `crates/`) for QEMU, built into
    /// `target/firmware/`.
    pub fn in_repository() -> Firmware {
        Firmware::for_board(Board::Qemu)
    }

    /// The firmware of this repository for `board`, built into `target/firmware/` (QEMU) or
    /// `target/firmware-<board>/`.
    pub fn for_board(board: Board) -> Firmware {
        let repository = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        Firmware::new(&repository, board)
    }

    /// The firmware of the repository at `repository` for `board`.
    pub fn new(repository: &Path, board: Board) -> Firmware {
        Firmware {
            repository: repository.to_path_buf(),
            target_dir: repository.join("target").join(board.target_dir_name()),
            board,
        }
    }

    fn project(&self) -> PathBuf {
        self.repository.join("firmware")
    }

    /// Builds the image of `program` for `budget`, or takes it from the cache. An image over
    /// budget is a [`DeviceError::OverBudget`] with the linker's message and the sizes of its
    /// parts. A training plan is first checked against the budget with [`check_plan`], so a plan
    /// that cannot fit is refused before cargo runs.
    pub fn build(&self, budget: &Budget, program: Program) -> Result<Image, DeviceError> {
        if let Some(plan) = program.plan() {
            check_plan(&PlanSizes::of(plan)?, budget)?;
        }
        let toolchain = detect_toolchain(&self.project())?;
        let key = self.cache_key(budget, program, &toolchain)?;
        let images = self.target_dir.join("images");
        let cached = images.join(format!("mcutrain-firmware-{key:016x}.elf"));
        if let Some(image) = load_image(&cached, budget, true)? {
            return Ok(image);
        }
        fs::create_dir_all(&images).map_err(DeviceError::io("create target/firmware"))?;
        // One build at a time (threads and processes): cargo writes one output path for
        // every budget, which must not change before it is copied into the cache.
        let lock_path = self.target_dir.join("build.lock");
        let lock = fs::File::create(&lock_path).map_err(DeviceError::io("create build.lock"))?;
        lock.lock().map_err(DeviceError::io("lock build.lock"))?;
        if let Some(image) = load_image(&cached, budget, true)? {
            return Ok(image);
        }
        let plan_path = match program.plan() {
            Some(plan) => Some(self.store_plan(key, plan)?),
            None => None,
        };
        let output = self.cargo_build(budget, plan_path.as_deref(), &toolchain)?;
        if !output.status.success() {
            drop(lock);
            let stderr = String::from_utf8_lossy(&output.stderr);
            return Err(self.build_failure(budget, program, &stderr));
        }
        let built = self
            .target_dir
            .join(TARGET)
            .join("release/mcutrain-firmware");
        let image = fs::read(&built).map_err(DeviceError::io("read the firmware image"))?;
        store(&cached, &image)?;
        prune_cache(&images);
        drop(lock);
        load_image(&cached, budget, false)?
            .ok_or_else(|| DeviceError::Build(format!("{} vanished", cached.display())))
    }

    /// Writes the plan file where `build.rs` reads it: `target/firmware/plans/`, named by the
    /// image's key (so an unchanged plan keeps its path and does not trigger a rebuild).
    fn store_plan(&self, key: u64, plan: &[u8]) -> Result<PathBuf, DeviceError> {
        let plans = self.target_dir.join("plans");
        fs::create_dir_all(&plans).map_err(DeviceError::io("create target/firmware/plans"))?;
        let path = plans.join(format!("plan-{key:016x}.bin"));
        store(&path, plan)?;
        path.canonicalize()
            .map_err(DeviceError::io(format!("find {}", path.display())))
    }

    fn cargo_build(
        &self,
        budget: &Budget,
        plan: Option<&Path>,
        toolchain: &Toolchain,
    ) -> Result<std::process::Output, DeviceError> {
        let mut cargo = match toolchain {
            Toolchain::Rustup => tool("cargo", &self.project()),
            Toolchain::DebianBuildStd => {
                let mut cargo = tool("/usr/bin/cargo", &self.project());
                cargo
                    .env("RUSTC", "/usr/bin/rustc")
                    .env("RUSTC_BOOTSTRAP", "1")
                    .env(
                        "CARGO_TARGET_THUMBV7EM_NONE_EABIHF_LINKER",
                        "arm-none-eabi-ld",
                    )
                    .arg("-Zbuild-std=core");
                cargo
            }
        };
        cargo
            .args(["build", "--release", "--locked", "--target", TARGET])
            .args(self.board.features())
            .arg("--target-dir")
            .arg(&self.target_dir)
            .env("MCUTRAIN_SRAM", budget.sram_bytes.to_string())
            .env("MCUTRAIN_FLASH", budget.flash_bytes.to_string())
            .env("MCUTRAIN_MIN_STACK", budget.min_stack_bytes.to_string());
        match plan {
            Some(path) => cargo.env("MCUTRAIN_PLAN", path),
            None => cargo.env_remove("MCUTRAIN_PLAN"),
        };
        cargo.output().map_err(|e| DeviceError::MissingTool {
            what: "cargo".into(),
            detail: e.to_string(),
        })
    }

    /// Classifies a failed build; over budget, measures the image against the board's whole
    /// memory for the breakdown.
    fn build_failure(&self, budget: &Budget, program: Program, stderr: &str) -> DeviceError {
        let messages = linker_messages(stderr);
        let over_budget = [
            "mcutrain budget",
            "will not fit in region",
            "stack end address",
        ]
        .iter()
        .any(|marker| messages.contains(marker));
        if !over_budget {
            return DeviceError::Build(stderr.trim().to_string());
        }
        let linker = format!("refused at link time:\n{messages}");
        let (sram_bytes, flash_bytes) = self.board.memory_bytes();
        let unbounded = Budget {
            sram_bytes,
            flash_bytes,
            min_stack_bytes: budget.min_stack_bytes,
        };
        if unbounded == *budget {
            return DeviceError::OverBudget {
                linker,
                breakdown: "(the budget is the board's whole memory)".into(),
            };
        }
        let plan = program.plan().map(PlanSizes::of).transpose();
        let breakdown = match (self.build(&unbounded, program), plan) {
            (Ok(image), Ok(plan)) => breakdown(&image.footprint, budget, plan.as_ref()),
            (_, Err(e)) => format!("(the plan's sizes are not known: {e})"),
            (Err(e), _) => format!("(the image does not fit the board's memory either: {e})"),
        };
        DeviceError::OverBudget { linker, breakdown }
    }

    /// FNV-1a over the firmware and core sources, the budgets, the plan and the compiler's
    /// version.
    fn cache_key(
        &self,
        budget: &Budget,
        program: Program,
        toolchain: &Toolchain,
    ) -> Result<u64, DeviceError> {
        let mut hash = Fnv64::default();
        let roots = [
            self.project(),
            self.repository.join("crates/core"),
            self.repository.join("rust-toolchain.toml"),
        ];
        let mut files = Vec::new();
        for root in &roots {
            collect_files(root, &mut files)?;
        }
        files.sort();
        for file in &files {
            hash.write(file.to_string_lossy().as_bytes());
            hash.write(
                &fs::read(file).map_err(DeviceError::io(format!("read {}", file.display())))?,
            );
        }
        for n in [
            budget.sram_bytes,
            budget.flash_bytes,
            budget.min_stack_bytes,
        ] {
            hash.write(&n.to_le_bytes());
        }
        match program.plan() {
            Some(plan) => {
                hash.write(b"plan");
                hash.write(&(plan.len() as u64).to_le_bytes());
                hash.write(plan);
            }
            None => hash.write(b"self-test"),
        }
        hash.write(format!("{toolchain:?} {:?}", self.board).as_bytes());
        let rustc = match toolchain {
            Toolchain::Rustup => "rustc",
            Toolchain::DebianBuildStd => "/usr/bin/rustc",
        };
        let version = tool(rustc, &self.project())
            .arg("-vV")
            .output()
            .map_err(DeviceError::io("run rustc -vV"))?;
        hash.write(&version.stdout);
        Ok(hash.0)
    }
}

/// Writes a file of the cache atomically, so that a concurrent or later build never reads a
/// partial one.
fn store(path: &Path, bytes: &[u8]) -> Result<(), DeviceError> {
    write_atomically(path, bytes).map_err(|e| DeviceError::Io {
        action: format!("{} {}", e.action, e.path.display()),
        source: e.source,
    })
}

/// Cached images kept: the most recently built ones.
const CACHED_IMAGES: usize = 16;

/// Removes all but the [`CACHED_IMAGES`] newest images (best effort).
fn prune_cache(images: &Path) {
    let Ok(entries) = fs::read_dir(images) else {
        return;
    };
    let mut built: Vec<_> = entries
        .filter_map(|e| {
            let e = e.ok()?;
            let path = e.path();
            let elf = path.extension().is_some_and(|x| x == "elf");
            elf.then_some((e.metadata().ok()?.modified().ok()?, path))
        })
        .collect();
    built.sort();
    let stale = built.len().saturating_sub(CACHED_IMAGES);
    for (_, path) in &built[..stale] {
        let _ = fs::remove_file(path);
    }
}

/// The image at `path` if it exists.
fn load_image(path: &Path, budget: &Budget, cached: bool) -> Result<Option<Image>, DeviceError> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(DeviceError::io(format!("read {}", path.display()))(e)),
    };
    Ok(Some(Image {
        elf: path.to_path_buf(),
        footprint: Footprint::of_elf(&bytes)?,
        budget: *budget,
        cached,
    }))
}

/// The Rust toolchain that can build for [`TARGET`], or which tool is missing. The
/// environment variable `MCUTRAIN_FIRMWARE_TOOLCHAIN=debian` forces Debian's (to test the
/// fallback where rustup has the target too).
fn detect_toolchain(project: &Path) -> Result<Toolchain, DeviceError> {
    let force_debian = std::env::var("MCUTRAIN_FIRMWARE_TOOLCHAIN").is_ok_and(|v| v == "debian");
    let has = |rustc: &str, relative: &str| {
        tool(rustc, project)
            .args(["--print", "sysroot"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()).join(relative))
            .is_some_and(|path| path.exists())
    };
    if !force_debian && has("rustc", &format!("lib/rustlib/{TARGET}/lib")) {
        return Ok(Toolchain::Rustup);
    }
    let debian_source = has("/usr/bin/rustc", "lib/rustlib/src/rust/library/core");
    let debian_linker = Command::new("arm-none-eabi-ld")
        .arg("--version")
        .output()
        .is_ok();
    if debian_source && debian_linker {
        return Ok(Toolchain::DebianBuildStd);
    }
    Err(DeviceError::MissingTool {
        what: format!("the Rust target {TARGET}"),
        detail: format!(
            "the toolchain of {} lacks it, and Debian's rustc-web with rust-web-src and \
             arm-none-eabi-ld is not installed either",
            project.display()
        ),
    })
}

/// Every file under `root` (or `root` itself), skipping `target` directories.
fn collect_files(root: &Path, files: &mut Vec<PathBuf>) -> Result<(), DeviceError> {
    if root.is_file() {
        files.push(root.to_path_buf());
        return Ok(());
    }
    let entries =
        fs::read_dir(root).map_err(DeviceError::io(format!("list {}", root.display())))?;
    for entry in entries {
        let path = entry.map_err(DeviceError::io("list sources"))?.path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n != "target") {
                collect_files(&path, files)?;
            }
        } else {
            files.push(path);
        }
    }
    Ok(())
}

/// The linker's messages in cargo's output of a failed link (the `= note:` blocks without
/// the command line), one per line, without the linker's name.
fn linker_messages(stderr: &str) -> String {
    let mut lines = Vec::new();
    let mut in_note = false;
    for line in stderr.lines() {
        let mut text = line.trim();
        if let Some(rest) = text.strip_prefix("= note:") {
            in_note = true;
            text = rest.trim();
        } else if text.starts_with("error") || text.starts_with("warning") {
            in_note = false;
        }
        let command = text.starts_with('"') || text.starts_with("some arguments are omitted");
        if !in_note || command {
            continue;
        }
        for prefix in ["rust-lld: error:", "arm-none-eabi-ld:"] {
            text = text.trim_start_matches(prefix).trim();
        }
        if !text.is_empty() {
            lines.push(text);
        }
    }
    lines.join("\n")
}

fn verdict(need: u64, have: u64) -> char {
    if need > have {
        '>'
    } else {
        '<'
    }
}

/// A plan against the budget before anything is built: its arena and the minimum stack in
/// SRAM, the plan file in flash; `Err` with the breakdown when either is over.
pub fn check_plan(plan: &PlanSizes, budget: &Budget) -> Result<(), DeviceError> {
    let sram = plan.arena_bytes() + budget.min_stack_bytes;
    if sram <= budget.sram_bytes && plan.file_bytes <= budget.flash_bytes {
        return Ok(());
    }
    Err(DeviceError::OverBudget {
        linker: "refused before building: the plan alone exceeds the budget".into(),
        breakdown: format!(
            "SRAM: {} + {} minimum stack = {sram} {} budget {} bytes (more static data and \
             the stack's real depth come on top)\n\
             flash: plan file {} {} budget {} bytes (code comes on top)",
            plan.describe_arena(),
            budget.min_stack_bytes,
            verdict(sram, budget.sram_bytes),
            budget.sram_bytes,
            plan.file_bytes,
            verdict(plan.file_bytes, budget.flash_bytes),
            budget.flash_bytes,
        ),
    })
}

/// The image's parts against the budget, e.g.
/// `SRAM: .data 0 + .bss 60048 = 60048 static + 16384 minimum stack = 76432 > budget 8192`;
/// with a plan, the arena's and the plan file's share.
fn breakdown(f: &Footprint, budget: &Budget, plan: Option<&PlanSizes>) -> String {
    let sram = f.static_ram_bytes() + budget.min_stack_bytes;
    let flash = f.flash_bytes();
    let (bss_parts, const_parts) = match plan {
        Some(p) => (
            format!(
                " ({}, other {})",
                p.describe_arena(),
                f.bss_bytes.saturating_sub(p.arena_bytes())
            ),
            format!(" (plan file {})", p.file_bytes),
        ),
        None => (String::new(), String::new()),
    };
    format!(
        "SRAM: .data {} + .bss {}{bss_parts} = {} static + {} minimum stack = {sram} {} budget \
         {} bytes\n\
         flash: code {} + constants {}{const_parts} + .data {} = {flash} {} budget {} bytes",
        f.data_bytes,
        f.bss_bytes,
        f.static_ram_bytes(),
        budget.min_stack_bytes,
        verdict(sram, budget.sram_bytes),
        budget.sram_bytes,
        f.code_bytes,
        f.const_bytes,
        f.data_bytes,
        verdict(flash, budget.flash_bytes),
        budget.flash_bytes,
    )
}

/// 64-bit FNV-1a.
struct Fnv64(u64);

impl Default for Fnv64 {
    fn default() -> Self {
        Fnv64(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv64 {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linker_messages_are_taken_from_the_note_block() {
        let stderr = "   Compiling mcutrain-firmware v0.1.0\n\
            error: linking with `rust-lld` failed: exit status: 1\n  |\n\
            \x20 = note: rust-lld: error: \n\
            \x20         mcutrain budget: static RAM leaves less than the minimum stack\n\
            \x20         rust-lld: error: section '.bss' will not fit in region 'RAM'\n\n\
            error: could not compile `mcutrain-firmware` (bin) due to 1 previous error\n";
        assert_eq!(
            linker_messages(stderr),
            "mcutrain budget: static RAM leaves less than the minimum stack\n\
             section '.bss' will not fit in region 'RAM'"
        );
    }

    #[test]
    fn gnu_ld_messages_drop_the_command_line() {
        let stderr = "error: linking with `arm-none-eabi-ld` failed: exit status: 1\n  |\n\
            \x20 = note:  \"arm-none-eabi-ld\" \"-o\" \"firmware\" \"-Tlink.x\"\n\
            \x20 = note: some arguments are omitted. use `--verbose` to show all linker arguments\n\
            \x20 = note: arm-none-eabi-ld: firmware section `.bss' will not fit in region `RAM'\n\
            \x20         arm-none-eabi-ld: region `RAM' overflowed by 51856 bytes\n\n\
            error: could not compile `mcutrain-firmware`\n";
        assert_eq!(
            linker_messages(stderr),
            "firmware section `.bss' will not fit in region `RAM'\n\
             region `RAM' overflowed by 51856 bytes"
        );
    }

    #[test]
    fn breakdown_marks_the_exceeded_budget() {
        let f = Footprint {
            code_bytes: 1000,
            const_bytes: 200,
            data_bytes: 8,
            bss_bytes: 9000,
        };
        let budget = Budget {
            sram_bytes: 8192,
            ..Budget::default()
        };
        let text = breakdown(&f, &budget, None);
        assert!(
            text.contains("9008 static + 16384 minimum stack = 25392 > budget 8192"),
            "{text}"
        );
        assert!(text.contains("= 1208 < budget 1048576"), "{text}");
        let plan = PlanSizes {
            file_bytes: 150,
            tensor_bytes: 7000,
            state_bytes: 500,
        };
        let text = breakdown(&f, &budget, Some(&plan));
        assert!(
            text.contains(
                ".bss 9000 (arena 7500 (planned tensors 7000 + training state 500), other 1500)"
            ),
            "{text}"
        );
        assert!(text.contains("constants 200 (plan file 150)"), "{text}");
    }

    #[test]
    fn a_plan_over_budget_is_refused_before_building() {
        let plan = PlanSizes {
            file_bytes: 70_000,
            tensor_bytes: 250_000,
            state_bytes: 1000,
        };
        let budget = Budget::default();
        let text = check_plan(&plan, &budget).unwrap_err().to_string();
        assert!(text.contains("nothing ran"), "{text}");
        assert!(
            text.contains(
                "arena 251000 (planned tensors 250000 + training state 1000) + 16384 minimum \
                 stack = 267384 > budget 262144"
            ),
            "{text}"
        );
        assert!(text.contains("plan file 70000 < budget 1048576"), "{text}");
        let fits = PlanSizes {
            tensor_bytes: 200_000,
            ..plan
        };
        assert!(check_plan(&fits, &budget).is_ok());
        let tiny_flash = Budget {
            flash_bytes: 65_536,
            ..budget
        };
        assert!(check_plan(&fits, &tiny_flash).is_err());
    }

    #[test]
    fn the_cache_key_follows_the_budget() {
        let firmware = Firmware::in_repository();
        let key = |b: &Budget, p: Program| firmware.cache_key(b, p, &Toolchain::Rustup).unwrap();
        let default = Budget::default();
        assert_eq!(
            key(&default, Program::SelfTest),
            key(&default, Program::SelfTest)
        );
        let smaller = Budget {
            sram_bytes: 128 << 10,
            ..default
        };
        assert_ne!(
            key(&default, Program::SelfTest),
            key(&smaller, Program::SelfTest)
        );
        let (a, b) = (
            Program::Train { plan: &[1, 2] },
            Program::Train { plan: &[1, 3] },
        );
        assert_ne!(key(&default, a), key(&default, b));
        assert_ne!(key(&default, a), key(&default, Program::SelfTest));
    }
}
