//! `novacron image ...`: image commands. `import` uploads the file with a progress bar.

use crate::cli::{ImageCommand, OutputFormat};
use crate::client::{CliError, CliResult, Client};
use crate::output;
use futures::StreamExt;
use novacron_types::{ByteSize, ErrorCode, ImageRecord};
use reqwest::Method;
use std::io::IsTerminal;

pub async fn run(client: &Client, format: OutputFormat, command: ImageCommand) -> CliResult<()> {
    match command {
        ImageCommand::Import { file, name } => {
            let name = match name {
                Some(name) => name,
                None => file
                    .file_name()
                    .map(|name| name.to_string_lossy().to_string())
                    .ok_or_else(|| {
                        CliError::new(
                            ErrorCode::InvalidArgument,
                            format!("{} has no file name; pass --name", file.display()),
                        )
                    })?,
            };
            novacron_types::ImageName::new(name.clone())
                .map_err(|error| CliError::new(ErrorCode::InvalidArgument, error.to_string()))?;
            // Ask first: the server refuses a taken name before reading the upload, which a
            // client still sending the body would only see as a broken connection.
            match client
                .get::<ImageRecord>(&format!("/api/v1/images/{}", url_encode(&name)))
                .await
            {
                Ok(existing) => {
                    return Err(CliError::new(
                        ErrorCode::AlreadyExists,
                        format!(
                            "an image named {:?} already exists (id {}); delete it or choose another --name",
                            existing.name.as_str(),
                            existing.id
                        ),
                    ));
                }
                Err(error) if error.code == ErrorCode::NotFound => {}
                Err(error) if error.code == ErrorCode::InvalidArgument => {}
                Err(error) => return Err(error),
            }
            let opened = tokio::fs::File::open(&file).await.map_err(|error| {
                CliError::new(
                    ErrorCode::InvalidArgument,
                    format!("cannot read {}: {error}", file.display()),
                )
            })?;
            let length = opened
                .metadata()
                .await
                .map(|metadata| metadata.len())
                .unwrap_or(0);
            let progress = if std::io::stderr().is_terminal() {
                let bar = indicatif::ProgressBar::new(length);
                bar.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                    .progress_chars("=> "),
                );
                bar.set_message(format!("uploading {name}"));
                bar
            } else {
                indicatif::ProgressBar::hidden()
            };
            let counter = progress.clone();
            let stream =
                tokio_util::io::ReaderStream::with_capacity(opened, 1 << 20).map(move |chunk| {
                    if let Ok(bytes) = &chunk {
                        counter.inc(bytes.len() as u64);
                    }
                    chunk
                });
            let query = format!("/api/v1/images?name={}", url_encode(&name));
            let request = client
                .request(Method::POST, &query)
                .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                .header(reqwest::header::CONTENT_LENGTH, length)
                .body(reqwest::Body::wrap_stream(stream));
            let result: CliResult<ImageRecord> = client.json(request).await;
            progress.finish_and_clear();
            let record = result?;
            show(format, &record);
        }
        ImageCommand::Push {
            image,
            to,
            transfer,
        } => {
            return crate::transfer::start(
                client,
                format,
                novacron_types::TransferDirection::Push,
                image,
                to,
                transfer,
            )
            .await;
        }
        ImageCommand::Pull {
            image,
            from,
            transfer,
        } => {
            return crate::transfer::start(
                client,
                format,
                novacron_types::TransferDirection::Pull,
                image,
                from,
                transfer,
            )
            .await;
        }
        ImageCommand::List => {
            let images: Vec<ImageRecord> = client.get("/api/v1/images").await?;
            output::emit(format, &images, |images| {
                let rows: Vec<Vec<String>> = images
                    .iter()
                    .map(|image| {
                        vec![
                            image.name.to_string(),
                            image.id[..12].to_string(),
                            image.format.as_str().to_string(),
                            ByteSize(image.virtual_bytes).to_string(),
                            ByteSize(image.file_bytes).to_string(),
                            output::age(image.created_at),
                        ]
                    })
                    .collect();
                output::table(&["NAME", "ID", "FORMAT", "VIRTUAL", "FILE", "AGE"], &rows);
            });
        }
        ImageCommand::Show { image } => {
            let record: ImageRecord = client
                .get(&format!("/api/v1/images/{}", url_encode(&image)))
                .await?;
            show(format, &record);
        }
        ImageCommand::Delete { image } => {
            let record: ImageRecord = client
                .json(client.request(
                    Method::DELETE,
                    &format!("/api/v1/images/{}", url_encode(&image)),
                ))
                .await?;
            if format == OutputFormat::Table {
                println!("image {} deleted", record.name);
            } else {
                println!(
                    "{}",
                    serde_json::json!({ "deleted": record.name, "id": record.id })
                );
            }
        }
    }
    Ok(())
}

pub fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => {
                (byte as char).to_string()
            }
            _ => format!("%{byte:02X}"),
        })
        .collect()
}

fn show(format: OutputFormat, record: &ImageRecord) {
    output::emit(format, record, |image| {
        output::details(&[
            ("name", image.name.to_string()),
            ("id", image.id.clone()),
            ("format", image.format.as_str().to_string()),
            ("virtual size", ByteSize(image.virtual_bytes).to_string()),
            ("file size", ByteSize(image.file_bytes).to_string()),
            ("created", format!("{} ago", output::age(image.created_at))),
        ]);
    });
}
