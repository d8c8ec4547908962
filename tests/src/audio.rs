//! A known audio signal for the isochronous tests, and what a recording of
//! it shows.
//!
//! qemu's `usb-audio` (hw/usb/dev-audio.c) takes 48 kHz, 16-bit, stereo
//! PCM; at full speed each 1 ms frame carries one isochronous packet of
//! [`FRAMES_PER_PACKET`] sample frames. [`TestSignal`] is written as a WAV
//! for the guest's player, and qemu's `-audiodev wav` records what the
//! emulated device received; [`Recording::check`] compares the two.
//!
//! The left channel carries the sine. The right channel carries a position
//! marker, the frame's index times [`MARKER_STEP`] (wrapping as `i16`): a
//! 1 kHz sine at 48 kHz repeats every 48 frames, exactly one packet, so a
//! lost or repeated packet leaves no trace in it, while the marker shows
//! each one. The marker is read relative to its own slope, so the gain
//! qemu's mixer applies (its "0 dB" is 240/255) does not matter.

use std::path::Path;
use std::time::Duration;

use rustfft::{num_complex::Complex, FftPlanner};

/// Sample frames per second (usb-audio's only rate).
pub const SAMPLE_RATE: u32 = 48_000;
/// Channels (usb-audio without `multi=on` is stereo).
pub const CHANNELS: u16 = 2;
/// Sample frames in one 1 ms full-speed isochronous packet.
pub const FRAMES_PER_PACKET: usize = (SAMPLE_RATE / 1000) as usize;
/// How much the position marker grows per frame: large enough that
/// qemu's mixer rounding (±1) cannot be mistaken for a frame, small enough
/// that the marker runs 170 ms before it wraps.
pub const MARKER_STEP: i16 = 8;
/// Frames before the marker wraps around.
const MARKER_PERIOD: i64 = 65_536 / MARKER_STEP as i64;

#[derive(Debug, thiserror::Error)]
pub enum AudioError {
    #[error("WAV file {path}: {source}")]
    Wav {
        path: String,
        #[source]
        source: hound::Error,
    },
    #[error("WAV file {path} is {found}, expected 16-bit integer PCM with {CHANNELS} channels")]
    Format { path: String, found: String },
    #[error(
        "WAV file {path} has {bytes} bytes but its header counts no samples: \
         the writer (qemu) did not finish it, e.g. it was killed"
    )]
    Unfinished { path: String, bytes: u64 },
}

fn wav_error(path: &Path) -> impl FnOnce(hound::Error) -> AudioError + '_ {
    move |source| AudioError::Wav {
        path: path.display().to_string(),
        source,
    }
}

/// A sine on the left channel, the position marker on the right.
#[derive(Debug, Clone, Copy)]
pub struct TestSignal {
    pub freq_hz: f64,
    /// Peak amplitude as a fraction of full scale.
    pub amplitude: f64,
    pub frames: usize,
}

impl TestSignal {
    /// `duration` of a sine of `freq_hz` at half of full scale.
    pub fn sine(freq_hz: f64, duration: Duration) -> TestSignal {
        TestSignal {
            freq_hz,
            amplitude: 0.5,
            frames: (duration.as_secs_f64() * SAMPLE_RATE as f64).round() as usize,
        }
    }

    pub fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.frames as f64 / SAMPLE_RATE as f64)
    }

    /// Frame `i`: `[left, right]`.
    pub fn frame(&self, i: usize) -> [i16; 2] {
        let t = i as f64 / SAMPLE_RATE as f64;
        let s = self.amplitude * (2.0 * std::f64::consts::PI * self.freq_hz * t).sin();
        [
            (s * i16::MAX as f64).round() as i16,
            (i as i64 * MARKER_STEP as i64) as i16,
        ]
    }

    /// Every frame, as a recording of it with no loss would hold them.
    pub fn recording(&self) -> Recording {
        let (left, right) = (0..self.frames)
            .map(|i| self.frame(i))
            .map(|[l, r]| (l, r))
            .unzip();
        Recording {
            sample_rate: SAMPLE_RATE,
            left,
            right,
        }
    }

    /// The signal as a 48 kHz 16-bit stereo WAV file.
    pub fn write_wav(&self, path: &Path) -> Result<(), AudioError> {
        let spec = hound::WavSpec {
            channels: CHANNELS,
            sample_rate: SAMPLE_RATE,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        let mut w = hound::WavWriter::create(path, spec).map_err(wav_error(path))?;
        for i in 0..self.frames {
            for s in self.frame(i) {
                w.write_sample(s).map_err(wav_error(path))?;
            }
        }
        w.finalize().map_err(wav_error(path))
    }
}

