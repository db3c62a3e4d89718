//! `kiln report`: one self-contained HTML page comparing training runs from their `metrics.jsonl`.
//!
//! Each chart (loss against steps and against tokens, learning rate, gradient norm, tokens/s, MFU or TFLOP/s,
//! memory) overlays every run in its own colour. Steps a rollback or resume abandoned are drawn faded; skips,
//! rollbacks and resumes are marked on every chart against steps and listed in a table per run. The charts are SVG
//! drawn by plotters and written inline, and a Content-Security-Policy forbids the page any fetch, so it opens
//! offline and can be mailed or archived as one file.

use kiln_core::{Error, Result};
use kiln_train::metrics::{Event, StepRecord as Record};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// `kiln report`'s arguments.
#[derive(clap::Args)]
pub struct ReportCommand {
    /// Run directories (each a train.out_dir holding metrics.jsonl, and config.toml for tokens per step).
    #[arg(required = true, value_name = "RUN_DIR")]
    runs: Vec<PathBuf>,
    /// The HTML file to write.
    #[arg(long, default_value = "report.html")]
    out: PathBuf,
}

/// Writes the report and prints its path.
pub fn run(command: ReportCommand) -> Result<()> {
    let runs = command.runs.iter().map(|dir| Run::load(dir)).collect::<Result<Vec<_>>>()?;
    let html = page(&runs)?;
    std::fs::write(&command.out, html).map_err(|e| Error::io(&command.out, e))?;
    println!("{}", command.out.display());
    Ok(())
}

/// What a line of `metrics.jsonl` records.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    /// An ordinary step.
    Step,
    /// A step whose update was rejected as a spike; its loss and gradient norm are the rejected values.
    Skip,
    /// The run went back to the checkpoint of `to_step`; the steps logged after that one are abandoned.
    Rollback,
    /// The run restarted from the checkpoint of `step`; steps logged after that one before it are abandoned.
    Resume,
    /// An event this version does not know: listed, not drawn.
    Other,
}

/// What the report reads of a line of `metrics.jsonl` beyond its fields.
trait Line {
    fn kind(&self) -> Kind;
    /// The step a rollback or resume continues after, when the line is one.
    fn restart_step(&self) -> Option<u64>;
    /// What the events table says about the event beyond its step and kind.
    fn detail(&self) -> String;
}

impl Line for Record {
    fn kind(&self) -> Kind {
        match self.event {
            None => Kind::Step,
            Some(Event::Skip { .. }) => Kind::Skip,
            Some(Event::Rollback { .. }) => Kind::Rollback,
            Some(Event::Resume { .. }) => Kind::Resume,
            Some(Event::Other) => Kind::Other,
        }
    }

    fn restart_step(&self) -> Option<u64> {
        match self.event {
            Some(Event::Rollback { to_step, .. }) => Some(to_step),
            Some(Event::Resume { .. }) => Some(self.step),
            _ => None,
        }
    }

    fn detail(&self) -> String {
        match &self.event {
            Some(Event::Skip { why }) => why.clone(),
            Some(Event::Rollback { to_step, why, rollbacks, data_skipped }) => {
                format!("back to step {to_step}; rollback {rollbacks}; {data_skipped} batches of data skipped; {why}")
            }
            Some(Event::Resume { from }) => format!("from {from}"),
            Some(Event::Other) | None => String::new(),
        }
    }
}

impl Kind {
    /// How the events table names it.
    fn name(self) -> &'static str {
        match self {
            Kind::Step => "step",
            Kind::Skip => "skip",
            Kind::Rollback => "rollback",
            Kind::Resume => "resume",
            Kind::Other => "other",
        }
    }
}

/// One run directory's metrics, with which steps were abandoned by a later rollback or resume.
struct Run {
    /// The directory as given on the command line: how the page names the run.
    name: String,
    records: Vec<Record>,
    /// Parallel to `records`: whether a later rollback or resume threw the step away.
    abandoned: Vec<bool>,
    /// Tokens per step from config.toml, for lines without `tokens`; otherwise why it is not known.
    batch_tokens: std::result::Result<u64, String>,
}

