"""Exact multi-token joint decoding (MTJD) by enumeration — the quality ceiling MTAD approximates.

Every γ-block's joint log-probability under the target, Σ log p(x_i | ctx, x_<i) (raw
conditionals), is computed by enumerating all V^γ blocks, and the block is drawn from that joint
*processed at block level* with the request's temperature / top-k / top-p (top-k keeps the k most
probable blocks). With per-token processing the joint would just be ancestral sampling again;
at block level it concentrates on blocks with high joint likelihood, which is what MTJD is for.
Only feasible for tiny vocabularies (tests); real models use beam sampling on the target instead.
"""

from __future__ import annotations

import torch

from specdecode.errors import InvalidSettingError
from specdecode.propose.base import Draft, Proposer
from specdecode.sampling import SamplingSettings, process_logits, sample

MAX_BLOCKS = 50_000


def exact_joint_feasible(vocab_size: int, depth: int) -> bool:
    return vocab_size ** depth <= MAX_BLOCKS


class ExactJointProposer(Proposer):
    def __init__(self, model: torch.nn.Module, sampling: SamplingSettings, generator: torch.Generator | None,
                 depth: int = 4) -> None:
        super().__init__()
        if depth < 1:
            raise InvalidSettingError(f"gamma (block length) must be >= 1, got {depth}")
        vocab = int(model.get_output_embeddings().weight.shape[0])
        if not exact_joint_feasible(vocab, depth):
            raise InvalidSettingError(
                f"exact MTJD enumerates vocab^gamma = {vocab}^{depth} blocks (limit {MAX_BLOCKS}); use exact=False")
        self.model, self.sampling, self.generator, self.depth, self.vocab = model, sampling, generator, depth, vocab

    def block_log_probs(self, sequence: list[int], depth: int) -> tuple[torch.Tensor, torch.Tensor]:
        """All blocks ``[V^depth, depth]`` and their joint log-probabilities under the raw target."""
        device = next(self.model.parameters()).device
        blocks = torch.zeros(1, 0, dtype=torch.long, device=device)
        joint = torch.zeros(1, dtype=torch.float64, device=device)
        context = torch.tensor(sequence, device=device)
        for _ in range(depth):
            batch = torch.cat([context.expand(len(blocks), -1), blocks], dim=1)
            log_p = torch.log_softmax(self.model(batch).logits[:, -1].double(), dim=-1)
            self.stats.forwards += 1
            joint = (joint[:, None] + log_p).reshape(-1)
            tokens = torch.arange(self.vocab, device=device).repeat(len(blocks))
            blocks = torch.cat([blocks.repeat_interleave(self.vocab, dim=0), tokens[:, None]], dim=1)
        return blocks, joint

    def propose(self, sequence: list[int], max_tokens: int) -> Draft:
        depth = min(self.depth, max_tokens)
        if depth < 1:
            return Draft()
        blocks, joint = self.block_log_probs(sequence, depth)
        choice = sample(process_logits(joint, self.sampling), self.generator)
        self.stats.proposed += depth
        return Draft(tokens=blocks[choice].tolist())