/// A stereo 16-bit recording.
#[derive(Debug, Clone, Default)]
pub struct Recording {
    pub sample_rate: u32,
    pub left: Vec<i16>,
    pub right: Vec<i16>,
}

/// Consecutive frames of a recording (`start` and `len` in frames).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub start: usize,
    pub len: usize,
}

/// Where the position marker does not advance by one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Jump {
    /// Index of the frame after the discontinuity.
    pub at: usize,
    /// Frames of the signal skipped there (negative: played again).
    pub frames: i64,
}

/// How far a recording may be from the signal.
#[derive(Debug, Clone, Copy)]
pub struct Tolerance {
    /// Of the signal's duration, either way.
    pub duration_fraction: f64,
    pub freq_hz: f64,
    /// The longest silence, and the most frames lost or repeated at one
    /// place, in packets ([`FRAMES_PER_PACKET`]).
    pub max_gap_packets: usize,
}

/// What [`Recording::check`] measured.
#[derive(Debug, Clone)]
pub struct Analysis {
    pub duration: Duration,
    pub dominant_hz: Option<f64>,
    pub longest_silence: Option<Run>,
    pub jumps: Vec<Jump>,
    /// The marker's slope relative to [`MARKER_STEP`]: the gain of the path.
    pub gain: Option<f64>,
}

impl Recording {
    /// Reads a 16-bit stereo WAV file.
    pub fn read_wav(path: &Path) -> Result<Recording, AudioError> {
        let mut r = hound::WavReader::open(path).map_err(wav_error(path))?;
        let spec = r.spec();
        if spec.channels != CHANNELS
            || spec.bits_per_sample != 16
            || spec.sample_format != hound::SampleFormat::Int
        {
            return Err(AudioError::Format {
                path: path.display().to_string(),
                found: format!(
                    "{} channels, {}-bit {:?}",
                    spec.channels, spec.bits_per_sample, spec.sample_format
                ),
            });
        }
        let bytes = std::fs::metadata(path).map_or(0, |m| m.len());
        // 44 bytes: a canonical header with nothing after it.
        if r.len() == 0 && bytes > 44 {
            return Err(AudioError::Unfinished {
                path: path.display().to_string(),
                bytes,
            });
        }
        let samples: Vec<i16> = r
            .samples::<i16>()
            .collect::<Result<_, _>>()
            .map_err(wav_error(path))?;
        let (left, right) = samples.chunks_exact(2).map(|f| (f[0], f[1])).unzip();
        Ok(Recording {
            sample_rate: spec.sample_rate,
            left,
            right,
        })
    }

    pub fn frames(&self) -> usize {
        self.left.len()
    }

    pub fn duration(&self) -> Duration {
        if self.sample_rate == 0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64(self.frames() as f64 / self.sample_rate as f64)
    }

    /// The strongest frequency of the left channel (Hann window, one FFT
    /// over the whole recording: resolution sample_rate / frames), or
    /// `None` when there is nothing but DC.
    pub fn dominant_frequency(&self) -> Option<f64> {
        let n = self.frames();
        if n < 2 || self.sample_rate == 0 {
            return None;
        }
        let mut buf: Vec<Complex<f64>> = self
            .left
            .iter()
            .enumerate()
            .map(|(i, &s)| {
                let w = 0.5 - 0.5 * (2.0 * std::f64::consts::PI * i as f64 / n as f64).cos();
                Complex::new(s as f64 * w, 0.0)
            })
            .collect();
        FftPlanner::new().plan_fft_forward(n).process(&mut buf);
        let (bin, peak) = buf[1..n / 2 + 1]
            .iter()
            .enumerate()
            .map(|(k, c)| (k + 1, c.norm()))
            .max_by(|a, b| a.1.total_cmp(&b.1))?;
        if peak == 0.0 {
            return None;
        }
        Some(bin as f64 * self.sample_rate as f64 / n as f64)
    }