impl Run {
    /// Reads `dir/metrics.jsonl` (required; a line that is not a metrics object is an error naming it) and
    /// `dir/config.toml` (optional).
    fn load(dir: &Path) -> Result<Run> {
        let path = dir.join("metrics.jsonl");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| Error::data(&path, format!("cannot read it ({e}); is {} a kiln run?", dir.display())))?;
        let mut records = Vec::new();
        for (index, line) in text.lines().enumerate().filter(|(_, line)| !line.trim().is_empty()) {
            let malformed = |e: &dyn std::fmt::Display| Error::data(&path, format!("line {}: {e}", index + 1));
            let value: serde_json::Value = serde_json::from_str(line).map_err(|e| malformed(&e))?;
            let record = Record::deserialize(&value).map_err(|e| malformed(&e))?;
            // An event whose fields do not parse reads as no event: say so rather than draw it as a step.
            if record.event.is_none() && !value["event"].is_null() {
                return Err(malformed(&format!("an event {} without the fields its kind has", value["event"])));
            }
            records.push(record);
        }
        if records.is_empty() {
            return Err(Error::data(&path, "no metrics lines yet"));
        }
        let abandoned = abandoned_steps(&records);
        let name = dir.display().to_string().trim_end_matches('/').to_string();
        Ok(Run { name, records, abandoned, batch_tokens: batch_tokens(&dir.join("config.toml")) })
    }

    /// Tokens trained through a step: logged, or the configured batch times the step.
    fn tokens(&self, record: &Record) -> Option<f64> {
        record
            .tokens
            .or(self.batch_tokens.as_ref().ok().and_then(|batch| batch.checked_mul(record.step)))
            .map(|t| t as f64)
    }
}

/// Which lines a rollback or resume threw away: walking back from it, the steps after the one it continues from.
fn abandoned_steps(records: &[Record]) -> Vec<bool> {
    let mut abandoned = vec![false; records.len()];
    for (i, restart) in records.iter().enumerate().filter_map(|(i, r)| r.restart_step().map(|s| (i, s))) {
        for (j, earlier) in records[..i].iter().enumerate().rev() {
            match earlier.kind() {
                Kind::Step | Kind::Skip if earlier.step > restart => abandoned[j] = true,
                Kind::Step | Kind::Skip => break,
                _ => {}
            }
        }
    }
    abandoned
}

/// `train.total_batch_tokens` from a run's saved configuration (which kiln writes resolved), or why not.
fn batch_tokens(path: &Path) -> std::result::Result<u64, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let table: toml::Table = text.parse().map_err(|e| format!("{}: {e}", path.display()))?;
    table
        .get("train")
        .and_then(|train| train.get("total_batch_tokens"))
        .and_then(|value| value.as_integer())
        .and_then(|n| u64::try_from(n).ok())
        .ok_or_else(|| format!("{} has no train.total_batch_tokens", path.display()))
}

/// The colours of runs, in the order given; distinct hues, with enough contrast on white.
const RUN_COLOURS: [RGBColor; 6] = [
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
];

/// The colour of the run at `index` on the command line: past the chosen ones, hues a golden angle apart (each
/// far from the ones before it), dark enough for white.
fn run_colour(index: usize) -> RGBColor {
    match RUN_COLOURS.get(index) {
        Some(&colour) => colour,
        None => {
            let (r, g, b) = HSLColor((index as f64 * 0.618_034).fract(), 0.7, 0.4).rgb();
            RGBColor(r, g, b)
        }
    }
}

/// How a curve is drawn.
#[derive(Clone, Copy)]
enum Look {
    /// A line: a quantity logged every step.
    Line,
    /// A line with a dot at each value: a quantity logged now and then (validation loss).
    Dotted,
}

/// One quantity a chart draws for each run.
struct Curve {
    /// Added to the run's name in the legend; none for a chart's only curve.
    name: Option<&'static str>,
    value: fn(&Record) -> Option<f64>,
    look: Look,
}

/// What a chart's horizontal axis counts.
#[derive(Clone, Copy, PartialEq)]
enum Axis {
    Steps,
    Tokens,
}

/// One chart of the page.
struct Chart {
    title: &'static str,
    y_desc: &'static str,
    axis: Axis,
    curves: Vec<Curve>,
}

/// A run's points of one curve, in the order logged: the steps it kept as one line, and each stretch of steps
/// a rollback or resume abandoned as a line of its own, starting from the kept step it branched off.
struct Traced {
    kept: Vec<(f64, f64)>,
    abandoned: Vec<Vec<(f64, f64)>>,
}

