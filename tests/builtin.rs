//! The built-in demo model: the byte-level tokenizer's ids, the HF folder it is saved as (read
//! back by the ordinary loaders: same logits, plain template with EOS and padding, marker id
//! 257), and a short pre-training run that learns.

use nla_engine::device::cpu::CpuDevice;
use nla_engine::device::{Device, View};
use nla_engine::model::builtin::{
    byte_tokenizer, demo_config, demo_texts, pretrain_demo, save_model_folder, DEMO_VOCAB, EOS_ID,
    INJECT_ID,
};
use nla_engine::model::{forward, load_model, ActivationSet, Batch, Model};
use nla_engine::nla::{ChatTemplate, Marker};

#[test]
fn byte_tokenizer_ids_and_round_trip() {
    let tok = byte_tokenizer().unwrap();
    assert_eq!(tok.vocab_size(true), DEMO_VOCAB);
    assert_eq!(tok.vocab_size(false), 256);
    let text = "héllo <INJECT>!";
    let ids = tok.encode(text, false).unwrap();
    // the UTF-8 bytes of "héllo " (é = C3 A9), the marker, then "!"
    assert_eq!(ids, vec![104, 0xC3, 0xA9, 108, 108, 111, 32, 257, 33]);
    assert_eq!(tok.encode(text, true).unwrap(), ids, "no BOS/EOS is added");
    assert_eq!(tok.decode(&ids, false).unwrap(), text);
    assert_eq!(tok.decode(&ids, true).unwrap(), "héllo !");
    assert_eq!(tok.token_to_id("<|endoftext|>"), Some(EOS_ID));
    assert_eq!(tok.token_to_id("<INJECT>"), Some(INJECT_ID));
    assert_eq!(
        tok.encode("a<|endoftext|>", false).unwrap(),
        vec![97, EOS_ID]
    );
    // every byte is its own id: control characters, space, newline and multi-byte characters
    let all: String = (0u32..0x80).filter_map(char::from_u32).collect::<String>() + "ÿ€😀\r\n";
    let ids = tok.encode(&all, false).unwrap();
    assert_eq!(
        ids,
        all.bytes().map(u32::from).collect::<Vec<_>>(),
        "id = byte value"
    );
    assert_eq!(tok.decode(&ids, false).unwrap(), all);
    for b in 0..=255u32 {
        let t = tok.id_to_token(b).unwrap();
        assert_eq!(tok.token_to_id(&t), Some(b));
        assert_eq!(t.chars().count(), 1, "byte {b} is one character: {t:?}");
    }
}

#[test]
fn demo_config_shape() {
    let cfg = demo_config().unwrap();
    assert_eq!(
        (
            cfg.vocab_size,
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.num_hidden_layers
        ),
        (258, 128, 384, 4)
    );
    assert_eq!(
        (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim
        ),
        (4, 2, 32)
    );
    assert_eq!(cfg.rope_theta, 1e4);
    assert_eq!(cfg.max_position_embeddings, 512);
    assert!(cfg.tie_word_embeddings);
    assert_eq!(cfg.eos_token_ids, vec![EOS_ID]);
}

fn logits(dev: &CpuDevice, model: &Model<CpuDevice>, rows: &[Vec<u32>]) -> Vec<f32> {
    let batch = Batch::causal_lm(rows).unwrap();
    let mut acts = ActivationSet::new(dev, &model.cfg, batch.b, batch.t).unwrap();
    forward(dev, model, &mut acts, &batch.upload(dev).unwrap()).unwrap();
    dev.download(View::all(&acts.logits)).unwrap()
}