    /// Runs of at least `min_frames` frames whose left channel stays within
    /// `threshold` of zero. A sine of the test's amplitude is that close to
    /// zero for one frame per crossing, so longer runs are silence.
    pub fn silent_runs(&self, threshold: i16, min_frames: usize) -> Vec<Run> {
        let mut runs = Vec::new();
        let mut start = None;
        for (i, &s) in self.left.iter().chain([&i16::MAX]).enumerate() {
            let quiet = i < self.frames() && s.unsigned_abs() <= threshold.unsigned_abs();
            match (quiet, start) {
                (true, None) => start = Some(i),
                (false, Some(s0)) => {
                    if i - s0 >= min_frames.max(1) {
                        runs.push(Run {
                            start: s0,
                            len: i - s0,
                        });
                    }
                    start = None;
                }
                _ => {}
            }
        }
        runs
    }

    /// The marker's gain: its mean step between neighbouring frames over
    /// [`MARKER_STEP`], from the steps that look like one frame (a gain
    /// between 0.5 and 1.5). `None` when fewer than half of them do, i.e.
    /// the right channel holds no marker.
    pub fn marker_gain(&self) -> Option<f64> {
        let lo = MARKER_STEP as i32 / 2;
        let hi = MARKER_STEP as i32 * 3 / 2;
        let (sum, count) = self
            .right
            .windows(2)
            .map(|w| w[1] as i32 - w[0] as i32)
            .filter(|d| (lo..=hi).contains(d))
            .fold((0i64, 0usize), |(s, c), d| (s + d as i64, c + 1));
        if count == 0 || count * 2 < self.frames().saturating_sub(1) {
            return None;
        }
        Some(sum as f64 / count as f64 / MARKER_STEP as f64)
    }

    /// Every place where the marker does not advance by exactly one frame;
    /// `None` without a marker. The marker repeats every 8192 frames
    /// (170 ms): a jump of more than half that reads as going back (it
    /// still fails a check), and a loss of exactly one period shows only
    /// in the duration, which [`Recording::check`] bounds more tightly.
    pub fn marker_jumps(&self) -> Option<Vec<Jump>> {
        let gain = self.marker_gain()?;
        let step = MARKER_STEP as f64 * gain;
        let index = |v: i16| (v as f64 / step).round() as i64;
        let mut jumps = Vec::new();
        for (i, w) in self.right.windows(2).enumerate() {
            let advance = (index(w[1]) - index(w[0])).rem_euclid(MARKER_PERIOD);
            if advance == 1 {
                continue;
            }
            let frames = if advance > MARKER_PERIOD / 2 {
                advance - MARKER_PERIOD - 1
            } else {
                advance - 1
            };
            jumps.push(Jump { at: i + 1, frames });
        }
        Some(jumps)
    }

    /// Measures the recording and compares it with `signal`: the sample
    /// rate, the duration, the dominant frequency, silences and the
    /// marker's continuity. `Err` lists every way it is off.
    pub fn check(&self, signal: &TestSignal, tol: &Tolerance) -> Result<Analysis, CheckFailure> {
        let max_gap = tol.max_gap_packets * FRAMES_PER_PACKET;
        // 1 % of full scale: well below the sine, well above mixer rounding.
        let threshold = i16::MAX / 100;
        let analysis = Analysis {
            duration: self.duration(),
            dominant_hz: self.dominant_frequency(),
            longest_silence: self
                .silent_runs(threshold, 2)
                .into_iter()
                .max_by_key(|r| r.len),
            jumps: self.marker_jumps().unwrap_or_default(),
            gain: self.marker_gain(),
        };
        let mut problems = Vec::new();
        if self.sample_rate != SAMPLE_RATE {
            problems.push(format!(
                "sample rate {} Hz, expected {SAMPLE_RATE} Hz",
                self.sample_rate
            ));
        }
        let want = signal.duration().as_secs_f64();
        let got = analysis.duration.as_secs_f64();
        if (got - want).abs() > want * tol.duration_fraction {
            problems.push(format!(
                "duration {got:.3} s, expected {want:.3} s ± {:.0} %",
                tol.duration_fraction * 100.0
            ));
        }
        match analysis.dominant_hz {
            Some(f) if (f - signal.freq_hz).abs() <= tol.freq_hz => {}
            Some(f) => problems.push(format!(
                "dominant frequency {f:.1} Hz, expected {:.1} Hz ± {:.1} Hz",
                signal.freq_hz, tol.freq_hz
            )),
            None => problems.push("no dominant frequency: silence".into()),
        }
        if let Some(r) = analysis.longest_silence.filter(|r| r.len > max_gap) {
            problems.push(format!(
                "{:.1} ms of silence at {:.3} s (at most {} packets allowed)",
                r.len as f64 * 1000.0 / SAMPLE_RATE as f64,
                r.start as f64 / SAMPLE_RATE as f64,
                tol.max_gap_packets
            ));
        }
        if analysis.gain.is_none() {
            problems.push("the right channel carries no position marker".into());
        }
        for j in analysis
            .jumps
            .iter()
            .filter(|j| j.frames.unsigned_abs() as usize > max_gap)
        {
            problems.push(format!(
                "{} frames ({:.1} ms) {} at {:.3} s (at most {} packets allowed)",
                j.frames.abs(),
                j.frames.abs() as f64 * 1000.0 / SAMPLE_RATE as f64,
                if j.frames > 0 { "lost" } else { "repeated" },
                j.at as f64 / SAMPLE_RATE as f64,
                tol.max_gap_packets
            ));
        }
        if problems.is_empty() {
            Ok(analysis)
        } else {
            Err(CheckFailure { analysis, problems })
        }
    }
}