/// Skipped steps are left out: their values are the spikes the run rejected, marked on the charts instead.
fn trace(run: &Run, axis: Axis, value: fn(&Record) -> Option<f64>) -> Traced {
    let mut traced = Traced { kept: Vec::new(), abandoned: Vec::new() };
    let mut branch: Option<Vec<(f64, f64)>> = None;
    for (record, &abandoned) in run.records.iter().zip(&run.abandoned).filter(|(r, _)| r.kind() == Kind::Step) {
        let x = match axis {
            Axis::Steps => Some(record.step as f64),
            Axis::Tokens => run.tokens(record),
        };
        let Some(point) = x.zip(value(record)).filter(|(x, y)| x.is_finite() && y.is_finite()) else { continue };
        match (&mut branch, abandoned) {
            (Some(points), true) => points.push(point),
            (None, true) => branch = Some(traced.kept.last().into_iter().copied().chain([point]).collect()),
            (_, false) => {
                traced.abandoned.extend(branch.take());
                traced.kept.push(point);
            }
        }
    }
    traced.abandoned.extend(branch);
    traced
}

impl Chart {
    /// A chart of one quantity against steps.
    fn by_step(title: &'static str, y_desc: &'static str, value: fn(&Record) -> Option<f64>) -> Chart {
        Chart { title, y_desc, axis: Axis::Steps, curves: vec![Curve { name: None, value, look: Look::Line }] }
    }

    /// Training and validation loss against `axis`.
    fn loss(title: &'static str, axis: Axis) -> Chart {
        let curves = vec![
            Curve { name: Some("loss"), value: |r| r.loss.map(f64::from), look: Look::Line },
            Curve { name: Some("val loss"), value: |r| r.val_loss.map(f64::from), look: Look::Dotted },
        ];
        Chart { title, y_desc: "loss", axis, curves }
    }
}

/// The page's charts: MFU where every run that reports throughput knows its device's peak, else TFLOP/s.
fn charts(runs: &[Run]) -> Vec<Chart> {
    let logs = |run: &Run, value: fn(&Record) -> Option<f64>| run.records.iter().any(|r| value(r).is_some());
    let mfu_everywhere = runs.iter().any(|run| logs(run, |r| r.mfu))
        && runs.iter().all(|run| logs(run, |r| r.mfu) || !logs(run, |r| r.tflops));
    let throughput = if mfu_everywhere {
        Chart::by_step("Model FLOPs utilisation", "MFU (%)", |r| r.mfu.map(|f| 100.0 * f))
    } else {
        Chart::by_step("Model TFLOP/s", "TFLOP/s", |r| r.tflops)
    };
    let mut charts = vec![
        Chart::loss("Loss against steps", Axis::Steps),
        Chart::loss("Loss against tokens", Axis::Tokens),
        Chart::by_step("Learning rate", "lr", |r| r.lr.map(f64::from)),
        Chart::by_step("Gradient norm (before clipping)", "grad norm", |r| r.grad_norm.map(f64::from)),
        Chart::by_step("Throughput", "tokens/s", |r| r.tokens_per_s),
        throughput,
        Chart::by_step("Memory held by the engine", "allocated (GiB)", |r| r.allocated_bytes.map(|b| b as f64 / GIB)),
    ];
    let aux_loss = |r: &Record| r.aux_loss.map(f64::from);
    if runs.iter().any(|run| logs(run, aux_loss)) {
        let title = "Experts' balancing loss (before its coefficient; experts_per_token when balanced)";
        charts.insert(2, Chart::by_step(title, "aux loss", aux_loss));
    }
    charts
}

/// Bytes in a gibibyte, the unit of the memory chart.
const GIB: f64 = (1u64 << 30) as f64;
/// Each chart's size in pixels: about a laptop screen's width.
const CHART_SIZE: (u32, u32) = (1100, 420);
/// Lines' width in pixels: wide enough to tell colours apart.
const STROKE: u32 = 2;
/// How strongly abandoned steps and event lines are drawn, against 1 for kept steps.
const FADED: f64 = 0.3;

