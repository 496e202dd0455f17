//! What `hotpipe process` runs: each input image with its parameters, from the command
//! line (`--param key=value`, for every image) and a manifest (`--manifest jobs.jsonl`,
//! one image per line with its own parameters, the way batch users keep their
//! face/prompt lists). Every row is checked against `[params]`, and its image for
//! existence, before anything runs, so a typo on line 70 of a manifest stops the run at
//! once with the line and the key, not after an hour of work; every wrong row is
//! reported, so one edit fixes them all.
//!
//! Two manifest formats, told apart by the extension:
//! - JSON lines (`.jsonl`, or anything not `.csv`): each line a JSON object, `image` (a
//!   path, relative to the manifest's folder) and the parameters, e.g.
//!   `{"image": "faces/a.jpg", "prompt": "a red coat", "seed": 7}`. Blank lines and lines
//!   starting with `#` are skipped.
//! - CSV (`.csv`, RFC 4180 as spreadsheets write it): a header row naming `image` and
//!   parameter columns, then one row per image; each cell is read as its parameter's
//!   declared type (`7` is an integer for an `int`, text for a `string`), and an empty
//!   cell gives no value (the `--param` one, else the default); JSON's `null` is the
//!   same.
//!
//! A row's values override `--param`'s, which override the defaults. One image may
//! appear on several rows (variations).

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::config::{ParamError, ParamsConfig};
use crate::vocab::params::Params;

/// One image to process, with its parameters (`None` without `[params]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub path: PathBuf,
    pub params: Option<Params>,
}

/// Why the jobs could not be made: said before anything runs.
#[derive(Debug, thiserror::Error)]
pub enum JobsError {
    #[error("--param and --manifest need a [params] section declaring the parameters")]
    NoSchema,
    #[error(transparent)]
    Param(#[from] ParamError),
    #[error("cannot read manifest {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Every wrong row of a manifest, so that one edit fixes them all.
    #[error("{}", rows_text(.path, .rows))]
    Rows { path: PathBuf, rows: Vec<BadRow> },
}

/// A manifest row that cannot run: its line (1-based, counted in the file as an editor
/// shows it) and why.
#[derive(Debug, Clone, PartialEq)]
pub struct BadRow {
    pub line: usize,
    pub message: String,
}

/// How many wrong rows the error lists before it only counts the rest: enough to fix a
/// spreadsheet in one pass, few enough to read.
const ROWS_LISTED: usize = 20;

fn rows_text(path: &Path, rows: &[BadRow]) -> String {
    let p = path.display();
    if let [one] = rows {
        return format!("manifest {p} line {}: {}", one.line, one.message);
    }
    let mut s = format!("manifest {p}: {} rows cannot run:", rows.len());
    for r in rows.iter().take(ROWS_LISTED) {
        s.push_str(&format!("\n  line {}: {}", r.line, r.message));
    }
    if rows.len() > ROWS_LISTED {
        s.push_str(&format!("\n  ... and {} more", rows.len() - ROWS_LISTED));
    }
    s
}

/// The jobs for `inputs` (already expanded) and the `manifest`'s rows, in that order,
/// each with `args` (`--param`) over the defaults and a row's own values over both.
pub fn plan(
    params: Option<&ParamsConfig>,
    inputs: Vec<PathBuf>,
    args: &[String],
    manifest: Option<&Path>,
) -> Result<Vec<Job>, JobsError> {
    let Some(schema) = params else {
        if !args.is_empty() || manifest.is_some() {
            return Err(JobsError::NoSchema);
        }
        return Ok(inputs
            .into_iter()
            .map(|path| Job { path, params: None })
            .collect());
    };
    let base = schema.parse_args(args)?;
    let mut jobs = Vec::with_capacity(inputs.len());
    if !inputs.is_empty() {
        let p = schema.resolve(&base)?;
        jobs.extend(inputs.into_iter().map(|path| Job {
            path,
            params: Some(p.clone()),
        }));
    }
    if let Some(m) = manifest {
        jobs.extend(read_manifest(schema, &base, m)?);
    }
    Ok(jobs)
}

/// A manifest's rows as jobs, or every row that cannot run. A byte-order mark (what
/// Windows editors and spreadsheets write first) is not part of the first row.
fn read_manifest(
    schema: &ParamsConfig,
    base: &Map<String, Value>,
    path: &Path,
) -> Result<Vec<Job>, JobsError> {
    let text = std::fs::read_to_string(path).map_err(|source| JobsError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let rows = Rows {
        schema,
        base,
        dir: path.parent().unwrap_or(Path::new(".")),
        jobs: Vec::new(),
        bad: Vec::new(),
    };
    let csv = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("csv"));
    let rows = if csv {
        read_csv(rows, text)
    } else {
        read_jsonl(rows, text)
    };
    if rows.bad.is_empty() {
        Ok(rows.jobs)
    } else {
        Err(JobsError::Rows {
            path: path.to_path_buf(),
            rows: rows.bad,
        })
    }
}

/// A manifest being read: the jobs of the good rows and the bad rows, all of them.
struct Rows<'a> {
    schema: &'a ParamsConfig,
    base: &'a Map<String, Value>,
    dir: &'a Path,
    jobs: Vec<Job>,
    bad: Vec<BadRow>,
}

