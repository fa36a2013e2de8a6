//! The command line: hand-written parsing (the library takes no CLI dependency), every bad
//! input reported as a [`UsageError`] that names the option and what was wrong with it.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use tonic::metadata::{AsciiMetadataKey, AsciiMetadataValue};

/// The largest `--max-connections` the pool takes (its own limit per endpoint).
const MAX_CONNECTIONS_LIMIT: usize = 1024;
/// The largest `--concurrency`: a bound on the tasks one step spawns.
const MAX_CONCURRENCY: usize = 100_000;
/// The longest `--step-duration`: a bound on the sweep's time.
const MAX_STEP_DURATION: Duration = Duration::from_secs(600);
/// The largest request message taken from `--request-hex` or `--request-file`.
const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;

/// The usage text printed with every usage error and for `--help`.
pub const USAGE: &str = "\
usage: tonic-pool-tune TARGET [options]

Measures TARGET with N = 1, 2, 4, ... connections and recommends connections_per_endpoint.

  TARGET                   any target the pool takes: static:///host:port, dns:///name:port, ...
  --method PATH            /package.Service/Method to call (default /grpc.health.v1.Health/Check)
  --request-hex HEX        the encoded request message, in hex (default: empty message)
  --request-file FILE      the encoded request message, read from FILE
  --metadata KEY=VALUE     request metadata (repeatable), e.g. authorization=Bearer...
  --max-connections N      the largest N to try (default 32, at most 1024)
  --concurrency C          calls in flight during each step (default 64)
  --step-duration D        how long each step runs: 3s, 500ms, 1m, 1.5s (default 3s)
  --backend-header NAME    a response header naming the backend: also measure the spread
  --plot FILE              write an SVG plot of req/s and p99 against N to FILE
  -h, --help               print this text
";

/// What the tuner was asked to do; [`parse_args`] makes one.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Options {
    /// The pool target.
    pub target: String,
    /// The method's path, `/package.Service/Method`.
    pub method: String,
    /// The encoded request message sent with every call.
    pub request: Bytes,
    /// Metadata sent with every call.
    pub metadata: Vec<(AsciiMetadataKey, AsciiMetadataValue)>,
    /// The largest N tried.
    pub max_connections: usize,
    /// Calls in flight during each step.
    pub concurrency: usize,
    /// How long each step measures.
    pub step_duration: Duration,
    /// A response header whose value names the backend that answered.
    pub backend_header: Option<AsciiMetadataKey>,
    /// Where to write the SVG plot.
    pub plot: Option<PathBuf>,
}

impl Options {
    /// Options for `target` with every default: the health check, an empty request, N up to
    /// 32, 64 calls in flight, 3 s per step.
    pub fn new(target: impl Into<String>) -> Self {
        Self {
            target: target.into(),
            method: "/grpc.health.v1.Health/Check".to_owned(),
            request: Bytes::new(),
            metadata: Vec::new(),
            max_connections: 32,
            concurrency: 64,
            step_duration: Duration::from_secs(3),
            backend_header: None,
            plot: None,
        }
    }
}

/// What the command line asked for: a run, or the usage text.
#[derive(Clone, Debug)]
pub enum Command {
    /// Run the tuner with these options.
    Run(Box<Options>),
    /// Print [`USAGE`] and exit successfully.
    Help,
}

/// A command line the tuner cannot run: which option, and what was wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageError {
    message: String,
}

impl UsageError {
    fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
        }
    }

    /// What was wrong, naming the option.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for UsageError {}

