//! The host end of a session over a serial line ([`mcutrain_core::session::RequestLink`] on
//! the device): answer every `'?' len` request with the next `len` session bytes, collect
//! every `'!' len bytes` data frame, until the results end with their `END` record.
//!
//! This is the data path of a real board (the Nucleo-F746ZG's USART3 on the ST-LINK's virtual
//! COM port, see [`super::board`]); it is tested here against the device's side of the
//! framing running the real session loop, not on hardware.

use std::io::{self, Read, Write};

use mcutrain_core::session::{Tag, DATA, RECORD_HEADER_BYTES, REQUEST};

use super::DeviceError;

/// Serves `session` over `port` and returns the results the device sent.
pub fn serve(
    port: &mut (impl Read + Write),
    session: &mut impl Read,
) -> Result<Vec<u8>, DeviceError> {
    let link = |what: &str| {
        let what = what.to_string();
        move |e: std::io::Error| DeviceError::BadOutput(format!("serial line, {what}: {e}"))
    };
    let mut results = Vec::new();
    let mut buffer = Vec::new();
    while !results_complete(&results) {
        let mut frame = [0u8; 5];
        read_exact(port, &mut frame).map_err(link("reading a frame"))?;
        let len = u32::from_le_bytes([frame[1], frame[2], frame[3], frame[4]]) as usize;
        buffer.resize(len, 0);
        match frame[0] {
            REQUEST => {
                session
                    .read_exact(&mut buffer)
                    .map_err(link("the device asked for more than the session holds"))?;
                port.write_all(&buffer)
                    .map_err(link("sending session bytes"))?;
                port.flush().map_err(link("sending session bytes"))?;
            }
            DATA => {
                read_exact(port, &mut buffer).map_err(link("reading results"))?;
                results.extend_from_slice(&buffer);
            }
            other => {
                return Err(DeviceError::BadOutput(format!(
                    "serial line: frame byte {other:#04x} is neither a request nor data"
                )))
            }
        }
    }
    Ok(results)
}

