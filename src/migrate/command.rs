//! The control protocol: one command per text line, written to `.ferry/control` (the CLI
//! writes the same lines). docs/cli.md lists the verbs.
//!
//! ```text
//! migrate PATH... to VOL[,VOL] [cutover=live|close] [rate=BYTES_PER_S] [verify=yes|no]
//! merge VOL[,VOL]... into VOL [cutover=live|close] [rate=BYTES_PER_S] [verify=yes|no]
//! drain VOL [to VOL[,VOL]] [cutover=live|close] [rate=BYTES_PER_S] [verify=yes|no]
//! cancel ID
//! add VOL size=BYTES [path=IMAGE]
//! retire VOL
//! reopen VOL
//! set copy-rate=BYTES_PER_S | max-jobs=N
//! ```
//!
//! Words are separated by blanks; a word with blanks in it is written in double quotes, and
//! a backslash escapes the next character. Sizes are as [`parse_size`] reads them (`64K`,
//! `1.5G`: powers of 1024).

use crate::catalog::model::Cutover;
use crate::geometry::parse_size;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobOptions {
    pub cutover: Cutover,
    /// Bytes per second; 0 for no cap.
    pub rate_bytes_per_s: u64,
    /// Compare a checksum of every track of source and target before the switch.
    pub verify: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Migrate {
        paths: Vec<String>,
        to: Vec<String>,
        opts: JobOptions,
    },
    Merge {
        sources: Vec<String>,
        into: String,
        opts: JobOptions,
    },
    Drain {
        source: String,
        to: Vec<String>,
        opts: JobOptions,
    },
    Cancel {
        id: u64,
    },
    /// A new volume; its image at `path` (absolute), or in the pool's volumes directory; or
    /// the block device at `path`. `size_bytes` 0: the device's size. `force`: a device that
    /// holds a signature or another pool's label.
    Add {
        volume: String,
        size_bytes: u64,
        path: Option<String>,
        force: bool,
    },
    Retire {
        volume: String,
    },
    /// A closed volume takes allocations again.
    Reopen {
        volume: String,
    },
    SetCopyRate {
        bytes_per_s: u64,
    },
    SetMaxJobs {
        jobs: usize,
    },
}

pub const MAX_JOBS_LIMIT: usize = 64;

/// Split a line into words: blanks separate, double quotes group, backslash escapes.
pub fn split_words(line: &str) -> Result<Vec<String>, String> {
    Ok(split_marked(line)?.into_iter().map(|(w, _)| w).collect())
}

/// [`split_words`], each word with whether any of it was quoted or escaped: such a word is
/// always a value (a path with `=` in it), never a `key=value` option.
fn split_marked(line: &str) -> Result<Vec<(String, bool)>, String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut literal = false;
    let mut quoted = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                let n = chars.next().ok_or("a backslash ends the line")?;
                cur.push(n);
                in_word = true;
                literal = true;
            }
            '"' => {
                quoted = !quoted;
                in_word = true;
                literal = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    words.push((std::mem::take(&mut cur), std::mem::take(&mut literal)));
                    in_word = false;
                }
            }
            c => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if quoted {
        return Err("a double quote is not closed".into());
    }
    if in_word {
        words.push((cur, literal));
    }
    Ok(words)
}

/// Quote a word for a command line (the inverse of [`split_words`]).
pub fn quote(word: &str) -> String {
    if !word.is_empty() && !word.chars().any(|c| c.is_whitespace() || c == '"' || c == '\\' || c == '=') {
        return word.to_string();
    }
    let mut s = String::from("\"");
    for c in word.chars() {
        if c == '"' || c == '\\' {
            s.push('\\');
        }
        s.push(c);
    }
    s.push('"');
    s
}

fn volume_list(word: &str) -> Result<Vec<String>, String> {
    let v: Vec<String> = word.split(',').filter(|s| !s.is_empty()).map(str::to_string).collect();
    if v.is_empty() {
        return Err("an empty volume list".into());
    }
    Ok(v)
}

/// `key=value` options after the positional words.
fn options(words: &[String]) -> Result<JobOptions, String> {
    let mut opts = JobOptions { cutover: Cutover::Live, rate_bytes_per_s: 0, verify: false };
    for w in words {
        let (k, v) = w.split_once('=').ok_or_else(|| format!("unexpected word {w:?} (options are key=value)"))?;
        match k {
            "cutover" => {
                opts.cutover = match v {
                    "live" => Cutover::Live,
                    "close" => Cutover::Close,
                    _ => return Err(format!("cutover must be live or close, not {v:?}")),
                }
            }
            "rate" => opts.rate_bytes_per_s = parse_size(v).map_err(|e| format!("rate: {e}"))?,
            "verify" => {
                opts.verify = match v {
                    "yes" => true,
                    "no" => false,
                    _ => return Err(format!("verify must be yes or no, not {v:?}")),
                }
            }
            _ => return Err(format!("unknown option {k:?} (cutover=, rate=, verify=)")),
        }
    }
    Ok(opts)
}

