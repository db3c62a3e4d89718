//! `kiln report` on hand-written runs: the page it writes is self-contained and names every run and event, both
//! runs' curves really render in headless Chromium, and a directory that is not a run is refused with exit 2.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The first two colours `kiln report` gives runs (report.rs's RUN_COLOURS), as RGB.
const FIRST_RUN_COLOUR: [u8; 3] = [0xd6, 0x27, 0x28];
const SECOND_RUN_COLOUR: [u8; 3] = [0x1f, 0x77, 0xb4];

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).output().expect("kiln runs")
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-report-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// An ordinary step line: a loss falling from `level` (and other values scaled by it, so that runs differ), validation every 10 steps, and a field kiln does not write
/// yet (the schema grows, so the report must accept it).
fn step_line(step: u64, level: f64, extra: &str) -> String {
    let loss = level / (1.0 + 0.1 * step as f64);
    let val = if step % 10 == 0 { format!(",\"val_loss\":{}", loss + 0.1) } else { String::new() };
    format!(
        "{{\"step\":{step},\"loss\":{loss},\"lr\":{},\"grad_norm\":{},\"step_ms\":50.0,\"tokens_per_s\":{},\
         \"allocated_bytes\":{},\"future_field\":[1,2]{val}{extra}}}\n",
        0.00025 * level * (step as f64 / 40.0).min(1.0),
        level * (0.25 + 0.5 / step as f64),
        5000.0 * level + 10.0 * step as f64,
        (level * (1u64 << 28) as f64) as u64 + step * 1000,
    )
}

/// Two runs: `alpha`, 40 plain steps logging `tokens`, TFLOP/s, MFU and an experts' balancing loss; `beta`, with
/// tokens from its config.toml, a skipped step, a rollback from 25 to 20 and a resume at 30 after steps 31 and 32
/// were logged and lost.
fn two_runs(root: &Path) -> (PathBuf, PathBuf) {
    let alpha = root.join("alpha");
    std::fs::create_dir_all(&alpha).unwrap();
    let metrics: String = (1..=40)
        .map(|s| {
            let aux_loss = 2.0 + 1.0 / s as f64;
            step_line(s, 4.0, &format!(",\"tokens\":{},\"tflops\":80.5,\"mfu\":0.41,\"aux_loss\":{aux_loss}", s * 4096))
        })
        .collect();
    std::fs::write(alpha.join("metrics.jsonl"), metrics).unwrap();

    let beta = root.join("beta");
    std::fs::create_dir_all(&beta).unwrap();
    std::fs::write(beta.join("config.toml"), "[train]\ntotal_batch_tokens = 2048\nmax_steps = 40\n").unwrap();
    let mut metrics = String::new();
    for s in 1..=25 {
        let skip = if s == 12 { ",\"event\":\"skip\",\"why\":\"loss spike 9.1 > 3 sigma\"" } else { "" };
        // Steps 21 to 25 go badly, so the rollback abandons them.
        metrics += &step_line(s, if s > 20 { 5.0 } else { 3.0 }, skip);
    }
    metrics += "{\"step\":25,\"event\":\"rollback\",\"to_step\":20,\"why\":\"3 skips in 10 steps\",\"rollbacks\":1,\
                \"data_skipped\":5}\n";
    // Steps 31 and 32 are lost to a crash: the run resumes from step 30's checkpoint.
    metrics.extend((21..=32).map(|s| step_line(s, if s > 30 { 3.5 } else { 3.0 }, "")));
    metrics += "{\"step\":30,\"event\":\"resume\",\"from\":\"runs/beta/checkpoints/step_00000030\"}\n";
    metrics.extend((31..=40).map(|s| step_line(s, 3.0, "")));
    std::fs::write(beta.join("metrics.jsonl"), metrics).unwrap();
    (alpha, beta)
}

/// Writes the report of the two runs and returns its path and text.
fn report_of_two_runs(name: &str) -> (PathBuf, String) {
    let root = temp_dir(name);
    let (alpha, beta) = two_runs(&root);
    let out = root.join("report.html");
    let run = kiln(&["report", &alpha.to_string_lossy(), &beta.to_string_lossy(), "--out", &out.to_string_lossy()]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "kiln report failed: {stderr}");
    assert_eq!(String::from_utf8_lossy(&run.stdout).trim(), out.to_string_lossy(), "it prints the path written");
    let html = std::fs::read_to_string(&out).expect("kiln report wrote the page");
    (out, html)
}

