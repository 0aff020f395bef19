"""``--log-rows``: what each training process saw, for checking multi-process and resumed runs.

Every process appends JSON lines to ``OUTPUT_DIR/rows-rank<R>.jsonl``:

- ``{"rank": R, "num_rows": N, "tables": {name: sha256}}`` once per start (resumes add one):
  digests of the per-row tables every process must share (caption states of every row,
  read whole: a check for test-sized runs; identity codes, ELBO of Eq. 10: see :class:`~pogdiff.encode.encoded_dataset.EncodedDataset`; and the
  neighbour index and similarity of Eq. 8 and psi of Eq. 12 where the method has them);
- ``{"micro_step": m, "rows": [...]}`` per micro-batch: the dataset rows this process trained on;
- ``{"weights": sha256}`` at the end: a digest of the trained weights as this process holds them.

Under ``accelerate launch --num_processes P`` the rows of the P files at one micro-step
are disjoint and together form the global batch that one process with
``--train-batch-size P*B`` trains on at that micro-step; the table and weight digests
agree across files.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pogdiff.encode.cache import tensor_digest
from pogdiff.encode.encoded_dataset import EncodedDataset
from pogdiff.objectives.neighbours import NeighbourTable


class RowLog:
    """One process's ``rows-rank<R>.jsonl``, appended to."""

    def __init__(self, out: Path, rank: int, encoded: EncodedDataset, neighbours: NeighbourTable | None,
                 psi: torch.Tensor | None):
        self.path = Path(out) / f"rows-rank{rank}.jsonl"
        named = {"caption_index": encoded.caption_index, "identity": encoded.identity, "elbo": encoded.elbo}
        if neighbours is not None:
            named.update(neighbour_index=neighbours.index, neighbour_similarity=neighbours.similarity)
        if psi is not None:
            named["psi"] = psi
        tables = {name: tensor_digest(t.detach().cpu()) for name, t in named.items()}
        tables["caption_states"] = tensor_digest(encoded.caption_states(torch.arange(len(encoded))))
        self._write({"rank": rank, "num_rows": len(encoded), "tables": tables})

    def step(self, micro_step: int, rows: torch.Tensor) -> None:
        self._write({"micro_step": micro_step, "rows": rows.tolist()})

    def final_weights(self, model: torch.nn.Module) -> None:
        state = model.state_dict()
        self._write({"weights": tensor_digest(torch.cat([state[name].detach().float().cpu().flatten()
                                                         for name in sorted(state)]))})

    def _write(self, record: dict) -> None:
        with self.path.open("a") as file:
            file.write(json.dumps(record) + "\n")