/// Parses the arguments after the program name.
///
/// Options take their value as the next argument or after `=` (`--concurrency=8`); an
/// unknown option, a missing value, a second TARGET or a value out of range is a
/// [`UsageError`]. `--request-file` is read here, so that a missing file is reported before
/// anything is measured.
pub fn parse_args<I, S>(args: I) -> Result<Command, UsageError>
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    let mut args = args.into_iter().map(Into::into);
    let mut target = None;
    let mut options = Options::new(String::new());
    let mut request_given = None::<&'static str>;

    while let Some(arg) = args.next() {
        if arg == "-h" || arg == "--help" {
            return Ok(Command::Help);
        }
        if !arg.starts_with("--") {
            if arg.starts_with('-') && arg.len() > 1 {
                return Err(UsageError::new(format!("unknown option {arg}")));
            }
            if let Some(first) = &target {
                return Err(UsageError::new(format!(
                    "one TARGET only: got {first:?} and {arg:?}"
                )));
            }
            target = Some(arg);
            continue;
        }
        let (name, inline) = match arg.split_once('=') {
            Some((name, value)) => (name.to_owned(), Some(value.to_owned())),
            None => (arg.clone(), None),
        };
        let mut value = || -> Result<String, UsageError> {
            match inline.clone().or_else(|| args.next()) {
                Some(value) => Ok(value),
                None => Err(UsageError::new(format!("{name} needs a value"))),
            }
        };
        match name.as_str() {
            "--method" => options.method = parse_method(&value()?)?,
            "--request-hex" | "--request-file" => {
                let this = if name == "--request-hex" {
                    "--request-hex"
                } else {
                    "--request-file"
                };
                if let Some(other) = request_given {
                    return Err(UsageError::new(format!(
                        "{this} and {other}: give the request once"
                    )));
                }
                request_given = Some(this);
                let value = value()?;
                options.request = if this == "--request-hex" {
                    parse_hex(&value)?
                } else {
                    read_request_file(&value)?
                };
            }
            "--metadata" => options.metadata.push(parse_metadata(&value()?)?),
            "--max-connections" => {
                options.max_connections =
                    parse_count("--max-connections", &value()?, MAX_CONNECTIONS_LIMIT)?
            }
            "--concurrency" => {
                options.concurrency = parse_count("--concurrency", &value()?, MAX_CONCURRENCY)?
            }
            "--step-duration" => {
                let value = value()?;
                let duration = parse_duration(&value)
                    .map_err(|why| UsageError::new(format!("--step-duration {value:?}: {why}")))?;
                if duration.is_zero() || duration > MAX_STEP_DURATION {
                    return Err(UsageError::new(format!(
                        "--step-duration {value:?}: must be more than 0 and at most {}s",
                        MAX_STEP_DURATION.as_secs()
                    )));
                }
                options.step_duration = duration;
            }
            "--backend-header" => {
                let value = value()?;
                let key = AsciiMetadataKey::from_bytes(value.to_ascii_lowercase().as_bytes())
                    .map_err(|_| {
                        UsageError::new(format!(
                            "--backend-header {value:?}: not a valid header name"
                        ))
                    })?;
                options.backend_header = Some(key);
            }
            "--plot" => options.plot = Some(PathBuf::from(value()?)),
            _ => return Err(UsageError::new(format!("unknown option {name}"))),
        }
    }
    let target = target.ok_or_else(|| UsageError::new("missing TARGET"))?;
    // Checked here, so that a typo is a usage error before anything is measured.
    crate::Target::parse(&target)
        .map_err(|why| UsageError::new(format!("TARGET {target:?}: {why}")))?;
    options.target = target;
    Ok(Command::Run(Box::new(options)))
}

/// Parses a duration: a number (decimals allowed) and a unit, `ms`, `s`, `m` or `h`
/// (`3s`, `500ms`, `1.5s`, `2m`). The error says what is wrong.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| "needs a unit: ms, s, m or h (e.g. 3s, 500ms)".to_owned())?;
    let (number, unit) = text.split_at(split);
    let seconds_per_unit = match unit {
        "ms" => 0.001,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return Err(format!("unknown unit {unit:?}: use ms, s, m or h")),
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{number:?} is not a number"))?;
    Duration::try_from_secs_f64(value * seconds_per_unit).map_err(|_| "out of range".to_owned())
}

