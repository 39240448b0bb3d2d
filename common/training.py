"""The training loop every language model in the book uses.

It works with any model whose forward is ``model(idx, targets) -> (logits, loss)`` (the loss may
already include auxiliary terms such as an MoE load-balancing loss) and any data object with
``get_batch`` / ``val_batches`` / ``token_bytes`` (:class:`common.data.TokenData`).

    opt_cfg = TrainConfig(steps=500, batch_size=16, grad_accum=2, ckpt_dir="runs/lm/ckpt", ckpt_every=100)
    result = train(model, data, opt_cfg, device="cpu")
    print(result["val_loss"], result["val_bpb"])

What it does, in the order a step runs:

- the learning-rate multiplier :func:`lr_at` (linear warm-up, then constant and a linear warm-down,
  or a cosine decay),
- ``grad_accum`` micro-batches, each loss divided by ``grad_accum`` before ``backward``,
  under bf16 autocast where :func:`common.env.choose_dtype` says the device does it well,
- gradient clipping to ``grad_clip`` (global norm),
- one step of :func:`build_optimizer`'s Muon (2-D hidden matrices) + AdamW (everything else),
- every ``eval_every`` steps the validation loss and bits per byte (:func:`evaluate`),
- every ``ckpt_every`` steps, at the end, and on Ctrl-C or SIGTERM (which :mod:`common.runner`
  turns into the same ``KeyboardInterrupt``) a checkpoint (:mod:`common.checkpoint`) from which
  ``resume=True`` continues exactly as if never stopped.  Resuming checks first that the checkpoint
  exists, that it was made with the same model and training settings (naming the one that differs),
  and that ``steps`` lies beyond it.

Progress shows as a tqdm bar on a terminal and as plain lines in logs (:mod:`common.progress`).

Data parallel: started under ``torchrun --nproc_per_node N``, call :func:`setup_distributed` first;
``train`` then wraps the model in DistributedDataParallel and every rank takes its own rows of the
same global batch, so N processes with ``batch_size`` B follow one process with ``batch_size`` N*B.
"""

from __future__ import annotations

import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import checkpoint as ckpt
from common.data import bits_per_byte
from common.errors import UsageError
from common.progress import progress

# ----------------------------------------------------------------------------- optimizer


class MuonWithAdamW:
    """Two torch optimizers stepped as one: Muon for hidden matrices, AdamW for the rest.

    ``param_groups`` lists both optimizers' groups; each group carries ``base_lr``, the learning
    rate the schedule multiplies.
    """

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for opt in self.optimizers.values():
            opt.step()

    def state_dict(self) -> dict:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != set(self.optimizers):
            raise ValueError(
                f"optimizer state has {sorted(state)}, this optimizer has {sorted(self.optimizers)}"
            )
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])


def _embeddings_and_head(model: nn.Module) -> tuple[set[int], set[int]]:
    """ids of the embedding weights, and of the output head's weight (see :func:`split_parameters`)."""
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    vocab = max((m.num_embeddings for m in embeddings), default=None)
    to_vocab = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == vocab]
    return {id(m.weight) for m in embeddings}, ({id(to_vocab[-1].weight)} if to_vocab else set())


def split_parameters(
    model: nn.Module,
) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """(Muon parameters, AdamW parameters) by name.

    Muon takes the 2-D weight matrices of the hidden layers.  AdamW takes the embeddings (token and
    position), the output head, norms, biases, and anything not 2-D (e.g. stacked expert weights).
    The head is a weight tied to an embedding, or else the last ``nn.Linear`` whose outputs are the
    vocabulary (the largest embedding's size).
    """
    embedding_params, head_params = _embeddings_and_head(model)
    muon, adamw = [], []
    for name, p in model.named_parameters():  # tied parameters appear once
        if not p.requires_grad:
            continue
        is_matrix = p.ndim == 2 and id(p) not in embedding_params and id(p) not in head_params
        (muon if is_matrix else adamw).append((name, p))
    return muon, adamw


