//! [`Modality`]: the kinds of input mlmf handles.
//!
//! Names are lower case (`text`, `image`, `audio`, `video`, `custom:7`) in display,
//! parsing, serde and config files alike.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::MlmfError;

/// A kind of input. `Custom(id)` is for user-defined modalities (sensor streams,
/// embeddings computed elsewhere, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Modality {
    Text,
    Image,
    Audio,
    Video,
    Custom(u32),
}

impl Modality {
    /// The four built-in modalities, in canonical order.
    pub const BUILTIN: [Modality; 4] = [Self::Text, Self::Image, Self::Audio, Self::Video];

    /// The canonical name (`"image"`, `"custom:7"`).
    pub fn name(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Modality {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Text => f.write_str("text"),
            Self::Image => f.write_str("image"),
            Self::Audio => f.write_str("audio"),
            Self::Video => f.write_str("video"),
            Self::Custom(id) => write!(f, "custom:{id}"),
        }
    }
}

impl FromStr for Modality {
    type Err = MlmfError;

    /// Parses `text`, `image`, `audio`, `video` (any case) and `custom:N` / `custom_N`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.trim().to_ascii_lowercase();
        match lower.as_str() {
            "text" => return Ok(Self::Text),
            "image" => return Ok(Self::Image),
            "audio" => return Ok(Self::Audio),
            "video" => return Ok(Self::Video),
            _ => {}
        }
        if let Some(id) = lower
            .strip_prefix("custom:")
            .or_else(|| lower.strip_prefix("custom_"))
        {
            if let Ok(id) = id.parse::<u32>() {
                return Ok(Self::Custom(id));
            }
        }
        Err(MlmfError::config(
            "modality",
            format!("unknown modality {s:?}: expected text, image, audio, video or custom:N"),
        ))
    }
}

impl Serialize for Modality {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Modality {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_parse_roundtrip() {
        for m in [
            Modality::Text,
            Modality::Image,
            Modality::Audio,
            Modality::Video,
            Modality::Custom(0),
            Modality::Custom(4_000_000_000),
        ] {
            assert_eq!(m.to_string().parse::<Modality>().unwrap(), m);
        }
        assert_eq!("IMAGE".parse::<Modality>().unwrap(), Modality::Image);
        assert_eq!("custom_7".parse::<Modality>().unwrap(), Modality::Custom(7));
    }

    #[test]
    fn rejects_unknown_names() {
        for bad in ["", "pictures", "custom:", "custom:-1", "custom:x"] {
            let err = bad.parse::<Modality>().unwrap_err().to_string();
            assert!(err.contains("expected text, image, audio, video"), "{err}");
        }
    }

    #[test]
    fn serde_uses_names() {
        let json = serde_json::to_string(&vec![Modality::Audio, Modality::Custom(3)]).unwrap();
        assert_eq!(json, r#"["audio","custom:3"]"#);
        let back: Vec<Modality> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, vec![Modality::Audio, Modality::Custom(3)]);
    }
}
