//! UEA/UCR `.ts` time-series text files (as shipped by `aeon` and `sktime`).
//!
//! A file is `#` comment lines and `@` header lines (`@problemName`, `@timeStamps`,
//! `@univariate`, `@dimensions`, `@equalLength`, `@seriesLength`, `@classLabel true <labels>`,
//! ..., tags case-insensitive), then `@data` and one case per line:
//! `dim0 values:dim1 values:...:label`, values comma-separated.
//!
//! - Class labels are strings; label `k` is the position of the string on the `@classLabel`
//!   line, and the class count is the number of strings there.
//! - A missing value (`?`, or `NaN` as some exporters write it) becomes 0.
//! - Series of unequal length (within a case or across cases) are padded with 0 at the end to
//!   the longest series in the file; `@seriesLength` and `@equalLength` are not enforced.
//! - The data set has one channel per dimension, height 1 and width the longest length.
//! - Time stamps (`@timeStamps true`) and regression targets are not supported.

use super::{DataError, Dataset};

/// True when the text, after an optional UTF-8 byte-order mark and blank space, starts with a
/// `@` header or a `#` comment.
pub(crate) fn looks_like(bytes: &[u8]) -> bool {
    let text = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    matches!(
        text.iter().find(|b| !b.is_ascii_whitespace()),
        Some(b'@' | b'#')
    )
}

/// One case: its series (one per dimension) and its class index.
struct Case {
    series: Vec<Vec<f32>>,
    label: u16,
}

/// Header state collected before `@data`.
#[derive(Default)]
struct Header {
    class_labels: Option<Vec<String>>,
    dimensions: Option<usize>,
}

/// Reads a whole `.ts` file into a data set named `file`.
pub(crate) fn read(file: &str, bytes: &[u8]) -> Result<Dataset, DataError> {
    let syntax = |line: usize, detail: String| DataError::TsSyntax {
        file: file.to_owned(),
        line,
        detail,
    };
    let text = std::str::from_utf8(bytes).map_err(|e| DataError::BadHeader {
        file: file.to_owned(),
        format: ".ts",
        detail: format!("the file is not UTF-8 text ({e})"),
    })?;
    let text = text.strip_prefix('\u{FEFF}').unwrap_or(text);
    let mut header = Header::default();
    let mut cases: Vec<Case> = Vec::new();
    let mut in_data = false;
    for (number, line) in text.lines().enumerate() {
        let number = number + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if in_data {
            let labels = header.class_labels.as_deref().unwrap_or_default();
            let case = parse_case(line, labels).map_err(|d| syntax(number, d))?;
            let expected = header
                .dimensions
                .or_else(|| cases.first().map(|c| c.series.len()));
            if let Some(expected) = expected.filter(|&e| e != case.series.len()) {
                return Err(syntax(
                    number,
                    format!(
                        "the case has {} dimensions but the file has {expected}; every case \
                         needs the same number of ':'-separated series",
                        case.series.len()
                    ),
                ));
            }
            cases.push(case);
        } else {
            in_data = header_line(line, &mut header).map_err(|d| syntax(number, d))?;
        }
    }
    let last_line = text.lines().count();
    if !in_data {
        return Err(syntax(
            last_line,
            "the file has no @data line; check that it is a complete .ts file".into(),
        ));
    }
    if cases.is_empty() {
        return Err(DataError::Empty {
            file: file.to_owned(),
        });
    }
    let channels = cases[0].series.len();
    let width = cases
        .iter()
        .flat_map(|c| c.series.iter().map(Vec::len))
        .max()
        .unwrap_or(0);
    let mut samples = vec![0.0f32; cases.len() * channels * width];
    for (case, sample) in cases.iter().zip(samples.chunks_exact_mut(channels * width)) {
        for (series, row) in case.series.iter().zip(sample.chunks_exact_mut(width)) {
            row[..series.len()].copy_from_slice(series);
        }
    }
    Ok(Dataset {
        channels,
        height: 1,
        width,
        samples,
        labels: cases.iter().map(|c| c.label).collect(),
        classes: header.class_labels.map_or(0, |l| l.len()),
        name: file.to_owned(),
    })
}

