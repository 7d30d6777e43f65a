//! `novacron vm console NAME`: the VM's serial console over the API's websocket, with the
//! terminal in raw mode. Ctrl-] detaches (as in telnet and virsh).

use crate::client::{CliError, CliResult, Client};
use futures::{SinkExt, StreamExt};
use novacron_types::{ErrorCode, VmRecord};
use rustix::termios::{self, OptionalActions};
use std::io::{IsTerminal, Write};
use tokio::io::AsyncReadExt;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const DETACH_BYTE: u8 = 0x1d;

/// Puts stdin in raw mode and restores it on drop, also on error paths.
struct RawMode {
    saved: Option<termios::Termios>,
}

impl RawMode {
    fn enter() -> Self {
        let stdin = rustix::stdio::stdin();
        if !std::io::stdin().is_terminal() {
            return Self { saved: None };
        }
        let Ok(saved) = termios::tcgetattr(stdin) else {
            return Self { saved: None };
        };
        let mut raw = saved.clone();
        raw.make_raw();
        let _ = termios::tcsetattr(stdin, OptionalActions::Now, &raw);
        Self { saved: Some(saved) }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(saved) = &self.saved {
            let _ = termios::tcsetattr(rustix::stdio::stdin(), OptionalActions::Now, saved);
        }
    }
}

pub async fn attach(client: &Client, name: &str) -> CliResult<()> {
    // Ask over plain HTTP first so a wrong name or state gets the API's clear error.
    let _: VmRecord = client
        .get(&format!("/api/v1/vms/{}", crate::image::url_encode(name)))
        .await?;
    let url = format!(
        "{}/api/v1/vms/{}/console",
        client.base().replacen("http", "ws", 1),
        crate::image::url_encode(name)
    );
    let mut request = url.into_client_request().map_err(|error| {
        CliError::new(ErrorCode::InvalidArgument, format!("console url: {error}"))
    })?;
    if let Some(token) = client.token() {
        let value = format!("Bearer {token}").parse().map_err(|_| {
            CliError::new(
                ErrorCode::InvalidArgument,
                "the token has invalid characters",
            )
        })?;
        request.headers_mut().insert("authorization", value);
    }
    let (socket, _) = tokio_tungstenite::connect_async(request)
        .await
        .map_err(|error| {
            CliError::new(
                ErrorCode::Conflict,
                format!("cannot open the console of vm {name}: {error}"),
            )
        })?;
    eprintln!("connected to the console of vm {name}; detach with Ctrl-]\r");
    let (mut write, mut read) = socket.split();
    let raw = RawMode::enter();
    let input = async {
        let mut stdin = tokio::io::stdin();
        let mut buffer = [0u8; 1024];
        loop {
            let count = match stdin.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(count) => count,
            };
            let chunk = &buffer[..count];
            if let Some(position) = chunk.iter().position(|&byte| byte == DETACH_BYTE) {
                if position > 0 {
                    let _ = write
                        .send(Message::Binary(chunk[..position].to_vec().into()))
                        .await;
                }
                break;
            }
            if write
                .send(Message::Binary(chunk.to_vec().into()))
                .await
                .is_err()
            {
                break;
            }
        }
        let _ = write.send(Message::Close(None)).await;
    };
    let output = async {
        let mut stdout = std::io::stdout();
        while let Some(Ok(message)) = read.next().await {
            match message {
                Message::Binary(data) => {
                    let _ = stdout.write_all(&data);
                }
                Message::Text(text) => {
                    let _ = stdout.write_all(text.as_bytes());
                }
                Message::Close(_) => break,
                _ => continue,
            }
            let _ = stdout.flush();
        }
    };
    tokio::select! {
        () = input => {},
        () = output => {},
    }
    drop(raw);
    eprintln!("\r\ndetached from vm {name}");
    Ok(())
}