#[test]
fn model_folder_round_trip() {
    let dev = CpuDevice::new();
    let tok = byte_tokenizer().unwrap();
    let model = Model::init_random(&dev, demo_config().unwrap(), 7, 0.02).unwrap();
    let dir = tempfile::tempdir().unwrap();
    save_model_folder(&dev, &model, &tok, dir.path()).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(dir.path().join(f).is_file(), "{f} written");
    }

    let (loaded, ltok) = load_model(&dev, dir.path()).unwrap();
    let ltok = ltok.expect("tokenizer.json is loaded with the model");
    assert_eq!(loaded.cfg, model.cfg);
    // f32 weights are saved as f32, so the loaded model is bit for bit the same model: same
    // logits exactly (same ops in the same order)
    assert_eq!(
        loaded.params_to_host(&dev).unwrap(),
        model.params_to_host(&dev).unwrap()
    );
    let rows = vec![
        vec![1, 72, 105, 33, 256, 257, 0, 200],
        vec![255, 254, 32, 10, 13, 97, 98, 99],
    ];
    let a = logits(&dev, &model, &rows);
    assert_eq!(a.len(), 2 * 8 * DEMO_VOCAB);
    assert!(a.iter().all(|x| x.is_finite()));
    assert_eq!(logits(&dev, &loaded, &rows), a);

    // the tokenizer read from the folder is the same tokenizer
    let text = "Tea, 2 cups — <INJECT> <|endoftext|>\n";
    let ids = tok.encode(text, false).unwrap();
    assert_eq!(ltok.encode(text, false).unwrap(), ids);
    assert_eq!(ltok.decode(&ids, false).unwrap(), text);
    assert_eq!(ltok.vocab_size(true), DEMO_VOCAB);

    // plain template, EOS and padding = <|endoftext|>, no BOS
    let tpl = ChatTemplate::load(dir.path(), &ltok).unwrap();
    assert!(tpl.is_plain());
    assert_eq!(tpl.eos_token(), Some("<|endoftext|>"));
    assert_eq!(tpl.pad_token(), Some("<|endoftext|>"));
    assert_eq!(tpl.bos_token(), None);
    assert_eq!(tpl.end_of_turn_id(&ltok).unwrap(), EOS_ID);
    assert_eq!(tpl.pad_id(&ltok).unwrap(), EOS_ID);
    // no cls token named: `cls` pooling appends the padding id
    assert_eq!(tpl.cls_id(&ltok).unwrap(), EOS_ID);
    // one named in tokenizer_config.json is appended instead; one not in the vocabulary is an
    // error that says so
    let cfg_path = dir.path().join("tokenizer_config.json");
    let text = std::fs::read_to_string(&cfg_path).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&text).unwrap();
    cfg["cls_token"] = "<INJECT>".into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let with_cls = ChatTemplate::load(dir.path(), &ltok).unwrap();
    assert_eq!(
        with_cls.cls_id(&ltok).unwrap(),
        ltok.token_to_id("<INJECT>").unwrap()
    );
    cfg["cls_token"] = "<CLS>".into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let e = ChatTemplate::load(dir.path(), &ltok)
        .unwrap()
        .cls_id(&ltok)
        .unwrap_err()
        .to_string();
    assert!(e.contains("cls") && e.contains("<CLS>"), "{e}");
    std::fs::write(&cfg_path, text).unwrap();
    assert_eq!(
        tpl.render_conversation("Explain <INJECT>:", "the cat")
            .unwrap(),
        "Explain <INJECT>:the cat"
    );

    // the marker is the <INJECT> token itself
    let m = Marker::choose(&ltok, "<INJECT>", None).unwrap();
    assert_eq!((m.token.as_str(), m.id), ("<INJECT>", INJECT_ID));
}

#[test]
fn save_needs_the_eos_token() {
    let dev = CpuDevice::new();
    let json = r#"{"version":"1.0","model":{"type":"WordLevel","vocab":{"a":0,"[UNK]":1},"unk_token":"[UNK]"}}"#;
    let inner = json
        .parse::<tokenizers::Tokenizer>()
        .expect("a valid tokenizer.json");
    let tok = nla_engine::model::Tokenizer::from_tokenizers(inner, "mem".into());
    let model = Model::init_random(&dev, demo_config().unwrap(), 0, 0.02).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let err = save_model_folder(&dev, &model, &tok, dir.path())
        .unwrap_err()
        .to_string();
    assert!(err.contains("<|endoftext|>"), "{err}");
}

#[test]
fn pretrain_learns_and_is_deterministic() {
    let dev = CpuDevice::new();
    let text = demo_texts().join("\n");
    let steps = 30;
    let mut losses = vec![];
    let model = pretrain_demo(&dev, &text, steps, 3, &mut |step, loss| {
        losses.push((step, loss))
    })
    .unwrap();
    assert_eq!(
        losses.iter().map(|l| l.0).collect::<Vec<_>>(),
        (1..=steps).collect::<Vec<_>>()
    );
    let uniform = (DEMO_VOCAB as f64).ln();
    let first = losses[0].1;
    // a random init with std 0.02 predicts close to uniform
    assert!((first - uniform).abs() < 0.1, "first loss {first}");
    // 30 steps learn at least the byte frequencies of English text (unigram entropy ~3 nats)
    let last: f64 = losses[steps as usize - 5..]
        .iter()
        .map(|l| l.1)
        .sum::<f64>()
        / 5.0;
    assert!(
        last < 3.3,
        "mean loss of the last 5 steps {last}; losses {losses:?}"
    );
    // the model sees held-in text better than uniform
    let row: Vec<u32> = text.as_bytes()[..128].iter().map(|&b| b as u32).collect();
    let batch = Batch::causal_lm(&[row]).unwrap();
    let mut acts = ActivationSet::new(&dev, &model.cfg, 1, 128).unwrap();
    let loss = forward(&dev, &model, &mut acts, &batch.upload(&dev).unwrap())
        .unwrap()
        .mean();
    assert!(loss < 3.3, "loss on the first window {loss}");

    // same seed, same steps: the same model
    let again = pretrain_demo(&dev, &text, 3, 3, &mut |_, _| {}).unwrap();
    let again2 = pretrain_demo(&dev, &text, 3, 3, &mut |_, _| {}).unwrap();
    assert_eq!(
        again.params_to_host(&dev).unwrap(),
        again2.params_to_host(&dev).unwrap()
    );

    let err = pretrain_demo(&dev, "too short", 1, 0, &mut |_, _| {})
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("needs more than one window"), "{err}");
}

#[test]
fn demo_corpus() {
    let texts = demo_texts();
    assert!((400..=600).contains(&texts.len()), "{} texts", texts.len());
    for t in &texts {
        assert!((40..=120).contains(&t.len()), "{t:?}");
        assert!(t.is_ascii(), "{t:?}");
    }
}
