//! Encoded audio bytes (WAV, FLAC, MP3, Ogg Vorbis) to float32 samples with symphonia.
//!
//! Output: `[channels, samples]` float32 in [-1, 1] (integer PCM scaled as soundfile does:
//! `s / 2^(bits-1)`), plus the stream's sampling rate. The first audio track is decoded;
//! encoder delay and padding are trimmed (gapless). Anything that is not a complete,
//! well-formed stream (unknown format, unsupported codec, corrupt or truncated data) is an
//! [`MlmfError::Decode`]; the decoder runs behind a panic guard so that hostile bytes can
//! only ever produce an error.

use std::io::Cursor;
use std::panic::{catch_unwind, AssertUnwindSafe};

use ndarray::Array2;
use symphonia::core::codecs::audio::AudioDecoderOptions;
use symphonia::core::errors::Error as SymphoniaError;
use symphonia::core::formats::probe::Hint;
use symphonia::core::formats::{FormatOptions, TrackType};
use symphonia::core::io::MediaSourceStream;
use symphonia::core::meta::MetadataOptions;

use crate::error::{MlmfError, Result};
use crate::modality::Modality;

fn decode_error(message: impl Into<String>) -> MlmfError {
    MlmfError::decode(Modality::Audio, message)
}

/// Decodes a whole audio file held in memory: `([channels, samples], sampling_rate)`.
///
/// Supported: WAV (PCM, float, ADPCM), FLAC, MP3, Ogg Vorbis. Errors are
/// [`MlmfError::Decode`] for anything undecodable.
pub fn decode_audio(bytes: &[u8]) -> Result<(Array2<f32>, u32)> {
    let d = decode_planes(bytes, None)?;
    let channels = d.planes.len();
    let mut data = Vec::with_capacity(channels * d.frames);
    for plane in &d.planes {
        data.extend_from_slice(plane);
    }
    let array = Array2::from_shape_vec((channels, d.frames), data)
        .map_err(|e| MlmfError::Internal(format!("decoded audio layout: {e}")))?;
    Ok((array, d.rate))
}

/// Decoded audio, one vector per channel (all `frames` long).
#[derive(Debug)]
pub(crate) struct Decoded {
    pub(crate) planes: Vec<Vec<f32>>,
    pub(crate) frames: usize,
    pub(crate) rate: u32,
}

/// Decodes to per-channel vectors; stops with an [`MlmfError::Input`] as soon as the
/// stream is longer than `max_duration_s` seconds, before decoding (and storing) the rest.
pub(crate) fn decode_planes(bytes: &[u8], max_duration_s: Option<f64>) -> Result<Decoded> {
    if bytes.is_empty() {
        return Err(decode_error(
            "no bytes (expected a WAV, FLAC, MP3 or Ogg Vorbis file)",
        ));
    }
    match catch_unwind(AssertUnwindSafe(|| decode_inner(bytes, max_duration_s))) {
        Ok(result) => result,
        Err(_) => Err(decode_error("the decoder failed on malformed data")),
    }
}

