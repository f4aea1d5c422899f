//! Reading a config: YAML value tree, the walk against the known keys, overrides, required
//! keys, deserialisation. The steps are listed in the parent module's docs.

use std::collections::BTreeMap;
use std::path::Path;

use serde_norway::{Mapping, Value};

use super::seed_keys::{IGNORED, RENAMED};
use super::{DatasetConfig, IgnoredKey, RunConfig};
use crate::{Error, Result};

/// Required keys and what to put there.
const REQUIRED: &[(&str, &str)] = &[
    (
        "model.model_name",
        "the actor: a Hugging Face model folder or a .gguf file",
    ),
    (
        "data.train_dataset.parquet_files",
        "the training data: a parquet file or a list of them",
    ),
    (
        "trainer.total_training_steps",
        "the number of optimizer steps",
    ),
];

/// Keys of `data.train_dataset` that `data.val_dataset` does not inherit.
const NOT_INHERITED: &[&str] = &["parquet_files", "shuffle"];

impl RunConfig {
    /// Loads `path`, applies `overrides` (`a.b.c=value`, in order), and validates.
    pub fn from_file(path: impl AsRef<Path>, overrides: &[String]) -> Result<RunConfig> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_yaml(&text, path, overrides)
    }

    /// Loads YAML text; `path` is where it came from, for messages.
    pub fn from_yaml(text: &str, path: &Path, overrides: &[String]) -> Result<RunConfig> {
        let schema = Node::schema()?;
        let mut tree: Value = serde_norway::from_str(text).map_err(|e| syntax_error(path, &e))?;
        tree.apply_merge()
            .map_err(|e| Error::format(path, format!("merge keys (`<<`): {e}")))?;
        let mut root = match tree {
            Value::Null => Mapping::new(),
            Value::Mapping(m) => m,
            other => {
                return Err(Error::format(
                    path,
                    format!(
                        "a config is a mapping of sections (model, data, ...); found {}",
                        kind(&other)
                    ),
                ))
            }
        };

        let mut walk = Walk {
            file: path,
            schema: &schema,
            origin: None,
            ignored: vec![],
            renamed: vec![],
        };
        let moves = walk.section(&mut root, &schema, "")?;
        walk.apply_moves(&mut root, moves, false)?;

        for ov in overrides {
            let (key, raw) = ov.split_once('=').ok_or_else(|| {
                Error::config(
                    path,
                    ov.as_str(),
                    "an override is `a.b.c=value` (no `=` found)",
                )
            })?;
            let key = key.trim();
            if key.is_empty() || key.split('.').any(|s| s.is_empty()) {
                return Err(Error::config(
                    path,
                    key,
                    format!("`--set {ov}`: the key must be a dotted path such as `optim.lr`"),
                ));
            }
            let value: Value = serde_norway::from_str(raw).map_err(|e| {
                Error::config(
                    path,
                    key,
                    format!("`--set {ov}`: the value is not YAML: {e}"),
                )
            })?;
            // Null on a section removes it (e.g. `data.val_dataset=null`).
            if value.is_null() && matches!(schema.find(key), Some(Node::Section { .. })) {
                remove(&mut root, key);
                continue;
            }
            let mut one = Mapping::new();
            put(&mut one, key, value);
            walk.origin = Some(ov.as_str());
            let moves = walk.section(&mut one, &schema, "")?;
            walk.apply_moves(&mut one, moves, true)?;
            merge(&mut root, one);
        }

        inherit_val_dataset(&mut root);
        for (key, what) in REQUIRED {
            require(path, &root, key, what)?;
        }
        if get(&root, "data.val_dataset").is_some_and(|v| !v.is_null()) {
            require(
                path,
                &root,
                "data.val_dataset.parquet_files",
                "the validation data (or remove `data.val_dataset`)",
            )?;
        }

        // Deserialise from text, not from the tree: the text deserializer reports the dotted
        // path of a wrong value.
        let text = serde_norway::to_string(&Value::Mapping(root))
            .map_err(|e| Error::format(path, format!("cannot re-encode the config: {e}")))?;
        let mut cfg: RunConfig = serde_norway::from_str(&text).map_err(|e| type_error(path, &e))?;
        cfg.source = path.to_path_buf();
        cfg.ignored = walk.ignored;
        cfg.renamed = walk.renamed;
        cfg.validate()?;
        Ok(cfg)
    }
}

/// The known keys: ours (from the serialised defaults), verl's renamed ones, ignored ones.
enum Node {
    Section {
        /// A section of ours (kept), or one that only holds verl keys (dropped after the walk).
        ours: bool,
        children: BTreeMap<String, Node>,
        /// (name prefix, reason) of ignored `prefix*` keys.
        wild: Vec<(&'static str, &'static str)>,
    },
    Leaf,
    Renamed(&'static [&'static str]),
    Ignored(&'static str),
}