/// Applies one header line; returns true for `@data`.
fn header_line(line: &str, header: &mut Header) -> Result<bool, String> {
    if !line.starts_with('@') {
        return Err(format!(
            "expected an @ header line before @data, found '{line}'"
        ));
    }
    let mut words = line.split_whitespace();
    let tag = words.next().unwrap_or_default().to_ascii_lowercase();
    let flag = |word: Option<&str>| match word.map(str::to_ascii_lowercase).as_deref() {
        Some("true") => Ok(true),
        Some("false") => Ok(false),
        _ => Err(format!("{tag} must be followed by true or false")),
    };
    match tag.as_str() {
        "@data" => {
            if header.class_labels.is_none() {
                return Err(
                    "@data comes before any '@classLabel true <labels>' line; the loader \
                     needs the class labels"
                        .into(),
                );
            }
            return Ok(true);
        }
        "@classlabel" => {
            if !flag(words.next())? {
                return Err(
                    "@classLabel false: the file has no class labels (unlabelled or \
                     regression data are not supported)"
                        .into(),
                );
            }
            let labels: Vec<String> = words.map(str::to_owned).collect();
            if labels.is_empty() {
                return Err("@classLabel true lists no labels".into());
            }
            if labels.len() > usize::from(u16::MAX) + 1 {
                return Err(format!("{} class labels; at most 65536", labels.len()));
            }
            if let Some(dup) = labels
                .iter()
                .enumerate()
                .find_map(|(i, l)| labels[..i].contains(l).then_some(l))
            {
                return Err(format!(
                    "class label '{dup}' is listed twice on @classLabel"
                ));
            }
            header.class_labels = Some(labels);
        }
        "@timestamps" if flag(words.next())? => {
            return Err(
                "time-stamped series (@timeStamps true) are not supported; export \
                        them without time stamps"
                    .into(),
            );
        }
        "@targetlabel" if flag(words.next())? => {
            return Err(
                "regression targets (@targetLabel true) are not supported; the \
                        loader reads classification data"
                    .into(),
            );
        }
        "@univariate" if flag(words.next())? => header.dimensions = Some(1),
        "@dimensions" | "@dimension" => {
            let count = words.next().and_then(|w| w.parse().ok()).filter(|&n| n > 0);
            header.dimensions =
                Some(count.ok_or_else(|| format!("{tag} must be followed by a positive count"))?);
        }
        // @problemName, @equalLength, @seriesLength, @missing, unknown tags and false
        // @timeStamps, @targetLabel and @univariate carry nothing the loader needs.
        _ => {}
    }
    Ok(false)
}

/// Parses `dim0 values:dim1 values:...:label`.
fn parse_case(line: &str, class_labels: &[String]) -> Result<Case, String> {
    let Some((series_text, label_text)) = line.rsplit_once(':') else {
        return Err(format!(
            "a case needs ':'-separated series followed by ':label', found '{line}'"
        ));
    };
    let label_text = label_text.trim();
    let label = class_labels
        .iter()
        .position(|l| l == label_text)
        .ok_or_else(|| {
            format!(
                "class label '{label_text}' is not on the @classLabel line ({}); the line may \
                 be cut short",
                class_labels.join(" ")
            )
        })?;
    let series = series_text
        .split(':')
        .enumerate()
        .map(|(dim, text)| parse_series(dim, text))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Case {
        series,
        label: label as u16,
    })
}

/// Parses comma-separated values; `?` and `NaN` are missing and read as 0.
fn parse_series(dim: usize, text: &str) -> Result<Vec<f32>, String> {
    if text.trim().is_empty() {
        return Err(format!("dimension {dim} has no values"));
    }
    text.split(',')
        .map(|token| {
            let token = token.trim();
            if token == "?" || token.eq_ignore_ascii_case("nan") {
                return Ok(0.0);
            }
            match token.parse::<f32>() {
                Ok(v) if v.is_finite() => Ok(v),
                _ => Err(format!(
                    "dimension {dim}: '{token}' is not a finite number (use '?' for a \
                     missing value)"
                )),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sniffs_headers_and_comments_only() {
        assert!(looks_like(b"\xEF\xBB\xBF  #comment\n"));
        assert!(looks_like(b"\n@problemName X\n"));
        assert!(!looks_like(b"1,2,3:a\n"));
        assert!(!looks_like(b"   "));
    }

    #[test]
    fn missing_values_read_as_zero_and_bad_tokens_are_errors() {
        assert_eq!(
            parse_series(0, "1, ?,NaN,-2.5").unwrap(),
            vec![1.0, 0.0, 0.0, -2.5]
        );
        assert!(parse_series(1, "1,x").unwrap_err().contains("'x'"));
        assert!(parse_series(1, "1,inf").unwrap_err().contains("'inf'"));
        assert!(parse_series(1, "1,,2").is_err());
        assert!(parse_series(2, " ").unwrap_err().contains("no values"));
    }

    #[test]
    fn header_requires_true_class_labels_without_duplicates() {
        let mut h = Header::default();
        assert!(header_line("@classLabel false", &mut h).is_err());
        assert!(header_line("@classLabel true a b a", &mut h)
            .unwrap_err()
            .contains("twice"));
        assert!(header_line("@data", &mut h).is_err());
        assert!(!header_line("@classLabel TRUE a b", &mut h).unwrap());
        assert!(header_line("@DATA", &mut h).unwrap());
        assert_eq!(h.class_labels.unwrap(), vec!["a", "b"]);
    }

    proptest! {
        #[test]
        fn arbitrary_text_after_a_header_never_panics(body in "[-0-9a-c?,:.@# \n]{0,120}") {
            let text = format!("@classLabel true a b\n@data\n{body}");
            match read("f.ts", text.as_bytes()) {
                Ok(ds) => prop_assert_eq!(ds.samples.len(), ds.len() * ds.sample_len()),
                Err(e) => prop_assert!(e.to_string().starts_with("f.ts"), "{}", e),
            }
        }
    }
}