impl Rows<'_> {
    fn bad(&mut self, line: usize, message: String) {
        self.bad.push(BadRow { line, message });
    }

    /// A row's job: `image` relative to the manifest's folder and present now (a missing
    /// file found after an hour of work is the late failure the check exists to
    /// prevent), the row's values over `base`.
    fn row(&mut self, line: usize, image: &str, row: Result<Map<String, Value>, ParamError>) {
        let job = row.map_err(|e| e.to_string()).and_then(|row| {
            if image.is_empty() {
                return Err(
                    "needs \"image\": the path of the image (relative to the manifest)".into(),
                );
            }
            let mut given = self.base.clone();
            given.extend(row);
            let params = self.schema.resolve(&given).map_err(|e| e.to_string())?;
            let path = self.dir.join(image);
            present(&path, image)?;
            Ok(Job {
                path,
                params: Some(params),
            })
        });
        match job {
            Ok(j) => self.jobs.push(j),
            Err(m) => self.bad(line, m),
        }
    }
}

/// Whether a row's image is a file that exists now.
fn present(path: &Path, image: &str) -> Result<(), String> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => Err(format!("image `{image}` is a folder ({})", path.display())),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(format!(
            "image `{image}` not found (looked for {}; paths are relative to the manifest)",
            path.display()
        )),
        Err(e) => Err(format!("image `{image}`: {e} ({})", path.display())),
    }
}

/// JSON lines: each a JSON object; blank lines and `#` comments skipped.
fn read_jsonl<'a>(mut rows: Rows<'a>, text: &str) -> Rows<'a> {
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let mut image = String::new();
        let row = ParamsConfig::parse_json(t.as_bytes()).map(|mut row| {
            if let Some(Value::String(s)) = row.remove("image") {
                image = s;
            }
            // `null` is no value, as an empty CSV cell is: `--param`'s, else the default.
            row.retain(|_, v| !v.is_null());
            row
        });
        rows.row(i + 1, &image, row);
    }
    rows
}

/// The 1-based line of the record that starts at byte `offset` of `text`, counted here
/// because the csv crate's own count is wrong after a blank line or a CRLF line end (what
/// spreadsheets write). Its offset can point at the line ends (and blank lines) before
/// the record, which no record starts with, so they are skipped first.
fn line_at(text: &str, offset: u64) -> usize {
    let bytes = text.as_bytes();
    let mut end = (offset as usize).min(bytes.len());
    while end < bytes.len() && matches!(bytes[end], b'\r' | b'\n') {
        end += 1;
    }
    1 + bytes[..end].iter().filter(|&&b| b == b'\n').count()
}

/// A CSV reading error in words, without the crate's own (wrong) line number.
fn csv_problem(e: &csv::Error) -> String {
    match e.kind() {
        csv::ErrorKind::UnequalLengths {
            expected_len, len, ..
        } => format!("the row has {len} cells, the header row {expected_len}"),
        _ => e.to_string(),
    }
}