impl Node {
    fn section(ours: bool) -> Node {
        Node::Section {
            ours,
            children: BTreeMap::new(),
            wild: vec![],
        }
    }

    fn from_value(v: &Value) -> Node {
        match v {
            Value::Mapping(m) => {
                let children = m
                    .iter()
                    .filter_map(|(k, v)| Some((k.as_str()?.to_string(), Node::from_value(v))))
                    .collect();
                Node::Section {
                    ours: true,
                    children,
                    wild: vec![],
                }
            }
            _ => Node::Leaf,
        }
    }

    fn schema() -> Result<Node> {
        let mut template = RunConfig {
            model: Default::default(),
            data: Default::default(),
            optim: Default::default(),
            trainer: Default::default(),
            grpo: Default::default(),
            ppo: Default::default(),
            generation: Default::default(),
            source: Default::default(),
            ignored: vec![],
            renamed: vec![],
        };
        template.data.val_dataset = Some(DatasetConfig::default());
        let v = serde_norway::to_value(&template)
            .map_err(|e| Error::invalid("config schema", e.to_string()))?;
        let mut root = Node::from_value(&v);
        for &(from, to) in RENAMED {
            for dst in to {
                if !matches!(root.find(dst), Some(Node::Leaf)) {
                    return Err(Error::invalid(
                        "config schema",
                        format!("`{from}` is renamed to `{dst}`, which is not a key"),
                    ));
                }
            }
            root.insert(from, Node::Renamed(to))?;
        }
        for &(key, reason) in IGNORED {
            match key.strip_suffix('*') {
                Some(prefix) => {
                    let (parent, name) = prefix.rsplit_once('.').unwrap_or(("", prefix));
                    match root.section_at(parent)? {
                        Node::Section { wild, .. } => wild.push((name, reason)),
                        _ => return Err(Error::invalid("config schema", key.to_string())),
                    }
                }
                None => root.insert(key, Node::Ignored(reason))?,
            }
        }
        Ok(root)
    }

    fn find(&self, path: &str) -> Option<&Node> {
        path.split('.').try_fold(self, |n, part| match n {
            Node::Section { children, .. } => children.get(part),
            _ => None,
        })
    }

    /// The section at `path`, made (as a verl-only section) where missing.
    fn section_at(&mut self, path: &str) -> Result<&mut Node> {
        let mut n = self;
        for part in path.split('.').filter(|p| !p.is_empty()) {
            n = match n {
                Node::Section { children, .. } => children
                    .entry(part.to_string())
                    .or_insert_with(|| Node::section(false)),
                _ => {
                    return Err(Error::invalid(
                        "config schema",
                        format!("`{path}` runs through a key that is not a section"),
                    ))
                }
            };
        }
        Ok(n)
    }

    fn insert(&mut self, path: &str, node: Node) -> Result<()> {
        let (parent, name) = path.rsplit_once('.').unwrap_or(("", path));
        match self.section_at(parent)? {
            Node::Section { children, .. } if !children.contains_key(name) => {
                children.insert(name.to_string(), node);
                Ok(())
            }
            _ => Err(Error::invalid(
                "config schema",
                format!("`{path}` is listed twice"),
            )),
        }
    }

    /// Every dotted path of a leaf of ours or a renamed key, for "did you mean" elsewhere.
    fn leaf_paths(&self, prefix: &str, out: &mut Vec<String>) {
        if let Node::Section { children, .. } = self {
            for (k, n) in children {
                let p = join(prefix, k);
                match n {
                    Node::Leaf | Node::Renamed(_) => out.push(p),
                    Node::Section { .. } => n.leaf_paths(&p, out),
                    Node::Ignored(_) => {}
                }
            }
        }
    }
}

/// A value moved from a verl key to ours: (verl path, our paths, value).
type Move = (String, &'static [&'static str], Value);

struct Walk<'a> {
    file: &'a Path,
    /// The whole schema, for "did you mean" across sections.
    schema: &'a Node,
    /// The override being walked, for messages; None for the file.
    origin: Option<&'a str>,
    ignored: Vec<IgnoredKey>,
    renamed: Vec<(String, String)>,
}

