//! What a `curl` run saw: status, headers and body, parsed from files curl wrote.

use std::fmt;

/// One curl exchange as seen by the client.
#[derive(Debug, Clone, Default)]
pub struct Reply {
    /// curl's exit code (0 on a completed transfer; 7 refused, 28 timeout, 52 empty reply,
    /// 56 receive failure or failed CONNECT).
    pub exit: i32,
    /// Final HTTP status, 0 when there was no response.
    pub status: u16,
    /// The response to a CONNECT (`%{http_connect}`), 0 when none was sent.
    pub connect_status: u16,
    /// The final response's status line, e.g. `HTTP/1.1 502 Bad Gateway`.
    pub status_line: String,
    /// The final response's headers, names lowercased, in order.
    pub headers: Vec<(String, String)>,
    /// The response body.
    pub body: String,
    /// curl's own messages.
    pub stderr: String,
}

impl Reply {
    /// Parses curl's `-D` header dump (keeping the last response: a CONNECT answer comes first),
    /// its `-o` body and its `-w '%{http_code} %{http_connect}'` line.
    pub fn parse(exit: i32, write_out: &str, header_dump: &str, body: &str, stderr: &str) -> Reply {
        let mut codes = write_out.split_whitespace().map(|c| c.parse().unwrap_or(0));
        let status = codes.next().unwrap_or(0);
        let connect_status = codes.next().unwrap_or(0);
        let block = header_dump
            .replace("\r\n", "\n")
            .split("\n\n")
            .map(str::trim)
            .filter(|b| !b.is_empty())
            .last()
            .unwrap_or_default()
            .to_owned();
        let mut lines = block.lines();
        let status_line = lines.next().unwrap_or_default().to_owned();
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        Reply {
            exit,
            status,
            connect_status,
            status_line,
            headers,
            body: body.to_owned(),
            stderr: stderr.to_owned(),
        }
    }

    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Fails unless this is Envoy's registry-only block: `502`, `server: envoy`, no body.
    pub fn expect_blocked(&self, what: &str) -> anyhow::Result<()> {
        let ok = self.status_line == "HTTP/1.1 502 Bad Gateway"
            && self.header("server") == Some("envoy")
            && self.header("content-length") == Some("0")
            && self.body.is_empty();
        anyhow::ensure!(
            ok,
            "{what}: expected `HTTP/1.1 502 Bad Gateway`, `server: envoy`, `content-length: 0` \
             and an empty body; got {self}"
        );
        Ok(())
    }

    /// Fails unless this is a `200` whose body contains `mark`.
    pub fn expect_page(&self, what: &str, mark: &str) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.exit == 0 && self.status == 200 && self.body.contains(mark),
            "{what}: expected 200 with a body containing {mark:?}; got {self}"
        );
        Ok(())
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "[curl exit {}, status {}, CONNECT status {}, status line {:?}, headers {:?}, body {:?}, stderr {:?}]",
            self.exit,
            self.status,
            self.connect_status,
            self.status_line,
            self.headers,
            self.body,
            self.stderr.trim()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_response_after_a_connect() {
        let dump = "HTTP/1.1 200 Connection established\r\n\r\nHTTP/1.1 502 Bad Gateway\r\nServer: envoy\r\ncontent-length: 0\r\n\r\n";
        let r = Reply::parse(0, "502 200", dump, "", "");
        assert_eq!(r.status, 502);
        assert_eq!(r.connect_status, 200);
        assert_eq!(r.status_line, "HTTP/1.1 502 Bad Gateway");
        assert_eq!(r.header("SERVER"), Some("envoy"));
        assert!(r.expect_blocked("test").is_ok());
    }

    #[test]
    fn a_page_is_not_a_block() {
        let dump = "HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Length: 5\r\n\r\n";
        let r = Reply::parse(0, "200 000", dump, "hello", "");
        assert!(r.expect_blocked("test").is_err());
        assert!(r.expect_page("test", "hell").is_ok());
        assert!(r.expect_page("test", "bye").is_err());
    }

    #[test]
    fn no_response_at_all() {
        let r = Reply::parse(7, "000 000", "", "", "curl: (7) Failed to connect");
        assert_eq!(r.status, 0);
        assert!(r.expect_blocked("test").is_err());
        assert!(r.expect_page("test", "").is_err());
    }
}