/// Fills `buffer` from `port`, waiting through read timeouts: a serial port's read ends with
/// `TimedOut` while the device computes, which is not the end of the session (the end of the
/// input is).
fn read_exact(port: &mut impl Read, mut buffer: &mut [u8]) -> io::Result<()> {
    use io::ErrorKind::{Interrupted, TimedOut, UnexpectedEof};
    while !buffer.is_empty() {
        match port.read(buffer) {
            Ok(0) => return Err(UnexpectedEof.into()),
            Ok(n) => buffer = &mut buffer[n..],
            Err(e) if matches!(e.kind(), TimedOut | Interrupted) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// True when `results` is whole records ending with `END`.
fn results_complete(results: &[u8]) -> bool {
    let mut at = 0;
    while let Some(header) = results.get(at..at + RECORD_HEADER_BYTES) {
        let len = u32::from_le_bytes([header[4], header[5], header[6], header[7]]) as usize;
        at += RECORD_HEADER_BYTES + len;
        if header[..4] == Tag::End.bytes() && at == results.len() {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::{channel, Receiver, Sender};

    /// One end of an in-memory serial line.
    struct End {
        tx: Sender<u8>,
        rx: Receiver<u8>,
    }

    fn line() -> (End, End) {
        let (a_tx, b_rx) = channel();
        let (b_tx, a_rx) = channel();
        (End { tx: a_tx, rx: a_rx }, End { tx: b_tx, rx: b_rx })
    }

    impl Read for End {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let Some(first) = buf.first_mut() else {
                return Ok(0);
            };
            *first = self
                .rx
                .recv()
                .map_err(|_| std::io::ErrorKind::UnexpectedEof)?;
            Ok(1)
        }
    }

    impl Write for End {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            for &b in buf {
                self.tx
                    .send(b)
                    .map_err(|_| std::io::ErrorKind::BrokenPipe)?;
            }
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl mcutrain_core::session::SerialPort for End {
        fn read_byte(&mut self) -> Result<u8, mcutrain_core::session::LinkError> {
            self.rx
                .recv()
                .map_err(|_| mcutrain_core::session::LinkError::Read)
        }

        fn write_byte(&mut self, byte: u8) -> Result<(), mcutrain_core::session::LinkError> {
            self.tx
                .send(byte)
                .map_err(|_| mcutrain_core::session::LinkError::Write)
        }
    }

    #[test]
    fn completeness_needs_whole_records_and_the_end() {
        let mut results = Vec::new();
        results.extend(b"LOSS");
        results.extend(8u32.to_le_bytes());
        results.extend([0; 8]);
        assert!(!results_complete(&results));
        results.extend(b"END ");
        results.extend(0u32.to_le_bytes());
        assert!(results_complete(&results));
        assert!(!results_complete(&results[..results.len() - 1]));
    }

    #[test]
    fn unknown_frames_and_short_sessions_are_errors() {
        let (mut host, mut device) = line();
        device.write_all(&[b'x', 0, 0, 0, 0]).unwrap();
        let e = serve(&mut host, &mut std::io::empty()).unwrap_err();
        assert!(e.to_string().contains("neither a request nor data"), "{e}");
        device.write_all(&[REQUEST, 4, 0, 0, 0]).unwrap();
        let e = serve(&mut host, &mut &[1u8, 2][..]).unwrap_err();
        assert!(e.to_string().contains("more than the session holds"), "{e}");
    }

    /// A port that reads from a script: `None` is a read that times out, `Some(bytes)` the
    /// bytes that arrive next; after the script, the end of the input.
    struct Scripted {
        reads: std::collections::VecDeque<Option<Vec<u8>>>,
        written: Vec<u8>,
    }

    impl Read for Scripted {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            match self.reads.pop_front() {
                None => Ok(0),
                Some(None) => Err(io::ErrorKind::TimedOut.into()),
                Some(Some(mut bytes)) => {
                    let n = bytes.len().min(buf.len());
                    buf[..n].copy_from_slice(&bytes[..n]);
                    if n < bytes.len() {
                        self.reads.push_front(Some(bytes.split_off(n)));
                    }
                    Ok(n)
                }
            }
        }
    }

    impl Write for Scripted {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.written.extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn read_timeouts_are_waited_through_and_the_end_of_input_is_an_error() {
        let mut end = b"END ".to_vec();
        end.extend(0u32.to_le_bytes());
        let script = |split_data: bool| {
            let mut reads = vec![
                None,
                Some(vec![REQUEST, 2]),
                None,
                Some(vec![0, 0, 0]),
                None,
            ];
            reads.push(Some(vec![DATA, 8, 0, 0, 0, b'E', b'N']));
            if split_data {
                reads.extend([None, None, Some(end[2..].to_vec())]);
            }
            Scripted {
                reads: reads.into(),
                written: Vec::new(),
            }
        };
        let mut port = script(true);
        let results = serve(&mut port, &mut &[7u8, 9, 11][..]).unwrap();
        assert_eq!(results, end);
        assert_eq!(port.written, [7, 9]);
        let e = serve(&mut script(false), &mut &[7u8, 9][..]).unwrap_err();
        assert!(e.to_string().contains("reading results"), "{e}");
    }

    /// The device's session loop over `RequestLink` on one end, `serve` on the other: the
    /// results are those of the same session over a plain in-memory link.
    #[test]
    fn a_session_over_the_request_link_gives_the_direct_results() {
        use crate::compile::plan_file::AlignedBytes;
        use crate::compile::{compile, plan_file, PlanOptions, Precision};
        use crate::engine::fqt::FqtConfig;
        use crate::model::UpdateScheme;
        use crate::model::{zoo, Architecture, Layer, LayerKind};
        use mcutrain_core::ops::activation::Activation;
        use mcutrain_core::session::{self, Clock, Link, LinkError, RequestLink, Workspace};

        let arch = Architecture {
            input: [1, 4, 4],
            classes: 3,
            layers: vec![
                Layer {
                    name: "flatten".into(),
                    kind: LayerKind::Flatten,
                },
                Layer {
                    name: "classifier".into(),
                    kind: LayerKind::Linear {
                        out_features: 3,
                        activation: Activation::None,
                    },
                },
            ],
        };
        let float = zoo::init_float(&arch, 3).unwrap();
        let samples: Vec<f32> = (0..6 * 16).map(|i| (i % 7) as f32 / 7.0).collect();
        let data = crate::data::Dataset {
            channels: 1,
            height: 4,
            width: 4,
            samples,
            labels: vec![0, 1, 2, 0, 1, 2],
            classes: 3,
            name: "ramp".into(),
        };
        let model = crate::quantize::quantize(&float, &data, 6).unwrap();
        let cfg = FqtConfig {
            batch: 4,
            scheme: UpdateScheme::All,
            ..FqtConfig::default()
        };
        let updates = cfg.scheme.updates(&arch);
        let options = PlanOptions {
            batch: 4,
            ..PlanOptions::new(Precision::Int8)
        };
        let plan = compile(&arch, &updates, &options).unwrap();
        let bytes = plan_file::write(&plan, &model, &cfg.plan_config()).unwrap();
        let bytes = AlignedBytes::copy_of(&bytes);
        let view = mcutrain_core::plan::PlanView::parse(bytes.as_slice()).unwrap();

        let header = session::SessionHeader {
            epochs: 2,
            train_samples: 6,
            eval_samples: 3,
            input_len: 16,
        };
        let mut stream = header.encode().to_vec();
        let mut record = vec![0u8; session::sample_record_bytes(16)];
        for i in (0..6).chain(0..6).chain(0..3) {
            session::encode_sample(data.labels[i], data.sample(i), &mut record).unwrap();
            stream.extend(&record);
        }

        struct Zero;
        impl Clock for Zero {
            fn now(&self) -> u32 {
                0
            }
        }
        /// The device's side: the session loop, then the end record.
        fn device_run(view: &mcutrain_core::plan::PlanView, link: &mut impl Link) {
            let mut arena = AlignedBytes::zeroed(view.arena_required());
            let (mut record, mut codes) = (vec![0u8; session::sample_record_bytes(16)], [0i8; 16]);
            let mut counts = vec![0u64; view.step_count()];
            let workspace = Workspace {
                record: &mut record,
                codes: &mut codes,
                values: &mut [],
                step_counts: &mut counts,
            };
            session::run(view, arena.as_mut_slice(), link, &Zero, workspace).unwrap();
            session::write_end(link).unwrap();
        }

        struct Memory<'a> {
            input: &'a [u8],
            output: Vec<u8>,
        }
        impl Link for Memory<'_> {
            fn read_exact(&mut self, buffer: &mut [u8]) -> Result<(), LinkError> {
                let (head, rest) = self.input.split_at(buffer.len());
                buffer.copy_from_slice(head);
                self.input = rest;
                Ok(())
            }
            fn write_all(&mut self, bytes: &[u8]) -> Result<(), LinkError> {
                self.output.extend_from_slice(bytes);
                Ok(())
            }
        }
        let mut direct = Memory {
            input: &stream,
            output: Vec::new(),
        };
        device_run(&view, &mut direct);

        let (mut host, device) = line();
        let served = std::thread::scope(|scope| {
            let device_view = view;
            scope.spawn(move || device_run(&device_view, &mut RequestLink(device)));
            serve(&mut host, &mut stream.as_slice()).unwrap()
        });
        assert_eq!(served, direct.output);
        assert!(results_complete(&served));
    }
}