const USAGE: &str = "verbs: migrate PATH... to VOL[,VOL] [cutover=live|close] [rate=N] [verify=yes] | merge VOL... into VOL [..] | \
                     drain VOL [to VOL,...] [..] | cancel ID | add VOL size=N [path=IMAGE] | retire VOL | reopen VOL | set copy-rate=N | set max-jobs=N";

pub fn parse(line: &str) -> Result<Command, String> {
    let marked = split_marked(line)?;
    let Some((_, after_verb)) = marked.split_first() else { return Err(format!("an empty command ({USAGE})")) };
    // `verify` alone reads like a flag; say how it is written rather than take it for a path
    // or a volume (a data set named so is written in quotes).
    if after_verb.iter().any(|(w, literal)| !literal && w == "verify") {
        return Err("verify is an option: write verify=yes".into());
    }
    // Options are the unquoted `key=value` words from the first one on.
    let opt_start = after_verb.iter().position(|(w, literal)| !literal && w.contains('=')).unwrap_or(after_verb.len());
    let words: Vec<String> = marked.into_iter().map(|(w, _)| w).collect();
    let (verb, rest) = words.split_first().expect("not empty");
    let (pos, opt_words) = rest.split_at(opt_start);
    match verb.as_str() {
        "migrate" => {
            let at = pos.iter().position(|w| w == "to").ok_or("migrate: missing `to VOL`")?;
            let paths = pos[..at].to_vec();
            if paths.is_empty() {
                return Err("migrate: no path given".into());
            }
            let [vols] = &pos[at + 1..] else {
                return Err("migrate: `to` takes one comma-separated volume list".into());
            };
            Ok(Command::Migrate { paths, to: volume_list(vols)?, opts: options(opt_words)? })
        }
        "merge" => {
            let at = pos.iter().position(|w| w == "into").ok_or("merge: missing `into VOL`")?;
            let mut sources = Vec::new();
            for w in &pos[..at] {
                sources.extend(volume_list(w)?);
            }
            if sources.is_empty() {
                return Err("merge: no source volume given".into());
            }
            let [into] = &pos[at + 1..] else { return Err("merge: `into` takes one volume".into()) };
            Ok(Command::Merge { sources, into: into.clone(), opts: options(opt_words)? })
        }
        "drain" => {
            let (source, to) = match pos {
                [s] => (s.clone(), Vec::new()),
                [s, to, vols] if to == "to" => (s.clone(), volume_list(vols)?),
                _ => return Err("drain: expected `drain VOL [to VOL,...]`".into()),
            };
            Ok(Command::Drain { source, to, opts: options(opt_words)? })
        }
        "cancel" => {
            let [id] = rest else { return Err("cancel: expected one job or plan id".into()) };
            let id =
                id.trim_start_matches(['j', 'p']).parse().map_err(|_| format!("cancel: {id:?} is not a job id"))?;
            Ok(Command::Cancel { id })
        }
        "add" => {
            let [v] = pos else { return Err("add: expected `add VOL size=N [path=IMAGE|DEVICE] [force=yes]`".into()) };
            let (mut size_bytes, mut path, mut force) = (None, None, false);
            for w in opt_words {
                match w.split_once('=') {
                    Some(("size", n)) => size_bytes = Some(parse_size(n).map_err(|e| format!("size: {e}"))?),
                    Some(("path", p)) if p.starts_with('/') => path = Some(p.to_string()),
                    Some(("path", p)) => return Err(format!("path: {p:?} is not an absolute path")),
                    Some(("force", "yes")) => force = true,
                    _ => return Err(format!("add: unknown option {w:?} (size=N, path=IMAGE|DEVICE, force=yes)")),
                }
            }
            // Without size=, a block device brings its own (less its label): check_new_volume
            // takes 0 so; an image in the pool's directory needs one.
            let size_bytes = match (size_bytes, &path) {
                (Some(n), _) => n,
                (None, Some(_)) => 0,
                (None, None) => return Err("add: missing size=N".into()),
            };
            Ok(Command::Add { volume: v.clone(), size_bytes, path, force })
        }
        "retire" => {
            let [v] = rest else { return Err("retire: expected one volume".into()) };
            Ok(Command::Retire { volume: v.clone() })
        }
        "reopen" => {
            let [v] = rest else { return Err("reopen: expected one volume".into()) };
            Ok(Command::Reopen { volume: v.clone() })
        }
        "set" => {
            let [kv] = rest else { return Err("set: expected copy-rate=N or max-jobs=N".into()) };
            match kv.split_once('=') {
                Some(("copy-rate", v)) => {
                    Ok(Command::SetCopyRate { bytes_per_s: parse_size(v).map_err(|e| format!("copy-rate: {e}"))? })
                }
                Some(("max-jobs", v)) => match v.parse::<usize>() {
                    Ok(n) if (1..=MAX_JOBS_LIMIT).contains(&n) => Ok(Command::SetMaxJobs { jobs: n }),
                    _ => Err(format!("max-jobs must be 1..={MAX_JOBS_LIMIT}, not {v:?}")),
                },
                _ => Err(format!("set: unknown setting {kv:?} (copy-rate=N, max-jobs=N)")),
            }
        }
        _ => Err(format!("unknown verb {verb:?} ({USAGE})")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbs_parse() {
        assert_eq!(
            parse("migrate /db/a \"/with space/b\" to V3,V4 cutover=close rate=10M").unwrap(),
            Command::Migrate {
                paths: vec!["/db/a".into(), "/with space/b".into()],
                to: vec!["V3".into(), "V4".into()],
                opts: JobOptions { cutover: Cutover::Close, rate_bytes_per_s: 10 << 20, verify: false }
            }
        );
        assert_eq!(
            parse("merge V1 V2,V3 into V9").unwrap(),
            Command::Merge {
                sources: vec!["V1".into(), "V2".into(), "V3".into()],
                into: "V9".into(),
                opts: JobOptions { cutover: Cutover::Live, rate_bytes_per_s: 0, verify: false }
            }
        );
        assert_eq!(
            parse("drain V1 to V2 verify=yes cutover=close").unwrap(),
            Command::Drain {
                source: "V1".into(),
                to: vec!["V2".into()],
                opts: JobOptions { cutover: Cutover::Close, rate_bytes_per_s: 0, verify: true }
            }
        );
        assert!(matches!(
            parse("migrate /a to V2 verify=no").unwrap(),
            Command::Migrate { opts: JobOptions { verify: false, .. }, .. }
        ));
        assert!(matches!(parse("drain V1").unwrap(), Command::Drain { to, .. } if to.is_empty()));
        assert_eq!(parse("cancel 12").unwrap(), Command::Cancel { id: 12 });
        assert_eq!(parse("set max-jobs=3").unwrap(), Command::SetMaxJobs { jobs: 3 });
        assert_eq!(
            parse("add V9 size=64M path=\"/img dir/V9.img\"").unwrap(),
            Command::Add {
                volume: "V9".into(),
                size_bytes: 64 << 20,
                path: Some("/img dir/V9.img".into()),
                force: false
            }
        );
        assert_eq!(
            parse("add V9 size=1G").unwrap(),
            Command::Add { volume: "V9".into(), size_bytes: 1 << 30, path: None, force: false }
        );
    }

    #[test]
    fn malformed_lines_say_what_is_wrong() {
        for (line, want) in [
            ("", "empty command"),
            ("frobnicate x", "unknown verb"),
            ("migrate /a", "missing `to VOL`"),
            ("migrate to V1", "no path"),
            ("migrate /a to V1 cutover=sometimes", "cutover must be"),
            ("migrate /a to V1 rate=fast", "rate:"),
            ("migrate /a to V1 speed=1", "unknown option"),
            ("migrate /a to V1 verify=maybe", "verify must be yes or no"),
            ("migrate /a to V1 verify", "write verify=yes"),
            ("merge V1 into V2 verify=", "verify must be yes or no"),
            ("merge into V1", "no source"),
            ("drain V1 V2", "expected `drain VOL"),
            ("cancel x", "not a job id"),
            ("migrate \"/a to V1", "not closed"),
            ("set max-jobs=0", "max-jobs must be"),
            ("add V9", "missing size"),
            ("reopen", "expected one volume"),
            ("add size=1M", "expected `add VOL"),
            ("add V9 size=big", "size:"),
            ("add V9 size=1M path=rel.img", "not an absolute path"),
            ("add V9 size=1M colour=red", "unknown option"),
        ] {
            let e = parse(line).unwrap_err();
            assert!(e.contains(want), "{line:?}: {e}");
        }
    }

    #[test]
    fn quote_round_trips() {
        for w in ["plain", "with space", "q\"uote", "back\\slash", "", "a=b"] {
            assert_eq!(split_words(&quote(w)).unwrap(), vec![w.to_string()]);
        }
    }

    /// The story: a path with `=` in it could not be named in a control line; the parser took
    /// it for a `key=value` option. A quoted (or escaped) word is always a value now.
    #[test]
    fn a_quoted_path_with_an_equals_sign_is_a_path() {
        let c = parse(&format!("migrate {} to V2 cutover=close", quote("/data/x=1.db"))).unwrap();
        let Command::Migrate { paths, to, opts } = c else { panic!("{c:?}") };
        assert_eq!(paths, vec!["/data/x=1.db".to_string()]);
        assert_eq!(to, vec!["V2".to_string()]);
        assert_eq!(opts.cutover, Cutover::Close);
        let c = parse("migrate /data/y\\=2 to V2").unwrap();
        assert!(matches!(c, Command::Migrate { ref paths, .. } if paths == &["/data/y=2".to_string()]), "{c:?}");
        // Unquoted, it is still an option, and a bad one.
        assert!(parse("migrate /data/x=1.db to V2").is_err());
        assert!(parse("").is_err());
    }
}
