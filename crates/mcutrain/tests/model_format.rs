//! The model file format: round trips, determinism, the documented layout, corruption
//! detection (truncation, bit flips, random bytes, malformed payloads) and atomic saves.

use std::fs;

use mcutrain::model::format::{
    self, FormatError, FORMAT_VERSION, HEADER_LEN, MAGIC, MAX_ELEMENTS, MAX_LAYERS,
};
use mcutrain::model::zoo::{fashion_shift_backbone, init_float};
use mcutrain::model::{
    Architecture, FloatLayer, Layer, LayerKind, Model, ModelError, Params, QuantLayer, QuantState,
};
use mcutrain_core::checksum::{crc32, crc32_update};
use mcutrain_core::ops::activation::Activation;
use mcutrain_core::quant::{QParams, RangeEma};
use proptest::prelude::*;

fn conv(
    name: &str,
    out_channels: usize,
    k: usize,
    pad: usize,
    groups: usize,
    activation: Activation,
) -> Layer {
    Layer {
        name: name.into(),
        kind: LayerKind::Conv2d {
            out_channels,
            kernel: (k, k),
            stride: (1, 1),
            padding: (pad, pad),
            groups,
            activation,
        },
    }
}

fn layer(name: &str, kind: LayerKind) -> Layer {
    Layer {
        name: name.into(),
        kind,
    }
}

/// A small model that uses every layer kind and every activation: `[2, 6, 6] -> 3 classes`.
fn small_arch() -> Architecture {
    Architecture {
        input: [2, 6, 6],
        classes: 3,
        layers: vec![
            conv("stem", 4, 3, 1, 1, Activation::Relu6),
            conv("dw", 4, 3, 1, 4, Activation::Relu),
            layer("add", LayerKind::Add { skip_from: 0 }),
            layer("relu", LayerKind::Activation(Activation::Relu)),
            layer(
                "max",
                LayerKind::MaxPool {
                    kernel: (2, 2),
                    stride: (2, 2),
                    padding: (0, 0),
                },
            ),
            layer(
                "avg",
                LayerKind::AvgPool {
                    kernel: (3, 3),
                    stride: (1, 1),
                    padding: (1, 1),
                },
            ),
            conv("pw", 6, 1, 0, 1, Activation::None),
            layer("gap", LayerKind::GlobalAvgPool),
            layer("flat", LayerKind::Flatten),
            layer(
                "fc",
                LayerKind::Linear {
                    out_features: 3,
                    activation: Activation::None,
                },
            ),
        ],
    }
}

/// Float parameters with a fixed, non-trivial pattern (every value exact in f32).
fn float_model(arch: &Architecture) -> Model {
    let lens = arch.param_lens().expect("the test architecture is valid");
    let pattern = |salt: usize, n: usize| -> Vec<f32> {
        (0..n)
            .map(|j| ((j * 37 + salt * 11) % 101) as f32 / 64.0 - 0.75)
            .collect()
    };
    let params = lens
        .iter()
        .enumerate()
        .map(|(i, &(weight_len, bias_len))| FloatLayer {
            weight: pattern(i, weight_len),
            bias: pattern(i + 100, bias_len),
        })
        .collect();
    Model {
        arch: arch.clone(),
        params: Params::Float(params),
    }
}

