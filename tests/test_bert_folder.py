"""A Hugging Face BERT encoder from a local folder (config.json, weights, vocab.txt), loaded by ptq's
own BERT module without `transformers`, quantized on the bundled sentences, and rebuilt by `ptq eval`."""
from __future__ import annotations

import json
import string

import numpy as np
import pytest
import torch

import ptq
from ptq import minilm
from ptq.cli import main
from ptq.errors import ModelError
from ptq.metrics import sentence_embeddings

CONFIG = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
          "intermediate_size": 64, "max_position_embeddings": 40, "layer_norm_eps": 1e-12, "hidden_act": "gelu",
          "type_vocab_size": 2, "architectures": ["BertModel"]}
WORDS = ["the", "a", "is", "of", "and", "to", "in", "it", "was", "on", "for", "with", "at", "by", "from"]


def vocab() -> list[str]:
    letters = list(string.ascii_lowercase)
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.punctuation, *WORDS, *letters, *("##" + c for c in letters)]


def hf_state(c: dict, rows: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under BertModel's key names, with the `bert.` prefix and a classifier of a task model."""
    g = torch.Generator().manual_seed(seed)
    d, f = c["hidden_size"], c["intermediate_size"]

    def t(*shape, s=0.2):
        return torch.randn(*shape, generator=g) * s

    sd = {"embeddings.word_embeddings.weight": t(rows, d, s=1.0), "embeddings.position_embeddings.weight": t(c["max_position_embeddings"], d),
          "embeddings.token_type_embeddings.weight": t(2, d), "embeddings.LayerNorm.weight": 1 + t(d, s=0.05),
          "embeddings.LayerNorm.bias": t(d, s=0.05)}
    for i in range(c["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        for name, (o, k) in {"attention.self.query": (d, d), "attention.self.key": (d, d), "attention.self.value": (d, d),
                             "attention.output.dense": (d, d), "intermediate.dense": (f, d), "output.dense": (d, f)}.items():
            sd[p + name + ".weight"], sd[p + name + ".bias"] = t(o, k), t(o, s=0.05)
        for name in ("attention.output.LayerNorm", "output.LayerNorm"):
            sd[p + name + ".weight"], sd[p + name + ".bias"] = 1 + t(d, s=0.05), t(d, s=0.05)
    return {"bert." + k: v for k, v in sd.items()} | {"classifier.weight": t(2, d), "classifier.bias": t(2)}


def write_folder(path, config=CONFIG, weights="pytorch_model.bin"):
    path.mkdir()
    words = vocab()
    (path / "config.json").write_text(json.dumps({**config, "vocab_size": len(words)}))
    (path / "vocab.txt").write_text("\n".join(words) + "\n")
    sd = hf_state(config, len(words))
    if weights.endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file(sd, str(path / weights))
    else:
        torch.save(sd, path / weights)
    return path, sd


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    folder, sd = write_folder(tmp_path_factory.mktemp("models") / "tiny-bert")
    qm = ptq.quantize(str(folder), "samples", "w8a8", calib_size=32, eval_data="samples:eval", eval_size=16,
                      overrides={"calibration.sensitivity_samples": 0, "calibration.verify_size": 8, "bias_correction.mode": "none"})
    return folder, sd, qm


def test_folder_quantizes_on_the_bundled_sentences(bert_folder):
    folder, sd, qm = bert_folder
    spec = qm.manifest.data["model"]
    assert spec["kind"] == "bert" and spec["folder"] == str(folder.resolve()) and spec["input_shape"] == [32, 2]
    assert spec["weights"] == str(folder.resolve() / "pytorch_model.bin")
    assert qm.manifest.tensor(next(op for op in qm.manifest.ops if op["kind"] == "embedding")["embedding"]["table"]).shape == (len(vocab()), 32)
    ver = qm.report["verification"]
    # level 2 end to end on a sentence-embedding model: the pooled embeddings, not an argmax of hidden states
    assert ver["verified"] and "embedding_cosine_min" in ver["numeric"] and "top1_agreement_decisive" not in ver["numeric"]
    assert ver["numeric"]["embedding_cosine_min"] >= 0.999  # measured 0.9999998
    fid = qm.report["fidelity"]
    assert fid["samples"] == 16 and fid["sentence_cosine"] >= 0.999  # measured 0.99996 on the held-out sentences
    assert "least sentence-embedding cosine" in qm.card()


def test_folder_model_is_the_hf_encoder_and_reads_safetensors_too(bert_folder, tmp_path):
    """The same weights as model.safetensors give the same module; the folder's tokenizer makes the ids."""
    folder, sd, qm = bert_folder
    other, _ = write_folder(tmp_path / "st", weights="model.safetensors")
    a = minilm.load_folder(folder, folder / "pytorch_model.bin", 16)
    b = minilm.load_folder(other, other / "model.safetensors", 16)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert torch.equal(a.position.detach(), sd["bert.embeddings.position_embeddings.weight"][:16] + sd["bert.embeddings.token_type_embeddings.weight"][0])
    x = minilm.WordPiece.from_folder(folder).encode(["The cat, Zoë."], tokens=16)
    ids = vocab()
    assert [ids[int(i)] for i, keep in x[0] if keep] == ["[CLS]", "the", "c", "##a", "##t", ",", "z", "##o", "##e", ".", "[SEP]"]
    with torch.no_grad():
        e = sentence_embeddings(a(torch.from_numpy(x)).numpy(), x)
    assert e.shape == (1, 32) and abs(np.linalg.norm(e) - 1) < 1e-9


def test_eval_rebuilds_the_folder_model(bert_folder, tmp_path, capsys):
    folder, _, qm = bert_folder
    out = tmp_path / "q"
    qm.save(out)
    assert main(["eval", str(out), "--data", "samples:eval", "--size", "8", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["samples"] == 8 and res["sentence_cosine"] >= 0.999


@pytest.mark.parametrize("make, fragment", [
    (lambda p: p.mkdir(), "has no config.json; give a Hugging Face BERT folder (config.json, model.safetensors or pytorch_model.bin, vocab.txt)"),
    (lambda p: write_folder(p, {**CONFIG, "model_type": "roberta"}),
     "config.json has model_type 'roberta'; ptq reads BERT encoders (model_type 'bert') from a folder"),
    (lambda p: write_folder(p, {**CONFIG, "hidden_act": "swish"}), "hidden_act 'swish' is not supported"),
])
def test_a_folder_ptq_cannot_read_is_one_line(tmp_path, capsys, make, fragment):
    folder = tmp_path / "m"
    make(folder)
    with pytest.raises(ModelError) as exc:
        ptq.quantize(str(folder), "samples", "w8a8")
    assert fragment in str(exc.value) and "\n" not in str(exc.value)
    assert main(["quantize", str(folder), "--out", str(tmp_path / "out")]) == 2
    assert fragment in capsys.readouterr().err and not (tmp_path / "out").exists()