def build_optimizer(
    model: nn.Module,
    lr: float = 3e-3,
    muon_lr: float = 0.02,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.95),
    muon_momentum: float = 0.95,
    use_muon: bool = True,
    embedding_lr: float | None = None,
    head_lr: float | None = None,
) -> MuonWithAdamW:
    """AdamW (``lr``) for embeddings, head, norms, biases; ``torch.optim.Muon`` (``muon_lr``) for hidden
    matrices.  ``embedding_lr`` and ``head_lr`` give the embeddings and the output head AdamW groups of
    their own (nanochat's recipe: a large rate for the embedding, a small one for the unembedding); a
    head tied to the embedding is the embedding.

    Muon orthogonalises each matrix's momentum with a Newton-Schulz iteration (in bf16, as torch
    does) and scales the step by sqrt(max(1, rows/cols)) (its "original" adjustment).  Weight decay
    applies to the matrices only.  ``use_muon=False`` gives everything to AdamW, for comparison.
    """
    rates = {"lr": lr, "muon_lr": muon_lr, "embedding_lr": embedding_lr, "head_lr": head_lr}
    if any(v is not None and v <= 0 for v in rates.values()):
        raise ValueError(f"learning rates must be positive, got {rates}")
    muon_params, adamw_params = split_parameters(model)
    embedding_ids, head_ids = _embeddings_and_head(model)
    own = {"embedding": embedding_lr, "head": head_lr}

    def kind(p) -> str:
        if id(p) in embedding_ids and embedding_lr is not None:
            return "embedding"
        return "head" if id(p) in head_ids and head_lr is not None else "other"

    groups = [
        {"params": [p for _, p in adamw_params if kind(p) == k], "weight_decay": 0.0, "lr": own.get(k) or lr}
        for k in ("embedding", "head", "other")
    ]
    optimizers = {}
    if use_muon and muon_params:
        optimizers["muon"] = torch.optim.Muon(
            [p for _, p in muon_params], lr=muon_lr, weight_decay=weight_decay, momentum=muon_momentum
        )
    elif muon_params:
        groups.append({"params": [p for _, p in muon_params], "weight_decay": weight_decay})
    optimizers["adamw"] = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=1e-8)
    combined = MuonWithAdamW(optimizers)
    for group in combined.param_groups:
        group["base_lr"] = group["lr"]
    return combined


SCHEDULES = ("linear", "cosine")