/// A plausible int8 state built by hand from a float model: per-channel symmetric weights on
/// even layers, one asymmetric per-tensor range on odd layers, some ranges not yet observed.
fn int8_model(float: &Model) -> Model {
    let Params::Float(layers) = &float.params else {
        panic!("int8_model needs a float model");
    };
    let quant_layers = layers
        .iter()
        .enumerate()
        .map(|(i, p)| {
            if p.weight.is_empty() {
                return QuantLayer {
                    weight: Vec::new(),
                    weight_q: Vec::new(),
                    weight_range: RangeEma::new(),
                    bias: Vec::new(),
                    bias_scale: 1.0,
                };
            }
            let per_channel = p.weight.len() / p.bias.len();
            let (min, max) = p
                .weight
                .iter()
                .fold((0.0f32, 0.0f32), |(lo, hi), &w| (lo.min(w), hi.max(w)));
            let weight_q: Vec<QParams> = if i % 2 == 0 {
                p.weight
                    .chunks(per_channel)
                    .map(|c| QParams::symmetric(c.iter().fold(0.0f32, |m, w| m.max(w.abs()))))
                    .collect()
            } else {
                vec![QParams::from_range(min, max)]
            };
            let weight = p
                .weight
                .iter()
                .enumerate()
                .map(|(j, &w)| weight_q[(j / per_channel).min(weight_q.len() - 1)].quantize(w))
                .collect();
            let bias_scale = weight_q[0].scale * 0.05;
            QuantLayer {
                weight,
                weight_q,
                weight_range: RangeEma::from_range(min, max),
                bias: p.bias.iter().map(|&b| (b / bias_scale) as i32).collect(),
                bias_scale,
            }
        })
        .collect();
    let tensors = float.arch.layers.len() + 1;
    Model {
        arch: float.arch.clone(),
        params: Params::Int8(QuantState {
            layers: quant_layers,
            activations: (0..tensors)
                .map(|i| RangeEma::from_range(-(i as f32), 1.0 + i as f32 * 0.5))
                .collect(),
            errors: (0..tensors)
                .map(|i| {
                    if i % 2 == 0 {
                        RangeEma::new()
                    } else {
                        RangeEma::from_range(-0.01 * i as f32, 0.02 * i as f32)
                    }
                })
                .collect(),
        }),
    }
}

fn small_models() -> [Model; 2] {
    let float = float_model(&small_arch());
    let int8 = int8_model(&float);
    [float, int8]
}

/// Recompute the checksum of a file after editing it (the documented coverage: bytes 8..16,
/// then the payload).
fn rechecksum(bytes: &mut [u8]) {
    let crc = crc32_update(crc32(&bytes[8..16]), &bytes[HEADER_LEN..]);
    bytes[16..20].copy_from_slice(&crc.to_le_bytes());
}

fn put_u32(bytes: &mut [u8], at: usize, value: u32) {
    bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
}

/// File offset of the first parameter record, from the documented architecture layout.
fn params_offset(arch: &Architecture) -> usize {
    let layers: usize = arch
        .layers
        .iter()
        .map(|l| {
            let spec = l.kind.spec();
            2 + l.name.len() + 1 + 4 * spec.fields + usize::from(spec.activation)
        })
        .sum();
    HEADER_LEN + (5 * 4 + layers).next_multiple_of(4)
}

#[test]
fn float_and_int8_models_round_trip() {
    let backbone = init_float(&fashion_shift_backbone(), 7).expect("the backbone is valid");
    let backbone_int8 = int8_model(&backbone);
    let [small, small_int8] = small_models();
    for model in [small, small_int8, backbone, backbone_int8] {
        let bytes = format::to_bytes(&model);
        let decoded = format::from_bytes(&bytes).expect("a written model loads");
        assert_eq!(decoded, model, "{} model", model.precision());
    }
}

#[test]
fn file_round_trip_preserves_the_model() {
    let dir = tempfile::tempdir().unwrap();
    for (i, model) in small_models().iter().enumerate() {
        let path = dir.path().join(format!("model{i}.mcut"));
        format::save(&path, model).unwrap();
        assert_eq!(&format::load(&path).unwrap(), model);
    }
}

#[test]
fn encoding_is_deterministic() {
    for model in small_models() {
        assert_eq!(format::to_bytes(&model), format::to_bytes(&model.clone()));
    }
    // Two models built independently from the same seed give the same bytes.
    let a = init_float(&fashion_shift_backbone(), 3).unwrap();
    let b = init_float(&fashion_shift_backbone(), 3).unwrap();
    assert_eq!(format::to_bytes(&a), format::to_bytes(&b));
    let c = init_float(&fashion_shift_backbone(), 4).unwrap();
    assert_ne!(format::to_bytes(&a), format::to_bytes(&c));
}