impl Walk<'_> {
    fn err(&self, field: &str, msg: String) -> Error {
        match self.origin {
            Some(ov) => Error::config(self.file, field, format!("{msg} (in `--set {ov}`)")),
            None => Error::config(self.file, field, msg),
        }
    }

    /// Checks every key of `map` against `schema` (a section) at dotted path `at`: drops
    /// ignored keys and empty sections, takes out renamed keys (returned, to be put under our
    /// name), and fails on the first unknown key.
    fn section(&mut self, map: &mut Mapping, schema: &Node, at: &str) -> Result<Vec<Move>> {
        let (children, wild) = match schema {
            Node::Section { children, wild, .. } => (children, wild),
            _ => return Ok(vec![]),
        };
        let mut moves = vec![];
        let keys: Vec<Value> = map.keys().cloned().collect();
        for k in keys {
            let Some(name) = k.as_str() else {
                return Err(self.err(at, format!("keys are names; found the key {}", short(&k))));
            };
            let full = join(at, name);
            let node = match children.get(name) {
                Some(n) => n,
                None => match wild.iter().find(|(prefix, _)| name.starts_with(prefix)) {
                    Some(&(_, reason)) => {
                        map.remove(&k);
                        self.ignored.push(IgnoredKey { path: full, reason });
                        continue;
                    }
                    None => return Err(self.unknown(schema, at, name)),
                },
            };
            match node {
                Node::Ignored(reason) => {
                    map.remove(&k);
                    self.ignored.push(IgnoredKey { path: full, reason });
                }
                Node::Renamed(to) => {
                    if let Some(v) = map.remove(&k) {
                        self.no_interpolation(&full, &v)?;
                        moves.push((full, *to, v));
                    }
                }
                Node::Leaf => {
                    if let Some(v) = map.get(&k) {
                        self.no_interpolation(&full, v)?;
                    }
                }
                sub @ Node::Section { ours, .. } => match map.get_mut(&k) {
                    Some(Value::Null) => {
                        map.remove(&k);
                    }
                    Some(Value::Mapping(m)) => {
                        moves.extend(self.section(m, sub, &full)?);
                        if !ours || m.is_empty() {
                            map.remove(&k);
                        }
                    }
                    Some(other) => {
                        let found = kind(other);
                        return Err(self.err(
                            &full,
                            format!("is a section: expected keys under it, found {found}"),
                        ));
                    }
                    None => {}
                },
            }
        }
        Ok(moves)
    }

    /// Puts renamed values under our names. From the file, a value that is also given under
    /// our name must be equal; from an override, it wins.
    fn apply_moves(&mut self, root: &mut Mapping, moves: Vec<Move>, overwrite: bool) -> Result<()> {
        let mut set_by: BTreeMap<&str, String> = BTreeMap::new();
        for (from, to, v) in moves {
            for &dst in to {
                if !overwrite {
                    if let Some(old) = get(root, dst).filter(|old| **old != v) {
                        let (new, old) = (short(&v), short(old));
                        let other = match set_by.get(dst) {
                            Some(src) => format!("`{src}` sets it to {old}"),
                            None => format!("`{dst}` is also given, as {old}"),
                        };
                        return Err(self.err(
                            &from,
                            format!("sets `{dst}` to {new}, but {other}; keep one"),
                        ));
                    }
                }
                put(root, dst, v.clone());
                set_by.insert(dst, from.clone());
                self.renamed.push((from.clone(), dst.to_string()));
            }
        }
        Ok(())
    }

    fn unknown(&self, schema: &Node, at: &str, name: &str) -> Error {
        let full = join(at, name);
        let Node::Section { children, .. } = schema else {
            return self.err(&full, "unknown key".into());
        };
        // A close name at the same level, else the same name elsewhere, else the list.
        let close = children
            .keys()
            .filter_map(|c| {
                let d = strsim::damerau_levenshtein(name, c);
                let prefix = name.len() >= 3 && (c.starts_with(name) || name.starts_with(c));
                (d <= 1 || (d <= 3 && 3 * d <= c.len().max(name.len())) || prefix).then_some((d, c))
            })
            .min();
        if let Some((_, c)) = close {
            return self.err(
                &full,
                format!("unknown key; did you mean `{}`?", join(at, c)),
            );
        }
        let mut all = vec![];
        self.schema.leaf_paths("", &mut all);
        let elsewhere: Vec<String> = all
            .into_iter()
            .filter(|p| p.rsplit('.').next() == Some(name))
            .map(|p| format!("`{p}`"))
            .collect();
        if !elsewhere.is_empty() {
            return self.err(
                &full,
                format!("unknown key; did you mean {}?", elsewhere.join(" or ")),
            );
        }
        let ours: Vec<&str> = children
            .iter()
            .filter(|(_, n)| matches!(n, Node::Leaf | Node::Section { ours: true, .. }))
            .map(|(k, _)| k.as_str())
            .collect();
        let known = if ours.is_empty() {
            children.keys().map(String::as_str).collect()
        } else {
            ours
        };
        let level = if at.is_empty() { "the top level" } else { at };
        self.err(
            &full,
            format!("unknown key; the keys at {level} are: {}", known.join(", ")),
        )
    }

    fn no_interpolation(&self, full: &str, v: &Value) -> Result<()> {
        let bad = match v {
            Value::String(s) => s.contains("${"),
            Value::Sequence(items) => items
                .iter()
                .any(|x| x.as_str().is_some_and(|s| s.contains("${"))),
            _ => false,
        };
        if bad {
            return Err(self.err(
                full,
                "holds a Hydra interpolation `${...}`; there is no Hydra here: write the value"
                    .into(),
            ));
        }
        Ok(())
    }
}