def lr_at(
    step: int,
    total_steps: int,
    warmup_steps: int = 0,
    warmdown_steps: int = 0,
    final_ratio: float = 0.0,
    schedule: str = "linear",
) -> float:
    """Learning-rate multiplier at ``step`` (0-based).

    Both schedules rise linearly over the first ``warmup_steps`` steps to 1 (step 0 gets
    1/warmup_steps).  Then

    - ``"linear"`` (nanochat's): constant 1, and a linear warm-down over the last ``warmdown_steps``
      steps toward ``final_ratio``;
    - ``"cosine"`` (GPT-3's, and the book's reader project): half a cosine from 1 at the end of
      warm-up toward ``final_ratio`` at ``total_steps``; ``warmdown_steps`` must be 0.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if total_steps <= 0 or warmup_steps < 0 or warmdown_steps < 0:
        raise ValueError(
            f"need total_steps > 0 and non-negative warm-up/down, got {total_steps}, "
            f"{warmup_steps}, {warmdown_steps}"
        )
    if warmup_steps + warmdown_steps > total_steps:
        raise ValueError(
            f"warmup_steps + warmdown_steps = {warmup_steps + warmdown_steps} exceeds "
            f"total_steps = {total_steps}"
        )
    if schedule == "cosine" and warmdown_steps:
        raise ValueError(f"the cosine schedule decays over every step after warm-up, got {warmdown_steps=}")
    if not 0 <= step < total_steps:
        raise ValueError(f"step {step} outside [0, {total_steps})")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "cosine":
        progress = (step - warmup_steps) / (total_steps - warmup_steps)  # 0 after warm-up, < 1 at the end
        return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    steps_left = total_steps - step
    if steps_left <= warmdown_steps:
        progress = steps_left / warmdown_steps  # 1 at the start of warm-down, 1/warmdown at the last step
        return final_ratio + (1 - final_ratio) * progress
    return 1.0


# ----------------------------------------------------------------------------- distributed


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "cpu") -> DistContext:
    """Join the process group torchrun set up (gloo on CPU, nccl on CUDA); a no-op for a single process."""
    import torch.distributed as dist

    if sys.platform == "win32":  # torch's Windows builds have no libuv TCPStore, which torch >= 2.4 asks for
        os.environ.setdefault("USE_LIBUV", "0")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistContext(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return DistContext(rank, world_size, local_rank, device)


def cleanup_distributed() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _dist_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# ----------------------------------------------------------------------------- evaluation


def autocast_for(device: str, dtype: torch.dtype | str):
    """Autocast to ``dtype`` (a torch dtype or a ``--dtype`` name) on ``device``; nothing for fp32."""
    if isinstance(dtype, str):
        dtype = resolve_dtype(dtype, device)
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data,
    batch_size: int = 8,
    max_batches: int | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict:
    """Validation loss (nats per token) and bits per byte over ``data.val_batches``.

    The loss is the plain cross-entropy of the logits (no auxiliary terms).  Bits per byte sums the
    cross-entropy of the tokens that stand for text and divides by the bytes they encode, in bits;
    special tokens (``<|endoftext|>``, zero bytes) count in the loss but not in bits per byte.
    """
    was_training = model.training
    model.eval()
    total_nats, text_nats, n_tokens, n_bytes = 0.0, 0.0, 0, 0
    for x, y in data.val_batches(batch_size, max_batches):
        x, y = x.to(device), y.to(device)
        with autocast_for(device, dtype):
            logits, _ = model(x)
        nats = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")  # (batch*seq,)
        token_bytes = data.token_bytes.to(device)[y.flatten()]
        total_nats += nats.sum().item()
        text_nats += nats[token_bytes > 0].sum().item()
        n_tokens += y.numel()
        n_bytes += int(token_bytes.sum().item())
    model.train(was_training)
    if n_tokens == 0:
        raise ValueError("no validation batches: the validation split is shorter than one context window")
    return {"loss": total_nats / n_tokens, "bpb": bits_per_byte(text_nats, n_bytes), "tokens": n_tokens}


# ----------------------------------------------------------------------------- training


@dataclass
class TrainConfig:
    """Settings of one training run (``batch_size`` is per process and micro-batch)."""

    steps: int = 200
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 3e-3  # AdamW: embeddings, head, norms, biases
    muon_lr: float = 0.02  # Muon: hidden matrices
    embedding_lr: float | None = None  # None: lr
    head_lr: float | None = None  # None: lr
    use_muon: bool = True
    weight_decay: float = 0.0
    warmup_steps: int = 10
    schedule: str = "linear"  # after warm-up: "linear" (constant, then warm-down) | "cosine" (decay)
    warmdown_frac: float = 0.3  # "linear": share of the steps spent decaying the learning rate
    final_lr_ratio: float = 0.0
    grad_clip: float = 1.0  # 0 turns clipping off
    eval_every: int = 50  # 0: only at the end
    eval_batches: int = 8
    eval_batch_size: int | None = None
    ckpt_dir: str | None = None
    ckpt_every: int = 0  # 0: only at the end (and on Ctrl-C) when ckpt_dir is set
    resume: bool = False
    seed: int = 0  # seeds the batch sampler
    dtype: str = "auto"  # auto (common.env.choose_dtype) | fp32 | bf16 | fp16
    progress: bool = True
    find_unused_parameters: bool = False  # DDP: set for models that skip parameters (MoE experts)

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.warmdown_frac <= 1:
            raise ValueError(f"warmdown_frac must be in [0, 1], got {self.warmdown_frac}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.dtype not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"dtype must be auto, fp32, bf16 or fp16, got {self.dtype!r}")
        if self.resume and not self.ckpt_dir:
            raise ValueError("resume=True needs a ckpt_dir")

    @property
    def warmdown_steps(self) -> int:
        if self.schedule == "cosine":
            return 0
        return min(round(self.warmdown_frac * self.steps), self.steps - min(self.warmup_steps, self.steps))


# settings a resumed run may change: how long it runs, how often it evaluates and saves, where
RESUMABLE_CHANGES = {
    "steps",
    "eval_every",
    "eval_batches",
    "eval_batch_size",
    "ckpt_dir",
    "ckpt_every",
    "resume",
    "progress",
    "find_unused_parameters",
}


def model_config(model: nn.Module) -> dict | None:
    """The model's config as a dict (``model.config.to_dict()`` or a dataclass), or None."""
    config = getattr(model, "config", None)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    if config is not None and hasattr(config, "__dataclass_fields__"):
        return asdict(config)
    return None