#[test]
fn saving_twice_gives_identical_files() {
    let dir = tempfile::tempdir().unwrap();
    let [_, model] = small_models();
    let (first, second) = (dir.path().join("a.mcut"), dir.path().join("b.mcut"));
    format::save(&first, &model).unwrap();
    format::save(&second, &model).unwrap();
    let first_bytes = fs::read(&first).unwrap();
    assert_eq!(first_bytes, fs::read(&second).unwrap());
    format::save(&first, &model).unwrap();
    assert_eq!(first_bytes, fs::read(&first).unwrap());
    assert_eq!(first_bytes, format::to_bytes(&model));
}

#[test]
fn header_and_alignment_follow_the_documented_layout() {
    for (precision, model) in small_models().iter().enumerate() {
        let bytes = format::to_bytes(model);
        assert_eq!(bytes[..8], MAGIC);
        assert_eq!(u16::from_le_bytes([bytes[8], bytes[9]]), FORMAT_VERSION);
        assert_eq!(u16::from_le_bytes([bytes[10], bytes[11]]), precision as u16);
        let payload_len = u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
        assert_eq!(payload_len, bytes.len() - HEADER_LEN);
        assert_eq!(bytes.len() % 4, 0, "sections are 4-byte aligned");
        let stored = u32::from_le_bytes(bytes[16..20].try_into().unwrap());
        assert_eq!(
            stored,
            crc32_update(crc32(&bytes[8..16]), &bytes[HEADER_LEN..])
        );
        // The parameters start after the padded architecture section with their record
        // count, then the stem's first count.
        let at = params_offset(&model.arch);
        let read = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        assert_eq!(read(at), model.arch.layers.len());
        let first_count = match &model.params {
            Params::Float(layers) => layers[0].weight.len(),
            Params::Int8(state) => state.layers[0].weight_q.len(),
        };
        assert_eq!(read(at + 4), first_count);
    }
}

#[test]
fn every_truncation_is_reported() {
    for model in small_models() {
        let bytes = format::to_bytes(&model);
        for len in 0..bytes.len() {
            match format::from_bytes(&bytes[..len]) {
                Err(FormatError::Truncated {
                    expected, actual, ..
                }) => {
                    assert_eq!(actual, len);
                    assert!(
                        expected > len && expected <= bytes.len(),
                        "{expected} {len}"
                    );
                }
                other => panic!("prefix of {len} bytes gave {other:?}"),
            }
        }
    }
}

#[test]
fn every_single_bit_flip_is_an_error() {
    for model in small_models() {
        let bytes = format::to_bytes(&model);
        let mut flipped = bytes.clone();
        for byte in 0..bytes.len() {
            for bit in 0..8 {
                flipped[byte] ^= 1 << bit;
                assert!(
                    format::from_bytes(&flipped).is_err(),
                    "bit {bit} of byte {byte} ({} model)",
                    model.precision()
                );
                flipped[byte] ^= 1 << bit;
            }
        }
        assert_eq!(flipped, bytes);
    }
}

#[test]
fn a_flipped_payload_bit_is_a_checksum_mismatch_that_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flipped.mcut");
    let [model, _] = small_models();
    let mut bytes = format::to_bytes(&model);
    bytes[HEADER_LEN + 5] ^= 0x10;
    fs::write(&path, &bytes).unwrap();
    let err = format::load(&path).unwrap_err();
    assert!(
        matches!(err, FormatError::ChecksumMismatch { stored, computed, .. } if stored != computed)
    );
    let message = err.to_string();
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(message.contains("re-create"), "{message}");
}

