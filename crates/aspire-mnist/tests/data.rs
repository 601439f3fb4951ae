//! The real MNIST file: size, split and scaling.

use std::path::PathBuf;

use aspire_mnist::data::{self, NUM_CLASSES, PIXELS};

fn data_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../data/mnist_5k.csv.gz")
}

#[test]
fn loads_5000_rows_split_4000_1000_with_100_test_images_per_digit() {
    let started = std::time::Instant::now();
    let data = data::load(&data_path()).expect("run `make setup` to extract the MNIST data");
    println!("loaded in {:.2} s", started.elapsed().as_secs_f64());

    assert_eq!(data.train.len(), 4000);
    assert_eq!(data.test.len(), 1000);
    for split in [&data.train, &data.test] {
        assert_eq!(split.images.len(), split.len() * PIXELS);
        assert!(split.images.iter().all(|p| (0.0..=1.0).contains(p)));
    }
    let mut per_digit = [0usize; NUM_CLASSES];
    for &l in &data.test.labels {
        per_digit[usize::from(l)] += 1;
    }
    assert_eq!(per_digit, [100; NUM_CLASSES]);
    // Real images: mostly background, with some full-intensity strokes.
    let all = &data.test.images;
    assert!(all.contains(&1.0) && all.contains(&0.0));
    let mean = all.iter().sum::<f32>() / all.len() as f32;
    assert!((0.05..0.25).contains(&mean), "mean pixel {mean}");
}