/// CSV: a header row naming `image` and parameter columns, each cell read as its
/// parameter's declared type; an empty cell gives no value.
fn read_csv<'a>(mut rows: Rows<'a>, text: &str) -> Rows<'a> {
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::Headers)
        .from_reader(text.as_bytes());
    let headers = match reader.headers() {
        Ok(h) => h.clone(),
        Err(e) => {
            rows.bad(1, format!("cannot read the header row: {e}"));
            return rows;
        }
    };
    let Some(image_col) = headers.iter().position(|h| h == "image") else {
        rows.bad(
            1,
            "the header row needs an `image` column (the path of each image, relative to the manifest)".into(),
        );
        return rows;
    };
    for record in reader.records() {
        let record = match record {
            Ok(r) => r,
            Err(e) => {
                let line = e.position().map_or(0, |p| line_at(text, p.byte()));
                rows.bad(line, csv_problem(&e));
                continue;
            }
        };
        let line = record.position().map_or(0, |p| line_at(text, p.byte()));
        let cells = headers
            .iter()
            .zip(record.iter())
            .enumerate()
            .filter(|&(i, (_, cell))| i != image_col && !cell.is_empty())
            .map(|(_, pair)| pair);
        let row = rows.schema.parse_texts(cells);
        let image = record.get(image_col).unwrap_or("").trim();
        rows.row(line, image, row);
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::vocab::params::ParamValue;

    fn schema() -> ParamsConfig {
        let text = "[params.schema]\nprompt = { type = \"string\" }\nseed = { type = \"int\", default = 1 }\n";
        Config::from_toml(text, "t.toml", Path::new("/"), 0)
            .unwrap()
            .params
            .unwrap()
    }

    #[test]
    fn rows_override_params_which_override_defaults() {
        let d = tempfile::tempdir().unwrap();
        let m = d.path().join("jobs.jsonl");
        touch(d.path(), &["a.jpg"]);
        std::fs::write(
            &m,
            "# faces\n{\"image\": \"a.jpg\", \"prompt\": \"coat\"}\n\n{\"image\": \"a.jpg\", \"seed\": 9}\n",
        )
        .unwrap();
        let s = schema();
        let args = ["prompt=beach".to_string()];
        let jobs = plan(Some(&s), vec!["x.png".into()], &args, Some(&m)).unwrap();
        let got: Vec<(PathBuf, String, i64)> = jobs
            .iter()
            .map(|j| {
                let p = j.params.as_ref().unwrap();
                let Some(ParamValue::Str(prompt)) = p.get("prompt") else {
                    panic!()
                };
                let Some(ParamValue::Int(seed)) = p.get("seed") else {
                    panic!()
                };
                (j.path.clone(), prompt.clone(), *seed)
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("x.png".into(), "beach".into(), 1),
                (d.path().join("a.jpg"), "coat".into(), 1),
                (d.path().join("a.jpg"), "beach".into(), 9),
            ]
        );
    }

    /// Empty files at `names` under `dir`: the images a manifest names must exist.
    fn touch(dir: &Path, names: &[&str]) {
        for n in names {
            let p = dir.join(n);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, b"").unwrap();
        }
    }

    fn prompt_and_seed(j: &Job) -> (String, i64) {
        let p = j.params.as_ref().unwrap();
        let Some(ParamValue::Str(prompt)) = p.get("prompt") else {
            panic!()
        };
        let Some(ParamValue::Int(seed)) = p.get("seed") else {
            panic!()
        };
        (prompt.clone(), *seed)
    }

    #[test]
    fn a_csv_manifest_reads_cells_as_their_declared_types() {
        let d = tempfile::tempdir().unwrap();
        let m = d.path().join("jobs.CSV");
        touch(d.path(), &["faces/a.jpg", "b.jpg", "c.jpg"]);
        // A spreadsheet's quoting: a comma and a line break inside a prompt, an empty
        // cell (the --param value), a number as a string parameter.
        std::fs::write(
            &m,
            "image,prompt,seed\nfaces/a.jpg,\"a coat, red\nand a hat\",7\nb.jpg,,\n c.jpg ,42,3\n",
        )
        .unwrap();
        let s = schema();
        let jobs = plan(Some(&s), vec![], &["prompt=beach".into()], Some(&m)).unwrap();
        let got: Vec<(PathBuf, (String, i64))> = jobs
            .iter()
            .map(|j| (j.path.clone(), prompt_and_seed(j)))
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    d.path().join("faces/a.jpg"),
                    ("a coat, red\nand a hat".into(), 7)
                ),
                (d.path().join("b.jpg"), ("beach".into(), 1)),
                (d.path().join("c.jpg"), ("42".into(), 3)),
            ]
        );
        for (text, needle) in [
            (
                "image,prompt,seed\na.jpg,x,1\nb.jpg,x,seven\n",
                "line 3: parameter `seed` must be an integer",
            ),
            (
                "image,prompt,sede\na.jpg,x,1\n",
                "line 2: unknown parameter `sede`",
            ),
            (
                "img,prompt\na.jpg,x\n",
                "line 1: the header row needs an `image` column",
            ),
            ("image,prompt\n,x\n", "line 2: needs \"image\""),
            ("image,prompt\na.jpg,x,extra\n", "line 2"),
        ] {
            std::fs::write(&m, text).unwrap();
            let e = plan(Some(&s), vec![], &[], Some(&m))
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle), "{text:?}: {e}");
        }
    }

    #[test]
    fn a_bad_row_names_its_line_and_key() {
        let d = tempfile::tempdir().unwrap();
        let m = d.path().join("jobs.jsonl");
        touch(d.path(), &["a.jpg", "b.jpg"]);
        std::fs::write(&m, "{\"image\": \"a.jpg\", \"prompt\": \"x\"}\n{\"image\": \"b.jpg\", \"prompt\": \"x\", \"sede\": 3}\n").unwrap();
        let e = plan(Some(&schema()), vec![], &[], Some(&m))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 2") && e.contains("unknown parameter `sede`"),
            "{e}"
        );
        std::fs::write(&m, "{\"prompt\": \"x\"}\n").unwrap();
        let e = plan(Some(&schema()), vec![], &[], Some(&m))
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 1") && e.contains("needs \"image\""), "{e}");
        let e = plan(Some(&schema()), vec!["a.png".into()], &[], None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`prompt` is required"), "{e}");
        let e = plan(None, vec![], &["seed=1".into()], None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("need a [params] section"), "{e}");
    }

    #[test]
    fn every_bad_row_is_reported_with_the_line_an_editor_shows() {
        let d = tempfile::tempdir().unwrap();
        touch(d.path(), &["a.jpg", "b.jpg"]);
        let m = d.path().join("jobs.csv");
        // What a spreadsheet saves: a byte-order mark, CRLF line ends, a blank line, a
        // quoted line break; line 4 names a missing image, line 6 a bad seed.
        std::fs::write(
            &m,
            "\u{feff}image,prompt,seed\r\na.jpg,x,1\r\n\r\nnope.jpg,x,2\r\nb.jpg,\"two\r\nlines\",seven\r\nb.jpg,x,7.0\r\n",
        )
        .unwrap();
        let s = schema();
        let Err(JobsError::Rows { rows, .. }) = plan(Some(&s), vec![], &[], Some(&m)) else {
            panic!("the bad rows were not reported");
        };
        let lines: Vec<usize> = rows.iter().map(|r| r.line).collect();
        assert_eq!(lines, [4, 5], "{rows:?}");
        assert!(
            rows[0].message.contains("image `nope.jpg` not found"),
            "{rows:?}"
        );
        assert!(
            rows[1].message.contains("`seed` must be an integer"),
            "{rows:?}"
        );
        let e = JobsError::Rows {
            path: m.clone(),
            rows,
        }
        .to_string();
        assert!(e.contains("2 rows cannot run:\n  line 4: image"), "{e}");

        // JSON lines: the same leniency as CSV (a byte-order mark, `null` for the
        // default, 7.0 for 7) and all bad rows at once.
        let m = d.path().join("jobs.jsonl");
        std::fs::write(
            &m,
            "\u{feff}{\"image\": \"a.jpg\", \"prompt\": null, \"seed\": 7.0}\n{\"image\": \"gone.jpg\", \"prompt\": \"x\"}\n\n{\"image\": \"b.jpg\", \"seed\": 7.5}\n",
        )
        .unwrap();
        let Err(JobsError::Rows { rows, .. }) =
            plan(Some(&s), vec![], &["prompt=p".into()], Some(&m))
        else {
            panic!("the bad rows were not reported");
        };
        let lines: Vec<usize> = rows.iter().map(|r| r.line).collect();
        assert_eq!(lines, [2, 4], "{rows:?}");
        std::fs::write(
            &m,
            "\u{feff}{\"image\": \"a.jpg\", \"prompt\": null, \"seed\": 7.0}\n",
        )
        .unwrap();
        let jobs = plan(Some(&s), vec![], &["prompt=p".into()], Some(&m)).unwrap();
        assert_eq!(prompt_and_seed(&jobs[0]), ("p".into(), 7));
    }
}
