//! NLA examples: marker choice, chat templates, actor and critic examples, truncation and
//! collation, with the real SmolLM2-135M-Instruct tokenizer and template
//! (`scripts/fetch-smollm2.sh`) and with the tiny hand-written BPE of the `gqa_untied` fixture.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use nla_engine::config::{CriticConfig, Truncation};
use nla_engine::data::{RowSource, Sample};
use nla_engine::model::{gguf, Tokenizer};
use nla_engine::nla::*;
use nla_engine::Error;

const SYSTEM: &str = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by \
                      Hugging Face<|im_end|>\n";
const PROMPT: &str = "Explain the following: <INJECT>\n\nPlease provide an explanation.";
/// `<|im_end|>` (SmolLM2's EOS, pad and end of turn)
const IM_END: u32 = 2;
/// `の`: SmolLM2 has no single token in U+3200..=U+33FF, so the tests configure one.
const NO: u32 = 26453;

fn smollm2() -> (Tokenizer, ChatTemplate) {
    let g = gguf::read_gguf(&common::smollm2_gguf()).unwrap();
    (
        gguf::gguf_tokenizer(&g).unwrap(),
        ChatTemplate::from_gguf(&g).unwrap(),
    )
}

fn gqa_untied_dir() -> PathBuf {
    common::fixtures_dir().join("models/gqa_untied")
}

fn sample(prompt: &str, response: &str, vectors: Vec<Vec<f32>>) -> Sample {
    Sample {
        prompt: Some(prompt.into()),
        response: Some(response.into()),
        vectors,
        extra: Default::default(),
        source: RowSource {
            file: Arc::from(Path::new("/data/train.parquet")),
            row: 7,
        },
    }
}

fn limit(max_length: usize, truncation: Truncation) -> LengthLimit {
    LengthLimit {
        max_length,
        truncation,
    }
}

fn example(enc: &ActorEncoder, s: &Sample) -> ActorExample {
    enc.example(s).unwrap().example().unwrap()
}

/// The error's text, checked to name the sample's file and row.
fn row_error(e: Error) -> String {
    let msg = e.to_string();
    assert!(
        matches!(e, Error::Data { row: 7, .. }) && msg.contains("/data/train.parquet: row 7"),
        "{msg}"
    );
    msg
}

#[test]
fn smollm2_marker() {
    let (tok, _) = smollm2();
    let err = Marker::choose(&tok, "<INJECT>", None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("SmolLM2-135M-Instruct.Q4_1.gguf")
            && err.contains("\"<INJECT>\"")
            && err.contains("U+3200..=U+33FF"),
        "{err}"
    );
    let m = Marker::choose(&tok, "<INJECT>", Some(NO)).unwrap();
    assert_eq!(
        (m.text.as_str(), m.token.as_str(), m.id),
        ("<INJECT>", "の", NO)
    );
    assert_eq!(m.apply("a <INJECT> b <INJECT>"), "a の b の");
    // a configured text that is one token is used as it is
    let m = Marker::choose(&tok, "<jupyter_output>", None).unwrap();
    assert_eq!((m.token.as_str(), m.id), ("<jupyter_output>", 14));
    // an id whose text is several tokens' worth is refused
    assert!(Marker::choose(&tok, "<INJECT>", Some(1_000_000)).is_err());
}