fn join(at: &str, name: &str) -> String {
    if at.is_empty() {
        name.to_string()
    } else {
        format!("{at}.{name}")
    }
}

fn get<'a>(root: &'a Mapping, path: &str) -> Option<&'a Value> {
    let (first, rest) = path.split_once('.').unwrap_or((path, ""));
    let v = root.get(first)?;
    if rest.is_empty() {
        return Some(v);
    }
    get(v.as_mapping()?, rest)
}

/// Sets `path` to `v`, making (or replacing non-mapping values by) sections on the way.
fn put(root: &mut Mapping, path: &str, v: Value) {
    match path.split_once('.') {
        None => {
            root.insert(Value::from(path), v);
        }
        Some((first, rest)) => {
            let slot = root
                .entry(Value::from(first))
                .or_insert_with(|| Value::Mapping(Mapping::new()));
            if !slot.is_mapping() {
                *slot = Value::Mapping(Mapping::new());
            }
            if let Value::Mapping(m) = slot {
                put(m, rest, v);
            }
        }
    }
}

fn remove(root: &mut Mapping, path: &str) {
    match path.split_once('.') {
        None => {
            root.remove(path);
        }
        Some((first, rest)) => {
            if let Some(Value::Mapping(m)) = root.get_mut(first) {
                remove(m, rest);
            }
        }
    }
}

/// Deep merge: mappings merge key by key, anything else in `top` replaces.
fn merge(base: &mut Mapping, top: Mapping) {
    for (k, v) in top {
        match (base.get_mut(&k), v) {
            (Some(Value::Mapping(b)), Value::Mapping(t)) => merge(b, t),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

fn inherit_val_dataset(root: &mut Mapping) {
    let Some(train) = get(root, "data.train_dataset")
        .and_then(Value::as_mapping)
        .cloned()
    else {
        return;
    };
    let Some(Value::Mapping(data)) = root.get_mut("data") else {
        return;
    };
    if let Some(Value::Mapping(val)) = data.get_mut("val_dataset") {
        for (k, v) in train {
            let skip = k.as_str().is_some_and(|s| NOT_INHERITED.contains(&s));
            if !skip && !val.contains_key(&k) {
                val.insert(k, v);
            }
        }
    }
}

fn require(path: &Path, root: &Mapping, key: &str, what: &str) -> Result<()> {
    match get(root, key) {
        Some(v) if !v.is_null() => Ok(()),
        _ => Err(Error::config(
            path,
            key,
            format!("required key is missing: {what}"),
        )),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

/// A value as one short line of YAML, for messages.
fn short(v: &Value) -> String {
    let s = serde_norway::to_string(v).unwrap_or_default();
    let s = s.trim().replace('\n', " ");
    if s.len() > 60 {
        format!("{}...", s.chars().take(60).collect::<String>())
    } else {
        s
    }
}

/// The message without its " at line L column C" part.
fn message_without_location(e: &serde_norway::Error) -> String {
    let msg = e.to_string();
    match e.location() {
        Some(l) => msg.replacen(
            &format!(" at line {} column {}", l.line(), l.column()),
            "",
            1,
        ),
        None => msg,
    }
}

fn syntax_error(path: &Path, e: &serde_norway::Error) -> Error {
    let msg = message_without_location(e);
    match e.location() {
        Some(l) => Error::format(
            path,
            format!("line {}, column {}: {msg}", l.line(), l.column()),
        ),
        None => Error::format(path, msg),
    }
}

/// A deserialisation error as `field`: message. The location refers to the re-encoded text,
/// not to the user's file, so it is dropped; the dotted path says where.
fn type_error(path: &Path, e: &serde_norway::Error) -> Error {
    let msg = message_without_location(e).replace("unit value", "null (an empty value)");
    match msg.split_once(": ") {
        Some((field, rest)) if !field.contains(' ') => Error::config(path, field, rest),
        _ => Error::config(path, "", msg),
    }
}