/// The smallest range holding every value, widened a little so no point sits on the frame.
fn padded_range(values: impl Iterator<Item = f64>) -> Option<std::ops::Range<f64>> {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if lo > hi {
        return None;
    }
    let pad = if hi > lo { 0.04 * (hi - lo) } else { 0.5 * lo.abs().max(1e-9) };
    Some(lo - pad..hi + pad)
}

/// How a chart against steps marks one kind of event.
#[derive(Clone, Copy)]
struct Marker {
    kind: Kind,
    /// The kind's name in the legend.
    name: &'static str,
    /// A path around the event's point (pixels, y down), which the page's key draws as a character too.
    shape: &'static [(i32, i32)],
}

/// The events marked on the charts against steps.
const MARKERS: [Marker; 3] = [
    Marker { kind: Kind::Skip, name: "skip", shape: &[(-6, -6), (6, -6), (0, 5), (-6, -6)] },
    Marker { kind: Kind::Rollback, name: "rollback", shape: &[(-6, -6), (6, 6), (0, 0), (6, -6), (-6, 6)] },
    Marker { kind: Kind::Resume, name: "resume", shape: &[(-5, -5), (5, -5), (5, 5), (-5, 5), (-5, -5)] },
];

/// A chart that plotters could not draw: a bug here rather than a problem with the runs.
fn drawing_error(title: &str, e: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("drawing the chart {title:?}: {e}"))
}

/// One chart as SVG, or `None` when no run has a value for it.
fn render(chart: &Chart, runs: &[Run]) -> Result<Option<String>> {
    let traced: Vec<Vec<Traced>> =
        runs.iter().map(|run| chart.curves.iter().map(|curve| trace(run, chart.axis, curve.value)).collect()).collect();
    let points = || traced.iter().flatten().flat_map(|t| t.kept.iter().chain(t.abandoned.iter().flatten()));
    let (Some(x_range), Some(y_range)) = (padded_range(points().map(|p| p.0)), padded_range(points().map(|p| p.1)))
    else {
        return Ok(None);
    };
    let fail = |e| drawing_error(chart.title, e);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, CHART_SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(fail)?;
        let mut plot = ChartBuilder::on(&root)
            .margin(12)
            .x_label_area_size(45)
            .y_label_area_size(80)
            .build_cartesian_2d(x_range, y_range.clone())
            .map_err(fail)?;
        let x_desc = match chart.axis {
            Axis::Steps => "step",
            Axis::Tokens => "tokens",
        };
        plot.configure_mesh().x_desc(x_desc).y_desc(chart.y_desc).light_line_style(WHITE).draw().map_err(fail)?;
        for ((run_index, run), run_traced) in runs.iter().enumerate().zip(&traced) {
            let colour = run_colour(run_index);
            for (curve, traced) in chart.curves.iter().zip(run_traced).filter(|(_, t)| !t.kept.is_empty()) {
                let line = colour.stroke_width(STROKE);
                let series = plot.draw_series(LineSeries::new(traced.kept.iter().copied(), line)).map_err(fail)?;
                let label = match curve.name {
                    None => run.name.clone(),
                    Some(name) => format!("{} {name}", run.name),
                };
                series.label(label).legend(move |(x, y)| PathElement::new([(x, y), (x + 24, y)], line));
                if let Look::Dotted = curve.look {
                    let dots = traced.kept.iter().map(|&p| Circle::new(p, 3, colour.filled()));
                    plot.draw_series(dots).map_err(fail)?;
                }
                let faded = colour.mix(FADED).stroke_width(STROKE);
                for branch in &traced.abandoned {
                    plot.draw_series(LineSeries::new(branch.iter().copied(), faded)).map_err(fail)?;
                }
            }
        }
        // Events happen at steps: a chart against tokens has no place for them.
        if chart.axis == Axis::Steps {
            for marker in MARKERS {
                mark_events(&mut plot, runs, marker, &y_range).map_err(fail)?;
            }
        }
        plot.configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(fail)?;
        root.present().map_err(fail)?;
    }
    Ok(Some(svg))
}

