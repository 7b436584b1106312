"""Training a draft head on feature data, and measuring it the way decoding will use it.

Loss: forward KL from the target's distribution over the draft vocabulary (recomputed from the
stored hidden states with the target's own head rows: exact, not a top-k sketch) to the head's,
optionally plus a smooth-L1 regression of the predicted feature onto the target's (EAGLE-1's
recipe) and a cross-entropy on the target's top token (greedy drafting is judged on that token
alone; the KL also spends a small head's capacity on the tail). Training-time test (EAGLE-3): the head is unrolled for ``unroll`` steps; step s at
position t reads the feature the head predicted at step s-1 for position t, and sees the real
entries up to position t-s+1 plus its own chain — exactly what draft step s sees at decoding
time. Windows of several sequences are packed into one row with a block-diagonal mask.

Resumable within a wall-clock budget: a checkpoint holds the weights, the optimiser, the step
and the elapsed time.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from specdecode.distill.head_data import FeatureSequence
from specdecode.errors import InvalidSettingError
from specdecode.models.cache import KVCache
from specdecode.models.draft_head import DraftHead
from specdecode.models.tree import tree_attention_mask
from specdecode.propose.eagle import EagleProposer
from specdecode.sampling import SamplingSettings


@dataclass
class HeadTrainSettings:
    budget_s: float = 1800.0
    max_steps: int = 100_000
    windows: int = 8            # windows per step, packed into one row
    window: int = 128           # positions per window
    unroll: int = 3             # training-time test depth
    lr: float = 1e-3
    warmup: int = 20
    feature_weight: float = 0.0  # weight of the feature regression term (0: KL only)
    argmax_weight: float = 0.0  # weight of the cross-entropy on the target's top token (0: KL only)
    answer_bias: float = 0.7    # share of windows that start near the answer (where drafting happens)
    seed: int = 0
    checkpoint_every_s: float = 120.0

    def validate(self) -> None:
        for name in ("windows", "window", "unroll", "max_steps"):
            if getattr(self, name) < 1:
                raise InvalidSettingError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.budget_s <= 0 or self.lr <= 0 or self.feature_weight < 0 or self.argmax_weight < 0:
            raise InvalidSettingError("budget and learning rate must be positive, loss weights not negative")


@dataclass
class HeadTrainLog:
    steps: int = 0
    seconds: float = 0.0
    positions: int = 0
    losses: list[float] = field(default_factory=list)       # total per step
    kl_by_step: list[list[float]] = field(default_factory=list)  # per unroll step, every 10 steps


def _windows(sequences: list[FeatureSequence], settings: HeadTrainSettings, rng: random.Random) -> list[tuple[int, int, int]]:
    """(sequence, first position t, length) of each window; positions t use (h_t, x_{t+1}) → h_{t+1}."""
    usable = [i for i, s in enumerate(sequences) if len(s.ids) >= 4]
    weights = [len(sequences[i].ids) for i in usable]
    chosen = rng.choices(usable, weights=weights, k=settings.windows)
    out = []
    for i in chosen:
        seq = sequences[i]
        positions = len(seq.ids) - 2             # t in [0, T-3]
        length = min(settings.window, positions)
        low = 0
        if rng.random() < settings.answer_bias:
            low = min(max(0, seq.prompt_len - length // 4), positions - length)
        out.append((i, rng.randint(low, positions - length), length))
    return out


def _unroll_mask(head: DraftHead, layout: list[tuple[int, int]], positions: torch.Tensor, step: int) -> object:
    """Visibility for unroll step ``step`` (1-based) over the entries of steps 1..step."""
    window = torch.cat([torch.full((length,), b) for b, (_, length) in enumerate(layout)])
    local = torch.cat([torch.arange(length) for _, length in layout])
    same = window[:, None] == window[None, :]
    blocks = [same & (local[None, :] <= local[:, None] - step + 1)]
    blocks += [same & (local[None, :] == local[:, None] - step + j) for j in range(2, step + 1)]
    visible = torch.cat(blocks, dim=1)
    keys = positions.repeat(step)
    return tree_attention_mask(head.layers, 0, keys, visible, positions)


def head_loss(head: DraftHead, sequences: list[FeatureSequence], picks: list[tuple[int, int, int]],
              settings: HeadTrainSettings) -> tuple[torch.Tensor, list[float]]:
    """Mean over unroll steps of the KL (+ weighted feature regression and top-token cross-entropy)
    on packed windows."""
    dtype = head.fc.weight.dtype
    h_in = torch.cat([sequences[i].hidden[t: t + n] for i, t, n in picks]).to(dtype)
    h_out = torch.cat([sequences[i].hidden[t + 1: t + 1 + n] for i, t, n in picks]).to(dtype)
    ids = torch.cat([sequences[i].ids[t + 1: t + 1 + n] for i, t, n in picks]).long()
    positions = torch.cat([torch.arange(t, t + n) for _, t, n in picks])
    local = torch.cat([torch.arange(n) for *_, n in picks])
    starts = torch.cumsum(torch.tensor([0] + [n for *_, n in picks[:-1]]), 0)
    with torch.no_grad():
        log_p = torch.log_softmax(head.logits(h_out), dim=-1)
    kv = KVCache()
    features = h_in
    total = torch.zeros((), dtype=dtype)
    kls = []
    for step in range(1, settings.unroll + 1):
        if step > 1:  # position t reads the feature predicted for it at the previous step (at t - 1)
            shifted = torch.roll(features, 1, dims=0)
            shifted[starts] = 0
            features = shifted
        mask = _unroll_mask(head, [(0, n) for *_, n in picks], positions, step)
        predicted = head(features[None], ids[None], kv, position_ids=positions[None], attention_mask=mask)[0]
        valid = local >= step - 1
        log_q = torch.log_softmax(head.logits(predicted[valid]), dim=-1)
        kl = (log_p[valid].exp() * (log_p[valid] - log_q)).sum(-1).mean()
        loss = kl
        if settings.feature_weight:
            loss = loss + settings.feature_weight * F.smooth_l1_loss(predicted[valid], h_out[valid])
        if settings.argmax_weight:
            loss = loss + settings.argmax_weight * F.nll_loss(log_q, log_p[valid].argmax(-1))
        total = total + loss / settings.unroll
        kls.append(float(kl.detach()))
        features = predicted
    return total, kls


def train_head(head: DraftHead, sequences: list[FeatureSequence], settings: HeadTrainSettings,
               checkpoint: str | Path | None = None, progress: bool = True) -> HeadTrainLog:
    """Train ``head`` in place (its lent rows and embedding stay frozen) within ``settings.budget_s``."""
    settings.validate()
    if not sequences:
        raise InvalidSettingError("no training sequences")
    params = [p for p in head.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    log = HeadTrainLog()
    ckpt = Path(checkpoint) if checkpoint else None
    if ckpt is not None and ckpt.is_file():
        state = torch.load(ckpt)
        if _recipe(state["settings"]) != _recipe(asdict(settings)):
            raise InvalidSettingError(f"checkpoint {ckpt} was written with other settings; delete it to restart")
        head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        log = HeadTrainLog(**state["log"])
    rng = random.Random(settings.seed + log.steps)
    head.train()
    started, saved = time.perf_counter() - log.seconds, time.perf_counter()
    bar = tqdm(total=int(settings.budget_s), initial=int(log.seconds), desc="train head", unit="s",
               disable=not progress)
    while log.steps < settings.max_steps and time.perf_counter() - started < settings.budget_s:
        fraction = (time.perf_counter() - started) / settings.budget_s
        factor = min(1.0, (log.steps + 1) / settings.warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, fraction)))
        for group in optimizer.param_groups:
            group["lr"] = settings.lr * max(factor, 0.02)
        picks = _windows(sequences, settings, rng)
        loss, kls = head_loss(head, sequences, picks, settings)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        log.steps += 1
        log.positions += sum(n for *_, n in picks)
        log.losses.append(round(float(loss.detach()), 4))
        if log.steps % 10 == 0:
            log.kl_by_step.append([round(k, 4) for k in kls])
        now = time.perf_counter()
        log.seconds = now - started
        bar.update(int(log.seconds) - bar.n)
        bar.set_postfix(step=log.steps, loss=f"{sum(log.losses[-20:]) / len(log.losses[-20:]):.3f}")
        if ckpt is not None and now - saved > settings.checkpoint_every_s:
            _save_checkpoint(ckpt, head, optimizer, settings, log)
            saved = now
    bar.close()
    if ckpt is not None:
        _save_checkpoint(ckpt, head, optimizer, settings, log)
    head.eval()
    return log


def _recipe(settings: dict) -> dict:
    """The settings a resumed run must share with the checkpoint (its budget may grow)."""
    return {k: v for k, v in settings.items() if k not in ("budget_s", "max_steps", "checkpoint_every_s")}


def _save_checkpoint(path: Path, head: DraftHead, optimizer, settings: HeadTrainSettings, log: HeadTrainLog) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"head": head.state_dict(), "optimizer": optimizer.state_dict(), "settings": asdict(settings),
                "log": asdict(log)}, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").rename(path)


@dataclass
class ChainReplay:
    """Greedy chain decoding replayed on recorded answers: per target verification, how many
    tokens were drafted and how many of them the target kept; and the head steps spent."""
    drafted: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    tokens: int = 0
    head_steps: int = 0

    @property
    def tau(self) -> float:
        """Tokens per target forward."""
        return self.tokens / max(1, len(self.drafted))

    def acceptance_by_position(self, gamma: int) -> list[float]:
        """Share of drafts reaching draft position k whose token there was kept."""
        reached, kept = [0] * gamma, [0] * gamma
        for drafted, accepted in zip(self.drafted, self.accepted):
            for k in range(min(accepted + 1, drafted)):
                reached[k] += 1
                kept[k] += k < accepted
        return [round(a / max(1, r), 3) for a, r in zip(kept, reached)]


@torch.inference_mode()
def replay_chain(head: DraftHead, sequences: list[FeatureSequence], gamma: int,
                 min_confidence: float = 0.0) -> ChainReplay:
    """Greedy chain drafting by the runtime's own ``EagleProposer`` on greedy answers with their
    target features. No target forward runs: greedy decoding emits the recorded answer whatever
    is drafted, so the features each verification would return are the recorded ones."""
    replay = ChainReplay()
    for seq in sequences:
        ids, hidden = seq.ids.long().tolist(), seq.hidden.to(head.fc.weight.dtype)
        if len(ids) - seq.prompt_len < 2:
            continue
        proposer = EagleProposer(head, SamplingSettings(), None, gamma, min_confidence)
        proposer.on_prefill(hidden[: seq.prompt_len - 1])
        n = seq.prompt_len
        while n < len(ids):
            draft = proposer.propose(ids[:n], len(ids) - n - 1).tokens  # as the engine: room for the bonus token
            accepted = 0
            while accepted < len(draft) and draft[accepted] == ids[n + accepted]:
                accepted += 1
            proposer.observe_hidden(hidden[n - 1: n + accepted])
            n += accepted + 1
            replay.drafted.append(len(draft))
            replay.accepted.append(accepted)
            replay.tokens += accepted + 1
        replay.head_steps += proposer.stats.forwards
    return replay


@torch.inference_mode()
def evaluate_head(head: DraftHead, sequences: list[FeatureSequence], gamma: int = 5) -> dict[str, float]:
    """On greedy answers with their target features: first-draft-token agreement, and greedy chain
    decoding replayed step by step (τ = tokens per target forward, acceptance by draft position)."""
    hits = total = 0
    head.eval()
    for seq in sequences:
        ids, hidden = seq.ids.long().tolist(), seq.hidden.to(head.fc.weight.dtype)
        if len(ids) - seq.prompt_len < 2:
            continue
        predicted = head(hidden[None], torch.tensor([ids[1:]]))[0]       # entry t predicts x_{t+2}
        guess = head.vocab_ids[head.logits(predicted).argmax(-1)].tolist()
        for t in range(max(0, seq.prompt_len - 2), len(ids) - 2):
            hits += guess[t] == ids[t + 2]
            total += 1
    chain = replay_chain(head, sequences, gamma)
    return {"first_token_agreement": round(hits / max(1, total), 4), "tau": round(chain.tau, 3),
            "acceptance_by_position": chain.acceptance_by_position(gamma), "answer_positions": total}
