//! Every value of the chart is in its schema, documented in `values.yaml` and in the README.

use super::*;

/// Leaf paths of the values schema (objects without declared properties count as leaves).
fn schema_leaves(v: &Value, prefix: &str, out: &mut Vec<String>) {
    match v.get("properties").and_then(Value::as_object) {
        Some(props) => {
            for (k, sub) in props {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                schema_leaves(sub, &path, out);
            }
        }
        None => out.push(prefix.to_string()),
    }
}

/// The line of `path` (a.b.c) in a block-style YAML text, following indentation.
fn yaml_line(lines: &[&str], path: &str) -> Option<usize> {
    let indent = |l: &str| l.len() - l.trim_start().len();
    let (mut from, mut to, mut parent_indent) = (0, lines.len(), None::<usize>);
    let mut found = None;
    for key in path.split('.') {
        let i = (from..to).find(|&i| {
            let l = lines[i];
            l.trim_start().starts_with(&format!("{key}:"))
                && parent_indent.is_none_or(|p| indent(l) > p)
                && !l.trim_start().starts_with('#')
        })?;
        let ind = indent(lines[i]);
        // The block of this key ends at the next line indented no deeper than the key.
        let end = (i + 1..to)
            .find(|&j| !lines[j].trim().is_empty() && indent(lines[j]) <= ind)
            .unwrap_or(to);
        (from, to, parent_indent, found) = (i + 1, end, Some(ind), Some(i));
    }
    found
}

#[test]
fn every_value_is_documented_in_values_yaml_and_the_readme() {
    let dir = chart_dir();
    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("values.schema.json")).expect("schema"),
    )
    .expect("schema is JSON");
    let values = std::fs::read_to_string(dir.join("values.yaml")).expect("values.yaml");
    let readme = std::fs::read_to_string(repo_root().join("README.md")).expect("README");
    let helm = readme
        .split("## Helm")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("a Helm section in the README");
    let mut leaves = vec![];
    schema_leaves(&schema, "", &mut leaves);
    assert!(leaves.len() > 50, "{leaves:?}");
    let lines: Vec<&str> = values.lines().collect();
    for leaf in leaves.iter().filter(|l| *l != "global") {
        let key = leaf.rsplit('.').next().unwrap_or(leaf);
        // values.yaml: the key exists and a comment sits right above it (or above its parent's
        // block for the per-controller switches, which share one).
        let at =
            yaml_line(&lines, leaf).unwrap_or_else(|| panic!("{leaf} missing from values.yaml"));
        assert!(
            at > 0 && lines[at - 1].trim_start().starts_with('#'),
            "{leaf} has no comment in values.yaml"
        );
        assert!(
            helm.contains(key),
            "{leaf} is not documented in the README's Helm section"
        );
    }
}