/// Every run's events of one kind on a chart against steps: a faded vertical line in the run's colour and the
/// kind's marker at the top, with the kind in the legend when there are any.
fn mark_events<'a>(
    plot: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<RangedCoordf64, RangedCoordf64>>,
    runs: &[Run],
    Marker { kind, name, shape }: Marker,
    y_range: &std::ops::Range<f64>,
) -> std::result::Result<(), DrawingAreaErrorKind<std::io::Error>> {
    let events: Vec<(f64, RGBColor)> = runs
        .iter()
        .enumerate()
        .flat_map(|(i, run)| {
            run.records.iter().filter(|r| r.kind() == kind).map(move |r| (r.step as f64, run_colour(i)))
        })
        .collect();
    if events.is_empty() {
        return Ok(());
    }
    let lines =
        events.iter().map(|&(x, colour)| PathElement::new([(x, y_range.start), (x, y_range.end)], colour.mix(FADED)));
    plot.draw_series(lines)?;
    let markers = events.iter().map(|&(x, colour)| {
        EmptyElement::at((x, y_range.end)) + PathElement::new(shape.to_vec(), colour.stroke_width(STROKE))
    });
    plot.draw_series(markers)?.label(name).legend(move |(x, y)| {
        PathElement::new(
            shape.iter().map(|&(dx, dy)| (x + 12 + dx, y + dy)).collect::<Vec<_>>(),
            BLACK.stroke_width(STROKE),
        )
    });
    Ok(())
}

/// Text for HTML, with the characters that would be markup escaped.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// The whole page: the runs with their colours, a key to the drawing, the charts, and each run's events.
fn page(runs: &[Run]) -> Result<String> {
    let mut html = String::from(concat!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n",
        // Nothing may be fetched: the page is its own record, and opening it must not reach the network.
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; img-src data:\">\n",
        "<title>kiln report</title>\n<style>\n",
        "body { font-family: sans-serif; margin: 1.5em; color: #222; }\n",
        ".swatch { display: inline-block; width: 2em; height: 0.6em; margin-right: 0.5em; }\n",
        "table { border-collapse: collapse; margin-bottom: 1em; }\n",
        "td, th { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; }\n",
        "</style>\n</head>\n<body>\n<h1>kiln report</h1>\n<ul class=\"runs\">\n",
    ));
    for (i, run) in runs.iter().enumerate() {
        let RGBColor(r, g, b) = run_colour(i);
        html += &format!(
            "<li><span class=\"swatch\" style=\"background: #{r:02x}{g:02x}{b:02x}\"></span>{}</li>\n",
            escape(&run.name)
        );
    }
    html.push_str(concat!(
        "</ul>\n<p>Dots: validation loss. Faded: steps a rollback or resume abandoned. On the charts against steps, ",
        "\u{25bd} marks a skipped step, \u{2715} a rollback and \u{25a1} a resume.</p>\n",
    ));
    for run in runs.iter() {
        if let Err(why) = &run.batch_tokens
            && run.records.iter().any(|r| r.kind() == Kind::Step && r.tokens.is_none())
        {
            html += &format!(
                "<p>{} is not on the loss-against-tokens chart where its lines lack <code>tokens</code>: {}</p>\n",
                escape(&run.name),
                escape(why)
            );
        }
    }
    for chart in charts(runs) {
        html += &format!("<h2>{}</h2>\n", escape(chart.title));
        match render(&chart, runs)? {
            Some(svg) => html.push_str(&svg),
            None => html.push_str("<p>No run has values for this chart.</p>"),
        }
        html.push('\n');
    }
    html.push_str("<h2>Events</h2>\n");
    for run in runs {
        html += &format!("<h3>{}</h3>\n", escape(&run.name));
        let events: Vec<&Record> = run.records.iter().filter(|r| r.event.is_some()).collect();
        if events.is_empty() {
            html.push_str("<p>No skips, rollbacks or resumes.</p>\n");
            continue;
        }
        html.push_str("<table class=\"events\">\n<tr><th>step</th><th>event</th><th>detail</th></tr>\n");
        for event in events {
            html += &format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td></tr>\n",
                event.step,
                event.kind().name(),
                escape(&event.detail())
            );
        }
        html.push_str("</table>\n");
    }
    html.push_str("</body>\n</html>\n");
    Ok(html)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_run_of_many_has_a_colour_of_its_own() {
        let colours: Vec<(u8, u8, u8)> = (0..40).map(|i| run_colour(i).rgb()).collect();
        for (i, a) in colours.iter().enumerate() {
            assert!(!colours[..i].contains(a), "run {i} repeats a colour: {colours:?}");
        }
    }
}
