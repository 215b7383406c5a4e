//! What a chat request's media cost in prompt tokens, as the mock counts them: each image
//! from its header's pixel size under Qwen2-VL's `smart_resize` rule (one token per
//! `side`×`side` px), each WAV clip from its length (one token per 40 ms, as Qwen2-Audio),
//! each `data:video/jpeg` video (comma-joined JPEG frames, as vLLM reads them) as two
//! frames per temporal patch, each patch the first frame's grid (128–768 tokens a frame).
//!
//! Only the header bytes are base64-decoded (growing the decoded prefix until the parser
//! has what it needs), so a 4 MB image costs microseconds. Media given by URL are not
//! fetched: they count 0 and are reported as not sized.

use base64::Engine as _;

/// Tokens of a request's media and what could not be sized.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MediaTokens {
    pub image_tokens: u64,
    pub images: u32,
    pub video_tokens: u64,
    pub videos: u32,
    pub audio_tokens: u64,
    pub audio_clips: u32,
    /// Media given by URL (not fetched, so not counted).
    pub not_sized: u32,
}

/// The pixel rule of a Qwen-VL family processor.
#[derive(Debug, Clone, Copy)]
pub struct ImageRule {
    /// Pixels per token side: 28 (Qwen2-VL, Qwen2.5-VL) or 32 (Qwen3-VL).
    pub side: u32,
    pub min_pixels: u64,
    pub max_pixels: u64,
}

impl ImageRule {
    pub const QWEN2_VL: ImageRule = ImageRule {
        side: 28,
        min_pixels: 56 * 56,
        max_pixels: 28 * 28 * 16384,
    };
    pub const QWEN3_VL: ImageRule = ImageRule {
        side: 32,
        min_pixels: 65536,
        max_pixels: 16_777_216,
    };

    /// The rule for a video's frames: the image rule's side, 128–768 tokens a frame.
    pub fn frames(&self) -> ImageRule {
        let per = u64::from(self.side) * u64::from(self.side);
        ImageRule {
            side: self.side,
            min_pixels: 128 * per,
            max_pixels: 768 * per,
        }
    }

    pub fn for_side(side: u32) -> ImageRule {
        if side == 32 {
            Self::QWEN3_VL
        } else {
            Self::QWEN2_VL
        }
    }

    /// Tokens of a `width`×`height` image (`smart_resize`, then one per side² px).
    pub fn tokens(&self, width: u64, height: u64) -> Result<u64, String> {
        if width == 0 || height == 0 {
            return Err(format!("image of {width}×{height} px"));
        }
        let f = f64::from(self.side);
        let (w, h) = (width as f64, height as f64);
        if w.max(h) / w.min(h) > 200.0 {
            return Err(format!("image aspect ratio above 200 ({width}×{height})"));
        }
        let mut hb = f.max((h / f).round() * f);
        let mut wb = f.max((w / f).round() * f);
        if hb * wb > self.max_pixels as f64 {
            let beta = (h * w / self.max_pixels as f64).sqrt();
            hb = f.max((h / beta / f).floor() * f);
            wb = f.max((w / beta / f).floor() * f);
        } else if hb * wb < self.min_pixels as f64 {
            let beta = (self.min_pixels as f64 / (h * w)).sqrt();
            hb = (h * beta / f).ceil() * f;
            wb = (w * beta / f).ceil() * f;
        }
        Ok((hb / f) as u64 * (wb / f) as u64)
    }
}

/// Decodes growing prefixes of base64 `text` until `parse` succeeds on one (or the whole
/// text has been tried).
fn with_prefix<T>(
    text: &str,
    mut parse: impl FnMut(&[u8]) -> Option<T>,
) -> Result<Option<T>, String> {
    let engine = base64::engine::general_purpose::STANDARD;
    let mut take = 1024usize;
    loop {
        let end = take.min(text.len());
        // Whole 4-character groups only, unless this is the end of the text.
        let cut = if end == text.len() {
            end
        } else {
            end - end % 4
        };
        let bytes = engine
            .decode(&text.as_bytes()[..cut])
            .map_err(|e| format!("media data is not base64 ({e})"))?;
        if let Some(v) = parse(&bytes) {
            return Ok(Some(v));
        }
        if end == text.len() {
            return Ok(None);
        }
        take = take.saturating_mul(8);
    }
}

/// `data:<mime>;base64,<payload>` → the payload; None for any other URL.
fn data_payload(url: &str) -> Option<&str> {
    let rest = url.strip_prefix("data:")?;
    let (meta, payload) = rest.split_once(',')?;
    meta.ends_with(";base64").then_some(payload)
}

fn video_tokens(url: &str, rule: &ImageRule, n: usize) -> Result<Option<u64>, String> {
    let Some(rest) = url.strip_prefix("data:video/jpeg;base64,") else {
        return Ok(None); // a video file or a URL: not sized here
    };
    let first = rest.split(',').next().unwrap_or("");
    let frames = rest.split(',').count() as u64;
    let size = with_prefix(first, |b| imagesize::blob_size(b).ok())?
        .ok_or_else(|| format!("video {n}: its first frame is not an image"))?;
    let per_patch = rule
        .frames()
        .tokens(size.width as u64, size.height as u64)
        .map_err(|e| format!("video {n}: {e}"))?;
    Ok(Some(frames.div_ceil(2) * per_patch))
}