#[test]
fn codepoint_marker_skips_special_tokens() {
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(gqa_untied_dir().join("tokenizer.json")).unwrap())
            .unwrap();
    let added = json["added_tokens"].as_array_mut().unwrap();
    for (id, content, special) in [(96, "㈀", true), (97, "㎡", false)] {
        added.push(
            serde_json::json!({"id": id, "content": content, "single_word": false,
            "lstrip": false, "rstrip": false, "normalized": false, "special": special}),
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    std::fs::write(&path, json.to_string()).unwrap();
    let tok = Tokenizer::from_file(&path).unwrap();
    let m = Marker::choose(&tok, "<INJECT>", None).unwrap();
    let cp = m.token.chars().next().unwrap() as u32;
    assert!(MARKER_CODEPOINTS.contains(&cp) && m.token.chars().count() == 1);
    assert_eq!((m.token.as_str(), m.id), ("㎡", 97));
    assert_eq!(tok.encode(&m.token, false).unwrap(), vec![97]);
}

#[test]
fn hf_tokenizer_without_cjk() {
    let path = gqa_untied_dir().join("tokenizer.json");
    let tok = Tokenizer::from_file(&path).unwrap();
    let err = Marker::choose(&tok, "<INJECT>", None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("gqa_untied/tokenizer.json") && err.contains("U+3200..=U+33FF"),
        "{err}"
    );
    let m = Marker::choose(&tok, "!", None).unwrap();
    assert_eq!((m.token.as_str(), m.id), ("!", 3));
    let m = Marker::choose(&tok, "<INJECT>", Some(59)).unwrap();
    assert_eq!((m.token.as_str(), m.id), (" the", 59));
}

#[test]
fn smollm2_chatml() {
    let (tok, tpl) = smollm2();
    assert!(!tpl.is_plain() && !tpl.prompt_special_tokens());
    assert_eq!(
        tpl.render_prompt("What is 2+2?").unwrap(),
        format!("{SYSTEM}<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    );
    assert_eq!(
        tpl.render_conversation("Hi", "Hello!").unwrap(),
        format!(
            "{SYSTEM}<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        )
    );
    assert_eq!(tpl.end_of_turn_id(&tok).unwrap(), IM_END);
    assert_eq!(tpl.pad_id(&tok).unwrap(), IM_END);
}

#[test]
fn smollm2_actor_example() {
    let (tok, tpl) = smollm2();
    let marker = Marker::choose(&tok, "<INJECT>", Some(NO)).unwrap();
    let opts = ActorOptions::new(limit(512, Truncation::Error));
    let enc = ActorEncoder::new(&tok, &tpl, &marker, opts.clone()).unwrap();
    assert_eq!(enc.end_id(), IM_END);
    let ex = example(&enc, &sample(PROMPT, "A cat sat.", vec![vec![1.0, 2.0]]));
    let prompt_text = format!(
        "{SYSTEM}<|im_start|>user\nExplain the following: の\n\nPlease provide an \
         explanation.<|im_end|>\n<|im_start|>assistant\n"
    );
    let response_text = "<explanation>\nA cat sat.\n</explanation>";
    assert_eq!(
        tok.decode(&ex.ids, false).unwrap(),
        format!("{prompt_text}{response_text}<|im_end|>")
    );
    let prompt_ids = tok.encode(&prompt_text, false).unwrap();
    let response_ids = tok.encode(response_text, false).unwrap();
    assert_eq!(ex.prompt_len, prompt_ids.len());
    assert_eq!(ex.ids[..ex.prompt_len], prompt_ids[..]);
    assert_eq!(ex.ids[ex.prompt_len..ex.ids.len() - 1], response_ids[..]);
    assert_eq!(*ex.ids.last().unwrap(), IM_END);
    // the loss covers exactly the response and the end token
    let ones: Vec<usize> = (0..ex.ids.len())
        .filter(|&i| ex.loss_mask[i] == 1)
        .collect();
    assert_eq!(ones, (ex.prompt_len..ex.ids.len()).collect::<Vec<_>>());
    // one site, at the marker
    assert_eq!(ex.sites.len(), 1);
    let p = ex.sites[0];
    assert_eq!(ex.ids[p], NO);
    assert!(tok
        .decode(&ex.ids[..p], false)
        .unwrap()
        .ends_with("user\nExplain the following: "));
    assert_eq!(ex.vectors, vec![vec![1.0, 2.0]]);

    // [V]: the end token is not a target
    let v = ActorEncoder::new(
        &tok,
        &tpl,
        &marker,
        ActorOptions {
            end_in_loss: false,
            ..opts.clone()
        },
    )
    .unwrap();
    let exv = example(&v, &sample(PROMPT, "A cat sat.", vec![vec![1.0, 2.0]]));
    assert_eq!(exv.ids, ex.ids);
    assert_eq!(*exv.loss_mask.last().unwrap(), 0);
    assert_eq!(
        exv.loss_mask[..ex.ids.len() - 1],
        ex.loss_mask[..ex.ids.len() - 1]
    );

    // the raw response, without explanation tags
    let raw = ActorEncoder::new(
        &tok,
        &tpl,
        &marker,
        ActorOptions {
            explanation_tag: None,
            ..opts
        },
    )
    .unwrap();
    let exr = example(&raw, &sample(PROMPT, "A cat sat.", vec![vec![1.0, 2.0]]));
    assert_eq!(
        tok.decode(&exr.ids[exr.prompt_len..], false).unwrap(),
        "A cat sat.<|im_end|>"
    );

    // the prompt alone, for generation
    let pr = enc
        .prompt(&sample(PROMPT, "", vec![vec![1.0, 2.0]]))
        .unwrap()
        .example()
        .unwrap();
    assert_eq!(pr.ids, prompt_ids);
    assert_eq!(
        (pr.prompt_len, pr.sites.clone()),
        (prompt_ids.len(), vec![p])
    );
    assert!(pr.loss_mask.iter().all(|&m| m == 0));
}

#[test]
fn actor_example_errors() {
    let (tok, tpl) = smollm2();
    let marker = Marker::choose(&tok, "<INJECT>", Some(NO)).unwrap();
    let enc = ActorEncoder::new(
        &tok,
        &tpl,
        &marker,
        ActorOptions::new(limit(512, Truncation::Error)),
    )
    .unwrap();
    // two markers, one vector
    let msg = row_error(
        enc.example(&sample("<INJECT> and <INJECT>", "x", vec![vec![0.0]]))
            .unwrap_err(),
    );
    assert!(
        msg.contains("2 marker token(s)") && msg.contains("1 vector(s)"),
        "{msg}"
    );
    // no marker
    let msg = row_error(
        enc.example(&sample("none", "x", vec![vec![0.0]]))
            .unwrap_err(),
    );
    assert!(msg.contains("0 marker token(s)"), "{msg}");
    // no prompt
    let mut s = sample(PROMPT, "x", vec![vec![0.0]]);
    s.prompt = None;
    row_error(enc.example(&s).unwrap_err());

    // a marker as the prompt's last token (plain template: nothing follows the prompt)
    let path = gqa_untied_dir();
    let htok = Tokenizer::from_file(&path.join("tokenizer.json")).unwrap();
    let plain = ChatTemplate::from_hf_dir(&path, &htok).unwrap();
    let bang = Marker::choose(&htok, "<INJECT>", Some(3)).unwrap();
    let henc = ActorEncoder::new(
        &htok,
        &plain,
        &bang,
        ActorOptions::new(limit(512, Truncation::Error)),
    )
    .unwrap();
    let msg = row_error(
        henc.example(&sample("Is it <INJECT>", "and", vec![vec![0.0]]))
            .unwrap_err(),
    );
    assert!(msg.contains("neither first nor last"), "{msg}");
}

#[test]
fn actor_truncation() {
    let (tok, tpl) = smollm2();
    let marker = Marker::choose(&tok, "<INJECT>", Some(NO)).unwrap();
    let s = sample(PROMPT, "A cat sat on the mat.", vec![vec![0.5]]);
    let enc_with = |max_length, truncation| {
        ActorEncoder::new(
            &tok,
            &tpl,
            &marker,
            ActorOptions::new(limit(max_length, truncation)),
        )
        .unwrap()
    };
    let full = example(&enc_with(512, Truncation::Error), &s);
    let (n, np, p) = (full.ids.len(), full.prompt_len, full.sites[0]);

    // exactly max_length is kept whole in every mode
    for mode in [
        Truncation::Error,
        Truncation::Skip,
        Truncation::Left,
        Truncation::Right,
    ] {
        assert_eq!(example(&enc_with(n, mode), &s), full);
    }
    // error: names the row and the lengths
    let msg = row_error(enc_with(n - 1, Truncation::Error).example(&s).unwrap_err());
    assert!(
        msg.contains(&format!("{n} tokens, more than max_length {}", n - 1)),
        "{msg}"
    );
    // skip: counted
    let mut counts = SkipCounts::default();
    let out = enc_with(n - 1, Truncation::Skip).example(&s).unwrap();
    assert_eq!(out, Outcome::Skipped(Skip::TooLong { len: n, max: n - 1 }));
    assert!(counts.take(out).is_none());
    assert_eq!(counts.too_long, 1);
    // right: the response is cut, the prompt kept
    let r = example(&enc_with(np + 2, Truncation::Right), &s);
    assert_eq!(r.ids, full.ids[..np + 2]);
    assert_eq!(r.loss_mask, full.loss_mask[..np + 2]);
    assert_eq!((r.prompt_len, r.sites.clone()), (np, vec![p]));
    // left: the start of the system prompt is cut, the sites move
    let l = example(&enc_with(n - 3, Truncation::Left), &s);
    assert_eq!(l.ids, full.ids[3..]);
    assert_eq!(l.loss_mask, full.loss_mask[3..]);
    assert_eq!((l.prompt_len, l.sites.clone()), (np - 3, vec![p - 3]));
    // never cut a marker away or to the prompt's edge
    for (max, mode) in [
        (n - p, Truncation::Left),
        (n - p - 1, Truncation::Left),
        (p, Truncation::Right),
        (p + 1, Truncation::Right),
    ] {
        let msg = row_error(enc_with(max, mode).example(&s).unwrap_err());
        assert!(
            msg.contains("would cut the marker"),
            "{max} {mode:?}: {msg}"
        );
    }
    // right truncation that leaves no response token
    let msg = row_error(enc_with(np, Truncation::Right).example(&s).unwrap_err());
    assert!(msg.contains("leaves no response token"), "{msg}");
}

#[test]
fn critic_text() {
    let tag = Some("explanation");
    assert_eq!(
        extract_explanation("<explanation>\n  A cat.\n</explanation>", tag),
        Some("A cat.")
    );
    assert_eq!(
        extract_explanation(
            "pre <explanation>one</explanation> <explanation>two</explanation>",
            tag
        ),
        Some("one")
    );
    assert_eq!(extract_explanation("A cat.", tag), None);
    assert_eq!(extract_explanation("<explanation>\nA cat", tag), None);
    assert_eq!(
        extract_explanation("</explanation><explanation>x", tag),
        None
    );
    assert_eq!(extract_explanation(" raw text ", None), Some(" raw text "));

    let (tok, _) = smollm2();
    let enc = CriticEncoder::new(
        &tok,
        CriticOptions::from_config(&CriticConfig::default(), limit(128, Truncation::Error)),
    );
    let expected = "Summary of the following text: <text>A cat sat.</text> <summary>";
    let response = "<explanation>\n A cat sat. \n</explanation>";
    assert_eq!(enc.text(response).unwrap(), expected);
    // SmolLM2's GGUF adds no BOS, so the special tokens change nothing here
    let ex = enc
        .example(&sample("", response, vec![vec![3.0, 4.0]]))
        .unwrap()
        .example()
        .unwrap();
    assert_eq!(ex.ids, tok.encode(expected, false).unwrap());
    assert_eq!(ex.target, vec![3.0, 4.0]);
    // a dataset response without tags is the explanation itself ([O] AR-SFT)
    let plain = enc
        .example(&sample("", "A cat sat.", vec![vec![3.0, 4.0]]))
        .unwrap()
        .example()
        .unwrap();
    assert_eq!(plain.ids, ex.ids);
    // an opened but unclosed tag is unparseable: counted, not an error
    let mut counts = SkipCounts::default();
    for bad in ["<explanation>\nA cat sat.", "x <explanation> A cat"] {
        let out = enc.example(&sample("", bad, vec![vec![0.0]])).unwrap();
        assert_eq!(out, Outcome::Skipped(Skip::Unparseable));
        assert!(counts.take(out).is_none());
    }
    assert_eq!(
        counts,
        SkipCounts {
            too_long: 0,
            unparseable: 2
        }
    );
    // one vector per critic example
    let msg = row_error(
        enc.example(&sample("", response, vec![vec![0.0], vec![1.0]]))
            .unwrap_err(),
    );
    assert!(msg.contains("exactly one vector"), "{msg}");

    // no tag, a prefix without `{explanation}`, no special tokens
    let v = CriticEncoder::new(
        &tok,
        CriticOptions {
            critic_prompt: Some("Text: ".into()),
            explanation_tag: None,
            add_special_tokens: false,
            limit: limit(128, Truncation::Error),
        },
    );
    let ids = v.ids("A cat sat.", None).unwrap().example().unwrap();
    let mut want = tok.encode("Text: ", false).unwrap();
    want.extend(tok.encode("A cat sat.", false).unwrap());
    assert_eq!(ids, want);
    assert_eq!(v.text("A cat sat.").unwrap(), "Text: A cat sat.");
}

#[test]
fn critic_truncation() {
    let (tok, _) = smollm2();
    let response = "<explanation>A long explanation of many words.</explanation>";
    let enc_with = |max_length, truncation| {
        CriticEncoder::new(
            &tok,
            CriticOptions::from_config(&CriticConfig::default(), limit(max_length, truncation)),
        )
    };
    let full = enc_with(512, Truncation::Error)
        .ids(response, None)
        .unwrap()
        .example()
        .unwrap();
    let n = full.len();
    let s = sample("", response, vec![vec![0.0]]);
    let ids = |max, mode| {
        enc_with(max, mode)
            .example(&s)
            .unwrap()
            .example()
            .map(|e| e.ids)
    };
    assert_eq!(ids(n, Truncation::Error), Some(full.clone()));
    assert_eq!(ids(5, Truncation::Left), Some(full[n - 5..].to_vec()));
    assert_eq!(ids(5, Truncation::Right), Some(full[..5].to_vec()));
    assert_eq!(
        enc_with(5, Truncation::Skip).example(&s).unwrap(),
        Outcome::Skipped(Skip::TooLong { len: n, max: 5 })
    );
    let msg = row_error(enc_with(5, Truncation::Error).example(&s).unwrap_err());
    assert!(msg.contains("more than max_length 5"), "{msg}");
    // a generated response has no row to name
    let e = enc_with(5, Truncation::Error)
        .ids(response, None)
        .unwrap_err();
    assert!(matches!(e, Error::Invalid { .. }), "{e}");
}

#[test]
fn actor_collation() {
    let (tok, tpl) = smollm2();
    let marker = Marker::choose(&tok, "<INJECT>", Some(NO)).unwrap();
    let enc = ActorEncoder::new(
        &tok,
        &tpl,
        &marker,
        ActorOptions::new(limit(512, Truncation::Error)),
    )
    .unwrap();
    let exs = vec![
        example(&enc, &sample(PROMPT, "Short.", vec![vec![1.0, 2.0]])),
        example(
            &enc,
            &sample(
                "Two: <INJECT> and <INJECT>.",
                "A much longer explanation with more tokens in it.",
                vec![vec![3.0, 4.0], vec![5.0, 6.0]],
            ),
        ),
    ];
    let pad = tpl.pad_id(&tok).unwrap();
    let ab = collate_actor(&exs, pad, None).unwrap();
    let t = exs.iter().map(|e| e.ids.len()).max().unwrap();
    assert_eq!((ab.batch.b, ab.batch.t, ab.a), (2, t, 2));
    assert_eq!(ab.batch.ids.len(), 2 * t);
    for (r, e) in exs.iter().enumerate() {
        let row = r * t;
        let n = e.ids.len();
        assert_eq!(ab.batch.ids[row..row + n], e.ids[..]);
        assert!(ab.batch.ids[row + n..row + t].iter().all(|&x| x == pad));
        for q in 0..t {
            let (target, m) = (ab.batch.targets[row + q], ab.batch.mask[row + q]);
            if q + 1 < n {
                assert_eq!(target, e.ids[q + 1]);
                // position q predicts token q+1: in the loss iff q+1 is a response token
                assert_eq!(m, if q + 1 >= e.prompt_len { 1.0 } else { 0.0 });
            } else {
                assert_eq!((target, m), (pad, 0.0));
            }
        }
        // the last prediction in the loss is the end token
        assert_eq!(ab.batch.targets[row + n - 2], IM_END);
        assert_eq!(ab.batch.mask[row + n - 2], 1.0);
    }
    let want_sites: Vec<u32> = exs
        .iter()
        .enumerate()
        .flat_map(|(r, e)| e.sites.iter().map(move |&p| (r * t + p) as u32))
        .collect();
    assert_eq!(ab.sites, want_sites);
    assert_eq!(ab.sites.len(), 3);
    assert_eq!(ab.vecs, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    // a fixed T
    let wide = collate_actor(&exs, pad, Some(t + 3)).unwrap();
    assert_eq!(wide.batch.t, t + 3);
    assert_eq!(wide.sites[2] as usize, (t + 3) + exs[1].sites[1]);
    assert!(collate_actor(&exs, pad, Some(t - 1)).is_err());
    assert!(collate_actor(&[], pad, None).is_err());
}

#[test]
fn critic_collation() {
    let exs = vec![
        CriticExample {
            ids: vec![5, 6, 7],
            target: vec![1.0, 2.0],
        },
        CriticExample {
            ids: vec![8],
            target: vec![3.0, 4.0],
        },
    ];
    let cb = collate_critic(&exs, 0, None).unwrap();
    assert_eq!((cb.b, cb.t, cb.a), (2, 3, 2));
    assert_eq!(cb.ids, vec![5, 6, 7, 8, 0, 0]);
    assert_eq!(cb.mask, vec![1.0, 1.0, 1.0, 1.0, 0.0, 0.0]);
    assert_eq!(cb.targets, vec![1.0, 2.0, 3.0, 4.0]);
    let mut bad = exs.clone();
    bad[1].target.push(5.0);
    assert!(collate_critic(&bad, 0, None).is_err());
}

#[test]
fn hf_plain_actor_example() {
    let dir = gqa_untied_dir();
    let tok = Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    // no tokenizer_config.json: plain, with the EOS of config.json
    let tpl = ChatTemplate::from_hf_dir(&dir, &tok).unwrap();
    assert!(tpl.is_plain() && tpl.prompt_special_tokens());
    assert_eq!(tpl.eos_token(), Some("</s>"));
    assert_eq!(tpl.render_prompt("Is it on?").unwrap(), "Is it on?");
    let marker = Marker::choose(&tok, "<INJECT>", Some(3)).unwrap();
    let mut opts = ActorOptions::new(limit(64, Truncation::Error));
    opts.explanation_tag = None;
    let enc = ActorEncoder::new(&tok, &tpl, &marker, opts).unwrap();
    let ex = example(
        &enc,
        &sample("Is it <INJECT> on?", "and the", vec![vec![0.0]]),
    );
    // <s> I s Ġi t Ġ ! Ġon ?
    let prompt = [1, 20, 46, 67, 47, 56, 3, 73, 17];
    assert_eq!(ex.ids[..prompt.len()], prompt);
    let mut response = tok.encode("and the", false).unwrap();
    response.push(2);
    assert_eq!(ex.ids[prompt.len()..], response[..]);
    assert_eq!((ex.prompt_len, ex.sites.clone()), (prompt.len(), vec![6]));
    assert_eq!(
        ex.loss_mask.iter().filter(|&&m| m == 1).count(),
        response.len()
    );
}

#[test]
fn hf_jinja_template() {
    let src = gqa_untied_dir();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        src.join("tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    let template = "{{ bos_token }}{% for m in messages %}\n\
                    {% if m['role'] == 'user' %}\n\
                    [U] {{ m['content'].strip() }}\n\
                    {% elif m['role'] == 'assistant' %}\n\
                    [A] {{ m['content'] }}{{ eos_token }}\n\
                    {% else %}{{ raise_exception('unknown role') }}{% endif %}\n\
                    {% endfor %}{% if add_generation_prompt %}[A] {% endif %}";
    let config = serde_json::json!({
        "bos_token": {"content": "<s>", "special": true},
        "eos_token": "</s>",
        "chat_template": template,
    });
    std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
    let tok = Tokenizer::from_file(&dir.path().join("tokenizer.json")).unwrap();
    let tpl = ChatTemplate::load(dir.path(), &tok).unwrap();
    assert!(!tpl.is_plain());
    // trim_blocks and lstrip_blocks as Hugging Face renders
    assert_eq!(
        tpl.render_prompt("  hello  ").unwrap(),
        "<s>[U] hello\n[A] "
    );
    assert_eq!(
        tpl.render_conversation("hello", "yes").unwrap(),
        "<s>[U] hello\n[A] yes</s>\n"
    );
    assert_eq!(tpl.end_of_turn_id(&tok).unwrap(), 2);
    assert_eq!(tpl.pad_id(&tok).unwrap(), 2);

    let failing = ChatTemplate::jinja(
        "{{ raise_exception('no system role') }}".into(),
        dir.path().join("tokenizer_config.json"),
        None,
        None,
        None,
    )
    .unwrap();
    let err = failing.render_prompt("x").unwrap_err().to_string();
    assert!(
        err.contains("no system role") && err.contains("tokenizer_config.json"),
        "{err}"
    );
    assert!(
        ChatTemplate::jinja("{% if %}".into(), PathBuf::from("t.json"), None, None, None).is_err()
    );
}