#[test]
fn a_newer_version_is_unsupported() {
    let [model, _] = small_models();
    let mut bytes = format::to_bytes(&model);
    bytes[8..10].copy_from_slice(&2u16.to_le_bytes());
    let err = format::from_bytes(&bytes).unwrap_err();
    assert!(matches!(
        err,
        FormatError::UnsupportedVersion {
            found: 2,
            supported: FORMAT_VERSION,
            ..
        }
    ));
    let message = err.to_string();
    assert!(
        message.contains("newer") && message.contains("upgrade"),
        "{message}"
    );
    // Even a file of just magic and version is recognised as a newer one.
    assert!(matches!(
        format::from_bytes(&bytes[..10]),
        Err(FormatError::UnsupportedVersion { found: 2, .. })
    ));
    bytes[8..10].copy_from_slice(&0u16.to_le_bytes());
    assert!(matches!(
        format::from_bytes(&bytes),
        Err(FormatError::UnsupportedVersion { found: 0, .. })
    ));
}

#[test]
fn other_files_are_not_models() {
    let err = format::from_bytes(b"{\"layers\": []} is json, not a model").unwrap_err();
    assert!(matches!(&err, FormatError::NotAModel { found, .. } if found == b"{\"layers"));
    let message = err.to_string();
    assert!(message.contains("is not an mcutrain model"), "{message}");
    assert!(message.contains("--out"), "{message}");
    assert!(matches!(
        format::from_bytes(b"MCUX"),
        Err(FormatError::NotAModel { .. })
    ));
}

#[test]
fn parameters_that_do_not_fit_the_architecture_are_invalid() {
    let [mut float, mut int8] = small_models();
    if let Params::Float(layers) = &mut float.params {
        layers[6].bias.pop();
    }
    assert!(matches!(
        format::from_bytes(&format::to_bytes(&float)),
        Err(FormatError::Invalid {
            source: ModelError::BadParams(_),
            ..
        })
    ));
    // One parameter record too many (the bias popped above restored).
    let mut extra = float.clone();
    if let Params::Float(layers) = &mut extra.params {
        layers[6].bias.push(0.0);
        layers.push(FloatLayer::default());
    }
    assert!(matches!(
        format::from_bytes(&format::to_bytes(&extra)),
        Err(FormatError::Invalid {
            source: ModelError::BadParams(_),
            ..
        })
    ));
    if let Params::Int8(state) = &mut int8.params {
        state.activations.pop();
    }
    assert!(matches!(
        format::from_bytes(&format::to_bytes(&int8)),
        Err(FormatError::Invalid {
            source: ModelError::BadParams(_),
            ..
        })
    ));
}

#[test]
fn a_rechecksummed_architecture_edit_is_invalid() {
    let [model, _] = small_models();
    let clean = format::to_bytes(&model);
    // classes (payload bytes 12..16) no longer match the last layer.
    let mut bytes = clean.clone();
    put_u32(&mut bytes, HEADER_LEN + 12, 4);
    rechecksum(&mut bytes);
    assert!(matches!(
        format::from_bytes(&bytes),
        Err(FormatError::Invalid {
            source: ModelError::BadOutput { classes: 4, .. },
            ..
        })
    ));
    // The stem's out_channels (after the 5 leading u32s, the u16 name length, "stem" and the
    // kind tag) changes the expected parameter counts.
    let mut bytes = clean;
    put_u32(&mut bytes, HEADER_LEN + 20 + 2 + 4 + 1, 5);
    rechecksum(&mut bytes);
    assert!(matches!(
        format::from_bytes(&bytes),
        Err(FormatError::Invalid { .. })
    ));
}

#[test]
fn absurd_sizes_are_refused_before_allocating() {
    let [model, _] = small_models();
    let clean = format::to_bytes(&model);
    let at = params_offset(&model.arch) + 4; // the stem's weight count
    let edit = |offset: usize, value: u32| {
        let mut bytes = clean.clone();
        put_u32(&mut bytes, offset, value);
        rechecksum(&mut bytes);
        format::from_bytes(&bytes)
    };
    assert!(matches!(
        edit(at, MAX_ELEMENTS as u32 + 1),
        Err(FormatError::TooLarge { .. })
    ));
    // A count within the limit but beyond the bytes left.
    assert!(matches!(
        edit(at, 1 << 20),
        Err(FormatError::Corrupt { .. })
    ));
    assert!(matches!(
        edit(HEADER_LEN + 16, MAX_LAYERS as u32 + 1),
        Err(FormatError::TooLarge { .. })
    ));
    // Shapes whose products overflow are refused, not multiplied.
    for offset in [HEADER_LEN, HEADER_LEN + 4, HEADER_LEN + 8] {
        assert!(matches!(
            edit(offset, u32::MAX),
            Err(FormatError::TooLarge { .. })
        ));
    }
    // The stem's padding (fields 6 and 7 of the convolution).
    let stem_fields = HEADER_LEN + 20 + 2 + 4 + 1;
    assert!(format::from_bytes(&clean).is_ok());
    assert!(edit(stem_fields + 5 * 4, u32::MAX).is_err());
    // The stem's stride.
    assert!(matches!(
        edit(stem_fields + 3 * 4, 0),
        Err(FormatError::Invalid { .. })
    ));
}