/// `/package.Service/Method`: a leading slash and two non-empty, printable parts.
fn parse_method(text: &str) -> Result<String, UsageError> {
    let valid = text
        .strip_prefix('/')
        .and_then(|rest| rest.split_once('/'))
        .is_some_and(|(service, method)| {
            !service.is_empty()
                && !method.is_empty()
                && !method.contains('/')
                && text.bytes().all(|b| b.is_ascii_graphic())
        });
    if valid {
        Ok(text.to_owned())
    } else {
        Err(UsageError::new(format!(
            "--method {text:?}: expected /package.Service/Method"
        )))
    }
}

/// Hex digits (either case, optional `0x`, whitespace ignored) into bytes.
fn parse_hex(text: &str) -> Result<Bytes, UsageError> {
    let bad = |why: &str| UsageError::new(format!("--request-hex: {why}"));
    let digits: Vec<u8> = text
        .strip_prefix("0x")
        .unwrap_or(text)
        .bytes()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    if !digits.len().is_multiple_of(2) {
        return Err(bad("an odd number of hex digits"));
    }
    if digits.len() / 2 > MAX_REQUEST_BYTES {
        return Err(bad("the request is larger than 4 MiB"));
    }
    let nibble = |digit: u8| -> Result<u8, UsageError> {
        char::from(digit)
            .to_digit(16)
            .map(|n| n as u8)
            .ok_or_else(|| bad(&format!("{:?} is not a hex digit", char::from(digit))))
    };
    digits
        .chunks(2)
        .map(|pair| Ok(nibble(pair[0])? << 4 | nibble(pair[1])?))
        .collect::<Result<Vec<u8>, _>>()
        .map(Bytes::from)
}

/// The request message from a file, at most 4 MiB.
fn read_request_file(path: &str) -> Result<Bytes, UsageError> {
    let bytes = std::fs::read(path)
        .map_err(|err| UsageError::new(format!("--request-file {path:?}: {err}")))?;
    if bytes.len() > MAX_REQUEST_BYTES {
        return Err(UsageError::new(format!(
            "--request-file {path:?}: larger than 4 MiB"
        )));
    }
    Ok(Bytes::from(bytes))
}

/// `key=value`: an ASCII metadata key (lowercased) and a printable ASCII value.
fn parse_metadata(text: &str) -> Result<(AsciiMetadataKey, AsciiMetadataValue), UsageError> {
    let bad = |why: &str| UsageError::new(format!("--metadata {text:?}: {why}"));
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| bad("expected key=value"))?;
    let key = key.trim().to_ascii_lowercase();
    if key.ends_with("-bin") {
        return Err(bad("binary (-bin) metadata is not supported"));
    }
    let key = AsciiMetadataKey::from_bytes(key.as_bytes())
        .map_err(|_| bad("the key is not a valid header name"))?;
    let value = AsciiMetadataValue::try_from(value)
        .map_err(|_| bad("the value must be printable ASCII"))?;
    Ok((key, value))
}

