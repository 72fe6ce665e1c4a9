"""Fidelity of quantized outputs against FP32: agreement, KL, logit SQNR, accuracy."""
from __future__ import annotations

import numpy as np


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def fidelity(fp: np.ndarray, q: np.ndarray, labels: np.ndarray | None = None) -> dict:
    """Top-1/top-5 agreement (percent, FP32 top-1 as the label), mean KL(fp‖q), logit SQNR (dB)."""
    fp = np.asarray(fp, np.float64)
    fp = fp.reshape(len(fp), -1)  # an encoder's (N, T, D) hidden states count as one vector per sample
    q = np.asarray(q, np.float64).reshape(fp.shape)
    top1_fp = fp.argmax(-1)
    k = min(5, fp.shape[-1])
    top5_q = np.argsort(-q, axis=-1)[:, :k]
    lp, lq = _log_softmax(fp), _log_softmax(q)
    kl = float((np.exp(lp) * (lp - lq)).sum(-1).mean())
    noise = float(((fp - q) ** 2).sum())
    out = {
        "samples": int(fp.shape[0]),
        "top1_agreement": 100.0 * float((q.argmax(-1) == top1_fp).mean()),
        "top5_agreement": 100.0 * float((top5_q == top1_fp[:, None]).any(-1).mean()),
        "kl": kl,
        "sqnr_db": float(10 * np.log10((fp ** 2).sum() / noise)) if noise > 0 else float("inf"),
    }
    if labels is not None:
        labels = np.asarray(labels)
        out["accuracy"] = 100.0 * float((q.argmax(-1) == labels).mean())
        out["fp32_accuracy"] = 100.0 * float((top1_fp == labels).mean())
    return out


def sentence_embeddings(hidden: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Mean of the hidden states (N, T, D) over the tokens the packed inputs x (N, T, 2) keep (x[..., 1]
    is the attention mask), L2-normalised: sentence-transformers' pooling."""
    hidden = np.asarray(hidden, np.float64).reshape(len(x), x.shape[1], -1)
    mask = np.asarray(x[..., 1], np.float64)[..., None]
    e = (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
    return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-300)


def embedding_fidelity(fp: np.ndarray, q: np.ndarray) -> dict:
    """Sentence embeddings (N, D), L2-normalised, against their FP32 versions: the mean and least
    cosine per sentence, and the Spearman correlation of the two pairwise similarity matrices (upper
    triangles), which is what retrieval and clustering depend on."""
    from scipy.stats import spearmanr
    fp, q = np.asarray(fp, np.float64), np.asarray(q, np.float64)
    cos = (fp * q).sum(1)
    iu = np.triu_indices(len(fp), 1)
    rho = float(spearmanr((fp @ fp.T)[iu], (q @ q.T)[iu]).statistic) if len(fp) > 2 else float("nan")
    return {"sentence_cosine": float(cos.mean()), "sentence_cosine_min": float(cos.min()), "similarity_spearman": rho}