#[test]
fn save_refuses_what_load_would_refuse() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.mcut");
    let [mut model, _] = small_models();
    model.arch.layers[0].name = "x".repeat(300);
    assert!(matches!(
        format::save(&path, &model),
        Err(FormatError::TooLarge { .. })
    ));
    if let Params::Float(layers) = &mut model.params {
        layers[0].weight[0] = f32::NAN;
    }
    assert!(matches!(
        format::save(&path, &model),
        Err(FormatError::Invalid { .. })
    ));
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn saving_into_a_missing_directory_fails_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-dir");
    let path = missing.join("model.mcut");
    let [model, _] = small_models();
    let err = format::save(&path, &model).unwrap_err();
    assert!(matches!(err, FormatError::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("no-such-dir"), "{err}");
    assert!(!missing.exists());
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn saving_over_a_file_replaces_it_without_leftovers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.mcut");
    fs::write(&path, b"an older, longer file that is not a model at all").unwrap();
    let [_, model] = small_models();
    format::save(&path, &model).unwrap();
    assert_eq!(format::load(&path).unwrap(), model);
    let names: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["model.mcut"]);
}

#[test]
fn saving_onto_a_directory_fails_and_leaves_no_temp_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("taken");
    fs::create_dir(&path).unwrap();
    let [model, _] = small_models();
    assert!(matches!(
        format::save(&path, &model),
        Err(FormatError::Io { .. })
    ));
    assert!(path.is_dir());
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn loading_a_missing_file_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing-model.mcut");
    let err = format::load(&path).unwrap_err();
    assert!(matches!(&err, FormatError::Io { path: p, .. } if p == &path));
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
}

fn small_int8_bytes() -> Vec<u8> {
    format::to_bytes(&small_models()[1])
}

proptest! {
    #[test]
    fn random_bytes_are_refused(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        prop_assert!(format::from_bytes(&bytes).is_err());
    }

    #[test]
    fn random_bytes_after_a_valid_header_start_are_refused(
        rest in proptest::collection::vec(any::<u8>(), 0..2048),
    ) {
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        bytes.extend_from_slice(&rest);
        prop_assert!(format::from_bytes(&bytes).is_err());
    }

    /// Payload edits that keep the checksum right never panic, and whatever still loads
    /// re-encodes to exactly the same bytes (the encoding is canonical).
    #[test]
    fn rechecksummed_edits_never_panic_and_stay_canonical(
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
    ) {
        let mut bytes = small_int8_bytes();
        let payload_len = bytes.len() - HEADER_LEN;
        for (at, value) in edits {
            bytes[HEADER_LEN + at % payload_len] = value;
        }
        rechecksum(&mut bytes);
        if let Ok(model) = format::from_bytes(&bytes) {
            prop_assert_eq!(format::to_bytes(&model), bytes);
        }
    }

}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn bit_flips_in_a_large_model_are_detected(bit in any::<usize>()) {
        let model = init_float(&fashion_shift_backbone(), 11).unwrap();
        let mut bytes = format::to_bytes(&model);
        let bit = bit % (bytes.len() * 8);
        bytes[bit / 8] ^= 1 << (bit % 8);
        prop_assert!(format::from_bytes(&bytes).is_err());
    }
}
