//! What `hotpipe process` runs: each input image with its parameters, from the command
//! line (`--param key=value`, for every image) and a manifest (`--manifest jobs.jsonl`,
//! one image per line with its own parameters, the way batch users keep their
//! face/prompt lists). Every row is checked against `[params]` before anything runs, so
//! a typo on line 70 of a manifest stops the run at once with the line and the key, not
//! after an hour of work.
//!
//! Two manifest formats, told apart by the extension:
//! - JSON lines (`.jsonl`, or anything not `.csv`): each line a JSON object, `image` (a
//!   path, relative to the manifest's folder) and the parameters, e.g.
//!   `{"image": "faces/a.jpg", "prompt": "a red coat", "seed": 7}`. Blank lines and lines
//!   starting with `#` are skipped.
//! - CSV (`.csv`, RFC 4180 as spreadsheets write it): a header row naming `image` and
//!   parameter columns, then one row per image; each cell is read as its parameter's
//!   declared type (`7` is an integer for an `int`, text for a `string`), and an empty
//!   cell gives no value (the `--param` one, else the default).
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
    #[error("{0}")]
    Param(#[from] ParamError),
    #[error("cannot read manifest {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("manifest {path} line {line}: {message}")]
    Line {
        path: PathBuf,
        line: usize,
        message: String,
    },
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

fn read_manifest(
    schema: &ParamsConfig,
    base: &Map<String, Value>,
    path: &Path,
) -> Result<Vec<Job>, JobsError> {
    let text = std::fs::read_to_string(path).map_err(|source| JobsError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let csv = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("csv"));
    if csv {
        return read_csv(schema, base, path, &text);
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut jobs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_err = |message: String| JobsError::Line {
            path: path.to_path_buf(),
            line: i + 1,
            message,
        };
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let mut row =
            ParamsConfig::parse_json(t.as_bytes()).map_err(|e| line_err(e.to_string()))?;
        let image = match row.remove("image") {
            Some(Value::String(s)) => s,
            _ => String::new(),
        };
        jobs.push(job(schema, base, dir, &image, row).map_err(line_err)?);
    }
    Ok(jobs)
}

/// A row's job: `image` relative to the manifest's folder, the row's values over `base`.
fn job(
    schema: &ParamsConfig,
    base: &Map<String, Value>,
    dir: &Path,
    image: &str,
    row: Map<String, Value>,
) -> Result<Job, String> {
    if image.is_empty() {
        return Err("needs \"image\": the path of the image (relative to the manifest)".into());
    }
    let mut given = base.clone();
    given.extend(row);
    let params = schema.resolve(&given).map_err(|e| e.to_string())?;
    Ok(Job {
        path: dir.join(image),
        params: Some(params),
    })
}

fn read_csv(
    schema: &ParamsConfig,
    base: &Map<String, Value>,
    path: &Path,
    text: &str,
) -> Result<Vec<Job>, JobsError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let line_err = |line: u64, message: String| JobsError::Line {
        path: path.to_path_buf(),
        line: line as usize,
        message,
    };
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::Headers)
        .from_reader(text.as_bytes());
    let headers = reader
        .headers()
        .map_err(|e| line_err(1, format!("cannot read the header row: {e}")))?
        .clone();
    let Some(image_col) = headers.iter().position(|h| h == "image") else {
        return Err(line_err(
            1,
            "the header row needs an `image` column (the path of each image, relative to the manifest)".into(),
        ));
    };
    let mut jobs = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|e| {
            let line = e.position().map_or(0, |p| p.line());
            line_err(line, e.to_string())
        })?;
        let line = record.position().map_or(0, |p| p.line());
        let cells = headers
            .iter()
            .zip(record.iter())
            .enumerate()
            .filter(|&(i, (_, cell))| i != image_col && !cell.is_empty())
            .map(|(_, pair)| pair);
        let row = schema
            .parse_texts(cells)
            .map_err(|e| line_err(line, e.to_string()))?;
        let image = record.get(image_col).unwrap_or("").trim();
        jobs.push(job(schema, base, dir, image, row).map_err(|m| line_err(line, m))?);
    }
    Ok(jobs)
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
}