fn image_tokens(url: &str, rule: &ImageRule, n: usize) -> Result<Option<u64>, String> {
    let Some(payload) = data_payload(url) else {
        return Ok(None);
    };
    let size = with_prefix(payload, |b| imagesize::blob_size(b).ok())?
        .ok_or_else(|| format!("image {n}: not an image the mock can size"))?;
    rule.tokens(size.width as u64, size.height as u64)
        .map(Some)
        .map_err(|e| format!("image {n}: {e}"))
}

/// Qwen2-Audio's output length of a 16 kHz clip: mel frames (160 samples each), a
/// stride-2 convolution, then 2× pooling.
pub fn audio_tokens_of_samples(samples: u64) -> u64 {
    let frames = samples / 160;
    if frames == 0 {
        return 0;
    }
    let conv = (frames - 1) / 2 + 1;
    if conv < 2 {
        return 0;
    }
    (conv - 2) / 2 + 1
}

fn audio_tokens(data: &str, n: usize) -> Result<u64, String> {
    let spec = with_prefix(data, |b| {
        hound::WavReader::new(std::io::Cursor::new(b))
            .ok()
            .map(|r| (r.spec().sample_rate, r.duration()))
    })?
    .ok_or_else(|| format!("audio {n}: not a WAV file"))?;
    let (rate, frames) = spec;
    if rate == 0 {
        return Err(format!("audio {n}: sample rate 0"));
    }
    // At 16 kHz (what the audio towers resample to).
    let samples = u64::from(frames) * 16_000 / u64::from(rate);
    Ok(audio_tokens_of_samples(samples))
}

/// A content part's string at `pointer` (its URL or data), or the one-line error naming
/// the `n`-th item of its `kind` and the missing field.
fn part_str<'a>(
    part: &'a serde_json::Value,
    pointer: &str,
    kind: &str,
    n: usize,
) -> Result<&'a str, String> {
    part.pointer(pointer)
        .and_then(|v| v.as_str())
        .ok_or_else(|| format!("{kind} {n}: no {}", pointer[1..].replace('/', ".")))
}

/// The media of a chat request's messages (content parts `image_url`, `input_audio`,
/// `audio_url`, `video_url`); an error for media the mock cannot read (the request gets a
/// 400, as a real server's would).
pub fn count_media(v: &serde_json::Value, rule: &ImageRule) -> Result<MediaTokens, String> {
    let mut out = MediaTokens::default();
    let Some(messages) = v.get("messages").and_then(|m| m.as_array()) else {
        return Ok(out);
    };
    let parts = messages
        .iter()
        .filter_map(|m| m.get("content").and_then(|c| c.as_array()))
        .flatten();
    for part in parts {
        match part.get("type").and_then(|t| t.as_str()) {
            Some("image_url") => {
                let n = out.images as usize + 1;
                let url = part_str(part, "/image_url/url", "image", n)?;
                match image_tokens(url, rule, n)? {
                    Some(t) => out.image_tokens += t,
                    None => out.not_sized += 1,
                }
                out.images += 1;
            }
            Some("input_audio") => {
                let n = out.audio_clips as usize + 1;
                let data = part_str(part, "/input_audio/data", "audio", n)?;
                out.audio_tokens += audio_tokens(data, n)?;
                out.audio_clips += 1;
            }
            Some("video_url") => {
                let n = out.videos as usize + 1;
                let url = part_str(part, "/video_url/url", "video", n)?;
                match video_tokens(url, rule, n)? {
                    Some(t) => out.video_tokens += t,
                    None => out.not_sized += 1,
                }
                out.videos += 1;
            }
            Some("audio_url") => out.not_sized += 1,
            _ => {}
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qwen_rule_matches_smart_resize() {
        let r = ImageRule::QWEN2_VL;
        assert_eq!(r.tokens(1288, 728), Ok(46 * 26));
        // Rounded to the nearest multiple of 28 per side.
        assert_eq!(r.tokens(1300, 700), Ok(46 * 25));
        // Below min_pixels: scaled up to 56×56.
        assert_eq!(r.tokens(10, 10), Ok(4));
        assert!(r.tokens(1, 300).is_err());
        assert_eq!(ImageRule::QWEN3_VL.tokens(1024, 512), Ok(32 * 16));
    }

    #[test]
    fn audio_is_a_token_per_40_ms() {
        assert_eq!(audio_tokens_of_samples(16_000), 25);
        assert_eq!(audio_tokens_of_samples(640 * 7), 7);
        assert_eq!(audio_tokens_of_samples(100), 0);
    }

    #[test]
    fn bad_media_is_an_error_and_urls_are_unsized() {
        let rule = ImageRule::QWEN2_VL;
        let v = serde_json::json!({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "hi"},
            {"type": "image_url", "image_url": {"url": "https://x/a.png"}},
        ]}]});
        let m = count_media(&v, &rule).expect("ok");
        assert_eq!((m.images, m.not_sized, m.image_tokens), (1, 1, 0));
        let v = serde_json::json!({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,!!!!"}},
        ]}]});
        assert!(count_media(&v, &rule)
            .expect_err("bad media")
            .contains("base64"));
        let v = serde_json::json!({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8gd29ybGQ="}},
        ]}]});
        assert!(count_media(&v, &rule)
            .expect_err("bad media")
            .contains("image 1"));
    }
}