def _check_settings(directory: str, model: nn.Module, cfg: TrainConfig, state: dict) -> None:
    extra = state.get("extra") or {}
    now_model, saved_model = model_config(model), extra.get("model_config")
    if now_model is not None and saved_model is not None:
        for key in sorted(set(now_model) & set(saved_model)):
            if now_model[key] != saved_model[key]:
                raise UsageError(
                    f"resume: the checkpoint in {directory} has a model with {key}={saved_model[key]!r}, "
                    f"this run asks for {key}={now_model[key]!r}; keep it, or use another output folder"
                )
    now_cfg, saved_cfg = asdict(cfg), extra.get("config") or {}
    for key in sorted((set(now_cfg) & set(saved_cfg)) - RESUMABLE_CHANGES):
        if now_cfg[key] != saved_cfg[key]:
            raise UsageError(
                f"resume: the checkpoint in {directory} was trained with {key}={saved_cfg[key]!r}, "
                f"this run asks for {key}={now_cfg[key]!r}; keep it, or use another output folder"
            )


def check_resumable(directory: str, model: nn.Module, cfg: TrainConfig) -> dict:
    """The checkpoint's state, after checking that ``cfg`` and ``model`` may continue it.

    Raises :class:`~common.errors.UsageError` naming what is wrong: no checkpoint, an unreadable
    one, a model or training setting that differs, or ``cfg.steps`` not beyond the checkpoint's step.
    """
    if not ckpt.has_checkpoint(directory):
        raise UsageError(f"resume: no complete checkpoint in {directory} to resume from")
    state = ckpt.read_state(directory)
    _check_settings(directory, model, cfg, state)
    if state["step"] >= cfg.steps:
        raise UsageError(
            f"resume: the checkpoint in {directory} is at step {state['step']}, so steps={cfg.steps} "
            f"leaves nothing to train; ask for more than {state['step']} steps"
        )
    return state


def resume_plan(model: nn.Module, cfg: TrainConfig) -> str:
    """What ``--resume`` does with one of several runs (a script's recipes or phases), decided before
    any of them trains: ``"start"`` where it never saved a checkpoint (it trains from step 0),
    ``"done"`` where its checkpoint is that of the finished run (same settings, ``cfg.steps`` reached:
    :func:`finished_run` gives its result), ``"resume"`` where :func:`check_resumable` accepts it;
    :class:`~common.errors.UsageError` otherwise.  A script refuses ``--resume`` only when every run
    would start (nothing was saved)."""
    if not ckpt.has_checkpoint(cfg.ckpt_dir):
        return "start"
    state = ckpt.read_state(cfg.ckpt_dir)
    if state["step"] == cfg.steps and (state.get("extra") or {}).get("result") is not None:
        _check_settings(cfg.ckpt_dir, model, cfg, state)
        return "done"
    check_resumable(cfg.ckpt_dir, model, cfg)
    return "resume"


