//! `novacron link list/show`: the links to peers as this host's transfers measured them, with
//! the bandwidth forecasts transfers act on (`GET /api/v1/links`). `link eval` runs locally and
//! lives in `main`.

use crate::cli::OutputFormat;
use crate::client::{CliResult, Client};
use crate::image::url_encode;
use crate::output;
use novacron_bandwidth::{Forecast, ForecastHorizon};
use novacron_types::{LinkInfo, ProbeLinkRequest};
use reqwest::Method;

pub async fn list(client: &Client, format: OutputFormat) -> CliResult<()> {
    let links: Vec<LinkInfo> = client.get("/api/v1/links").await?;
    output::emit(format, &links, |links| {
        if links.is_empty() {
            println!(
                "no link measured yet: a link appears once this host has sent to a peer \
                 (`novacron image push`)"
            );
            return;
        }
        let rows: Vec<Vec<String>> = links
            .iter()
            .map(|link| {
                let one_second = forecast_of(link, ForecastHorizon::OneSecond);
                vec![
                    peer_label(link),
                    link.peer_address.clone().unwrap_or_else(|| "-".into()),
                    link.summary
                        .current_bits_per_sec
                        .map_or_else(|| "-".into(), bits_per_second),
                    one_second.map_or_else(|| "-".into(), band),
                    one_second
                        .map_or_else(|| "-".into(), |forecast| forecast.predictor_name.clone()),
                    accuracy_of(link, ForecastHorizon::OneSecond),
                    format!("{:.0} s", link.summary.observed_seconds),
                    output::age(link.last_measured_at),
                ]
            })
            .collect();
        output::table(
            &[
                "PEER",
                "ADDRESS",
                "RATE",
                "NEXT 1 S (80 % BAND)",
                "PREDICTOR",
                "ACCURACY",
                "MEASURED",
                "LAST",
            ],
            &rows,
        );
    });
    Ok(())
}

pub async fn show(client: &Client, format: OutputFormat, peer: &str) -> CliResult<()> {
    let link: LinkInfo = client
        .get(&format!("/api/v1/links/{}", url_encode(peer)))
        .await?;
    print_link(format, &link);
    Ok(())
}

/// `link probe`: measures the link now, then shows it.
pub async fn probe(
    client: &Client,
    format: OutputFormat,
    peer: &str,
    request: &ProbeLinkRequest,
) -> CliResult<()> {
    // JSON has no NaN or infinity (they would travel as "no value"): refused here.
    if let Some(seconds) = request.seconds.filter(|seconds| !seconds.is_finite()) {
        return Err(crate::client::CliError::new(
            novacron_types::ErrorCode::InvalidArgument,
            format!("a link probe lasts more than 0 and at most 30 seconds, not {seconds}"),
        ));
    }
    if format == OutputFormat::Table {
        eprintln!(
            "probing the link to {peer} for {} s ...",
            request.seconds.unwrap_or_default()
        );
    }
    let link: LinkInfo = client
        .json(
            client
                .request(
                    Method::POST,
                    &format!("/api/v1/links/{}/probe", url_encode(peer)),
                )
                .json(request),
        )
        .await?;
    print_link(format, &link);
    Ok(())
}

fn print_link(format: OutputFormat, link: &LinkInfo) {
    output::emit(format, link, |link| {
        let mut pairs = vec![
            ("peer", peer_label(link)),
            ("fingerprint", link.peer_fingerprint.clone()),
            (
                "address",
                link.peer_address
                    .clone()
                    .unwrap_or_else(|| "- (the peer dialled in)".into()),
            ),
            (
                "rate (last second)",
                link.summary
                    .current_bits_per_sec
                    .map_or_else(|| "-".into(), bits_per_second),
            ),
            (
                "measured",
                format!(
                    "{:.1} s of sending, {} acknowledged, last {} ago; {} samples limited by the \
                     sender",
                    link.summary.observed_seconds,
                    novacron_types::ByteSize(link.summary.bytes_observed),
                    output::age(link.last_measured_at),
                    link.application_limited_samples
                ),
            ),
        ];
        let lines: Vec<(String, String)> = ForecastHorizon::ALL
            .into_iter()
            .map(|horizon| {
                let label = format!("next {}", horizon_label(horizon));
                let value = match forecast_of(link, horizon) {
                    Some(forecast) => format!(
                        "{} (confidence {:.2}, {}), accuracy so far {}",
                        band(forecast),
                        forecast.confidence,
                        forecast.predictor_name,
                        accuracy_of(link, horizon)
                    ),
                    None => "- (not enough measured yet)".into(),
                };
                (label, value)
            })
            .collect();
        for (label, value) in &lines {
            pairs.push((label.as_str(), value.clone()));
        }
        output::details(&pairs);
    });
}

fn peer_label(link: &LinkInfo) -> String {
    match &link.peer_name {
        Some(name) => name.clone(),
        None => short_fingerprint(&link.peer_fingerprint),
    }
}

fn short_fingerprint(fingerprint: &str) -> String {
    fingerprint.chars().take(7 + 12).collect::<String>() + "…"
}

fn horizon_label(horizon: ForecastHorizon) -> &'static str {
    match horizon {
        ForecastHorizon::OneSecond => "1 s",
        ForecastHorizon::FiveSeconds => "5 s",
        ForecastHorizon::ThirtySeconds => "30 s",
    }
}

fn forecast_of(link: &LinkInfo, horizon: ForecastHorizon) -> Option<&Forecast> {
    link.summary
        .forecasts
        .iter()
        .find(|forecast| forecast.horizon == horizon)
}

fn accuracy_of(link: &LinkInfo, horizon: ForecastHorizon) -> String {
    link.summary
        .accuracy
        .horizons
        .iter()
        .find(|accuracy| accuracy.horizon == horizon)
        .and_then(|accuracy| {
            accuracy
                .accuracy
                .map(|value| format!("{:.2} over {} checks", value, accuracy.forecasts_checked))
        })
        .unwrap_or_else(|| "-".into())
}

fn band(forecast: &Forecast) -> String {
    format!(
        "{} ({} – {})",
        bits_per_second(forecast.expected_bits_per_sec),
        bits_per_second(forecast.lower),
        bits_per_second(forecast.upper)
    )
}

/// A rate as people read link speeds: decimal bits per second.
pub fn bits_per_second(rate: f64) -> String {
    let rate = rate.max(0.0);
    if rate >= 1e9 {
        format!("{:.2} Gbit/s", rate / 1e9)
    } else if rate >= 1e6 {
        format!("{:.1} Mbit/s", rate / 1e6)
    } else if rate >= 1e3 {
        format!("{:.0} kbit/s", rate / 1e3)
    } else {
        format!("{rate:.0} bit/s")
    }
}
