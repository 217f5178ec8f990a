//! The plot of throughput against confirm window (PNG), raw lapin and the SDK, classic and
//! quorum queues.

use std::path::Path;

use plotters::prelude::*;

use super::{amqp, Report};
use crate::HarnessError;

/// TrueType fonts tried in turn for the plot's text (`RELIABLE_PLOT_FONT` first).
const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
];

fn plot_error(e: impl std::fmt::Display) -> HarnessError {
    HarnessError::Setup(format!("plot: {e}"))
}

fn register_font() -> Result<(), HarnessError> {
    let from_env = std::env::var("RELIABLE_PLOT_FONT").ok();
    let path = from_env
        .iter()
        .map(String::as_str)
        .chain(FONTS.iter().copied())
        .find(|p| Path::new(p).is_file())
        .ok_or_else(|| {
            HarnessError::Setup(format!(
                "plot: no TrueType font found ({}); install one (apt-get install fonts-dejavu-core) or set RELIABLE_PLOT_FONT",
                FONTS.join(", ")
            ))
        })?;
    // The font lives as long as the process: plotters keeps a 'static reference.
    let bytes: &'static [u8] = Box::leak(std::fs::read(path)?.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| plot_error(format!("{path} is not a usable TrueType font")))
}

/// Draws `path` from the window sweep in `report`.
pub fn window_curve(report: &Report, path: &Path) -> Result<(), HarnessError> {
    register_font()?;
    let mut series = Vec::new();
    for queue_type in [
        reliable_amqp::QueueType::ClassicDurable,
        reliable_amqp::QueueType::Quorum,
    ] {
        let group = amqp::group(queue_type);
        for (case, who) in [(amqp::RAW, "raw lapin"), (amqp::SDK, "SDK")] {
            let mut points: Vec<(u32, f64)> = report
                .cases
                .iter()
                .filter(|c| c.group == group && c.case == case)
                .filter_map(|c| Some((c.window? as u32, c.msgs_per_s)))
                .collect();
            points.sort_by_key(|p| p.0);
            let label = format!("{who}, {}", group.trim_start_matches("RabbitMQ, "));
            series.push((label, queue_type, who == "SDK", points));
        }
    }
    let all: Vec<(u32, f64)> = series.iter().flat_map(|s| s.3.iter().copied()).collect();
    if all.is_empty() {
        return Ok(());
    }
    // The x axis is log2 of the window, labelled with the window itself.
    let log2 = |w: u32| f64::from(w.max(1)).log2();
    let x_min = all.iter().map(|p| log2(p.0)).fold(f64::INFINITY, f64::min);
    let x_max = all
        .iter()
        .map(|p| log2(p.0))
        .fold(0.0, f64::max)
        .max(x_min + 1.0);
    let y_max = all.iter().map(|p| p.1).fold(0.0, f64::max) * 1.15;

    let root = BitMapBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "RabbitMQ persistent publishes with confirms: throughput by confirm window",
            ("sans-serif", 22),
        )
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d(x_min - 0.3..x_max + 0.3, 0.0..y_max.max(1.0))
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc("confirm window (messages unconfirmed at once, log scale)")
        .x_labels(((x_max - x_min) as usize + 2).min(16))
        .x_label_formatter(&|x| format!("{:.0}", 2f64.powf(*x)))
        .y_desc("messages per second")
        .label_style(("sans-serif", 15))
        .y_label_formatter(&|y| format!("{:.0}", y))
        .draw()
        .map_err(plot_error)?;
    for (label, queue_type, is_sdk, points) in series {
        let color = match queue_type {
            reliable_amqp::QueueType::Quorum => RGBColor(200, 60, 40),
            _ => RGBColor(40, 90, 190),
        };
        let style = if is_sdk {
            color.stroke_width(3)
        } else {
            color.mix(0.55).stroke_width(2)
        };
        chart
            .draw_series(LineSeries::new(
                points.iter().map(|&(x, y)| (log2(x), y)),
                style,
            ))
            .map_err(plot_error)?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], style));
        chart
            .draw_series(
                points
                    .iter()
                    .map(|&(x, y)| Circle::new((log2(x), y), 4, style.filled())),
            )
            .map_err(plot_error)?;
    }
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 15))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(plot_error)?;
    root.present().map_err(plot_error)?;
    Ok(())
}