def finished_run(model: nn.Module, cfg: TrainConfig, device: str = "cpu") -> dict:
    """The result :func:`train` returned for the finished run whose checkpoint is in ``cfg.ckpt_dir``
    (its history, validation figures and timing, as saved), with its weights loaded into ``model``."""
    try:
        state = ckpt.load_checkpoint(cfg.ckpt_dir, model, device=device)
    except (ckpt.CheckpointError, ValueError, RuntimeError) as e:
        raise UsageError(f"resume: {e}".splitlines()[0]) from e
    extra = state["extra"]
    return {**extra["history"], **extra["result"], "resumed_from": state["step"]}


def resolve_dtype(name: str, device: str) -> torch.dtype:
    from common.env import choose_dtype, torch_dtype

    if name == "auto":
        return choose_dtype(torch.device(device).type)[0]
    return torch_dtype(name)


def train(
    model: nn.Module, data, cfg: TrainConfig, device: str = "cpu", optimizer=None, callback=None
) -> dict:
    """Train ``model`` on ``data`` for ``cfg.steps`` optimizer steps; return the history and final figures.

    ``callback(step, record)`` runs after every step (``record``: loss, lr multiplier, grad norm);
    raising ``KeyboardInterrupt`` there (or pressing Ctrl-C, or SIGTERM under the runner) saves a
    checkpoint to resume from; the exception then carries ``checkpoint_dir`` and ``step``.
    Returns a dict: ``losses`` (train loss per step), ``lrs``, ``grad_norms``, ``val`` (one record per
    evaluation), ``val_loss``, ``val_bpb``, ``steps``, ``seconds``, ``tokens_per_second``, ``resumed_from``.
    """
    rank, world = _dist_world()
    model.to(device)
    raw_model = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(
            raw_model,
            device_ids=[torch.device(device).index] if device.startswith("cuda") else None,
            find_unused_parameters=cfg.find_unused_parameters,
        )
    dtype = resolve_dtype(cfg.dtype, device)
    scaler = torch.amp.GradScaler(torch.device(device).type) if dtype == torch.float16 else None
    optimizer = optimizer or build_optimizer(
        raw_model,
        cfg.lr,
        cfg.muon_lr,
        cfg.weight_decay,
        use_muon=cfg.use_muon,
        embedding_lr=cfg.embedding_lr,
        head_lr=cfg.head_lr,
    )
    sampler = torch.Generator().manual_seed(cfg.seed)
    history = {"losses": [], "lrs": [], "grad_norms": [], "val": []}
    start_step, resumed_from = 0, None
    if cfg.resume:
        check_resumable(cfg.ckpt_dir, raw_model, cfg)
        try:
            state = ckpt.load_checkpoint(cfg.ckpt_dir, raw_model, optimizer, device=device)
        except (ckpt.CheckpointError, ValueError, RuntimeError) as e:
            raise UsageError(f"resume: {e}".splitlines()[0]) from e
        ckpt.restore_rng_state(state["rng"], {"sampler": sampler})
        history = state["extra"]["history"]
        start_step = resumed_from = state["step"]

    def save(step: int, rng_state: dict, result: dict | None = None) -> None:
        if cfg.ckpt_dir and rank == 0:
            extra = {"history": history, "config": asdict(cfg), "model_config": model_config(raw_model)}
            if result is not None:  # the finished run: resume_plan calls it done
                extra["result"] = result
            ckpt.save_checkpoint(cfg.ckpt_dir, raw_model, optimizer, step, rng_state, extra)

    def run_eval(step: int) -> dict:
        result = evaluate(
            raw_model, data, cfg.eval_batch_size or cfg.batch_size, cfg.eval_batches, device, dtype
        )
        record = {"step": step, "loss": result["loss"], "bpb": result["bpb"]}
        history["val"].append(record)
        return record

    micro, rows = cfg.batch_size, slice(rank * cfg.batch_size, (rank + 1) * cfg.batch_size)
    warmdown = cfg.warmdown_steps
    bar = progress(total=cfg.steps, initial=start_step, desc="train", disable=not cfg.progress or rank != 0)
    rng_at_step = ckpt.capture_rng_state({"sampler": sampler})
    step, t0, tokens = start_step, time.perf_counter(), 0
    raw_model.train()
    try:
        while step < cfg.steps:
            mult = lr_at(
                step, cfg.steps, min(cfg.warmup_steps, cfg.steps), warmdown, cfg.final_lr_ratio, cfg.schedule
            )
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * mult
            step_loss = torch.zeros((), device=device)
            for k in range(cfg.grad_accum):
                x, y = data.get_batch("train", micro * world, generator=sampler, rows=rows)
                x, y = x.to(device), y.to(device)
                sync = nullcontext() if world == 1 or k == cfg.grad_accum - 1 else model.no_sync()
                with sync:
                    with autocast_for(device, dtype):
                        _, loss = model(x, y)
                    loss = loss / cfg.grad_accum
                    (scaler.scale(loss) if scaler else loss).backward()
                step_loss += loss.detach()
                tokens += x.numel()
            if scaler:
                for opt in optimizer.optimizers.values():
                    scaler.unscale_(opt)
            grad_norm = torch.nn.utils.clip_grad_norm_(
                raw_model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
            )
            if scaler:
                for opt in optimizer.optimizers.values():
                    scaler.step(opt)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if world > 1:
                import torch.distributed as dist

                dist.all_reduce(step_loss, op=dist.ReduceOp.AVG)
            step += 1
            rng_at_step = ckpt.capture_rng_state({"sampler": sampler})
            record = {"loss": step_loss.item(), "lr": mult, "grad_norm": grad_norm.item()}
            history["losses"].append(record["loss"])
            history["lrs"].append(mult)
            history["grad_norms"].append(record["grad_norm"])
            if not math.isfinite(record["loss"]):
                bar.write(f"step {step}: loss is {record['loss']}, stopping (diverged)")
                break
            postfix = {"loss": f"{record['loss']:.3f}", "lr": f"{mult:.2f}"}
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                val = run_eval(step)
                postfix["val"] = f"{val['loss']:.3f}"
                if cfg.progress and rank == 0:
                    bar.write(
                        f"step {step:>5}: train loss {record['loss']:.4f}  val loss {val['loss']:.4f}  "
                        f"val bpb {val['bpb']:.4f}"
                    )
            bar.set_postfix(postfix)
            bar.update(1)
            if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step < cfg.steps:
                save(step, rng_at_step)
            if callback is not None:
                callback(step, record)
        bar.close()
        seconds = time.perf_counter() - t0
        final = run_eval(step)
        result = {
            "val_loss": final["loss"],
            "val_bpb": final["bpb"],
            "steps": step,
            "seconds": seconds,
            "tokens_per_second": tokens * world / max(seconds, 1e-9),
        }
        save(step, rng_at_step, result if step == cfg.steps else None)
    except KeyboardInterrupt as e:
        # weights and optimizer are those after `step` completed steps; the RNGs are as they were then
        save(step, rng_at_step)
        bar.close()
        if cfg.ckpt_dir and rank == 0:
            e.checkpoint_dir, e.step = cfg.ckpt_dir, step
            print(f"\ninterrupted at step {step}: checkpoint saved to {cfg.ckpt_dir}", flush=True)
        raise
    return {**history, **result, "resumed_from": resumed_from}