/// A count between 1 and `max`.
fn parse_count(option: &str, text: &str, max: usize) -> Result<usize, UsageError> {
    match text.parse::<usize>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(UsageError::new(format!(
            "{option} {text:?}: expected a whole number from 1 to {max}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A valid target, for the tests about other arguments.
    const T: &str = "static:///127.0.0.1:1";

    fn run(args: &[&str]) -> Result<Options, UsageError> {
        match parse_args(args.iter().copied())? {
            Command::Run(options) => Ok(*options),
            Command::Help => panic!("expected a run"),
        }
    }

    /// The defaults are the issue's: the health check, an empty request, N up to 32, 64 in
    /// flight, 3 s per step.
    #[test]
    fn defaults() {
        let options = run(&["static:///127.0.0.1:50051"]).unwrap();
        assert_eq!(options.target, "static:///127.0.0.1:50051");
        assert_eq!(options.method, "/grpc.health.v1.Health/Check");
        assert!(options.request.is_empty());
        assert_eq!(options.max_connections, 32);
        assert_eq!(options.concurrency, 64);
        assert_eq!(options.step_duration, Duration::from_secs(3));
        assert!(options.backend_header.is_none() && options.plot.is_none());
    }

    /// Every option is taken, with its value after a space or an `=`.
    #[test]
    fn every_option() {
        let options = run(&[
            "--method=/echo.Echo/Unary",
            T,
            "--request-hex",
            "0A0b",
            "--max-connections",
            "8",
            "--concurrency=16",
            "--step-duration",
            "250ms",
            "--backend-header",
            "X-Backend",
            "--plot",
            "out.svg",
        ])
        .unwrap();
        assert_eq!(options.method, "/echo.Echo/Unary");
        assert_eq!(&options.request[..], &[0x0a, 0x0b]);
        assert_eq!(options.max_connections, 8);
        assert_eq!(options.concurrency, 16);
        assert_eq!(options.step_duration, Duration::from_millis(250));
        assert_eq!(options.backend_header.unwrap().as_str(), "x-backend");
        assert_eq!(options.plot.unwrap(), PathBuf::from("out.svg"));
    }

    /// Durations take ms, s, m and h, with decimals; anything else names the problem.
    #[test]
    fn duration_forms() {
        assert_eq!(parse_duration("3s"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("3").unwrap_err().contains("needs a unit"));
        assert!(parse_duration("3sec").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("1.2.3s")
            .unwrap_err()
            .contains("not a number"));
        assert!(parse_duration("s").unwrap_err().contains("not a number"));
        let zero = run(&[T, "--step-duration", "0s"]).unwrap_err();
        assert!(zero.message().contains("more than 0"), "{zero}");
    }

    /// `--metadata` repeats, in order; a pair without `=` or with a bad key is an error.
    #[test]
    fn repeated_metadata() {
        let options = run(&[
            T,
            "--metadata",
            "authorization=Bearer abc",
            "--metadata",
            "X-Tenant=blue=green",
        ])
        .unwrap();
        let pairs: Vec<(&str, &str)> = options
            .metadata
            .iter()
            .map(|(k, v)| (k.as_str(), v.to_str().unwrap()))
            .collect();
        assert_eq!(
            pairs,
            [("authorization", "Bearer abc"), ("x-tenant", "blue=green")]
        );
        assert!(run(&[T, "--metadata", "novalue"]).is_err());
        assert!(run(&[T, "--metadata", "bad key=v"]).is_err());
        assert!(run(&[T, "--metadata", "k-bin=v"]).is_err());
    }

    /// An unknown option, a missing value or TARGET, and bad values are usage errors naming
    /// the option; `--help` asks for the usage text.
    #[test]
    fn usage_errors() {
        let unknown = run(&[T, "--connections", "4"]).unwrap_err();
        assert_eq!(unknown.message(), "unknown option --connections");
        assert_eq!(run(&[T, "-x"]).unwrap_err().message(), "unknown option -x");
        assert_eq!(
            run(&[T, "--concurrency"]).unwrap_err().message(),
            "--concurrency needs a value"
        );
        assert_eq!(run(&[]).unwrap_err().message(), "missing TARGET");
        assert!(run(&["a", "b"])
            .unwrap_err()
            .message()
            .contains("one TARGET"));
        for bad in [
            &[T, "--max-connections", "0"][..],
            &[T, "--max-connections", "1025"],
            &[T, "--concurrency", "-3"],
            &[T, "--method", "Check"],
            &[T, "--method", "/svc/"],
            &[T, "--backend-header", "bad header"],
            &[T, "--request-hex", "abc"],
            &[T, "--request-hex", "zz"],
            &[T, "--request-hex", "00", "--request-file", "f"],
            &[T, "--request-file", "no-such-dir/request.bin"],
        ] {
            let err = run(bad).unwrap_err();
            assert!(err.message().contains(bad[1]), "{bad:?}: {err}");
        }
        assert!(matches!(parse_args(["--help"]), Ok(Command::Help)));
    }
}
