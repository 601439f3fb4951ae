//! The MNIST data set used by the exporter and the client: 5,000 real images in a gzip'd
//! CSV (784 pixel values 0–255, then the label), split deterministically into training
//! and test rows so that the exporter never trains on the images the client sends.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

use flate2::read::GzDecoder;

use crate::error::{Error, Result};

/// Pixels per image (28 × 28).
pub const PIXELS: usize = 784;
/// Number of classes (digits 0–9).
pub const NUM_CLASSES: usize = 10;
/// Where `make setup` puts the data, relative to the repository root.
pub const DEFAULT_DATA_PATH: &str = "data/mnist_5k.csv.gz";
/// Environment variable behind every binary's `--data` flag.
pub const DATA_ENV: &str = "ASPIRE_MNIST_DATA";

/// Whether row `index` (0-based, in file order) belongs to the test split. The file is
/// sorted by label, so taking every fifth row keeps both splits balanced across digits.
pub fn is_test_row(index: usize) -> bool {
    index % 5 == 4
}

/// Images and labels of one split.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Split {
    /// `len() * PIXELS` values in [0, 1], row-major, one image after another.
    pub images: Vec<f32>,
    /// One label (0–9) per image.
    pub labels: Vec<u8>,
}

impl Split {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the split has no images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The pixels of image `i`.
    pub fn image(&self, i: usize) -> &[f32] {
        &self.images[i * PIXELS..(i + 1) * PIXELS]
    }

    fn push(&mut self, pixels: &[f32], label: u8) {
        self.images.extend_from_slice(pixels);
        self.labels.push(label);
    }
}

/// The whole data set, already split.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MnistData {
    /// Rows whose index is not ≡ 4 (mod 5): 4,000 of the 5,000.
    pub train: Split,
    /// Rows whose index is ≡ 4 (mod 5): 1,000 of the 5,000, 100 per digit.
    pub test: Split,
}

/// Loads and splits the gzip'd CSV at `path`. Pixels are scaled to [0, 1] as `f32`, the
/// input TensorFlow Serving's tutorial client sends.
pub fn load(path: &Path) -> Result<MnistData> {
    let file = File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::DataMissing {
            path: path.to_path_buf(),
        },
        _ => Error::io("cannot open", path, e),
    })?;
    let format_error = |line: usize, message: String| Error::DataFormat {
        path: path.to_path_buf(),
        line,
        message,
    };
    let mut data = MnistData::default();
    let mut pixels = Vec::with_capacity(PIXELS);
    let mut row = 0;
    for (i, line) in BufReader::new(GzDecoder::new(file)).lines().enumerate() {
        let line_no = i + 1;
        let line = line.map_err(|e| format_error(line_no, format!("cannot read: {e}")))?;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let (pixel_fields, label) = line
            .rsplit_once(',')
            .ok_or_else(|| format_error(line_no, "expected 785 comma-separated values".into()))?;
        let label: u8 = match label.trim().parse() {
            Ok(l) if (l as usize) < NUM_CLASSES => l,
            _ => {
                return Err(format_error(
                    line_no,
                    format!("label {label:?} is not a digit 0-9"),
                ));
            }
        };
        pixels.clear();
        for field in pixel_fields.split(',') {
            let value: u8 = field.trim().parse().map_err(|_| {
                format_error(line_no, format!("pixel {field:?} is not an integer 0-255"))
            })?;
            pixels.push(f32::from(value) / 255.0);
        }
        if pixels.len() != PIXELS {
            return Err(format_error(
                line_no,
                format!(
                    "{} values; expected {} pixels and a label",
                    pixels.len() + 1,
                    PIXELS + 1
                ),
            ));
        }
        let split = if is_test_row(row) {
            &mut data.test
        } else {
            &mut data.train
        };
        split.push(&pixels, label);
        row += 1;
    }
    if data.train.is_empty() || data.test.is_empty() {
        return Err(format_error(
            row,
            format!("only {row} images; need at least 5 to fill both splits"),
        ));
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{Compression, write::GzEncoder};
    use std::io::Write;

    fn write_gz(dir: &Path, text: &str) -> std::path::PathBuf {
        let path = dir.join("d.csv.gz");
        let mut enc = GzEncoder::new(File::create(&path).unwrap(), Compression::fast());
        enc.write_all(text.as_bytes()).unwrap();
        enc.finish().unwrap();
        path
    }

    fn row(pixel: u32, label: &str) -> String {
        let mut fields: Vec<String> = (0..PIXELS).map(|_| pixel.to_string()).collect();
        fields.push(label.to_string());
        fields.join(",") + "\n"
    }

    #[test]
    fn splits_every_fifth_row_and_scales() {
        let dir = tempfile::tempdir().unwrap();
        let text: String = (0..10)
            .map(|i| row(255 * (i % 2), &(i % 10).to_string()))
            .collect();
        let data = load(&write_gz(dir.path(), &text)).unwrap();
        assert_eq!((data.train.len(), data.test.len()), (8, 2));
        assert_eq!(data.test.labels, vec![4, 9]);
        assert_eq!(data.test.image(0)[0], 0.0);
        assert_eq!(data.test.image(1)[783], 1.0);
    }

    #[test]
    fn errors_name_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        for (bad_row, needle) in [
            (row(0, "10"), "label \"10\""),
            (row(256, "1"), "pixel \"256\""),
            ("1,2,3\n".to_string(), "3 values"),
            ("nothing\n".to_string(), "785 comma-separated"),
        ] {
            let text = row(0, "1") + &bad_row;
            let path = write_gz(dir.path(), &text);
            let err = load(&path).unwrap_err().to_string();
            assert!(err.starts_with(&format!("{}:2: ", path.display())), "{err}");
            assert!(err.contains(needle), "{err}");
        }
        let missing = load(&dir.path().join("nope.csv.gz"))
            .unwrap_err()
            .to_string();
        assert!(missing.contains("make setup"), "{missing}");
    }
}
