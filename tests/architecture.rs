//! The direction of the crate's dependencies, checked on the source text: the transport and
//! the store sit below the shard and know nothing of it, so the import circle
//! config -> store/redis -> mesh -> shard/deliver -> conn -> config cannot come back.

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The crate paths a file's non-test code names (`crate::a::b` -> "a::b").
fn crate_paths(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap();
    let code = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => &text,
    };
    let mut paths = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if rest.starts_with('{') {
            // `use crate::{a::B, c};`: every item of the group, nested groups by their head.
            let mut depth = 0;
            let end = rest
                .char_indices()
                .find(|&(_, c)| {
                    depth += (c == '{') as i32 - (c == '}') as i32;
                    depth == 0
                })
                .map_or(rest.len(), |(i, _)| i);
            let mut item_start = 1;
            depth = 0;
            for (i, c) in rest[..end].char_indices().skip(1) {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        paths.push(leading_path(&rest[item_start..i]));
                        item_start = i + 1;
                    }
                    _ => {}
                }
            }
            paths.push(leading_path(&rest[item_start..end]));
            paths.retain(|p| !p.is_empty());
            continue;
        }
        paths.push(leading_path(rest));
    }
    paths
}

/// `a::b::C` from the start of `text` (after spaces), without a trailing `::`.
fn leading_path(text: &str) -> String {
    let text = text.trim_start();
    let end = text
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(text.len());
    text[..end].trim_end_matches(':').to_string()
}

/// Every `crate::` path named by `files` that starts with one of `forbidden`.
fn violations(files: &[PathBuf], forbidden: &[&str]) -> Vec<String> {
    let mut found = Vec::new();
    for file in files {
        for path in crate_paths(file) {
            if forbidden
                .iter()
                .any(|f| path == *f || path.starts_with(&format!("{f}::")))
            {
                found.push(format!("{} names crate::{path}", file.display()));
            }
        }
    }
    found
}

fn src(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src").join(rel)
}

#[test]
fn the_mesh_is_a_plain_transport_that_names_nothing_in_the_crate() {
    let paths = crate_paths(&src("mesh.rs"));
    assert!(
        paths.is_empty(),
        "mesh.rs should be generic over its message and depend on nothing else: {paths:?}"
    );
}

#[test]
fn the_store_knows_nothing_of_the_config_the_shard_or_connections() {
    let mut files = Vec::new();
    rust_files(&src("store"), &mut files);
    assert!(files.len() >= 3, "found {files:?}");
    let found = violations(&files, &["config", "shard", "conn", "server", "admin"]);
    assert!(found.is_empty(), "{found:#?}");
}

#[test]
fn the_checker_sees_a_forbidden_path() {
    // The checks above would pass on files they cannot read right: show one that fails.
    let dir = std::env::temp_dir().join(format!("ringgate-arch-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("planted.rs");
    std::fs::write(
        &file,
        "use crate::store::Inbox;\nuse crate::{mesh, conn::{Ctx, self}, shard::Shard};\nfn f(c: &crate::config::Config) {}\n#[cfg(test)]\nmod tests { use crate::shard::Shard; }\n",
    )
    .unwrap();
    let found = violations(std::slice::from_ref(&file), &["config", "shard", "conn"]);
    std::fs::remove_dir_all(&dir).unwrap();
    let named: Vec<&str> = found
        .iter()
        .map(|f| f.rsplit(" names ").next().unwrap())
        .collect();
    assert_eq!(
        named,
        [
            "crate::conn",
            "crate::shard::Shard",
            "crate::config::Config"
        ],
        "the non-test paths, also inside a `use crate::{{..}}` group: {found:?}"
    );
}
