//! The configurations shipped in configs/: every one loads, and those on synthetic data open their corpus and
//! describe the model their comments name, parameter for parameter.

use kiln_core::Config;
use kiln_data::Dataset;
use kiln_model::ModelSpec;
use std::path::PathBuf;

/// Parameters of the published models whose shapes configs/ copies, as Hugging Face's checkpoints count them.
const PUBLISHED: &[(&str, usize)] = &[
    ("bench-gpt2-124m.toml", 124_439_808),
    ("llama-3.2-1b.toml", 1_235_814_400),
    ("smollm-135m.toml", 134_515_008),
    ("qwen2.5-0.5b.toml", 494_032_768),
    ("qwen3-0.6b.toml", 596_049_920),
    ("smollm3-3b.toml", 3_075_098_624),
];

#[test]
fn every_shipped_config_loads_and_the_published_shapes_match() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.retain(|p| p.extension().is_some_and(|e| e == "toml"));
    files.sort();
    assert!(files.len() >= 5, "{files:?}");
    let mut published = 0;
    for path in &files {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let config = Config::load(Some(path), &[]).unwrap_or_else(|e| panic!("{name}: {e}"));
        // Text corpora live outside the repository (the Shakespeare config names the shared copy); the synthetic
        // ones are built in and must open.
        if !config.data.train.starts_with("synthetic:") {
            continue;
        }
        let data = Dataset::open(&config.data, config.model.block_size).unwrap_or_else(|e| panic!("{name}: {e}"));
        let spec = ModelSpec::new(&config.model, data.vocab_size());
        if let Some((_, params)) = PUBLISHED.iter().find(|(file, _)| *file == name) {
            // Published counts leave out the padded rows of the embedding (tied in all of them) but, unlike
            // num_counted_params, keep GPT-2's learned positions.
            assert_eq!(spec.num_params() - (spec.padded_vocab - spec.vocab) * spec.n_embd, *params, "{name}");
            published += 1;
        }
    }
    assert_eq!(published, PUBLISHED.len());
}
