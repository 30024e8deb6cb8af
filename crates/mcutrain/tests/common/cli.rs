//! Running the `mcutrain` command in tests, and writing NPY files for its `--data`.

use std::path::Path;
use std::process::{Command, Output};

/// `mcutrain ARGS`.
pub fn mcutrain(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mcutrain"))
        .args(args)
        .output()
        .expect("run mcutrain")
}

/// `mcutrain ARGS`, which must succeed and print one JSON object.
pub fn ok_json(args: &[&str]) -> serde_json::Value {
    let out = mcutrain(args);
    assert!(
        out.status.success(),
        "mcutrain {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout of {args:?} is not one JSON object ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Minimal NPY v1.0 writer: `data` of dtype `descr` (e.g. `<f4`, `|u1`) and `shape`.
pub fn write_npy(path: &Path, descr: &str, shape: &[usize], data: &[u8]) {
    let shape_txt = match shape.len() {
        1 => format!("({},)", shape[0]),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header =
        format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_txt}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend((header.len() as u16).to_le_bytes());
    bytes.extend(header.as_bytes());
    bytes.extend(data);
    std::fs::write(path, bytes).unwrap();
}