fn decode_inner(bytes: &[u8], max_duration_s: Option<f64>) -> Result<Decoded> {
    let mss = MediaSourceStream::new(Box::new(Cursor::new(bytes)), Default::default());
    let mut format = symphonia::default::get_probe()
        .probe(
            &Hint::new(),
            mss,
            FormatOptions::default(),
            MetadataOptions::default(),
        )
        .map_err(|e| {
            decode_error(format!(
                "unrecognised format ({e}); expected WAV, FLAC, MP3 or Ogg Vorbis"
            ))
        })?;

    let track = format
        .default_track(TrackType::Audio)
        .ok_or_else(|| decode_error("the file has no audio track"))?;
    let track_id = track.id;
    let declared_frames = track.num_frames;
    let params = track
        .codec_params
        .as_ref()
        .and_then(|p| p.audio())
        .ok_or_else(|| decode_error("the audio track has no codec parameters"))?
        .clone();
    let mut decoder = symphonia::default::get_codecs()
        .make_audio_decoder(&params, &AudioDecoderOptions::default())
        .map_err(|e| decode_error(format!("unsupported codec: {e}")))?;

    let mut rate = params.sample_rate;
    let mut planes: Vec<Vec<f32>> = match &params.channels {
        Some(c) => vec![Vec::new(); c.count()],
        None => Vec::new(),
    };
    let mut frames = 0usize;
    let mut max_frames: Option<usize> = None;
    // Reserve what the header announces, but never more than a generous multiple of the
    // input size: a hostile header must not make us allocate gigabytes up front.
    let reserve = declared_frames
        .unwrap_or(0)
        .min(bytes.len() as u64 * 4)
        .try_into()
        .unwrap_or(0usize);

    loop {
        let packet = match format.next_packet() {
            Ok(Some(p)) => p,
            Ok(None) => break,
            // A chained Ogg stream starts a new logical stream: keep the first one.
            Err(SymphoniaError::ResetRequired) => break,
            Err(SymphoniaError::IoError(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(decode_error(format!(
                    "truncated stream: data ends after {frames} frames"
                )))
            }
            Err(e) => {
                return Err(decode_error(format!(
                    "corrupt stream after {frames} frames: {e}"
                )))
            }
        };
        if packet.track_id != track_id {
            continue;
        }
        let buf = decoder
            .decode(&packet)
            .map_err(|e| decode_error(format!("corrupt audio data after {frames} frames: {e}")))?;
        let n = buf.frames();
        if n == 0 {
            continue;
        }
        let spec_rate = buf.spec().rate();
        let channels = buf.num_planes();
        if frames == 0 {
            rate = Some(spec_rate);
            if channels == 0 {
                return Err(decode_error("the stream has zero channels"));
            }
            max_frames = max_duration_s.map(|s| (s * f64::from(spec_rate)).floor() as usize);
            let reserve = reserve.min(max_frames.unwrap_or(usize::MAX).saturating_add(1));
            planes = (0..channels).map(|_| Vec::with_capacity(reserve)).collect();
        } else if channels != planes.len() || Some(spec_rate) != rate {
            return Err(decode_error(format!(
                "stream changes format after {frames} frames (channels {} -> {channels}, rate {:?} -> {spec_rate})",
                planes.len(),
                rate
            )));
        }
        if let (Some(limit), Some(s)) = (max_frames, max_duration_s) {
            if frames + n > limit {
                return Err(MlmfError::input(
                    Modality::Audio,
                    format!(
                        "expected at most max_duration_s = {s} s of audio, the stream is longer"
                    ),
                ));
            }
        }
        let mut tails: Vec<&mut [f32]> = planes
            .iter_mut()
            .map(|p| {
                p.resize(frames + n, 0.0);
                &mut p[frames..]
            })
            .collect();
        buf.copy_to_slice_planar::<f32, _>(&mut tails);
        frames += n;
    }

    if let Some(declared) = declared_frames {
        if (frames as u64) < declared {
            return Err(decode_error(format!(
                "truncated stream: the header declares {declared} frames, the data holds {frames}"
            )));
        }
    }
    let rate = rate.ok_or_else(|| decode_error("the stream declares no sampling rate"))?;
    if rate == 0 {
        return Err(decode_error("the stream declares a sampling rate of 0 Hz"));
    }
    Ok(Decoded {
        planes,
        frames,
        rate,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A minimal 16-bit PCM WAV file.
    fn wav_i16(rate: u32, channels: u16, samples: &[i16]) -> Vec<u8> {
        let data_len = (samples.len() * 2) as u32;
        let mut v = Vec::new();
        v.extend_from_slice(b"RIFF");
        v.extend_from_slice(&(36 + data_len).to_le_bytes());
        v.extend_from_slice(b"WAVEfmt ");
        v.extend_from_slice(&16u32.to_le_bytes());
        v.extend_from_slice(&1u16.to_le_bytes());
        v.extend_from_slice(&channels.to_le_bytes());
        v.extend_from_slice(&rate.to_le_bytes());
        v.extend_from_slice(&(rate * u32::from(channels) * 2).to_le_bytes());
        v.extend_from_slice(&(channels * 2).to_le_bytes());
        v.extend_from_slice(&16u16.to_le_bytes());
        v.extend_from_slice(b"data");
        v.extend_from_slice(&data_len.to_le_bytes());
        for s in samples {
            v.extend_from_slice(&s.to_le_bytes());
        }
        v
    }

    #[test]
    fn decodes_stereo_wav_planar() {
        let interleaved: Vec<i16> = (0..2000)
            .map(|i| if i % 2 == 0 { 16384 } else { -8192 })
            .collect();
        let (a, rate) = decode_audio(&wav_i16(22050, 2, &interleaved)).unwrap();
        assert_eq!(rate, 22050);
        assert_eq!(a.dim(), (2, 1000));
        assert!(a.row(0).iter().all(|&v| v == 0.5));
        assert!(a.row(1).iter().all(|&v| v == -0.25));
    }

    #[test]
    fn zero_frame_wav_decodes_to_empty() {
        let (a, rate) = decode_audio(&wav_i16(8000, 2, &[])).unwrap();
        assert_eq!((a.dim(), rate), ((2, 0), 8000));
    }

    #[test]
    fn empty_and_garbage_are_decode_errors() {
        for bytes in [&b""[..], b"hello world, not audio at all", &[0u8; 64]] {
            let e = decode_audio(bytes).unwrap_err();
            assert!(matches!(e, MlmfError::Decode { .. }), "{e}");
            assert!(
                e.to_string().starts_with("audio input: cannot decode"),
                "{e}"
            );
        }
    }

    #[test]
    fn truncated_wav_is_decode_error() {
        let wav = wav_i16(16000, 1, &vec![1000i16; 4000]);
        for cut in [20, 44, 45, 1001] {
            let r = decode_audio(&wav[..cut]);
            assert!(
                matches!(r, Err(MlmfError::Decode { .. })),
                "cut {cut}: {r:?}"
            );
        }
    }

    #[test]
    fn duration_limit_stops_early() {
        let wav = wav_i16(16000, 1, &vec![0i16; 32000]);
        let e = decode_planes(&wav, Some(1.0)).unwrap_err();
        assert!(matches!(e, MlmfError::Input { .. }), "{e}");
        assert!(e.to_string().contains("max_duration_s"), "{e}");
        let d = decode_planes(&wav, Some(2.0)).unwrap();
        assert_eq!((d.planes.len(), d.frames, d.rate), (1, 32000, 16000));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let _ = decode_audio(&bytes);
        }

        #[test]
        fn random_bodies_behind_real_magic_never_panic(
            magic in 0usize..6,
            body in proptest::collection::vec(any::<u8>(), 0..4096),
        ) {
            let heads: [&[u8]; 6] = [
                b"RIFF\x24\x10\x00\x00WAVEfmt ",
                b"fLaC\x00\x00\x00\x22",
                b"OggS\x00\x02\x00\x00\x00\x00\x00\x00\x00\x00",
                b"ID3\x04\x00\x00\x00\x00\x00\x00",
                b"\xff\xfb\x90\x64",
                b"RIFF\x00\x00\x00\x00WAVEdata",
            ];
            let mut bytes = heads[magic].to_vec();
            bytes.extend_from_slice(&body);
            let _ = decode_audio(&bytes);
        }

        #[test]
        fn mutated_wav_never_panics(
            pos in 0usize..4044,
            val in any::<u8>(),
            cut in 0usize..4044,
        ) {
            let mut wav = wav_i16(16000, 1, &vec![1234i16; 2000]);
            wav[pos] = val;
            wav.truncate(wav.len() - cut.min(wav.len()));
            let _ = decode_audio(&wav);
        }
    }
}
