//! Just enough HTTP/1.1 for the tool: a keep-alive client for `POST` (tokens and
//! publishes), and a request reader for the bare server's publish endpoint.

use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// A request or response head: the first line and the headers (names lower-cased).
#[derive(Debug)]
pub(crate) struct Head {
    pub(crate) line: String,
    pub(crate) headers: Vec<(String, String)>,
}

impl Head {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn content_length(&self) -> io::Result<usize> {
        match self.header("content-length") {
            None => Ok(0),
            Some(v) => v.trim().parse().map_err(|_| invalid("bad content-length")),
        }
    }
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

/// Reads a head; `None` at a clean end of stream before it.
pub(crate) async fn read_head<R: AsyncBufReadExt + Unpin>(
    reader: &mut R,
) -> io::Result<Option<Head>> {
    let mut line = String::new();
    if reader.read_line(&mut line).await? == 0 {
        return Ok(None);
    }
    let first = line.trim_end().to_owned();
    let mut headers = Vec::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).await? == 0 {
            return Err(invalid("the head ended early"));
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((name, value)) = l.split_once(':') {
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
        if headers.len() > 100 {
            return Err(invalid("too many headers"));
        }
    }
    Ok(Some(Head {
        line: first,
        headers,
    }))
}

/// Reads the body a head announces (`content-length` or chunked).
pub(crate) async fn read_body<R: AsyncBufReadExt + Unpin>(
    reader: &mut R,
    head: &Head,
) -> io::Result<Vec<u8>> {
    if head
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        let mut body = Vec::new();
        let mut line = String::new();
        loop {
            line.clear();
            reader.read_line(&mut line).await?;
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| invalid("bad chunk size"))?;
            let start = body.len();
            body.resize(start + size + 2, 0);
            reader.read_exact(&mut body[start..]).await?;
            body.truncate(start + size);
            if size == 0 {
                return Ok(body);
            }
        }
    }
    let mut body = vec![0; head.content_length()?];
    reader.read_exact(&mut body).await?;
    Ok(body)
}

/// One keep-alive HTTP/1.1 connection to a server.
#[derive(Debug)]
pub(crate) struct Client {
    stream: BufReader<TcpStream>,
    host: String,
}

impl Client {
    pub(crate) async fn connect(addr: SocketAddr) -> io::Result<Self> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream: BufReader::new(stream),
            host: addr.to_string(),
        })
    }

    /// `POST path` with a JSON body: the status and the body.
    pub(crate) async fn post(
        &mut self,
        path: &str,
        token: Option<&str>,
        body: &str,
    ) -> io::Result<(u16, Vec<u8>)> {
        let auth = token
            .map(|t| format!("authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let request = format!(
            "POST {path} HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\n{auth}content-length: {}\r\n\r\n{body}",
            self.host,
            body.len()
        );
        self.stream.get_mut().write_all(request.as_bytes()).await?;
        let head = read_head(&mut self.stream)
            .await?
            .ok_or_else(|| invalid("the server closed the connection"))?;
        let status = head
            .line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| invalid("bad status line"))?;
        let body = read_body(&mut self.stream, &head).await?;
        Ok((status, body))
    }

    /// `GET path` with a bearer token: the status and the body.
    pub(crate) async fn get(&mut self, path: &str, token: &str) -> io::Result<(u16, Vec<u8>)> {
        let request = format!(
            "GET {path} HTTP/1.1\r\nhost: {}\r\nauthorization: Bearer {token}\r\n\r\n",
            self.host
        );
        self.stream.get_mut().write_all(request.as_bytes()).await?;
        let head = read_head(&mut self.stream)
            .await?
            .ok_or_else(|| invalid("the server closed the connection"))?;
        let status = head
            .line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| invalid("bad status line"))?;
        let body = read_body(&mut self.stream, &head).await?;
        Ok((status, body))
    }
}

/// A development token from `POST /dev/token` (a `--dev` server).
pub(crate) async fn dev_token(addr: SocketAddr, roles: &[&str]) -> io::Result<String> {
    let mut client = Client::connect(addr).await?;
    let body = serde_json::json!({ "roles": roles }).to_string();
    let (status, body) = client.post("/dev/token", None, &body).await?;
    if status != 200 {
        return Err(invalid(&format!(
            "POST /dev/token answered {status}: {}",
            String::from_utf8_lossy(&body)
        )));
    }
    let json: serde_json::Value =
        serde_json::from_slice(&body).map_err(|_| invalid("POST /dev/token: not JSON"))?;
    json["access_token"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| invalid("POST /dev/token: no access_token"))
}
