"""``llave-fast eval``: precision@1 of a saved model, MMEB-style.

Each query is scored against the candidate set (for the synthetic data and for MMEB-train
style files: every distinct target of the split); a hit is a top-1 candidate with the
query's target id.
"""

from __future__ import annotations

import torch

from .train import retrieval_eval


def evaluate_model(model_path: str, data: str = "synthetic", *, image_dir: str | None = None,
                   num_eval: int = 256, seed: int = 0, image_size: int = 64, batch: int = 64) -> dict:
    from .data import MMEBDataset, SyntheticDataset, retrieval_candidates
    from .model import LLaVEEmbedder

    model = LLaVEEmbedder.from_pretrained(model_path).eval()
    if data == "synthetic":
        ds = SyntheticDataset(num_eval, seed=seed, split="eval", image_size=image_size)
    else:
        ds = MMEBDataset(data.split(","), image_dir)
    rset = retrieval_candidates(ds, limit=num_eval)

    def embed(b):
        return model(b)

    with torch.no_grad():
        result = retrieval_eval(embed, model.processor, rset, batch)
    result.update(model=model_path, data=data)
    return result