/// A recording that is not the signal, and why.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the recording is not the signal played: {}; {analysis:?}", problems.join("; "))]
pub struct CheckFailure {
    pub analysis: Analysis,
    pub problems: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOL: Tolerance = Tolerance {
        duration_fraction: 0.05,
        freq_hz: 2.0,
        max_gap_packets: 3,
    };

    fn one_khz() -> TestSignal {
        TestSignal::sine(1000.0, Duration::from_secs(3))
    }

    /// What qemu's mixer does at its "0 dB": scale by 240/255, with rounding.
    fn attenuated(mut r: Recording) -> Recording {
        let g = |s: &mut i16| *s = (*s as f64 * 240.0 / 255.0).round() as i16;
        r.left.iter_mut().for_each(g);
        r.right.iter_mut().for_each(g);
        r
    }

    fn problems(r: &Recording, s: &TestSignal) -> String {
        r.check(s, &TOL).expect_err("must fail").problems.join("; ")
    }

    #[test]
    fn the_signal_itself_passes_through_a_wav_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tone.wav");
        let s = one_khz();
        s.write_wav(&path).unwrap();
        let r = Recording::read_wav(&path).unwrap();
        assert_eq!(r.frames(), 144_000);
        assert_eq!(r.sample_rate, SAMPLE_RATE);
        let a = r.check(&s, &TOL).unwrap();
        assert!((a.dominant_hz.unwrap() - 1000.0).abs() < 0.5, "{a:?}");
        assert_eq!(a.jumps, vec![]);
        assert_eq!(a.longest_silence, None);
        assert_eq!(a.gain, Some(1.0));
    }

    #[test]
    fn qemus_gain_and_rounding_pass() {
        let a = attenuated(one_khz().recording())
            .check(&one_khz(), &TOL)
            .unwrap();
        assert_eq!(a.jumps, vec![]);
        assert!((a.gain.unwrap() - 240.0 / 255.0).abs() < 1e-3, "{a:?}");
    }

    #[test]
    fn a_wrong_frequency_fails() {
        let r = TestSignal::sine(1100.0, Duration::from_secs(3)).recording();
        let p = problems(&r, &one_khz());
        assert!(p.contains("dominant frequency 1100.0 Hz"), "{p}");
        assert!(!p.contains("duration"), "{p}");
        // 2.5 Hz off is beyond a 2 Hz tolerance; the FFT resolves 1/3 Hz.
        let r = TestSignal::sine(1002.5, Duration::from_secs(3)).recording();
        assert!(problems(&r, &one_khz()).contains("dominant frequency 1002."));
    }

    #[test]
    fn a_recording_too_short_or_too_long_fails() {
        let short = TestSignal::sine(1000.0, Duration::from_millis(2800)).recording();
        assert!(problems(&short, &one_khz()).contains("duration 2.800 s"));
        let long = TestSignal::sine(1000.0, Duration::from_millis(3200)).recording();
        assert!(problems(&long, &one_khz()).contains("duration 3.200 s"));
        // Within 5 %.
        let ok = TestSignal::sine(1000.0, Duration::from_millis(3100)).recording();
        ok.check(&one_khz(), &TOL).unwrap();
    }

    #[test]
    fn fifty_ms_of_silence_fail() {
        let mut r = attenuated(one_khz().recording());
        let at = SAMPLE_RATE as usize; // 1 s in
        let n = 50 * FRAMES_PER_PACKET;
        r.left[at..at + n].fill(0);
        r.right[at..at + n].fill(0);
        let p = problems(&r, &one_khz());
        assert!(p.contains("50.0 ms of silence at 1.000 s"), "{p}");
        // Two packets of silence are within the tolerance (with the
        // sine's zero crossing right after them: one frame more).
        let mut r = one_khz().recording();
        r.left[at..at + 2 * FRAMES_PER_PACKET].fill(0);
        let a = r.check(&one_khz(), &TOL).unwrap();
        assert_eq!(a.longest_silence.unwrap().len, 2 * FRAMES_PER_PACKET + 1);
    }

    #[test]
    fn fifty_lost_packets_fail_though_the_sine_hides_them() {
        let s = one_khz();
        let mut r = attenuated(s.recording());
        let at = SAMPLE_RATE as usize;
        let n = 50 * FRAMES_PER_PACKET;
        r.left.drain(at..at + n);
        r.right.drain(at..at + n);
        // Whole periods of the sine gone: its spectrum and silence say nothing.
        assert!((r.dominant_frequency().unwrap() - 1000.0).abs() < 1.0);
        assert!(r.silent_runs(i16::MAX / 100, 2).is_empty());
        let p = problems(&r, &s);
        assert!(p.contains("2400 frames (50.0 ms) lost at 1.000 s"), "{p}");
        let a = r
            .check(
                &s,
                &Tolerance {
                    max_gap_packets: 50,
                    ..TOL
                },
            )
            .unwrap();
        assert_eq!(a.jumps, vec![Jump { at, frames: 2400 }]);
    }

    #[test]
    fn repeated_packets_and_one_lost_packet_are_told_apart() {
        let s = one_khz();
        let mut r = s.recording();
        let at = 2 * SAMPLE_RATE as usize;
        // One packet played twice, 10 packets later one lost.
        let again: Vec<i16> = r.right[at - FRAMES_PER_PACKET..at].to_vec();
        r.right.splice(at..at, again.iter().copied());
        r.left.splice(at..at, again.iter().copied());
        let lost = at + 10 * FRAMES_PER_PACKET;
        r.right.drain(lost..lost + FRAMES_PER_PACKET);
        r.left.drain(lost..lost + FRAMES_PER_PACKET);
        assert_eq!(
            r.marker_jumps().unwrap(),
            vec![
                Jump { at, frames: -48 },
                Jump {
                    at: lost,
                    frames: 48
                }
            ]
        );
        // One packet either way is within 3 packets.
        r.check(&s, &TOL).unwrap();
    }

    #[test]
    fn silence_and_noise_without_a_marker_fail() {
        let silent = Recording {
            sample_rate: SAMPLE_RATE,
            left: vec![0; 144_000],
            right: vec![0; 144_000],
        };
        let p = problems(&silent, &one_khz());
        assert!(p.contains("no dominant frequency"), "{p}");
        assert!(p.contains("3000.0 ms of silence"), "{p}");
        assert!(p.contains("no position marker"), "{p}");
        let mut r = one_khz().recording();
        r.right = r.left.clone();
        assert!(problems(&r, &one_khz()).contains("no position marker"));
    }

    #[test]
    fn a_resampled_recording_fails_on_its_rate() {
        let mut r = one_khz().recording();
        r.sample_rate = 44_100;
        let p = problems(&r, &one_khz());
        assert!(p.contains("sample rate 44100 Hz"), "{p}");
    }

    #[test]
    fn a_wav_whose_header_was_never_finished_is_named_so() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cut.wav");
        one_khz().write_wav(&path).unwrap();
        // What qemu leaves when killed: the header written at start (data
        // size 0), the samples after it.
        let mut b = std::fs::read(&path).unwrap();
        b[40..44].copy_from_slice(&0u32.to_le_bytes());
        std::fs::write(&path, &b).unwrap();
        let e = Recording::read_wav(&path).unwrap_err();
        assert!(e.to_string().contains("did not finish it"), "{e}");
    }

    #[test]
    fn a_mono_wav_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mono.wav");
        let spec = hound::WavSpec {
            channels: 1,
            sample_rate: SAMPLE_RATE,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        let mut w = hound::WavWriter::create(&path, spec).unwrap();
        w.write_sample(0i16).unwrap();
        w.finalize().unwrap();
        let e = Recording::read_wav(&path).unwrap_err();
        assert!(e.to_string().contains("1 channels"), "{e}");
    }
}