#[test]
fn the_page_is_self_contained_and_names_runs_and_events() {
    let (_, html) = report_of_two_runs("page");
    assert!(html.contains("<svg"), "charts are inline SVG");
    assert!(html.matches("<svg").count() >= 7, "one chart per quantity");
    for name in ["alpha", "beta"] {
        assert!(html.contains(&format!("{name}</li>")), "the legend names run {name}");
    }
    assert!(html.contains("<table class=\"events\">"), "the events table");
    for row in [
        "<td>12</td><td>skip</td><td>loss spike 9.1 &gt; 3 sigma</td>",
        "<td>25</td><td>rollback</td><td>back to step 20; rollback 1; 5 batches of data skipped; 3 skips in 10 steps</td>",
        "<td>30</td><td>resume</td><td>from runs/beta/checkpoints/step_00000030</td>",
    ] {
        assert!(html.contains(row), "events table lacks {row}");
    }
    // alpha logs MFU, beta neither MFU nor TFLOP/s: MFU is charted.
    assert!(html.contains("<h2>Model FLOPs utilisation</h2>"));
    // alpha logs its experts' balancing loss: it has a chart of its own.
    assert!(html.contains("balancing loss (before its coefficient; experts_per_token when balanced)</h2>"));
    assert!(html.contains(
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; img-src data:\">"
    ));
    let lower = html.to_lowercase();
    for scheme in ["http://", "https://"] {
        for (at, _) in lower.match_indices(scheme) {
            assert!(lower[at..].starts_with("http://www.w3.org/"), "a network reference: {}", &html[at..at + 60]);
        }
    }
    for fetch in ["<script src", "<link", "@import", "<iframe", "<img"] {
        assert!(!lower.contains(fetch), "the page fetches with {fetch}");
    }
    for (at, _) in lower.match_indices("url(") {
        assert!(lower[at..].starts_with("url(#") || lower[at..].starts_with("url(data:"), "{}", &html[at..at + 40]);
    }
}

/// Debian's binary is `chromium`; other distributions call it `chromium-browser`.
fn chromium() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    ["chromium", "chromium-browser"]
        .iter()
        .flat_map(|name| std::env::split_paths(&path).map(move |dir| dir.join(name)))
        .find(|candidate| candidate.is_file())
        .expect("headless Chromium renders the report in this test: apt-get install chromium")
}

/// Pixels of exactly `colour` in an RGB or RGBA PNG.
fn count_pixels(png_path: &Path, colour: [u8; 3]) -> usize {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(png_path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buffer = vec![0; reader.output_buffer_size().unwrap()];
    let frame = reader.next_frame(&mut buffer).unwrap();
    let channels = match frame.color_type {
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        other => panic!("a screenshot in {other:?}"),
    };
    assert_eq!(frame.bit_depth, png::BitDepth::Eight);
    buffer[..frame.buffer_size()].chunks_exact(channels).filter(|pixel| pixel[..3] == colour).count()
}

#[test]
fn both_runs_render_in_headless_chromium() {
    let (page, _) = report_of_two_runs("chromium");
    let dir = page.parent().unwrap();
    let screenshot = dir.join("report.png");
    // The page could not fetch anything even if it tried: the proxy is a closed port.
    let out = Command::new(chromium())
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--proxy-server=127.0.0.1:9", "--hide-scrollbars"])
        .arg(format!("--user-data-dir={}", dir.join("chromium-profile").display()))
        .arg(format!("--screenshot={}", screenshot.display()))
        .args(["--window-size=1400,3000", "--virtual-time-budget=5000"])
        .arg(format!("file://{}", page.display()))
        .output()
        .expect("chromium starts");
    assert!(out.status.success() && screenshot.is_file(), "chromium: {}", String::from_utf8_lossy(&out.stderr));
    // A 2-pixel line across a chart is a few thousand pixels, and the first charts fit the window, so each run
    // drawn has many thousands in its colour (about 9,000), not counting anti-aliased edges; the run's swatch and
    // legend entries alone, were its curves missing, make under a thousand.
    for (run, colour) in [("alpha", FIRST_RUN_COLOUR), ("beta", SECOND_RUN_COLOUR)] {
        let pixels = count_pixels(&screenshot, colour);
        assert!(pixels > 3000, "run {run}'s colour {colour:?} on {pixels} pixels of {}", screenshot.display());
    }
}

#[test]
fn a_directory_without_metrics_is_refused() {
    let dir = temp_dir("not-a-run");
    let out = kiln(&["report", &dir.to_string_lossy(), "--out", &dir.join("r.html").to_string_lossy()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(&dir.join("metrics.jsonl").display().to_string()), "names the file: {stderr}");
    assert!(!dir.join("r.html").exists());
}

#[test]
fn a_malformed_line_is_refused_naming_it() {
    let dir = temp_dir("malformed");
    std::fs::write(dir.join("metrics.jsonl"), format!("{}{{\"step\": \"two\"}}\n", step_line(1, 4.0, ""))).unwrap();
    let out = kiln(&["report", &dir.to_string_lossy(), "--out", &dir.join("r.html").to_string_lossy()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("metrics.jsonl: line 2:"), "names the file and line: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
