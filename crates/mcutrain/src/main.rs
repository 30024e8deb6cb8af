//! The `mcutrain` command: pretrain, quantize, train, evaluate and demonstrate on-device
//! training of quantized networks. The commands are [`mcutrain::cli`]'s.

use clap::Parser;
use mcutrain::cli::Cli;

fn main() {
    restore_default_sigpipe();
    if let Err(e) = Cli::parse().run() {
        eprintln!("error: {e:#}");
        std::process::exit(2);
    }
}

/// End quietly, as other command-line tools do, when the reader of stdout goes away
/// (`mcutrain plan ... | head`): Rust ignores SIGPIPE, which turns the next write into a panic.
fn restore_default_sigpipe() {
    #[cfg(unix)]
    // SAFETY: called first in `main`, before any other thread exists; SIG_DFL is a valid
    // disposition for SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
